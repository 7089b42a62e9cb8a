"""The one supervisor of a deployment: `hpcserve up` and the Slurm job both run it.

It executes the deployment plan (`contract.plan`): starts the processes stage by stage
(services, workers, frontend), awaits each one's readiness, watches them while serving,
restarts a crashed one under its restart policy, and stops everything in reverse order. How a
process is started is the caller's: a local process group (`hpcserve up`) or an `srun` step
over the worker's node slice (the Slurm job); both give a `ManagedProcess`.

While serving, a component that exits is handled by what it is:
- a worker that exits 0 has drained (SIGTERM, `hpcserve drain`): it stays down;
- anything else crashed: its registration is dropped from etcd at once (the frontend then
  migrates its streams instead of waiting for the lease to lapse), and after a backoff that
  doubles each time it is started again; it counts as back once it has registered anew (a
  worker) or answers its readiness check (a service, the frontend);
- out of restarts: a critical component fails the deployment (`DeploymentFailed` names it
  and why); another one stays down and the rest serve on.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from contract.config import DeploymentConfig
from contract.discovery import worker_key
from contract.mpirun import mpi_init_failed
from contract.plan import (
    STAGE_WORKERS,
    STOP_TIMEOUT_S,
    WORKER_STOP_TIMEOUT_S,
    PlannedProcess,
    Readiness,
    remove_frontend_shared_files,
)
from contract.processes import ManagedProcess, ProcessFailed
from contract.readiness import (
    PROBE_ERRORS,
    etcd_delete_key,
    etcd_key_revision,
    http_ok,
    http_ok_from,
    keys_registered,
    port_open,
)

logger = logging.getLogger(__name__)

READY_TIMEOUT_S = {"etcd": 30.0, "nats": 30.0, "frontend": 180.0}
WORKER_READY_TIMEOUT_S = 600.0
MAX_BACKOFF_S = 60.0
DRAIN_DIR = "drain"  # <run dir>/drain/<component>: `hpcserve drain` asks for a drain here
# <run dir>/supervisor.json: restarts and phase per component (the frontend's /metrics reads it)
SUPERVISOR_FILE = "supervisor.json"

Launch = Callable[[PlannedProcess], ManagedProcess]
Say = Callable[[str], None]
Phase = Literal["starting", "ready", "waiting", "draining", "drained", "given_up"]


class DeploymentFailed(RuntimeError):
    """A critical component is down for good (or never started); the message says why."""

    def __init__(self, component: str, message: str, log_path: Path | None = None) -> None:
        super().__init__(message)
        self.component = component
        self.log_path = log_path


@dataclass(frozen=True)
class Policy:
    """A component's restart policy (from its config section)."""

    max_restarts: int
    backoff_s: float
    critical: bool = True

    def delay(self, restarts_so_far: int) -> float:
        return min(MAX_BACKOFF_S, self.backoff_s * 2**restarts_so_far)


def policy_for(config: DeploymentConfig, planned: PlannedProcess) -> Policy:
    if planned.group is not None:
        group = config.workers[planned.group]
        return Policy(group.restart.max_restarts, group.restart.backoff_s, group.critical)
    if planned.role == "frontend":
        restart = config.frontend.restart
    else:
        restart = getattr(config.services, planned.role).restart
    return Policy(restart.max_restarts, restart.backoff_s, critical=True)


def readiness_check(ready: Readiness) -> Callable[[], bool]:
    if ready.kind == "port":
        assert ready.host is not None and ready.port is not None
        return lambda: port_open(ready.host, ready.port)
    if ready.kind == "http":
        assert ready.url is not None
        if ready.process is not None:
            return lambda: http_ok_from(ready.url, ready.process)
        return lambda: http_ok(ready.url)
    assert ready.etcd_endpoint is not None and ready.prefix is not None
    return keys_registered(ready.etcd_endpoint, ready.prefix, ready.count or 1)


def ready_timeout_s(planned: PlannedProcess) -> float:
    return READY_TIMEOUT_S.get(planned.role, WORKER_READY_TIMEOUT_S)


def stop_timeout_s(planned: PlannedProcess) -> float:
    return WORKER_STOP_TIMEOUT_S if planned.stage == STAGE_WORKERS else STOP_TIMEOUT_S


@dataclass
class Component:
    """One planned process and what the supervisor knows of it."""

    planned: PlannedProcess
    policy: Policy
    process: ManagedProcess | None = None
    phase: Phase = "starting"
    restarts: int = 0
    due: float = 0.0  # waiting: when to start again; starting: the readiness deadline
    check: Callable[[], bool] = field(default=lambda: False)
    # a restarted worker process's old registrations: key → revision (None: none was left)
    stale_revisions: dict[str, int | None] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.planned.name


class Supervisor:
    def __init__(
        self,
        config: DeploymentConfig,
        plan: list[PlannedProcess],
        launch: Launch,
        *,
        run_dir: Path,
        say: Say,
        on_change: Callable[[Supervisor], None] | None = None,
        on_stage: Callable[[int], None] | None = None,
        ending: Callable[[], bool] = lambda: False,
    ) -> None:
        """`on_change(self)`: after any component changed (the Slurm job records it);
        `on_stage(stage)`: a start-up stage begins; `ending()` True: the whole deployment is
        being torn down from outside (scancel), so a component's exit is no crash."""
        self.config = config
        self.components = [Component(p, policy_for(config, p)) for p in plan]
        self.launch = launch
        self.run_dir = run_dir
        self.say = say
        self.on_change = on_change
        self.on_stage = on_stage
        self.ending = ending

    # ----- start and stop ------------------------------------------------------------------
    def start(self) -> None:
        """Start every stage and await its readiness; DeploymentFailed names a component that
        exits or times out before it is ready (start-up failures are not retried, except a
        worker's MPI world that failed to form: `_await_start`)."""
        for stage in sorted({c.planned.stage for c in self.components}):
            if self.on_stage is not None:
                self.on_stage(stage)
            members = [c for c in self.components if c.planned.stage == stage]
            for component in members:
                self._launch(component)
            self.write_pids()
            for component in members:
                t0 = time.monotonic()
                self._await_start(component)
                component.phase = "ready"
                self.say(f"{component.name} ready in {time.monotonic() - t0:.1f} s "
                         f"({component.planned.ready.describe()})")  # fmt: skip
            self._changed()

    def _await_start(self, component: Component) -> None:
        """Wait until `component` is ready. A worker whose ranks' MPI_Init failed is started
        again under its restart policy (the world of a multi-node group can fail to form once:
        a PMI exchange gone wrong); any other start-up failure fails the deployment at once."""
        while True:
            process = component.process
            assert process is not None
            try:
                process.wait_ready(readiness_check(component.planned.ready),
                                   ready_timeout_s(component.planned), poll_s=0.1)  # fmt: skip
                return
            except ProcessFailed as exc:
                if not self._start_again(component, process):
                    raise DeploymentFailed(component.name, str(exc), process.log_path) from None

    def _start_again(self, component: Component, process: ManagedProcess) -> bool:
        """Relaunch a worker that exited at start because its MPI world did not form, after
        the policy's backoff, while restarts are left; False: the failure stands."""
        policy = component.policy
        if (component.planned.stage != STAGE_WORKERS or process.running()
                or component.restarts >= policy.max_restarts
                or not mpi_init_failed(process.log_of_this_run())):  # fmt: skip
            return False
        delay = policy.delay(component.restarts)
        self.say(f"{component.name}: MPI_Init failed at start (exit {process.popen.returncode}); "
                 f"start {component.restarts + 1} of {policy.max_restarts} again in {delay:.1f} s "
                 f"(log {process.log_path})")  # fmt: skip
        time.sleep(delay)  # the policy's backoff, as between restarts while serving
        component.restarts += 1
        self._launch(component)
        self.write_pids()
        return True

    def stop(self) -> None:
        """Stop every process, last stage first; one stage's processes in parallel; then
        remove what the frontend processes shared while serving (their round-robin counter
        and load table)."""
        for stage in sorted({c.planned.stage for c in self.components}, reverse=True):
            group = [c for c in reversed(self.components) if c.planned.stage == stage]
            group = [c for c in group if c.process is not None]

            def stop(component: Component) -> None:
                assert component.process is not None
                code = component.process.stop(stop_timeout_s(component.planned))
                self.say(f"stopped {component.name} (exit {code})")

            with ThreadPoolExecutor(max_workers=max(1, len(group))) as pool:
                list(pool.map(stop, group))
        remove_frontend_shared_files([c.planned for c in self.components])

    # ----- serving -------------------------------------------------------------------------
    def serve(self, poll_s: float = 0.2) -> None:
        """Watch until DeploymentFailed (or the caller's signal handler raises)."""
        while True:
            if not self.poll():
                return
            time.sleep(poll_s)

    def poll(self) -> bool:
        """One look at every component; False once the deployment is being torn down."""
        changed = self._take_drain_requests()
        for component in self.components:
            process = component.process
            if component.phase in ("ready", "starting", "draining") and process is not None:
                if not process.running():
                    if self.ending():
                        return False
                    self._exited(component, process)
                    changed = True
                elif component.phase == "starting":
                    changed |= self._check_restarted(component)
            elif component.phase == "waiting" and time.monotonic() >= component.due:
                self._restart(component)
                changed = True
        if changed:
            self._changed()
        return True

    def _exited(self, component: Component, process: ManagedProcess) -> None:
        code = process.popen.returncode
        is_worker = component.planned.stage == STAGE_WORKERS
        if is_worker and code == 0 and component.phase in ("ready", "draining"):
            component.phase = "drained"
            self.say(f"{component.name} drained and left (exit 0); not restarted")
            return
        self._forget_registration(component)
        policy = component.policy
        what = f"{component.name} exited with code {code}"
        if component.restarts >= policy.max_restarts and policy.critical:
            why = f"{what}; no restarts left ({policy.max_restarts} allowed)"
            tail = f"{why}. Its log {process.log_path} ends:\n{process.log_tail()}"
            raise DeploymentFailed(component.name, tail, process.log_path)
        ended = process.last_line()  # the failure's own words, where the log is not quoted
        last_words = f"; its log's last line: {ended}" if ended else ""
        if component.restarts >= policy.max_restarts:
            why = f"{what}; no restarts left ({policy.max_restarts} allowed)"
            component.phase = "given_up"
            self.say(f"{why}; not critical: the others serve on{last_words}")
            return
        delay = policy.delay(component.restarts)
        component.phase = "waiting"
        component.due = time.monotonic() + delay
        self.say(f"{what}; restart {component.restarts + 1} of {policy.max_restarts} in "
                 f"{delay:.1f} s (log {process.log_path}){last_words}")  # fmt: skip

    def _restart(self, component: Component) -> None:
        component.restarts += 1
        self._launch(component)
        component.phase = "starting"
        component.due = time.monotonic() + ready_timeout_s(component.planned)
        if component.planned.stage == STAGE_WORKERS:
            component.check = self._registered_anew(component)
        else:
            component.check = readiness_check(component.planned.ready)

    def _check_restarted(self, component: Component) -> bool:
        if component.check():
            component.phase = "ready"
            self.say(f"{component.name} is back (restart {component.restarts})")
            return True
        if time.monotonic() > component.due:
            self.say(f"{component.name} not ready {ready_timeout_s(component.planned):.0f} s "
                     "after its restart: stopping it")  # fmt: skip
            assert component.process is not None
            component.process.stop(stop_timeout_s(component.planned))  # next poll: exited
        return False

    def _launch(self, component: Component) -> None:
        component.process = self.launch(component.planned)
        self.say(f"started {component.name} (pid {component.process.pid}, "
                 f"log {component.process.log_path})")  # fmt: skip

    # ----- worker registrations ------------------------------------------------------------
    def _registration_keys(self, component: Component) -> list[str]:
        """The etcd keys of every worker the process hosts (one, or several simulated ones)."""
        planned = component.planned
        return [worker_key(self.config.name, planned.role, wid) for wid in planned.worker_ids]

    def _forget_registration(self, component: Component) -> None:
        """Drop a dead worker process's keys now: its streams fail over at once, new requests
        go elsewhere, and a restarted instance is told apart from the stale keys."""
        endpoint = self.config.services.etcd.endpoint
        if endpoint is None:
            return
        for key in self._registration_keys(component):
            with contextlib.suppress(*PROBE_ERRORS):
                component.stale_revisions[key] = etcd_key_revision(endpoint, key)
                etcd_delete_key(endpoint, key)

    def _registered_anew(self, component: Component) -> Callable[[], bool]:
        """True once every worker the restarted process hosts has registered again."""
        keys = self._registration_keys(component)
        endpoint = self.config.services.etcd.endpoint
        assert keys and endpoint is not None

        def registered() -> bool:
            for key in keys:
                try:
                    revision = etcd_key_revision(endpoint, key)
                except PROBE_ERRORS:
                    return False
                if revision is None or revision == component.stale_revisions.get(key):
                    return False
            return True

        return registered

    # ----- drain ---------------------------------------------------------------------------
    def _take_drain_requests(self) -> bool:
        """`hpcserve drain` leaves `<run dir>/drain/<worker>`: SIGTERM that worker (it
        deregisters, finishes what it holds and exits 0, and is not restarted)."""
        folder = self.run_dir / DRAIN_DIR
        if not folder.is_dir():
            return False
        changed = False
        for request in folder.iterdir():
            component = next((c for c in self.components if c.name == request.name), None)
            request.unlink(missing_ok=True)
            if component is None or component.planned.stage != STAGE_WORKERS:
                self.say(f"drain request for {request.name!r} ignored: no such worker")
                continue
            if component.phase == "ready" and component.process is not None:
                component.process.terminate()
                component.phase = "draining"
                self.say(f"draining {component.name}")
                changed = True
        return changed

    def drain_workers(self, timeout_s: float, poll_s: float = 0.2) -> list[str]:
        """The graceful end of the whole deployment (time limit, preemption): SIGTERM every
        worker at once (each deregisters, finishes its streams and exits 0) and wait, bounded,
        until all are gone; the frontend and services still run, so held streams complete.
        Returns the workers still running at the deadline (the ordered stop ends them)."""
        workers = [c for c in self.components
                   if c.planned.stage == STAGE_WORKERS and c.process is not None]  # fmt: skip
        for component in workers:
            assert component.process is not None
            if component.process.running():
                component.process.terminate()
                component.phase = "draining"
        self._changed()
        deadline = time.monotonic() + timeout_s
        while True:
            left = [c for c in workers if c.process is not None and c.process.running()]
            if not left or time.monotonic() > deadline:
                break
            time.sleep(poll_s)
        for component in workers:
            if component not in left:
                component.phase = "drained"
        self._changed()
        return [c.name for c in left]

    # ----- reporting -----------------------------------------------------------------------
    def _changed(self) -> None:
        self.write_pids()
        _write_json(self.run_dir / SUPERVISOR_FILE,
                    {"restarts": self.restarts(), "phases": self.phases()})  # fmt: skip
        if self.on_change is not None:
            self.on_change(self)

    def write_pids(self) -> None:
        """`<run dir>/pids.json`: each component's current PID."""
        pids = {c.name: c.process.pid for c in self.components if c.process is not None}
        _write_json(self.run_dir / "pids.json", pids)

    def restarts(self) -> dict[str, int]:
        return {c.name: c.restarts for c in self.components if c.restarts}

    def phases(self) -> dict[str, str]:
        return {c.name: c.phase for c in self.components}


def _write_json(path: Path, data: object) -> None:
    """Replace `path` atomically: others read it at any time."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    tmp.replace(path)


__all__ = ["DeploymentFailed", "Policy", "ProcessFailed", "Supervisor", "policy_for"]
