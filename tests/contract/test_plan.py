"""The deployment plan is a pure function of the resolved config."""

from __future__ import annotations

from pathlib import Path

import pytest

from contract.config import load_config
from contract.plan import plan_deployment

REPO = Path(__file__).resolve().parents[2]


def resolved(*overrides: str):
    return load_config(
        REPO / "configs" / "local-agg.yaml",
        [
            "services.etcd.endpoint=http://127.0.0.1:2379",
            "services.nats.endpoint=nats://127.0.0.1:4222",
            "model.path=/models/m",
            *overrides,
        ],
        environ={},
    )


def test_local_agg_plan() -> None:
    plan = plan_deployment(
        resolved(), config_file="/run/config.yaml", run_dir="/run", python="py",
        etcd_binary="/bin/etcd", nats_binary="/bin/nats-server", etcd_peer_port=2390,
    )  # fmt: skip
    assert [(p.name, p.role, p.stage) for p in plan] == [
        ("etcd", "etcd", 0),
        ("nats", "nats", 0),
        ("worker-agg-g0-i0", "agg", 1),
        ("frontend", "frontend", 2),
    ]
    etcd, nats, worker, frontend = plan
    assert etcd.argv[0] == "/bin/etcd"
    assert "http://127.0.0.1:2390" in etcd.argv and "/run/etcd-data" in etcd.argv
    assert (etcd.ready.kind, etcd.ready.host, etcd.ready.port) == ("port", "127.0.0.1", 2379)
    assert nats.argv == ("/bin/nats-server", "-a", "127.0.0.1", "-p", "4222", "-m", "0")
    assert worker.argv == (
        "py", "-m", "mpi_workers", "--config", "/run/config.yaml", "--group", "0", "--index", "0"
    )  # fmt: skip
    assert worker.ready.kind == "registrations"
    assert (worker.ready.prefix, worker.ready.count) == ("hpcserve/local-agg/workers/", 1)
    assert worker.ready.etcd_endpoint == "http://127.0.0.1:2379"
    assert frontend.argv == ("py", "-m", "frontend", "--config", "/run/config.yaml")
    assert frontend.ready.url == "http://127.0.0.1:8000/health"
    # Pure: the same input gives the same plan.
    assert plan == plan_deployment(
        resolved(), config_file="/run/config.yaml", run_dir="/run", python="py",
        etcd_binary="/bin/etcd", nats_binary="/bin/nats-server", etcd_peer_port=2390,
    )  # fmt: skip


def test_external_services_and_more_workers() -> None:
    config = resolved(
        "services.etcd.start=false", "services.nats.start=false", "workers.0.count=2",
        "frontend.host=0.0.0.0",
    )  # fmt: skip
    plan = plan_deployment(config, config_file="c.yaml", run_dir="r")
    assert [p.name for p in plan] == ["worker-agg-g0-i0", "worker-agg-g0-i1", "frontend"]
    assert all(p.ready.count == 2 for p in plan if p.role == "agg")
    assert plan[-1].ready.url == "http://127.0.0.1:8000/health"


def test_unresolved_config_is_refused() -> None:
    with pytest.raises(ValueError, match="endpoint"):
        plan_deployment(load_config(environ={}), config_file="c", run_dir="r")
    with pytest.raises(ValueError, match=r"frontend\.port"):
        plan_deployment(resolved("frontend.port=0"), config_file="c", run_dir="r")
