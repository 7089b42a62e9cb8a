"""Run `hpcserve up` as a subprocess and read its output without ever blocking forever."""

from __future__ import annotations

import contextlib
import json
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from contract.processes import pid_alive

REPO = Path(__file__).resolve().parents[2]
READY = re.compile(r"^hpcserve ready: (http://\S+/v1)$")


class UpProcess:
    """`python -m hpcserve up ...` with its output drained by a thread into a queue."""

    def __init__(self, args: list[str], run_dir: Path, env: dict[str, str] | None = None) -> None:
        self.run_dir = run_dir
        self.base_url = ""  # set by `started()` once ready
        argv = [sys.executable, "-m", "hpcserve", "up", *args, "--set", f"run_dir={run_dir}"]
        self.popen = subprocess.Popen(
            argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            env=env or dict(os.environ), start_new_session=True,
        )  # fmt: skip
        self.lines: list[str] = []
        self._queue: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._drain, daemon=True).start()

    def _drain(self) -> None:
        assert self.popen.stdout is not None
        for line in self.popen.stdout:
            self._queue.put(line.rstrip("\n"))
        self._queue.put(None)

    def wait_for_line(self, pattern: re.Pattern[str], timeout_s: float) -> re.Match[str]:
        deadline = time.monotonic() + timeout_s
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"no line matching {pattern.pattern!r}:\n{self.output}")
            try:
                line = self._queue.get(timeout=remaining)
            except queue.Empty:
                continue
            if line is None:
                raise RuntimeError(f"hpcserve up exited ({self.popen.wait()}):\n{self.output}")
            self.lines.append(line)
            match = pattern.search(line)
            if match:
                return match

    def wait_ready(self, timeout_s: float = 300) -> str:
        return self.wait_for_line(READY, timeout_s).group(1)

    def finish(self, timeout_s: float = 60) -> int:
        code = self.popen.wait(timeout_s)
        while True:
            try:
                line = self._queue.get(timeout=5)
            except queue.Empty:
                break
            if line is None:
                break
            self.lines.append(line)
        return code

    @property
    def output(self) -> str:
        return "\n".join(self.lines)

    def next_restart(self, name: str) -> int:
        """The number the supervisor gives `name`'s next restart: a worker whose MPI_Init
        failed at start (a rare failure of MPI's start-up on a loaded machine) was started
        again, and that counted as one (lines read so far: call it after `wait_ready`)."""
        failed_starts = f"{name}: MPI_Init failed at start"
        return 1 + sum(failed_starts in line for line in self.lines)

    def wait_back(self, name: str, restart: int, timeout_s: float) -> int:
        """Until `name` is back from restart `restart` or a later one (a TP group started right
        after a rank's death may fail its start once, and the restart after it brings the
        group back); returns that restart's number."""
        back = re.compile(rf"{re.escape(name)} is back \(restart (\d+)\)")
        deadline = time.monotonic() + timeout_s
        while True:
            match = self.wait_for_line(back, max(deadline - time.monotonic(), 0.001))
            if int(match.group(1)) >= restart:
                return int(match.group(1))

    def pids(self) -> dict[str, int]:
        return json.loads((self.run_dir / "pids.json").read_text())

    def kill_all(self) -> None:
        """Last-resort cleanup for a failed test: the launcher first, then its children."""
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(60)
            except subprocess.TimeoutExpired:
                self.popen.kill()
        if (self.run_dir / "pids.json").exists():
            for pid in self.pids().values():
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(pid, signal.SIGKILL)


@contextlib.contextmanager
def started(args: list[str], run_dir: Path, timeout_s: float = 300) -> Iterator[UpProcess]:
    """`hpcserve up ARGS` until ready (its `base_url` set); everything killed on exit."""
    process = UpProcess(args, run_dir)
    try:
        process.base_url = process.wait_ready(timeout_s=timeout_s)
        yield process
    finally:
        process.kill_all()


def openai_client(up: UpProcess, timeout: float = 120):
    """A synchronous OpenAI client for the deployment, without retries."""
    import openai

    return openai.OpenAI(base_url=up.base_url, api_key="none", max_retries=0, timeout=timeout)


def processes_mentioning(text: str) -> list[int]:
    """Live PIDs whose command line contains `text` (e.g. a run folder)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if text in cmdline and pid_alive(int(entry.name)):
            found.append(int(entry.name))
    return found


def hpcserve_bench(*args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    """`hpcserve bench ARGS...` from the repository, its output captured."""
    return subprocess.run([sys.executable, "-m", "hpcserve", "bench", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=timeout, check=False)  # fmt: skip


def rank_pids(run_dir: Path) -> dict[int, int]:
    """MPI rank -> PID of the real rank processes (children of the rank guards)."""
    ranks = {}
    for pid in processes_mentioning(str(run_dir)):
        try:
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"HPCSERVE_RANK_GUARD=child" in env:
            rank = next(v for v in env if v.startswith(b"PMI_RANK="))
            ranks[int(rank.split(b"=")[1])] = pid
    return ranks


def concurrent_completions(
    up: UpProcess, requests: list[tuple[list[int], dict]], max_tokens: int
) -> list[str]:
    """Send every (prompt ids, sampling params) at once with the async openai client; texts
    in request order."""
    import asyncio

    import openai

    async def run() -> list[str]:
        client = openai.AsyncOpenAI(
            base_url=up.base_url, api_key="none", max_retries=0, timeout=180
        )
        model = (await client.models.list()).data[0].id
        responses = await asyncio.gather(
            *(
                client.completions.create(
                    model=model, prompt=prompt, max_tokens=max_tokens, **params
                )
                for prompt, params in requests
            )
        )
        await client.close()
        return [r.choices[0].text for r in responses]

    return asyncio.run(run())


def assert_concurrent_match_reference(
    up: UpProcess, prompt_ids: list[list[int]], cases: list[tuple[int, dict]],
    reference: dict[tuple[int, str], str], max_tokens: int,
) -> None:
    """Every case sent at once; each text equals the reference's (`aggregated_texts`)."""
    requests = [(prompt_ids[i], params) for i, params in cases]
    texts = concurrent_completions(up, requests, max_tokens)
    for (i, params), text in zip(cases, texts, strict=True):
        assert text == reference[(i, json.dumps(params))], (i, params)


def greedy_and_seeded(num_prompts: int, seed_base: int) -> list[tuple[int, dict]]:
    """(prompt index, sampling params): every prompt greedy and with seeded sampling."""
    out: list[tuple[int, dict]] = []
    for i in range(num_prompts):
        out.append((i, {"temperature": 0.0}))
        out.append((i, {"temperature": 0.9, "top_p": 0.95, "seed": seed_base + i}))
    return out


def aggregated_texts(
    model_dir: Path, tokenizer, prompt_ids: list[list[int]], cases: list[tuple[int, dict]],
    max_tokens: int,
) -> dict[tuple[int, str], str]:
    """Aggregated serving's text for every case, keyed (prompt index, params as JSON): all at
    once in one in-process TP 1 engine (the reference disaggregated serving must equal)."""
    import asyncio

    from contract.messages import GenerateRequest, SamplingParams
    from mpi_workers.engine.torch.engine import TorchEngine

    engine = TorchEngine(
        model_dir, block_size=16, kv_cache_memory_bytes=64 * 2**20, max_model_len=4096
    )

    async def run() -> list:
        await engine.start()
        try:
            return await asyncio.gather(
                *(
                    engine.generate_all(
                        GenerateRequest(
                            request_id=f"ref-{n}",
                            token_ids=prompt_ids[i],
                            sampling=SamplingParams(max_tokens=max_tokens, **params),
                        )
                    )
                    for n, (i, params) in enumerate(cases)
                )
            )
        finally:
            await engine.shutdown()

    outs = asyncio.run(run())
    return {
        (i, json.dumps(params)): tokenizer.decode(out.token_ids)
        for (i, params), out in zip(cases, outs, strict=True)
    }
