"""A cluster left behind by a killed run (its daemons, namespaces and bridge outlive it) does
not block the next `cluster.sh up`; a cluster whose owner still runs does."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
from cluster_helpers import CLUSTER_SH, running_cluster

from contract.processes import pid_alive

pytestmark = [
    pytest.mark.slurm,
    pytest.mark.skipif(
        os.geteuid() != 0,
        reason="the Slurm test cluster needs root (network namespaces, slurmd as root)",
    ),
]


def _cluster_sh(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", str(CLUSTER_SH), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )


def test_up_clears_a_cluster_whose_owner_is_gone(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    owner = subprocess.Popen(["sleep", "600"])
    first = dict(os.environ)
    first["HPCSERVE_SLURM_DIR"] = str(tmp_path_factory.mktemp("abandoned"))
    first["HPCSERVE_SLURM_OWNER_PID"] = str(owner.pid)
    try:
        up = _cluster_sh(["up", "1"], first)
        assert up.returncode == 0, up.stderr
        ctld_pid = int(Path(first["HPCSERVE_SLURM_DIR"], "run", "slurmctld.pid").read_text())

        # While its owner runs, the cluster is someone's: a second `up` refuses.
        second = dict(first, HPCSERVE_SLURM_DIR=str(tmp_path_factory.mktemp("second")))
        second["HPCSERVE_SLURM_OWNER_PID"] = str(os.getpid())
        refused = _cluster_sh(["up", "1"], second)
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
    finally:
        owner.kill()
        owner.wait()
        _cluster_sh(["down"], first)


def test_a_recycled_owner_pid_is_no_owner(tmp_path_factory: pytest.TempPathFactory) -> None:
    """The owner file names a live pid, but a process started at another time holds it (a
    machine restored from a snapshot): the cluster is abandoned all the same."""
    first = dict(os.environ)
    first["HPCSERVE_SLURM_DIR"] = str(tmp_path_factory.mktemp("recycled"))
    first["HPCSERVE_SLURM_OWNER_PID"] = str(os.getpid())
    owner_file = Path("/run/hpcserve-slurm-cluster.owner")
    try:
        up = _cluster_sh(["up", "1"], first)
        assert up.returncode == 0, up.stderr
        pid, _start, *dirs = owner_file.read_text().split()
        assert pid == str(os.getpid())
        owner_file.write_text(" ".join([pid, "1", *dirs]) + "\n")  # another start time
        with running_cluster(tmp_path_factory, 1) as env:
            assert owner_file.read_text().split()[2] == env["HPCSERVE_SLURM_DIR"]
    finally:
        _cluster_sh(["down"], first)
