"""The namespace Slurm test cluster, brought up by the modules that need it."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
CLUSTER_SH = REPO / "slurm" / "testing" / "cluster.sh"


@contextmanager
def running_cluster(
    tmp_path_factory: pytest.TempPathFactory, nodes: int
) -> Iterator[dict[str, str]]:
    """`cluster.sh up N`, yield an environment with SLURM_CONF; always `down`, even on failure."""
    env = dict(os.environ)
    env["HPCSERVE_SLURM_DIR"] = str(tmp_path_factory.mktemp("slurm-cluster"))
    env["HPCSERVE_SLURM_OWNER_PID"] = str(os.getpid())
    # A job runs from its job dir, where `python -m ...` would import whichever checkout an
    # editable install points at: the jobs run this checkout's code, as the tests do.
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    try:
        up = subprocess.run(
            ["bash", str(CLUSTER_SH), "up", str(nodes)],
            env=env,
            capture_output=True,
            text=True,
            timeout=180,
            check=False,
        )
        assert up.returncode == 0, f"cluster.sh up failed:\n{up.stdout}\n{up.stderr}"
        export = up.stdout.strip().splitlines()[-1]
        assert export.startswith("export SLURM_CONF="), up.stdout
        env["SLURM_CONF"] = export.partition("=")[2]
        yield env
    finally:
        subprocess.run(["bash", str(CLUSTER_SH), "down"], env=env, timeout=120, check=False)


@contextmanager
def cluster_for_this_process(
    tmp_path_factory: pytest.TempPathFactory, nodes: int
) -> Iterator[dict[str, str]]:
    """`running_cluster` with its SLURM_CONF, a fresh jobs root (HPCSERVE_SLURM_JOBS) and its
    PYTHONPATH also set in this process (the Python job API reads them, submitit's jobs inherit
    them); all restored afterwards."""
    keys = ("SLURM_CONF", "HPCSERVE_SLURM_JOBS", "PYTHONPATH")
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
