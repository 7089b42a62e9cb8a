"""The namespace Slurm test cluster, brought up by the modules that need it."""

from __future__ import annotations

import logging
import os
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

CLUSTER_SH = Path(__file__).resolve().parents[2] / "slurm" / "testing" / "cluster.sh"
# The cluster is one per machine (fixed bridge and namespace names) and another pytest run on
# this machine may hold it: cluster.sh then refuses `up` saying BUSY; wait this long for it.
BUSY = "a cluster is already up"
BUSY_WAIT_S = 600
logger = logging.getLogger(__name__)


@contextmanager
def running_cluster(
    tmp_path_factory: pytest.TempPathFactory, nodes: int, busy_wait_s: float = BUSY_WAIT_S
) -> Iterator[dict[str, str]]:
    """`cluster.sh up N`, yield an environment with SLURM_CONF; `down` at the end, even on
    failure. While another live run's cluster is up, wait (polling) up to `busy_wait_s`;
    a refused or failed `up` brought nothing up (cluster.sh undoes its own half), so nothing
    is taken down then: `down` would stop the other run's cluster."""
    env = dict(os.environ)
    env["HPCSERVE_SLURM_DIR"] = str(tmp_path_factory.mktemp("slurm-cluster"))
    env["HPCSERVE_SLURM_OWNER_PID"] = str(os.getpid())
    deadline = time.monotonic() + busy_wait_s
    try:
        while True:
            up = cluster_sh(["up", str(nodes)], env)
            if up.returncode == 0 or BUSY not in up.stderr or time.monotonic() > deadline:
                break
            logger.info("the Slurm test cluster is busy (%s); waiting", up.stderr.strip())
            time.sleep(1)
    except subprocess.TimeoutExpired:  # killed half-way: its traps did not run
        cluster_sh(["down"], env, timeout=120)
        raise
    assert up.returncode == 0, f"cluster.sh up failed:\n{up.stdout}\n{up.stderr}"
    try:
        export = up.stdout.strip().splitlines()[-1]
        assert export.startswith("export SLURM_CONF="), up.stdout
        env["SLURM_CONF"] = export.partition("=")[2]
        yield env
    finally:
        cluster_sh(["down"], env, timeout=120)


def cluster_sh(
    args: list[str], env: dict[str, str], timeout: float = 180
) -> subprocess.CompletedProcess[str]:
    """`cluster.sh ARGS` with `env`, its output captured."""
    return subprocess.run(
        ["bash", str(CLUSTER_SH), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


@contextmanager
def cluster_for_this_process(
    tmp_path_factory: pytest.TempPathFactory, nodes: int
) -> Iterator[dict[str, str]]:
    """`running_cluster` with its SLURM_CONF and a fresh jobs root (HPCSERVE_SLURM_JOBS) also
    set in this process (the Python job API reads them); both restored afterwards."""
    keys = ("SLURM_CONF", "HPCSERVE_SLURM_JOBS")
    saved = {key: os.environ.get(key) for key in keys}
    with running_cluster(tmp_path_factory, nodes) as env:
        env["HPCSERVE_SLURM_JOBS"] = str(tmp_path_factory.mktemp("slurm-jobs"))
        os.environ.update({key: env[key] for key in keys})
        try:
            yield env
        finally:
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value
