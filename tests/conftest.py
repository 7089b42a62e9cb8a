"""Shared fixtures: real etcd and nats-server for the whole session, the prepared model and
its tokenizer. Also the hooks of the suite's derived markers (tests/suite_markers.py) and of
the durations baseline check (tests/durations_baseline.py)."""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest
from durations_baseline import BASELINE, DurationsPlugin
from real_services import start_etcd, start_nats
from suite_markers import add_derived_markers

from frontend.tokenization import TextTokenizer
from hpcserve.model_prepare import prepare_default_model

# One frontend process unless a test asks for more (`--set frontend.workers=N` wins): the
# automatic count (one per spare core) differs between machines.
os.environ.setdefault("HPCSERVE__FRONTEND__WORKERS", "1")
# Every process a test starts (mpirun ranks, scripts under tests/, Slurm jobs run from their job
# folder) imports this checkout first, not whichever one an editable install points at.
CHECKOUT = str(Path(__file__).resolve().parents[1])
if os.environ.get("PYTHONPATH", "").split(os.pathsep)[0] != CHECKOUT:
    os.environ["PYTHONPATH"] = os.pathsep.join(
        filter(None, [CHECKOUT, os.environ.get("PYTHONPATH")])
    )


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--write-durations-baseline",
        action="store_true",
        help=f"fold this run's test times into {BASELINE.name} (instead of comparing)",
    )


def pytest_configure(config: pytest.Config) -> None:
    write = config.getoption("--write-durations-baseline")
    plugin = DurationsPlugin(BASELINE, config.rootpath, write)
    config.pluginmanager.register(plugin, "hpcserve-durations")


@pytest.hookimpl(tryfirst=True)  # before `-m` deselects by these markers
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    add_derived_markers(items)


# Ignored in this process, a stop signal is ignored in every child it starts from then on (the
# disposition is inherited): SIGTERM would no longer stop a test's processes.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


@pytest.fixture(autouse=True)
def stop_signals_left_as_found() -> Iterator[None]:
    """A test that runs an entry point in-process (one that ignores its stop signals at its
    end) must give pytest its handlers back; fail it, and restore them, if it did not."""
    before = {sig: signal.getsignal(sig) for sig in STOP_SIGNALS}
    yield
    ignored = [sig.name for sig in STOP_SIGNALS
               if signal.getsignal(sig) == signal.SIG_IGN != before[sig]]  # fmt: skip
    for sig, handler in before.items():
        signal.signal(sig, handler)
    assert not ignored, f"the test left {ignored} ignored in the test process"


@pytest.fixture(scope="session")
def services_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("services")


@pytest.fixture(scope="session")
def etcd_endpoint(services_dir: Path) -> Iterator[str]:
    process, endpoint = start_etcd(services_dir)
    try:
        yield endpoint
    finally:
        process.stop()


@pytest.fixture(scope="session")
def nats_url(services_dir: Path) -> Iterator[str]:
    process, url = start_nats(services_dir)
    try:
        yield url
    finally:
        process.stop()


@pytest.fixture(scope="session")
def model_dir() -> Path:
    """The default SmolLM2, converted once per machine."""
    return prepare_default_model()


@pytest.fixture(scope="session")
def tokenizer(model_dir: Path) -> TextTokenizer:
    return TextTokenizer(model_dir)


@pytest.fixture(scope="session")
def tiny_vlm_dir(model_dir: Path) -> Path:
    """A tiny RANDOM-weight LLaVA (CLIP tower), built once per machine."""
    from hpcserve.tiny_vlm import prepare_tiny_vlm

    return prepare_tiny_vlm(tower="clip")


@pytest.fixture(scope="session")
def tiny_vlm_siglip_dir(model_dir: Path) -> Path:
    """The same with a SigLIP tower (no class token, every patch a feature row)."""
    from hpcserve.tiny_vlm import prepare_tiny_vlm

    return prepare_tiny_vlm(tower="siglip")
