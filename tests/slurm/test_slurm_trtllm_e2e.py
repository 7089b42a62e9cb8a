"""A TensorRT-LLM deployment as a real Slurm job on the namespace cluster, through the test
double of `tensorrt_llm` (tests/trtllm_double): one aggregated group of 2 ranks, one rank on
n2 and one on n3, started as one `srun --mpi=pmi2 -N 2 -n 2` step of
`trtllm-llmapi-launch python -m mpi_workers ...` (the double's stand-in of NVIDIA's script:
rank 0 runs our worker without MPI in its environment, rank 1 becomes the MPI worker). READY,
one chat answered, the double's MPI session spans both nodes, cancel leaves nothing behind.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import pytest
import yaml
from test_slurm_e2e import (  # one cluster helper set: the same fixture and job helpers
    OURS,
    ask_paris,
    hpcserve,
    leftovers,
    slurm_env,  # noqa: F401  (the module's 3-node cluster fixture)
    submitted,
    wait_state,
)

from slurm.jobs import job_status

REPO = Path(__file__).resolve().parents[2]
DOUBLE = REPO / "tests" / "trtllm_double"
ENGINE = REPO / "mpi_workers" / "engine" / "trtllm"

pytestmark = [
    pytest.mark.slurm,
    pytest.mark.e2e,
    pytest.mark.skipif(
        os.geteuid() != 0,
        reason="the Slurm test cluster needs root (network namespaces, slurmd as root)",
    ),
    pytest.mark.skipif(
        not (DOUBLE / "double_env.py").is_file() or not ENGINE.is_dir(),
        reason="needs the TensorRT-LLM test double (tests/trtllm_double) and the trtllm "
        "engine adapter (mpi_workers/engine/trtllm)",
    ),
]

# Besides our components: the launcher stand-in and TensorRT-LLM's MPI leader/worker nodes.
TRTLLM_PROCESSES = (*OURS, "trtllm-llmapi-launch", "tensorrt_llm", "mgmn_")


def double_job_env() -> dict[str, str]:
    """PATH (the launcher stand-in) and PYTHONPATH (the double's `tensorrt_llm`) for the job,
    as `slurm.env`: every srun step on every node inherits them."""
    sys.path.insert(0, str(DOUBLE))
    try:
        from double_env import double_environ
    finally:
        sys.path.remove(str(DOUBLE))
    base = {"PATH": os.environ.get("PATH", "/usr/bin:/bin")}
    if os.environ.get("PYTHONPATH"):
        base["PYTHONPATH"] = os.environ["PYTHONPATH"]
    env = double_environ(base)
    return {key: env[key] for key in ("PATH", "PYTHONPATH")}


def write_config(path: Path) -> Path:
    """Head on n1; the 2-rank group one rank per node on n2 and n3 (CPU nodes: ranks_per_node)."""
    config = {
        "name": "slurm-trtllm-e2e",
        "model": {"path": None},
        "engine": {
            "kind": "trtllm",
            "trtllm": {
                "extra_engine_args": str(REPO / "configs" / "engine_configs" / "agg.yaml"),
                "launch": "llmapi-launch",
            },
        },
        "workers": [{"role": "agg", "count": 1, "tp": 2}],
        "frontend": {"host": "0.0.0.0", "port": 8000, "router": "round_robin"},
        "services": {"etcd": {"start": True}, "nats": {"start": True}, "lease_ttl_s": 10},
        "slurm": {
            "time_limit": 30,
            "ranks_per_node": 1,
            "mpi_plugin": "pmi2",  # MPICH (pip) on the test cluster
            "head_hosts_workers": False,
            "env": double_job_env(),
        },
    }
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def trtllm_leftovers(job_dir: Path) -> list[str]:
    """Live processes of the job, TensorRT-LLM's included (see test_slurm_e2e.leftovers)."""
    return leftovers(job_dir, TRTLLM_PROCESSES)


def test_trtllm_group_over_two_nodes_serves_and_cancels(
    slurm_env: dict[str, str],  # noqa: F811
    model_dir: Path,
    tmp_path: Path,
) -> None:
    config = write_config(tmp_path / "slurm-trtllm-e2e.yaml")
    with submitted(slurm_env, config, model_dir) as (job_id, job_dir):
        status = wait_state(job_id, "READY", timeout_s=300)
        assert ask_paris(status.url or "")
        log = hpcserve(slurm_env, "logs", job_id, "worker-agg-g0-i0")
        assert "MPI session: 2 ranks on n2,n3" in log, log[-3000:]
        # The job ran its own copy of the engine YAML (the job dir is what a container sees).
        copied = job_dir / "engine_configs" / "engine-agg.yaml"
        assert copied.is_file()
        resolved = yaml.safe_load((job_dir / "config.yaml").read_text())
        assert resolved["engine"]["trtllm"]["extra_engine_args"] == str(copied)
        assert trtllm_leftovers(job_dir), "the detector sees the running group"
    deadline = time.monotonic() + 15
    while left := trtllm_leftovers(job_dir):
        assert time.monotonic() < deadline, "left behind:\n" + "\n".join(left)
        time.sleep(0.2)
    assert job_status(job_id).state == "FINISHED"
