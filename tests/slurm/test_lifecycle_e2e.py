"""Deployments that outlive their Slurm jobs, on the 3-node namespace cluster (mocker engine).

- the time limit's warning (SIGUSR1 to the batch script, as `--signal=B:USR1@drain_s` sends
  it): a request in flight completes, the job drains and ends FINISHED "time limit";
- preemption's signals (SIGCONT + SIGTERM to the batch script and every step): drain,
  FINISHED "preempted", nothing left; `scontrol requeue`: drain, FINISHED "requeued", the
  job queued again;
- a 1-minute job with `slurm.successor`: a client loop through `hpcserve gateway` across
  the switch to the next generation fails no request; both generations in `hpcserve status`;
- `hpcserve scale --add 1`: a worker-only job joins and serves (the generation's own worker
  drained away); `--remove 1` drains it, FINISHED "removed", nothing of it left;
- `hpcserve up --in-allocation` under `salloc`: serves from the allocation's nodes without a
  new job; SIGTERM drains and stops it, FINISHED "stopped", the allocation released.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest
from cluster_helpers import cluster_for_this_process
from test_slurm_e2e import assert_nothing_left, hpcserve, leftovers, submitted, wait_state

from contract.readiness import free_port, http_ok
from slurm.deployment import generations, worker_jobs
from slurm.jobs import job_status
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
CONFIG = REPO / "configs" / "slurm-mocker.yaml"
PROMPT = [{"role": "user", "content": "Count to ten."}]


@pytest.fixture(scope="module")
def slurm_env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    with cluster_for_this_process(tmp_path_factory, 3) as env:
        yield env


def client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=url, api_key="none", max_retries=0, timeout=60)


def stream_tokens(url: str, max_tokens: int) -> tuple[int, str | None]:
    """One streamed chat completion: (content chunks received, the finish reason); a stream
    cut short has no finish reason."""
    api = client(url)
    model = api.models.list().data[0].id
    chunks, finish = 0, None
    stream = api.chat.completions.create(
        model=model, messages=PROMPT, max_tokens=max_tokens, stream=True,
        extra_body={"ignore_eos": True},
    )  # fmt: skip
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            chunks += 1
        if chunk.choices and chunk.choices[0].finish_reason:
            finish = chunk.choices[0].finish_reason
    return chunks, finish


def scancel(env: dict[str, str], *args: str) -> None:
    subprocess.run(["scancel", *args], env=env, check=True, timeout=30)


def wait_finished(job_id: str, timeout_s: float = 90) -> None:
    deadline = time.monotonic() + timeout_s
    while job_status(job_id).state != "FINISHED":
        assert time.monotonic() < deadline, job_status(job_id).describe()
        time.sleep(0.3)


def test_time_limit_warning_drains_and_finishes(slurm_env: dict[str, str], model_dir: Path):
    """SIGUSR1 to the batch script only (what `--signal=B:USR1@drain_s` does): the request
    in flight completes in full, then the job ends by itself, FINISHED "time limit"."""
    with submitted(slurm_env, CONFIG, model_dir,
                   "engine.mocker.decode_ms_base=20") as (job_id, job_dir):  # fmt: skip
        url = wait_state(job_id, "READY").url or ""
        result: dict[str, object] = {}

        def long_request() -> None:
            try:
                result["chunks"], result["finish"] = stream_tokens(url, 150)  # ~3 s
            except BaseException as exc:
                result["error"] = exc

        thread = threading.Thread(target=long_request)
        thread.start()
        time.sleep(1.0)  # the request is streaming
        scancel(slurm_env, "--batch", "--signal=USR1", job_id)
        thread.join(60)
        assert "error" not in result, result
        assert result["finish"] == "length" and result["chunks"] > 100, result
        wait_finished(job_id)
        state = read_state(job_dir)
        assert state is not None and state.reason == "time limit", state
        assert "workers drained" in (state.message or ""), state
        log = hpcserve(slurm_env, "logs", job_id, "sbatch")
        assert "ending (time limit): draining the workers" in log
        assert job_status(job_id).describe().startswith("FINISHED (time limit)")
        assert_nothing_left(job_dir)


def test_preemption_signals_drain_and_finish(slurm_env: dict[str, str], model_dir: Path):
    """Preemption sends SIGCONT and SIGTERM to the batch script and every step while the
    job is still RUNNING: the job drains and ends FINISHED "preempted", nothing left."""
    with submitted(slurm_env, CONFIG, model_dir) as (job_id, job_dir):
        wait_state(job_id, "READY")
        scancel(slurm_env, "--full", "--signal=CONT", job_id)
        scancel(slurm_env, "--full", "--signal=TERM", job_id)
        wait_finished(job_id)
        state = read_state(job_dir)
        assert state is not None and (state.state, state.reason) == ("FINISHED", "preempted")
        assert_nothing_left(job_dir)


class ClientLoop(threading.Thread):
    """Requests through the gateway, one after another (streamed and not), until stopped;
    every failure is kept."""

    def __init__(self, url: str) -> None:
        super().__init__(daemon=True)
        self.url = url
        self.done = 0
        self.failures: list[str] = []
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                if self.done % 2:
                    chunks, finish = stream_tokens(self.url, 40)
                    assert finish == "length" and chunks > 0, (chunks, finish)
                else:
                    api = client(self.url)
                    model = api.models.list().data[0].id
                    answer = api.chat.completions.create(model=model, messages=PROMPT,
                                                         max_tokens=8)  # fmt: skip
                    assert answer.choices[0].message.content
                self.done += 1
            except Exception as exc:
                self.failures.append(f"{type(exc).__name__}: {exc}")


def test_successor_and_gateway_switch_without_failed_requests(
    slurm_env: dict[str, str], model_dir: Path
) -> None:
    name = "lifecycle-succ"
    port = free_port()
    gateway = subprocess.Popen(
        [sys.executable, "-m", "hpcserve", "gateway", name, "--port", str(port)],
        cwd=REPO, env=slurm_env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    loop = ClientLoop(f"http://127.0.0.1:{port}/v1")
    # A 1-minute job whose successor is due at once (lead 55 s); Slurm sends the warning
    # 20 s before the limit, or up to a minute earlier: the hand-over waits for READY.
    sets = [f"name={name}", "slurm.time_limit=1", "slurm.drain_s=20", "slurm.successor=true",
            "slurm.successor_lead_s=55"]  # fmt: skip
    try:
        with submitted(slurm_env, CONFIG, model_dir, *sets) as (first, first_dir):
            wait_state(first, "READY")
            deadline = time.monotonic() + 30
            while not http_ok(f"http://127.0.0.1:{port}/gateway/health"):
                assert gateway.poll() is None and time.monotonic() < deadline
                time.sleep(0.2)
            loop.start()
            wait_finished(first, timeout_s=240)  # the time limit's warning, then the drain
            state = read_state(first_dir)
            assert state is not None and state.reason == "time limit", state
            assert state.successor is not None
            served_before_end = loop.done
            time.sleep(3)  # the loop goes on through the gateway on the successor
            loop.stop.set()
            loop.join(60)
            status = hpcserve(slurm_env, "status", name)
            ids = [job_id for job_id, _ in generations(name)]
            assert len(ids) >= 2 and ids[0] == first, status
            assert f"job {first}: FINISHED (time limit)" in status, status
            # Later generations chain on (each submits its own successor): one of them serves.
            assert any(f"job {job_id}: READY" in status for job_id in ids[1:]), status
            assert f"gateway: http://127.0.0.1:{port}/v1" in status, status
            hpcserve(slurm_env, "cancel", name)
    finally:
        loop.stop.set()
        gateway.terminate()
        gateway.wait(10)
    assert loop.failures == [], loop.failures[:5]
    assert loop.done > served_before_end > 10
    for job_id, job_dir in generations(name):
        assert job_status(job_id).state in ("FINISHED", "FAILED"), job_id
        assert_nothing_left(job_dir)


def ask(url: str) -> str:
    api = client(url)
    model = api.models.list().data[0].id
    answer = api.chat.completions.create(model=model, messages=PROMPT, max_tokens=8)
    return answer.choices[0].message.content or ""


def test_scale_adds_a_worker_job_that_serves_and_removes_it(
    slurm_env: dict[str, str], model_dir: Path
) -> None:
    name = "lifecycle-scale"
    with submitted(slurm_env, CONFIG, model_dir, f"name={name}") as (job_id, gen_dir):
        url = wait_state(job_id, "READY").url or ""
        out = hpcserve(slurm_env, "scale", name, "--role", "agg", "--add", "1")
        worker_job = out.split()[-1]
        worker_dir = dict(worker_jobs(name))[worker_job]
        wait_state(worker_job, "READY", timeout_s=120)
        log = hpcserve(slurm_env, "logs", worker_job, f"worker-agg-j{worker_job}-i0")
        assert f"registered agg-j{worker_job}-i0" in log, log[-2000:]
        # The generation's own worker leaves: from now on only the worker job can answer.
        hpcserve(slurm_env, "drain", job_id, "worker-agg-g0-i0")
        deadline = time.monotonic() + 60
        while "drained" not in (gen_dir / "supervisor.json").read_text():
            assert time.monotonic() < deadline
            time.sleep(0.3)
        for _ in range(4):
            assert ask(url)
        status = hpcserve(slurm_env, "status", name)
        assert f"job {worker_job}: READY" in status, status

        out = hpcserve(slurm_env, "scale", name, "--role", "agg", "--remove", "1")
        assert out.split()[-1] == worker_job
        state = read_state(worker_dir)
        assert state is not None and (state.state, state.reason) == ("FINISHED", "removed")
        deadline = time.monotonic() + 15  # the generation still runs: look for workers only
        while left := leftovers(worker_dir, ("mpi_workers", "slurm.worker_job")):
            assert time.monotonic() < deadline, left
            time.sleep(0.2)
        with pytest.raises(openai.APIStatusError) as caught:  # no worker is left
            ask(url)
        assert caught.value.status_code == 503
        assert f"job {worker_job}: FINISHED (removed)" in hpcserve(slurm_env, "status", name)
    state = read_state(gen_dir)
    assert state is not None and (state.state, state.reason) == ("FINISHED", "cancelled"), state


def test_up_in_allocation_serves_and_cleans_up(slurm_env: dict[str, str], model_dir: Path,
                                               tmp_path: Path) -> None:  # fmt: skip
    name = "lifecycle-alloc"
    pid_file = tmp_path / "hpcserve.pid"
    command = (f"echo $$ > {pid_file}; exec {sys.executable} -m hpcserve up --in-allocation "
               f"{CONFIG} --set name={name} --set model.path={model_dir}")  # fmt: skip
    salloc = subprocess.Popen(
        ["salloc", "-N2", "-J", name, "bash", "-c", command], cwd=REPO, env=slurm_env,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while not generations(name):
            assert salloc.poll() is None and time.monotonic() < deadline
            time.sleep(0.3)
        job_id, job_dir = generations(name)[0]
        try:
            url = wait_state(job_id, "READY").url or ""
        except AssertionError as exc:
            salloc.kill()
            said = salloc.communicate()[0][-3000:]
            raise AssertionError(f"{exc}\nsalloc said:\n{said}") from None
        assert url.startswith("http://10.99.0.11:")  # the allocation's first node is the head
        assert ask(url)
        assert "salloc" not in (job_dir / "job_id").read_text()
        squeue = subprocess.run(["squeue", "-h", "-o", "%i"], env=slurm_env, text=True,
                                capture_output=True, check=True).stdout.split()  # fmt: skip
        assert squeue == [job_id]  # no new job: the salloc allocation only
        os.kill(int(pid_file.read_text()), 15)
        out, _ = salloc.communicate(timeout=90)
        assert salloc.returncode == 0, out[-3000:]
    finally:
        if salloc.poll() is None:
            salloc.kill()
            salloc.wait(10)
    state = read_state(job_dir)
    assert state is not None and (state.state, state.reason) == ("FINISHED", "stopped"), state
    assert_nothing_left(job_dir)
    squeue = subprocess.run(["squeue", "-h", "-o", "%i"], env=slurm_env, text=True,
                            capture_output=True, check=True).stdout.split()  # fmt: skip
    assert squeue == [], squeue


def test_requeue_drains_and_the_job_is_queued_again(slurm_env: dict[str, str], model_dir: Path):
    """`scontrol requeue`: the running job drains and ends FINISHED "requeued" (told apart
    from scancel by Slurm's restart count), and Slurm queues it again (same job, same dir;
    `hpcserve status` says PENDING, not FINISHED). Its rerun is not awaited: Slurm holds a
    requeued job for a while."""
    with submitted(slurm_env, CONFIG, model_dir) as (job_id, job_dir):
        wait_state(job_id, "READY")
        subprocess.run(["scontrol", "requeue", job_id], env=slurm_env, check=True, timeout=30)
        deadline = time.monotonic() + 60
        while (state := read_state(job_dir)) is None or state.state != "FINISHED":
            assert time.monotonic() < deadline, state
            time.sleep(0.2)
        assert state.reason == "requeued", state
        assert "ending (requeued): draining the workers" in hpcserve(slurm_env, "logs", job_id,
                                                                      "sbatch")  # fmt: skip
        deadline = time.monotonic() + 30
        while job_status(job_id).state != "PENDING":
            assert time.monotonic() < deadline, job_status(job_id).describe()
            time.sleep(0.2)
