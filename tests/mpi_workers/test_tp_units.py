"""Tensor parallelism without MPI: rank groups, shape checks, config, plan and launcher."""

from __future__ import annotations

import pytest

from contract.config import ConfigError, load_config
from contract.plan import plan_deployment
from hpcserve.launcher import find_mpirun, mpi_launcher
from mpi_workers.engine.torch.layers import TpGroup, kv_head_range, vocab_shard
from mpi_workers.ranks import resolve_rank_group


class FakeComm:
    """Just enough of an mpi4py communicator for `resolve_rank_group`."""

    def __init__(self, rank: int, size: int) -> None:
        self.rank, self.size = rank, size
        self.split_args: tuple[int, int] | None = None

    def Get_rank(self) -> int:
        return self.rank

    def Get_size(self) -> int:
        return self.size

    def Split(self, color: int, key: int) -> str:
        self.split_args = (color, key)
        return f"comm-{color}"


def config(*overrides: str):
    return load_config(None, list(overrides), environ={})


def test_tp_is_accepted_but_disaggregated_roles_still_rejected() -> None:
    assert config("workers.0.tp=3").workers[0].tp == 3
    with pytest.raises(ConfigError, match=r"workers\.0\.role"):
        config("workers.0.role=prefill", "workers.0.tp=2")
    with pytest.raises(ConfigError, match=r"workers\.0\.tp: .*engine.kind torch or trtllm"):
        config("workers.0.tp=2", "engine.kind=mocker")


def test_one_world_per_instance() -> None:
    cfg = config("workers.0.tp=3")
    ranks = resolve_rank_group(cfg, 0, 0, FakeComm(2, 3))
    assert (ranks.role, ranks.group, ranks.rank, ranks.size, ranks.is_leader) == (
        "agg", 0, 2, 3, False
    )  # fmt: skip
    assert resolve_rank_group(cfg, 0, 0, FakeComm(0, 3)).is_leader


def test_tp1_needs_no_mpi() -> None:
    ranks = resolve_rank_group(config(), 0, 0)
    assert (ranks.rank, ranks.size, ranks.comm) == (0, 1, None)


def test_one_world_split_into_every_instance() -> None:
    cfg = config("workers=[{tp: 2, count: 2}, {tp: 3}]")
    comm = FakeComm(5, 7)  # ranks 0-1: g0 i0, 2-3: g0 i1, 4-6: g1 i0
    ranks = resolve_rank_group(cfg, 0, 0, comm)
    assert (ranks.group, ranks.index, ranks.rank, ranks.size) == (1, 0, 1, 3)
    assert ranks.leader_world_rank == 4 and comm.split_args == (2, 5)


def test_wrong_world_size_names_the_field() -> None:
    with pytest.raises(ConfigError, match=r"workers\.0\.tp: the MPI world has 2 rank\(s\)"):
        resolve_rank_group(config("workers.0.tp=3"), 0, 0, FakeComm(0, 2))


def test_kv_heads_split_or_replicated() -> None:
    assert [kv_head_range(4, TpGroup(r, 2)) for r in range(2)] == [(0, 2), (2, 2)]
    assert [kv_head_range(2, TpGroup(r, 4)) for r in range(4)] == [(0, 1), (0, 1), (1, 1), (1, 1)]


def test_vocab_shards_cover_the_vocabulary_with_padding() -> None:
    assert [vocab_shard(130, TpGroup(r, 4)) for r in range(4)] == [(0, 33), (33, 33), (66, 33),
                                                                  (99, 33)]  # fmt: skip


def test_plan_wraps_tp_workers_in_mpirun_only_when_asked() -> None:
    cfg = config(
        "workers.0.tp=3", "frontend.port=8000",
        "services.etcd.endpoint=http://127.0.0.1:2379", "services.nats.endpoint=nats://x:4222",
    )  # fmt: skip
    kwargs = dict(config_file="/run/c.yaml", run_dir="/run", python="py")
    local = plan_deployment(cfg, **kwargs, mpi_launcher=("mpirun", "-x"))
    worker = next(p for p in local if p.group == 0)
    assert worker.argv[:4] == ("mpirun", "-x", "-n", "3") and worker.ranks == 3
    assert worker.argv[4:7] == ("py", "-m", "mpi_workers")
    slurm = next(p for p in plan_deployment(cfg, **kwargs) if p.group == 0)
    assert slurm.argv[0] == "py" and slurm.ranks == 3  # srun starts the ranks itself


def test_mpi_launcher_detects_the_implementation(tmp_path) -> None:
    hydra = mpi_launcher(find_mpirun())
    assert hydra[1:] == ("-disable-auto-cleanup",)
    fake = tmp_path / "mpirun"
    fake.write_text("#!/bin/sh\necho 'mpirun (Open MPI) 4.1.6'\n")
    fake.chmod(0o755)
    openmpi = mpi_launcher(str(fake))
    assert "--oversubscribe" in openmpi and "--bind-to" in openmpi
