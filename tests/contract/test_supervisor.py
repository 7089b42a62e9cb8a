"""The supervisor against real processes and a real etcd: start order, readiness, restarts
after crashes (the dead worker's key dropped at once, the new one told apart from it), drain,
critical and non-critical components out of restarts, the ordered stop.

The components are small Python processes standing in for etcd/NATS/workers: a "service"
listens on a port, a "worker" puts its registration key into etcd (as a real worker does,
through the same key layout) and exits 0 on SIGTERM (a drain)."""

from __future__ import annotations

import base64
import json
import os
import signal
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest

from contract.config import DeploymentConfig
from contract.discovery import worker_key
from contract.plan import STAGE_FRONTEND, STAGE_SERVICES, STAGE_WORKERS, PlannedProcess, Readiness
from contract.processes import pid_alive
from contract.readiness import etcd_key_revision, free_port
from contract.supervisor import DRAIN_DIR, DeploymentFailed, Supervisor

SERVICE = """
import signal, socket, sys, time
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("127.0.0.1", int(sys.argv[1]))); s.listen()
while True: time.sleep(1)
"""

WORKER = """
import base64, json, signal, sys, time, urllib.request
endpoint, keys = sys.argv[1], sys.argv[2:]
signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # a drain: finish, exit 0
for key in keys:  # one key per worker the process hosts
    body = {"key": base64.b64encode(key.encode()).decode(),
            "value": base64.b64encode(b"{}").decode()}
    request = urllib.request.Request(endpoint + "/v3/kv/put", data=json.dumps(body).encode(),
                                     method="POST", headers={"Content-Type": "application/json"})
    urllib.request.urlopen(request, timeout=5).read()
    print("registered", key, flush=True)
    time.sleep(float(__import__("os").environ.get("STAGGER_S", "0")))
while True: time.sleep(1)
"""


def make_config(etcd: str, name: str, **group) -> DeploymentConfig:
    group.setdefault("restart", {"max_restarts": 1, "backoff_s": 0.1})
    return DeploymentConfig.model_validate({
        "name": name,
        "engine": {"kind": "mocker"},
        "workers": [{"count": 2, **group}],
        "services": {"etcd": {"start": False, "endpoint": etcd},
                     "nats": {"start": True, "endpoint": "nats://127.0.0.1:1",
                              "restart": {"max_restarts": 1, "backoff_s": 0.1}}},
    })  # fmt: skip


def make_plan(config: DeploymentConfig, hosted: tuple[int, ...] = (1, 1)) -> list[PlannedProcess]:
    """nats, one worker process per entry of `hosted` (hosting that many workers), frontend."""
    etcd = config.services.etcd.endpoint
    assert etcd is not None
    port = free_port()
    plan = [PlannedProcess("nats", "nats", STAGE_SERVICES, (sys.executable, "-c", SERVICE,
                           str(port)), Readiness("port", "127.0.0.1", port))]  # fmt: skip
    ready = Readiness("registrations", etcd_endpoint=etcd,
                      prefix=worker_key(config.name, "agg", ""), count=sum(hosted))  # fmt: skip
    first = 0
    for count in hosted:
        wids = tuple(f"agg-g0-i{i}" for i in range(first, first + count))
        keys = [worker_key(config.name, "agg", wid) for wid in wids]
        name = f"worker-{wids[0]}" + (f"-{first + count - 1}" if count > 1 else "")
        plan.append(PlannedProcess(name, "agg", STAGE_WORKERS,
                                   (sys.executable, "-c", WORKER, etcd, *keys), ready,
                                   group=0, index=first, worker_ids=wids))  # fmt: skip
        first += count
    front = free_port()
    plan.append(PlannedProcess("frontend", "frontend", STAGE_FRONTEND,
                               (sys.executable, "-c", SERVICE, str(front)),
                               Readiness("port", "127.0.0.1", front)))  # fmt: skip
    return plan


def supervise(
    tmp_path: Path, config: DeploymentConfig, hosted: tuple[int, ...] = (1, 1),
    env: dict[str, str] | None = None,
    edit_plan: Callable[[list[PlannedProcess]], None] | None = None,
) -> tuple[Supervisor, list[str]]:
    from contract.processes import ManagedProcess

    said: list[str] = []

    def launch(planned: PlannedProcess) -> ManagedProcess:
        return ManagedProcess.spawn(planned.name, planned.argv,
                                    tmp_path / "logs" / f"{planned.name}.log",
                                    env={**os.environ, **(env or {})})  # fmt: skip

    plan = make_plan(config, hosted)
    if edit_plan is not None:
        edit_plan(plan)
    return Supervisor(config, plan, launch, run_dir=tmp_path, say=said.append), said


def poll_until(supervisor: Supervisor, done, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not done():
        assert supervisor.poll()
        assert time.monotonic() < deadline, supervisor.phases()
        time.sleep(0.05)


def pid_of(supervisor: Supervisor, name: str) -> int:
    component = next(c for c in supervisor.components if c.name == name)
    assert component.process is not None
    return component.process.pid


def etcd_get(etcd: str, key: str) -> bool:
    body = {"key": base64.b64encode(key.encode()).decode()}
    request = urllib.request.Request(etcd + "/v3/kv/range", data=json.dumps(body).encode(),
                                     method="POST", headers={"Content-Type": "application/json"})
    return bool(json.loads(urllib.request.urlopen(request, timeout=5).read()).get("kvs"))


def test_crashed_worker_is_restarted_and_registers_anew(tmp_path, etcd_endpoint) -> None:
    config = make_config(etcd_endpoint, "sup-restart")
    supervisor, said = supervise(tmp_path, config)
    try:
        supervisor.start()
        assert said[0].startswith("started nats") and said[-1].startswith("frontend ready")
        key = worker_key(config.name, "agg", "agg-g0-i1")
        old_revision = etcd_key_revision(etcd_endpoint, key)
        old_pid = pid_of(supervisor, "worker-agg-g0-i1")
        os.killpg(old_pid, signal.SIGKILL)
        poll_until(supervisor, lambda: supervisor.phases()["worker-agg-g0-i1"] == "waiting")
        assert not etcd_get(etcd_endpoint, key)  # dropped at once, not after a lease
        exit_line = next(line for line in said if "worker-agg-g0-i1 exited with code -9" in line)
        assert exit_line.endswith(f"; its log's last line: registered {key}"), exit_line
        poll_until(supervisor, lambda: supervisor.phases()["worker-agg-g0-i1"] == "ready")
        assert supervisor.restarts() == {"worker-agg-g0-i1": 1}
        assert pid_of(supervisor, "worker-agg-g0-i1") != old_pid
        assert etcd_key_revision(etcd_endpoint, key) not in (None, old_revision)
        assert any("worker-agg-g0-i1 is back (restart 1)" in line for line in said)
        pids = json.loads((tmp_path / "pids.json").read_text())
        assert pids["worker-agg-g0-i1"] == pid_of(supervisor, "worker-agg-g0-i1")
        # A crashed service is restarted too (its port readiness).
        os.killpg(pid_of(supervisor, "nats"), signal.SIGKILL)
        poll_until(supervisor, lambda: supervisor.restarts().get("nats") == 1
                   and supervisor.phases()["nats"] == "ready")  # fmt: skip
    finally:
        supervisor.stop()
    assert not any(pid_alive(pid) for pid in json.loads((tmp_path / "pids.json").read_text())
                   .values())  # fmt: skip


def anew(etcd: str, keys: list[str], old: list[int | None]) -> list[bool]:
    """Per key: registered with another revision than `old`'s."""
    now = [etcd_key_revision(etcd, key) for key in keys]
    return [rev is not None and rev != was for rev, was in zip(now, old, strict=True)]


def test_a_process_hosting_several_workers_restarts_them_together(tmp_path, etcd_endpoint):
    """Its death drops every card it held at once; it is back only once all of them have
    registered anew (the restarted process registers them one by one, STAGGER_S apart)."""
    config = make_config(etcd_endpoint, "sup-hosted")
    supervisor, said = supervise(tmp_path, config, hosted=(3, 1), env={"STAGGER_S": "0.3"})
    name = "worker-agg-g0-i0-2"
    try:
        supervisor.start()
        keys = [worker_key(config.name, "agg", f"agg-g0-i{i}") for i in range(3)]
        old = [etcd_key_revision(etcd_endpoint, key) for key in keys]
        assert None not in old
        os.killpg(pid_of(supervisor, name), signal.SIGKILL)
        poll_until(supervisor, lambda: supervisor.phases()[name] == "waiting")
        assert not any(etcd_get(etcd_endpoint, key) for key in keys)
        assert etcd_get(etcd_endpoint, worker_key(config.name, "agg", "agg-g0-i3"))
        seen_partial = False
        deadline = time.monotonic() + 30
        while supervisor.phases()[name] != "ready":
            assert supervisor.poll() and time.monotonic() < deadline, supervisor.phases()
            registered = sum(anew(etcd_endpoint, keys, old))
            seen_partial |= 0 < registered < len(keys)
            time.sleep(0.02)
        assert seen_partial  # ready waited past the first card(s) of the three
        assert all(anew(etcd_endpoint, keys, old))  # checked right after the flip to ready
        assert supervisor.restarts() == {name: 1}
        assert any(f"{name} is back (restart 1)" in line for line in said)
    finally:
        supervisor.stop()


def test_drained_worker_stays_down_and_critical_exhaustion_fails(tmp_path, etcd_endpoint):
    config = make_config(etcd_endpoint, "sup-drain")
    supervisor, _said = supervise(tmp_path, config)
    try:
        supervisor.start()
        (tmp_path / DRAIN_DIR).mkdir()
        (tmp_path / DRAIN_DIR / "worker-agg-g0-i0").touch()
        poll_until(supervisor, lambda: supervisor.phases()["worker-agg-g0-i0"] == "drained")
        assert not (tmp_path / DRAIN_DIR / "worker-agg-g0-i0").exists()
        for _ in range(10):  # not restarted
            assert supervisor.poll()
        assert supervisor.phases()["worker-agg-g0-i0"] == "drained"
        # The other worker crashes twice: one restart allowed, then the deployment fails.
        os.killpg(pid_of(supervisor, "worker-agg-g0-i1"), signal.SIGKILL)
        poll_until(supervisor, lambda: supervisor.restarts() == {"worker-agg-g0-i1": 1}
                   and supervisor.phases()["worker-agg-g0-i1"] == "ready")  # fmt: skip
        os.killpg(pid_of(supervisor, "worker-agg-g0-i1"), signal.SIGKILL)
        with pytest.raises(DeploymentFailed, match="no restarts left") as failure:
            poll_until(supervisor, lambda: False)
        assert failure.value.component == "worker-agg-g0-i1"
    finally:
        supervisor.stop()


def test_non_critical_worker_out_of_restarts_leaves_the_rest_serving(tmp_path, etcd_endpoint):
    config = make_config(etcd_endpoint, "sup-noncritical", critical=False,
                         restart={"max_restarts": 0, "backoff_s": 0.1})  # fmt: skip
    supervisor, said = supervise(tmp_path, config)
    try:
        supervisor.start()
        os.killpg(pid_of(supervisor, "worker-agg-g0-i0"), signal.SIGKILL)
        poll_until(supervisor, lambda: supervisor.phases()["worker-agg-g0-i0"] == "given_up")
        assert any("not critical: the others serve on" in line for line in said)
        assert supervisor.phases()["worker-agg-g0-i1"] == "ready"
        assert supervisor.poll()
    finally:
        supervisor.stop()


def first_worker_runs(plan: list[PlannedProcess], argv: tuple[str, ...]) -> None:
    """worker-agg-g0-i0 of `plan` runs `argv` instead."""
    worker = plan[1]
    plan[1] = PlannedProcess(worker.name, worker.role, worker.stage, argv, worker.ready,
                             group=0, index=0, worker_ids=worker.worker_ids)  # fmt: skip


def failed_start(supervisor: Supervisor, code: int) -> DeploymentFailed:
    """What `start()` raised: worker-agg-g0-i0 exited with `code` before it was ready."""
    with pytest.raises(DeploymentFailed, match=f"exited with code {code} before it was ready"
                       ) as failure:  # fmt: skip
        supervisor.start()
    assert failure.value.component == "worker-agg-g0-i0"
    return failure.value


def test_a_component_dying_at_start_fails_naming_it(tmp_path, etcd_endpoint) -> None:
    """Not retried although it has a restart left: a missing GPU does not improve."""
    no_gpu = (sys.executable, "-c", "import sys; print('no GPU'); sys.exit(3)")
    supervisor, _said = supervise(tmp_path, make_config(etcd_endpoint, "sup-start"),
                                  edit_plan=lambda plan: first_worker_runs(plan, no_gpu))
    try:
        assert "no GPU" in str(failed_start(supervisor, 3))
        assert supervisor.restarts() == {}
    finally:
        supervisor.stop()


# A worker whose first start fails the way MPICH's MPI_Init does (the world of a multi-node
# group not formed: a PMI exchange gone wrong), then starts as the plain WORKER.
MPI_INIT_FAILS_ONCE = """
import os, sys
marker = sys.argv[1]
if not os.path.exists(marker):
    open(marker, "w").close()
    print("Abort(273827087) on node 0: Fatal error in internal_Init_thread: Other MPI error")
    sys.exit(15)
sys.argv = [sys.argv[0], *sys.argv[2:]]
exec(compile(sys.argv.pop(1), "worker", "exec"))
"""


def with_mpi_init_failing_once(plan: list[PlannedProcess], marker: Path) -> None:
    """worker-agg-g0-i0 of `plan` fails its first start in MPI_Init."""
    argv = (sys.executable, "-c", MPI_INIT_FAILS_ONCE, str(marker), WORKER, *plan[1].argv[3:])
    first_worker_runs(plan, argv)


def test_a_worker_whose_mpi_init_failed_is_started_again(tmp_path, etcd_endpoint) -> None:
    """An MPI world that did not form at start is a start-up failure worth a second try (under
    the worker's restart policy); the deployment then comes up."""
    supervisor, said = supervise(
        tmp_path, make_config(etcd_endpoint, "sup-mpi-once"),
        edit_plan=lambda plan: with_mpi_init_failing_once(plan, tmp_path / "first-start"),
    )  # fmt: skip
    try:
        supervisor.start()
        assert supervisor.phases()["worker-agg-g0-i0"] == "ready"
        assert supervisor.restarts() == {"worker-agg-g0-i0": 1}
        assert any("MPI_Init failed at start (exit 15); start 1 of 1 again" in m for m in said)
    finally:
        supervisor.stop()


def test_a_failed_mpi_init_with_no_restarts_left_fails_the_start(tmp_path, etcd_endpoint):
    config = make_config(etcd_endpoint, "sup-mpi-none", restart={"max_restarts": 0})
    supervisor, said = supervise(
        tmp_path, config,
        edit_plan=lambda plan: with_mpi_init_failing_once(plan, tmp_path / "first-start"),
    )  # fmt: skip
    try:
        assert "internal_Init_thread" in str(failed_start(supervisor, 15))
        assert not any("MPI_Init failed at start" in m for m in said)
    finally:
        supervisor.stop()


def test_drain_workers_ends_every_worker_first_and_leaves_the_rest(tmp_path, etcd_endpoint):
    """The graceful end of a job: every worker gets its drain signal at once and exits 0;
    the frontend and services are still up for the streams being finished."""
    supervisor, _said = supervise(tmp_path, make_config(etcd_endpoint, "drain-all"))
    supervisor.start()
    try:
        assert supervisor.drain_workers(timeout_s=10) == []
        phases = supervisor.phases()
        assert phases["worker-agg-g0-i0"] == phases["worker-agg-g0-i1"] == "drained"
        for component in supervisor.components:
            assert component.process is not None
            if component.planned.stage == STAGE_WORKERS:
                assert component.process.popen.returncode == 0
            else:
                assert component.process.running(), component.name
        saved = json.loads((tmp_path / "supervisor.json").read_text())
        assert saved["phases"]["worker-agg-g0-i1"] == "drained"
    finally:
        supervisor.stop()
