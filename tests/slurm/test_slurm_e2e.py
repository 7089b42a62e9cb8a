"""A deployment as a real Slurm job on the 3-node namespace cluster, end to end.

`hpcserve submit configs/slurm-agg.yaml` (head n1: etcd, NATS, frontend; workers on n2, n3)
→ READY → the official openai client on the head's address → `hpcserve cancel` → nothing
left on any node. The same for a TP group spanning the three nodes, for disaggregated
serving (prefill on n2, decode on n3), through submitit, and a worker that fails at start
or is killed while serving: the supervisor restarts it (a new step that serves again) until
its restarts are spent, then the job is FAILED naming it; a cancel instead ends FINISHED.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest
from cluster_helpers import cluster_for_this_process
from mpich_shm import mpich_segments

from slurm.jobs import JobStatus, cancel, job_status, submit_with_submitit
from slurm.state import read_state

pytestmark = [
    pytest.mark.slurm,
    pytest.mark.e2e,
    pytest.mark.skipif(
        os.geteuid() != 0,
        reason="the Slurm test cluster needs root (network namespaces, slurmd as root)",
    ),
]

REPO = Path(__file__).resolve().parents[2]
CONFIG = REPO / "configs" / "slurm-agg.yaml"
HEAD_URL = "http://10.99.0.11:8000/v1"
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
# What a deployment runs; none of it may outlive the job.
OURS = ("nats-server", "etcd", "mpi_workers", "-m frontend", "slurm.supervise", "slurmstepd")


@pytest.fixture(scope="module")
def slurm_env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """A 3-node cluster for the module (always torn down); SLURM_CONF set in this process too."""
    with cluster_for_this_process(tmp_path_factory, 3) as env:
        yield env


def hpcserve(env: dict[str, str], *args: str, timeout: float = 120) -> str:
    result = subprocess.run(
        [sys.executable, "-m", "hpcserve", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    assert result.returncode == 0, f"hpcserve {args} failed:\n{result.stdout}\n{result.stderr}"
    return result.stdout


def wait_state(job: str, wanted: str, timeout_s: float = 180) -> JobStatus:
    deadline = time.monotonic() + timeout_s
    while True:
        status = job_status(job)
        if status.state == wanted:
            return status
        assert status.state not in ({"FAILED", "FINISHED"} - {wanted}), status.describe()
        assert time.monotonic() < deadline, f"not {wanted} after {timeout_s}s: {status.describe()}"
        time.sleep(0.5)


def namespace_inodes() -> set[str]:
    return {
        f"net:[{os.stat(f'/run/netns/{name}').st_ino}]"
        for name in os.listdir("/run/netns")
        if re.fullmatch(r"hpcs-n\d+", name)
    }


def leftovers(job_dir: Path, ours: tuple[str, ...] = OURS) -> list[str]:
    """Live processes of the job: any naming its dir, or one of `ours` in a node namespace."""
    inodes, found = namespace_inodes(), []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            state = (entry / "stat").read_text().rpartition(")")[2].split()[0]
            netns = os.readlink(entry / "ns" / "net")
        except OSError:
            continue
        if state == "Z" or not cmdline:
            continue
        if str(job_dir) in cmdline or (netns in inodes and any(w in cmdline for w in ours)):
            found.append(f"{entry.name}: {cmdline[:160]}")
    return found


def assert_nothing_left(job_dir: Path, timeout_s: float = 15) -> None:
    deadline = time.monotonic() + timeout_s
    while left := leftovers(job_dir):
        assert time.monotonic() < deadline, "left behind:\n" + "\n".join(left)
        time.sleep(0.2)


def ask_paris(url: str) -> str:
    client = openai.OpenAI(base_url=url, api_key="none", max_retries=0, timeout=120)
    model = client.models.list().data[0].id
    response = client.chat.completions.create(
        model=model, messages=QUESTION, temperature=0, max_tokens=30
    )
    return response.choices[0].message.content or ""


@contextlib.contextmanager
def submitted(
    env: dict[str, str], config: Path, model_dir: Path, *sets: str
) -> Iterator[tuple[str, Path]]:
    """`hpcserve submit` a config: yields (job id, job dir); on the way out the job is
    cancelled, and (if the body passed) nothing of it may be left on any node."""
    args = ["--set", f"model.path={model_dir}"]
    for item in sets:
        args += ["--set", item]
    out = hpcserve(env, "submit", str(config), *args)
    job_id = re.search(r"^job (\S+)$", out, re.M).group(1)  # type: ignore[union-attr]
    job_dir = Path(re.search(r"^dir (\S+)$", out, re.M).group(1))  # type: ignore[union-attr]
    try:
        yield job_id, job_dir
    finally:
        hpcserve(env, "cancel", job_id)
    assert_nothing_left(job_dir)


def test_sbatch_job_serves_and_cancels(slurm_env: dict[str, str], model_dir: Path) -> None:
    with submitted(slurm_env, CONFIG, model_dir) as (job_id, job_dir):
        status = wait_state(job_id, "READY")
        assert status.url == HEAD_URL
        assert len(leftovers(job_dir)) >= 5  # the detector sees the running deployment
        assert hpcserve(slurm_env, "status", job_id).startswith(f"READY {HEAD_URL}\n")
        assert "Paris" in ask_paris(status.url)
        components = hpcserve(slurm_env, "logs", job_id).split()
        assert {"etcd", "nats", "frontend", "worker-agg-g0-i0", "worker-agg-g0-i1"} <= set(
            components
        )
        assert "registered" in hpcserve(slurm_env, "logs", job_id, "worker-agg-g0-i1")
    assert job_status(job_id).state == "FINISHED"


def test_tp_group_spanning_three_nodes_serves_and_cancels(
    slurm_env: dict[str, str], model_dir: Path
) -> None:
    """One TP=3 engine, one rank per node (srun --mpi=pmi2 over n1..n3), gloo across nodes."""
    config = CONFIG.parent / "slurm-agg-tp3.yaml"
    with submitted(slurm_env, config, model_dir) as (job_id, _job_dir):
        status = wait_state(job_id, "READY")
        assert "Paris" in ask_paris(status.url or "")
        log = hpcserve(slurm_env, "logs", job_id, "worker-agg-g0-i0")
        for rank, node in enumerate(("n1", "n2", "n3")):
            expected = (
                f"rank{rank}] mpi_workers.engine.torch.tp: gloo uses interface eth0 (node {node})"
            )
            assert expected in log
    assert job_status(job_id).state == "FINISHED"


def test_disaggregated_job_moves_kv_between_nodes(
    slurm_env: dict[str, str], model_dir: Path
) -> None:
    """configs/slurm-disagg.yaml: head on n1, the prefill worker on n2, the decode worker on
    n3; each prompt's KV goes from n2 to n3 over UCX (decode_first)."""
    env = {**slurm_env, "HPCSERVE_LOG_LEVEL": "DEBUG"}  # KV pushes are logged at DEBUG
    config = CONFIG.parent / "slurm-disagg.yaml"
    with submitted(env, config, model_dir) as (job_id, _job_dir):
        status = wait_state(job_id, "READY")
        assert "Paris" in ask_paris(status.url or "")
        prefill = hpcserve(env, "logs", job_id, "worker-prefill-g0-i0")
        decode = hpcserve(env, "logs", job_id, "worker-decode-g1-i0")
        assert "KV over ucx at 10.99.0.12:" in prefill  # n2
        assert "KV over ucx at 10.99.0.13:" in decode  # n3
        assert re.search(r"ucx push [\d.]+ MiB", prefill), prefill[-2000:]
    assert job_status(job_id).state == "FINISHED"


def test_submitit_job_serves_and_cancels(slurm_env: dict[str, str], model_dir: Path) -> None:
    from contract.config import load_config

    config = load_config(CONFIG, [f"model.path={model_dir}"], environ={})
    job = submit_with_submitit(config)
    try:
        status = wait_state(job.job_id, "READY")
        assert "Paris" in ask_paris(status.url or "")
    finally:
        cancel(job.job_id)
    assert_nothing_left(job.job_dir)
    assert job_status(job.job_id).state == "FINISHED"


def test_worker_failing_at_start_fails_the_job(slurm_env: dict[str, str], model_dir: Path):
    # engine.device=cuda only matters to the workers: torch here has no CUDA.
    with submitted(slurm_env, CONFIG, model_dir, "engine.device=cuda") as (job_id, _job_dir):
        status = wait_state(job_id, "FAILED", timeout_s=120)
        assert status.component is not None and status.component.startswith("worker-agg-g0-")
        assert "CUDA" in (status.log_tail or "")
        text = hpcserve(slurm_env, "status", job_id)
        assert text.startswith(f"FAILED {status.component}") and "CUDA" in text


def step_pids(step_name: str) -> list[int]:
    """Our worker processes started by the srun step named `step_name` (its job name)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
            environ = (entry / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"mpi_workers" in cmdline and f"SLURM_JOB_NAME={step_name}".encode() in environ:
            pids.append(int(entry.name))
    return pids


def kill_step(step_name: str) -> None:
    pids = step_pids(step_name)
    assert pids, f"no worker process found for step {step_name}"
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def restarts_so_far(job_dir: Path) -> dict[str, int]:
    """The supervisor's restarts per component now: a worker whose MPI_Init failed at start
    (a rare PMI2 failure on a loaded machine) was started again, and that counts as one."""
    state = read_state(job_dir)
    assert state is not None
    return dict(state.restarts)


def wait_back(
    slurm_env: dict[str, str], job_id: str, job_dir: Path, step: str,
    before: dict[str, int], timeout_s: float,
) -> None:  # fmt: skip
    """Until the supervisor says `step` is back from a restart after `before`: the next one
    or a later one (a TP step started right after a rank's death may fail its start once,
    and the restart after it brings the step back)."""
    back = re.compile(rf"{step} is back \(restart (\d+)\)")
    deadline = time.monotonic() + timeout_s
    while not any(
        int(number) > before.get(step, 0)
        for number in back.findall((job_dir / "logs" / "sbatch.log").read_text(errors="replace"))
    ):
        assert time.monotonic() < deadline, hpcserve(slurm_env, "logs", job_id, "sbatch")
        time.sleep(0.5)


def test_worker_killed_while_serving_is_restarted(slurm_env: dict[str, str], model_dir: Path):
    """A crash is not a cancel: the supervisor starts a new step for the worker on its node
    slice, the job stays READY, and the worker serves again."""
    with submitted(slurm_env, CONFIG, model_dir,
                   "workers.0.restart.backoff_s=0.2") as (job_id, job_dir):  # fmt: skip
        wait_state(job_id, "READY")
        before = step_pids("worker-agg-g0-i1")
        started_again = restarts_so_far(job_dir)  # a failed MPI_Init at start is retried
        kill_step("worker-agg-g0-i1")
        wait_back(slurm_env, job_id, job_dir, "worker-agg-g0-i1", started_again, 180)
        state = read_state(job_dir)
        assert state is not None
        assert state.restarts == {**started_again, "worker-agg-g0-i1": 1 + started_again.get(
            "worker-agg-g0-i1", 0)}  # fmt: skip
        after = step_pids("worker-agg-g0-i1")
        assert after and not set(after) & set(before)
        status = wait_state(job_id, "READY")
        log = hpcserve(slurm_env, "logs", job_id, "worker-agg-g0-i1")
        assert log.count("registered agg-g0-i1") == 2, log[-2000:]  # the old run's lines stay
        for _ in range(4):  # round robin: both workers answer
            assert "Paris" in ask_paris(status.url or "")


def test_killed_tp_rank_leaves_no_shared_memory_on_any_node(
    slurm_env: dict[str, str], model_dir: Path
) -> None:
    """A TP=3 step over n1..n3 whose rank on n2 is SIGKILLed: Slurm ends the step
    (--kill-on-bad-exit) with no MPI_Finalize anywhere, the supervisor starts a new one. No
    node keeps a name of the dead step's MPICH segments (each node's ranks unlinked theirs
    at start), nor of the new step's."""
    config = CONFIG.parent / "slurm-agg-tp3.yaml"
    step = "worker-agg-g0-i0"
    with submitted(slurm_env, config, model_dir,
                   "workers.0.restart.backoff_s=0.2") as (job_id, job_dir):  # fmt: skip
        wait_state(job_id, "READY")
        before = step_pids(step)
        segments = mpich_segments(before)
        assert len(segments) == 3, segments  # one per node
        environs = {pid: Path(f"/proc/{pid}/environ").read_bytes().split(b"\0") for pid in before}
        rank1 = [pid for pid, env in environs.items()  # the rank itself, not its guard
                 if b"SLURM_PROCID=1" in env and b"HPCSERVE_RANK_GUARD=child" in env]  # fmt: skip
        assert len(rank1) == 1, before
        started_again = restarts_so_far(job_dir)  # a failed MPI_Init at start is retried
        os.kill(rank1[0], signal.SIGKILL)
        wait_back(slurm_env, job_id, job_dir, step, started_again, 240)
        renewed = mpich_segments(step_pids(step))
        assert len(renewed) == 3 and renewed.isdisjoint(segments), (segments, renewed)
        left = [name for name in segments | renewed if Path("/dev/shm", name).exists()]
        assert left == [], left


def test_critical_worker_out_of_restarts_fails_the_job(slurm_env: dict[str, str], model_dir):
    with submitted(slurm_env, CONFIG, model_dir,
                   "workers.0.restart.max_restarts=0") as (job_id, _job_dir):  # fmt: skip
        wait_state(job_id, "READY")
        kill_step("worker-agg-g0-i1")
        status = wait_state(job_id, "FAILED", timeout_s=60)
        assert status.component == "worker-agg-g0-i1", status.describe()
        assert "no restarts left" in (status.message or "")
