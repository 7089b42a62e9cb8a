"""A cluster left behind by a killed run (its daemons, namespaces and bridge outlive it) does
not block the next `cluster.sh up`; a cluster whose owner still runs does: the tests' helper
waits for it and never takes it down."""

from __future__ import annotations

import logging
import os
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from cluster_helpers import BUSY, cluster_sh, running_cluster

from contract.processes import pid_alive

pytestmark = [
    pytest.mark.slurm,
    pytest.mark.skipif(
        os.geteuid() != 0,
        reason="the Slurm test cluster needs root (network namespaces, slurmd as root)",
    ),
]


@contextmanager
def another_runs_cluster(
    tmp_path_factory: pytest.TempPathFactory, name: str
) -> Iterator[tuple[subprocess.Popen[bytes], dict[str, str], int]]:
    """A one-node cluster brought up for another test run (its owner: a `sleep` we kill to
    end that run): (owner, that run's environment, its slurmctld's PID); taken down after."""
    owner = subprocess.Popen(["sleep", "600"])
    env = dict(os.environ)
    env["HPCSERVE_SLURM_DIR"] = str(tmp_path_factory.mktemp(name))
    env["HPCSERVE_SLURM_OWNER_PID"] = str(owner.pid)
    try:
        up = cluster_sh(["up", "1"], env)
        assert up.returncode == 0, up.stderr
        ctld_pid = int(Path(env["HPCSERVE_SLURM_DIR"], "run", "slurmctld.pid").read_text())
        yield owner, env, ctld_pid
    finally:
        owner.kill()
        owner.wait()
        cluster_sh(["down"], env)


def test_up_clears_a_cluster_whose_owner_is_gone(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    with another_runs_cluster(tmp_path_factory, "abandoned") as (owner, first, ctld_pid):
        # While its owner runs, the cluster is someone's: a second `up` refuses.
        second = dict(first, HPCSERVE_SLURM_DIR=str(tmp_path_factory.mktemp("second")))
        second["HPCSERVE_SLURM_OWNER_PID"] = str(os.getpid())
        refused = cluster_sh(["up", "1"], second)
        assert refused.returncode != 0
        assert f"already up for pid {owner.pid}" in refused.stderr

        # The owner dies without `down` (a killed test run): the next `up` takes over.
        owner.kill()
        owner.wait()
        with running_cluster(tmp_path_factory, 1) as env:
            assert not pid_alive(ctld_pid), "the abandoned slurmctld still runs"
            assert not Path(first["HPCSERVE_SLURM_DIR"]).exists()
            sinfo = subprocess.run(
                ["sinfo", "-h", "-N", "-o", "%N %T"],
                env=env,
                capture_output=True,
                text=True,
                timeout=30,
                check=True,
            )
            assert sinfo.stdout.split() == ["n1", "idle"]


def test_a_recycled_owner_pid_is_no_owner(tmp_path_factory: pytest.TempPathFactory) -> None:
    """The owner file names a live pid, but a process started at another time holds it (a
    machine restored from a snapshot): the cluster is abandoned all the same."""
    first = dict(os.environ)
    first["HPCSERVE_SLURM_DIR"] = str(tmp_path_factory.mktemp("recycled"))
    first["HPCSERVE_SLURM_OWNER_PID"] = str(os.getpid())
    owner_file = Path("/run/hpcserve-slurm-cluster.owner")
    try:
        up = cluster_sh(["up", "1"], first)
        assert up.returncode == 0, up.stderr
        pid, _start, *dirs = owner_file.read_text().split()
        assert pid == str(os.getpid())
        owner_file.write_text(" ".join([pid, "1", *dirs]) + "\n")  # another start time
        with running_cluster(tmp_path_factory, 1) as env:
            assert owner_file.read_text().split()[2] == env["HPCSERVE_SLURM_DIR"]
    finally:
        cluster_sh(["down"], first)


def test_a_cluster_of_another_live_run_is_waited_for_and_never_taken_down(
    tmp_path_factory: pytest.TempPathFactory, caplog: pytest.LogCaptureFixture
) -> None:
    """Two pytest runs on one machine: the second one's refused `up` must not `down` the
    first one's cluster (it stopped every process in the node namespaces and removed them)."""
    with another_runs_cluster(tmp_path_factory, "busy") as (owner, first, ctld_pid):
        with (
            pytest.raises(AssertionError, match=BUSY),
            running_cluster(tmp_path_factory, 1, busy_wait_s=0),
        ):
            pass
        assert pid_alive(ctld_pid), "a refused up took the other run's cluster down"
        sinfo = cluster_sh(["status"], first)
        assert sinfo.returncode == 0 and "idle" in sinfo.stdout, sinfo.stdout + sinfo.stderr

        # Waiting: once the other run is gone, its cluster is cleared and ours comes up.
        caplog.set_level(logging.INFO, logger="cluster_helpers")
        nodes: list[str] = []

        def second_run() -> None:
            with running_cluster(tmp_path_factory, 1, busy_wait_s=120) as env:
                nodes.append(cluster_sh(["status"], env).stdout)

        waiter = threading.Thread(target=second_run)
        waiter.start()
        deadline = time.monotonic() + 60
        while not any("busy" in record.getMessage() for record in caplog.records):
            assert time.monotonic() < deadline, "the second run never waited"
            time.sleep(0.1)
        owner.kill()
        owner.wait()
        waiter.join(timeout=150)
        assert not waiter.is_alive() and nodes and "idle" in nodes[0], nodes
        assert not pid_alive(ctld_pid)
