"""The namespace Slurm cluster of `slurm/testing/cluster.sh` really schedules and cleans up.

Everything else that tests Slurm (rendering, srun steps, submitit) stands on this cluster,
so these tests check the cluster itself: nodes come up idle, steps and batch jobs run on
every node, and `scancel` leaves no task behind.
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from cluster_helpers import running_cluster

from contract.processes import pid_alive

pytestmark = [
    pytest.mark.slurm,
    pytest.mark.skipif(
        os.geteuid() != 0,
        reason="the Slurm test cluster needs root (network namespaces, slurmd as root)",
    ),
]

NODES = 3


def _run(args: list[str], env: dict[str, str], timeout: float = 60) -> str:
    result = subprocess.run(
        args, env=env, capture_output=True, text=True, timeout=timeout, check=False
    )
    assert result.returncode == 0, f"{args} failed ({result.returncode}): {result.stderr}"
    return result.stdout


def _wait_for(check: Callable[[], bool], what: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.1)


def _job_state(job_id: str, env: dict[str, str]) -> str:
    return _run(["squeue", "-h", "-t", "all", "-j", job_id, "-o", "%T"], env).strip()


@pytest.fixture(scope="module")
def slurm_env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """Bring up a 3-node cluster for the module; always tear it down, even after failures."""
    with running_cluster(tmp_path_factory, NODES) as env:
        yield env


def test_all_nodes_idle(slurm_env: dict[str, str]) -> None:
    out = _run(["sinfo", "-h", "-N", "-o", "%N %T %P"], slurm_env)
    rows = sorted(set(out.split("\n")) - {""})
    assert rows == [f"n{i} idle debug*" for i in range(1, NODES + 1)]


def test_srun_step_runs_on_every_node(slurm_env: dict[str, str]) -> None:
    out = _run(
        [
            "srun",
            f"-N{NODES}",
            "--ntasks-per-node=1",
            "bash",
            "-c",
            "echo $SLURMD_NODENAME $SLURM_PROCID",
        ],
        slurm_env,
    )
    seen = sorted(line.split()[0] for line in out.splitlines())
    assert seen == [f"n{i}" for i in range(1, NODES + 1)]
    ranks = sorted(int(line.split()[1]) for line in out.splitlines())
    assert ranks == list(range(NODES))


def test_sbatch_job_writes_its_output(slurm_env: dict[str, str], tmp_path: Path) -> None:
    job_id = _run(
        [
            "sbatch",
            "--parsable",
            "-N2",
            f"--chdir={tmp_path}",
            "-o",
            "job-%j.out",
            "--wrap",
            "srun bash -c 'echo hello from $SLURMD_NODENAME'",
        ],
        slurm_env,
    ).strip()
    out_file = tmp_path / f"job-{job_id}.out"

    _wait_for(
        lambda: _job_state(job_id, slurm_env) not in ("PENDING", "RUNNING", "COMPLETING"),
        f"batch job {job_id} to finish",
    )
    assert _job_state(job_id, slurm_env) == "COMPLETED"
    lines = sorted(out_file.read_text().splitlines())
    assert len(lines) == 2
    assert all(line.startswith("hello from n") for line in lines)


def test_scancel_leaves_no_step_process(slurm_env: dict[str, str], tmp_path: Path) -> None:
    # Each task writes its own pid (to a temp name, renamed once complete, so a reader never
    # sees a half-written file), then becomes `sleep` (same pid).
    job_id = _run(
        [
            "sbatch",
            "--parsable",
            "-N2",
            f"--chdir={tmp_path}",
            "-o",
            "/dev/null",
            "--wrap",
            "srun bash -c 'echo $$ > tmp-$SLURMD_NODENAME && mv tmp-$SLURMD_NODENAME"
            " pid-$SLURMD_NODENAME; exec sleep 300'",
        ],
        slurm_env,
    ).strip()
    _wait_for(lambda: len(list(tmp_path.glob("pid-n*"))) == 2, "both tasks to start")
    pids = [int(path.read_text()) for path in tmp_path.glob("pid-n*")]
    _wait_for(lambda: all(pid_alive(pid) for pid in pids), "task pids to be visible", 5)

    _run(["scancel", job_id], slurm_env)
    _wait_for(lambda: not any(pid_alive(pid) for pid in pids), "tasks to end after scancel")
    _wait_for(lambda: _job_state(job_id, slurm_env) == "CANCELLED", f"job {job_id} to be cancelled")
