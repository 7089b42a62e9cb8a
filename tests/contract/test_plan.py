"""The deployment plan is a pure function of the resolved config."""

from __future__ import annotations

from pathlib import Path

import pytest

from contract.config import ConfigError, load_config
from contract.plan import (
    FRONTEND_PROCESS_ENV,
    LOAD_TABLE_ENV,
    MAX_AUTO_FRONTEND_PROCESSES,
    METRICS_DIR_ENV,
    RANKS_HERE_ENV,
    ROTATION_FILE_ENV,
    TRTLLM_LAUNCHER,
    cpu_threads_per_rank,
    find_binary,
    frontend_processes,
    load_table_file,
    needs_mpi_launcher,
    plan_deployment,
    remove_frontend_shared_files,
    rotation_file,
    worker_ranks_here,
)

REPO = Path(__file__).resolve().parents[2]


def resolved(*overrides: str):
    return load_config(
        REPO / "configs" / "local-agg.yaml",
        [
            "services.etcd.endpoint=http://127.0.0.1:2379",
            "services.nats.endpoint=nats://127.0.0.1:4222",
            "model.path=/models/m",
            "frontend.workers=1",  # the automatic count depends on the machine's cores
            *overrides,
        ],
        environ={},
    )


def test_local_agg_plan() -> None:
    plan = plan_deployment(
        resolved(), config_file="/run/config.yaml", run_dir="/run", python="py",
        etcd_binary="/bin/etcd", nats_binary="/bin/nats-server", etcd_peer_port=2390,
    )  # fmt: skip
    assert [(p.name, p.role, p.stage) for p in plan] == [
        ("etcd", "etcd", 0),
        ("nats", "nats", 0),
        ("worker-agg-g0-i0", "agg", 1),
        ("frontend", "frontend", 2),
    ]
    etcd, nats, worker, frontend = plan
    assert etcd.argv[0] == "/bin/etcd"
    assert "http://127.0.0.1:2390" in etcd.argv and "/run/etcd-data" in etcd.argv
    assert (etcd.ready.kind, etcd.ready.host, etcd.ready.port) == ("port", "127.0.0.1", 2379)
    assert nats.argv == ("/bin/nats-server", "-a", "127.0.0.1", "-p", "4222", "-m", "0")
    assert worker.argv == (
        "py", "-m", "mpi_workers", "--config", "/run/config.yaml", "--group", "0", "--index", "0"
    )  # fmt: skip
    assert worker.ready.kind == "registrations"
    assert (worker.ready.prefix, worker.ready.count) == ("hpcserve/local-agg/workers/", 1)
    assert worker.ready.etcd_endpoint == "http://127.0.0.1:2379"
    assert frontend.argv == ("py", "-m", "frontend", "--config", "/run/config.yaml")
    assert frontend.ready.url == "http://127.0.0.1:8000/health"
    # Pure: the same input gives the same plan.
    assert plan == plan_deployment(
        resolved(), config_file="/run/config.yaml", run_dir="/run", python="py",
        etcd_binary="/bin/etcd", nats_binary="/bin/nats-server", etcd_peer_port=2390,
    )  # fmt: skip


def test_external_services_and_more_workers() -> None:
    config = resolved(
        "services.etcd.start=false", "services.nats.start=false", "workers.0.count=2",
        "frontend.host=0.0.0.0",
    )  # fmt: skip
    plan = plan_deployment(config, config_file="c.yaml", run_dir="r")
    assert [p.name for p in plan] == ["worker-agg-g0-i0", "worker-agg-g0-i1", "frontend"]
    assert all(p.ready.count == 2 for p in plan if p.role == "agg")
    assert plan[-1].ready.url == "http://127.0.0.1:8000/health"


def test_unresolved_config_is_refused() -> None:
    with pytest.raises(ValueError, match="endpoint"):
        plan_deployment(load_config(environ={}), config_file="c", run_dir="r")
    with pytest.raises(ValueError, match=r"frontend\.port"):
        plan_deployment(resolved("frontend.port=0"), config_file="c", run_dir="r")


def trtllm(*overrides: str):
    return resolved("engine.kind=trtllm", *overrides)


def worker(plan):
    return next(p for p in plan if p.group is not None)


WORKER_ARGV = ("py", "-m", "mpi_workers", "--config", "c.yaml", "--group", "0", "--index", "0")


def test_trtllm_group_ranks_run_under_llmapi_launch() -> None:
    """tp * pp ranks, each `trtllm-llmapi-launch python -m mpi_workers ...`; locally behind
    the mpirun prefix, under Slurm (no launcher) the per-rank argv for srun."""
    config = trtllm("workers.0.tp=2", "engine.trtllm.pipeline_parallel_size=2")
    per_rank = worker(plan_deployment(config, config_file="c.yaml", run_dir="r", python="py"))
    assert per_rank.argv == (TRTLLM_LAUNCHER, *WORKER_ARGV)
    assert per_rank.ranks == 4
    local = worker(
        plan_deployment(
            config, config_file="c.yaml", run_dir="r", python="py",
            mpi_launcher=("mpirun", "--oversubscribe"),
        )
    )  # fmt: skip
    assert local.argv == ("mpirun", "--oversubscribe", "-n", "4", TRTLLM_LAUNCHER, *WORKER_ARGV)
    assert TRTLLM_LAUNCHER == "trtllm-llmapi-launch"
    assert needs_mpi_launcher(config)


@pytest.mark.parametrize(
    "overrides",
    [
        ("workers.0.tp=1",),  # one rank: the LLM in our worker process, no MPI
        ("workers.0.tp=2", "engine.trtllm.launch=spawn"),  # the LLM spawns its ranks
    ],
)
def test_trtllm_single_process_groups(overrides: tuple[str, ...]) -> None:
    config = trtllm(*overrides)
    process = worker(
        plan_deployment(
            config, config_file="c.yaml", run_dir="r", python="py", mpi_launcher=("mpirun",)
        )
    )
    assert process.argv == WORKER_ARGV
    assert process.ranks == 1
    assert not needs_mpi_launcher(config)


def test_trtllm_disagg_workers_get_ucx_kv_env() -> None:
    two = "workers=[{role: prefill}, {role: decode}]"
    config = trtllm(two)
    plan = plan_deployment(config, config_file="c.yaml", run_dir="r")
    envs = {p.role: p.env for p in plan if p.group is not None}
    assert envs["prefill"] == envs["decode"] == {
        "PYTHONUNBUFFERED": "1", "TRTLLM_USE_UCX_KVCACHE": "1",
    }  # fmt: skip
    torch = resolved(two)
    plan = plan_deployment(torch, config_file="c.yaml", run_dir="r")
    assert all("TRTLLM_USE_UCX_KVCACHE" not in p.env for p in plan)
    agg = worker(plan_deployment(trtllm(), config_file="c.yaml", run_dir="r"))
    assert agg.env == {"PYTHONUNBUFFERED": "1"}


def test_torch_tp_keeps_its_argv() -> None:
    config = resolved("workers.0.tp=3")
    process = worker(
        plan_deployment(
            config, config_file="c.yaml", run_dir="r", python="py", mpi_launcher=("mpirun",)
        )
    )
    assert process.argv == ("mpirun", "-n", "3", *WORKER_ARGV)
    assert process.ranks == 3


def test_local_torch_workers_learn_how_many_ranks_share_the_machine() -> None:
    config = resolved("workers=[{role: agg, count: 2}, {role: agg, tp: 3}]")
    plan = plan_deployment(config, config_file="c.yaml", run_dir="r", mpi_launcher=("mpirun",))
    workers = [p for p in plan if p.group is not None]
    assert [p.ranks for p in workers] == [1, 1, 3]
    assert all(p.env[RANKS_HERE_ENV] == "5" for p in workers)
    assert all(RANKS_HERE_ENV not in p.env for p in plan if p.group is None)
    # Slurm plans (worker ranks placed per node) and engines without torch threads: none
    placed = plan_deployment(config, config_file="c.yaml", run_dir="r", head_worker_ranks=0)
    assert all(RANKS_HERE_ENV not in p.env for p in placed)
    mocker = plan_deployment(resolved("engine.kind=mocker"), config_file="c.yaml", run_dir="r")
    assert all(RANKS_HERE_ENV not in p.env for p in mocker)


def test_cpu_threads_are_an_equal_share_of_the_cores(monkeypatch: pytest.MonkeyPatch) -> None:
    assert cpu_threads_per_rank(2, 2) == 1  # two TP=1 workers on two cores: one thread each
    assert cpu_threads_per_rank(16, 3) == 5
    assert cpu_threads_per_rank(2, 5) == 1  # never none
    assert cpu_threads_per_rank(8, 1) == 8
    monkeypatch.delenv(RANKS_HERE_ENV, raising=False)
    assert worker_ranks_here() is None and worker_ranks_here(default=3) == 3
    monkeypatch.setenv(RANKS_HERE_ENV, "4")
    assert worker_ranks_here(default=3) == 4
    monkeypatch.setenv(RANKS_HERE_ENV, "zero")
    assert worker_ranks_here(default=3) == 3


def test_frontend_processes_default_to_the_spare_cores_of_the_head() -> None:
    config = resolved("workers.0.count=3", "frontend.workers=null")  # automatic
    assert config.frontend.workers is None
    assert frontend_processes(config, cpus=2) == 1  # no spare core: today's one process
    assert frontend_processes(config, cpus=8) == 8 - 3 - 1  # minus workers, etcd + NATS
    assert frontend_processes(config, cpus=64) == MAX_AUTO_FRONTEND_PROCESSES
    assert frontend_processes(config, cpus=8, head_worker_ranks=0) == 7  # workers elsewhere
    external = resolved("services.etcd.start=false", "services.nats.start=false",
                        "services.etcd.endpoint=http://e:1", "services.nats.endpoint=nats://n:2",
                        "frontend.workers=null")  # fmt: skip
    assert frontend_processes(external, cpus=8, head_worker_ranks=0) == 8
    assert frontend_processes(resolved("frontend.workers=3"), cpus=1) == 3  # as asked


def test_several_frontend_processes_share_the_port() -> None:
    plan = plan_deployment(resolved("frontend.workers=3"), config_file="c.yaml", run_dir="/r")
    frontends = [p for p in plan if p.role == "frontend"]
    assert [p.name for p in frontends] == ["frontend-0", "frontend-1", "frontend-2"]
    for index, process in enumerate(frontends):
        assert process.argv[-4:] == ("-m", "frontend", "--config", "c.yaml")
        assert process.env[FRONTEND_PROCESS_ENV] == f"{index}/3"
        assert process.env[METRICS_DIR_ENV] == "/r/frontend-metrics"
        assert process.env[ROTATION_FILE_ENV] == rotation_file("local-agg", "/r")  # one for all
        assert process.env[LOAD_TABLE_ENV] == load_table_file("local-agg", "/r")
        assert process.ready.url == "http://127.0.0.1:8000/health"
        assert process.ready.process == index  # ready once it answers, not a sibling
    one = plan_deployment(resolved("frontend.workers=1"), config_file="c.yaml", run_dir="/r")
    assert [p.name for p in one if p.role == "frontend"] == ["frontend"]
    assert one[-1].ready.process is None
    assert FRONTEND_PROCESS_ENV not in one[-1].env
    assert ROTATION_FILE_ENV not in one[-1].env  # one process rotates on its own
    assert LOAD_TABLE_ENV not in one[-1].env  # and counts alone


def test_the_shared_files_are_removed_after_the_stop(tmp_path: Path) -> None:
    plan = plan_deployment(resolved("frontend.workers=2"), config_file="c.yaml",
                           run_dir=str(tmp_path))  # fmt: skip
    counter = Path(rotation_file("local-agg", str(tmp_path)))
    table = Path(load_table_file("local-agg", str(tmp_path)))
    for path in (counter, table):
        assert path.parent == Path("/dev/shm")  # node-local memory, not the run folder
        path.write_bytes(bytes(8))
    assert rotation_file("local-agg", str(tmp_path / "other")) != str(counter)
    assert load_table_file("local-agg", str(tmp_path / "other")) != str(table)
    assert table != counter
    remove_frontend_shared_files(plan)
    assert not counter.exists() and not table.exists()
    remove_frontend_shared_files(plan)  # already gone: nothing to do


def test_a_missing_service_binary_is_a_config_error_naming_its_field(monkeypatch) -> None:
    monkeypatch.setenv("PATH", "")
    monkeypatch.setattr("sys.executable", "/nonexistent/python")
    with pytest.raises(ConfigError, match=r"^services\.nats: nats-server not found"):
        find_binary("nats-server")


def test_simulated_workers_share_processes_per_process_at_a_time() -> None:
    """10 mocker workers, 4 per process: processes i0-3, i4-7, i8-9, each hosting its ids;
    readiness still counts the 10 workers' cards; the worker count stays 10."""
    config = resolved("engine.kind=mocker", "workers.0.count=10", "workers.0.per_process=4")
    plan = plan_deployment(config, config_file="c.yaml", run_dir="r")
    workers = [p for p in plan if p.group is not None]
    assert [p.name for p in workers] == [
        "worker-agg-g0-i0-3", "worker-agg-g0-i4-7", "worker-agg-g0-i8-9",
    ]  # fmt: skip
    assert [p.argv[-4:] for p in workers] == [
        ("--index", "0", "--instances", "4"),
        ("--index", "4", "--instances", "4"),
        ("--index", "8", "--instances", "2"),
    ]
    assert workers[2].worker_ids == ("agg-g0-i8", "agg-g0-i9")
    assert sum(len(p.worker_ids) for p in workers) == 10
    assert all(p.ready.count == 10 and p.ranks == 1 for p in workers)
    # one process per core of the head, not per worker, is what the frontend leaves free
    auto = resolved("engine.kind=mocker", "workers.0.count=10", "workers.0.per_process=4",
                    "frontend.workers=null")  # fmt: skip
    assert frontend_processes(auto, cpus=8) == 8 - 3 - 1


def test_the_mocker_hosts_four_per_process_by_default_and_other_engines_one() -> None:
    mocker = plan_deployment(resolved("engine.kind=mocker", "workers.0.count=6"),
                             config_file="c.yaml", run_dir="r")  # fmt: skip
    assert [p.name for p in mocker if p.group is not None] == [
        "worker-agg-g0-i0-3", "worker-agg-g0-i4-5",
    ]  # fmt: skip
    one = plan_deployment(resolved("engine.kind=mocker", "workers.0.count=6",
                                   "workers.0.per_process=1"),
                          config_file="c.yaml", run_dir="r")  # fmt: skip
    assert [p.name for p in one if p.group is not None] == [
        f"worker-agg-g0-i{i}" for i in range(6)
    ]
    assert all("--instances" not in p.argv for p in one)
    torch = plan_deployment(resolved("workers.0.count=2"), config_file="c.yaml", run_dir="r")
    assert [p.worker_ids for p in torch if p.group is not None] == [
        ("agg-g0-i0",), ("agg-g0-i1",),
    ]  # fmt: skip


def test_several_workers_per_process_need_the_mocker() -> None:
    with pytest.raises(ConfigError, match=r"workers\.0\.per_process: .*engine\.kind mocker"):
        resolved("workers.0.count=2", "workers.0.per_process=2")  # torch
    with pytest.raises(ConfigError, match=r"workers\.0\.per_process"):
        resolved("engine.kind=trtllm", "workers.0.per_process=4")
    with pytest.raises(ConfigError, match=r"workers\.0\.per_process"):
        resolved("engine.kind=mocker", "workers.0.per_process=0")
    assert resolved("workers.0.per_process=1").workers[0].per_process == 1  # allowed anywhere
