"""Deployment config: defaults, YAML, env and --set precedence, errors that name the field."""

from __future__ import annotations

from pathlib import Path

import pytest

from contract.config import ConfigError, DeploymentConfig, load_config

REPO = Path(__file__).resolve().parents[2]


def test_defaults() -> None:
    config = load_config(environ={})
    assert config == DeploymentConfig()
    assert config.frontend.port == 8000
    assert config.workers[0].role == "agg"
    assert config.services.etcd.start and config.services.nats.start
    assert config.model.served_model_name() == "SmolLM2-135M-Instruct"


def test_shipped_local_agg_config() -> None:
    config = load_config(REPO / "configs" / "local-agg.yaml", environ={})
    assert config.name == "local-agg"
    assert config.engine.kind == "torch"
    assert config.model.path is None
    assert config.frontend.host == "127.0.0.1" and config.frontend.port == 8000
    assert config.frontend.router == "round_robin"
    assert [(g.role, g.count, g.tp) for g in config.workers] == [("agg", 1, 1)]


def test_yaml_then_env_then_set(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("frontend:\n  port: 1000\n  host: 0.0.0.0\nengine:\n  block_size: 32\n")
    env = {"HPCSERVE__FRONTEND__PORT": "2000", "HPCSERVE__ENGINE__MAX_NUM_SEQS": "7"}
    config = load_config(path, ["frontend.port=3000"], environ=env)
    assert config.frontend.port == 3000  # --set beats env
    assert config.engine.max_num_seqs == 7  # env beats YAML/defaults
    assert config.engine.block_size == 32  # YAML kept
    assert config.frontend.host == "0.0.0.0"
    assert load_config(path, environ=env).frontend.port == 2000  # env beats YAML


def test_set_into_lists_and_typed_values() -> None:
    config = load_config(
        overrides=["workers.0.count=3", "services.etcd.start=false",
                   "services.etcd.endpoint=http://10.0.0.1:2379", "model.path=/m"],
        environ={},
    )  # fmt: skip
    assert config.workers[0].count == 3
    assert config.services.etcd.start is False
    assert config.services.etcd.endpoint == "http://10.0.0.1:2379"
    assert str(config.model.resolved_path()) == "/m"


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        (["frontend.port=70000"], "frontend.port"),
        (["frontend.prot=1"], "frontend.prot"),
        (["engine.block_size=0"], "engine.block_size"),
        (["frontend.kv_router.block_size=32"], "frontend.kv_router.block_size"),
        (["frontend.router=fastest"], "frontend.router"),
        (["services.nats.start=false"], "services.nats"),
        (["workers.0.role=prefill"], "workers.0.role"),
        (["workers.5.count=1"], "workers.5"),
        (["frontend=1", "frontend.port=2"], "frontend"),
        (["noequals"], "noequals"),
        (["benchmark.concurrency=[4, 0]"], "benchmark.concurrency.1"),
        (["benchmark.requests=8", "benchmark.duration_s=5"], "benchmark.duration_s"),
        (["benchmark.shared_prefix.prefix_prompts=2"], "benchmark.shared_prefix.prefix_tokens"),
        (["slurm.env={A: [1]}"], "slurm.env.A"),
        (["frontend.max_n=300"], "frontend.max_n"),  # over max_choices_per_request
        (["model.task=classify"], "model.task"),
        (["model.task=embed", "engine.kind=trtllm"], "model.task"),
        (
            ["model.task=embed", "workers.0.role=decode",
             "disaggregation.fallback_local_prefill=true"],
            "workers.0.role",
        ),
        (["model.pooler.pooling_type=CLS"], "model.pooler.pooling_type"),
        (["model.pooler.matryoshka_dimensions=[0]"], "model.pooler.matryoshka_dimensions"),
        (["frontend.max_embedding_inputs=0"], "frontend.max_embedding_inputs"),
        (
            ["multimodal.store_max_bytes=2048", "multimodal.max_media_bytes=4096"],
            "multimodal.store_max_bytes",
        ),
    ],
)
def test_errors_name_the_field(overrides: list[str], field: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(overrides=overrides, environ={})
    assert field in str(info.value)


def test_embed_task_and_its_pooler() -> None:
    config = load_config(environ={})
    assert config.model.task == "generate" and config.model.pooler.pooling_type == "LAST"
    config = load_config(
        overrides=["model.task=embed", "model.pooler.pooling_type=MEAN",
                   "model.pooler.matryoshka_dimensions=[64, 128]"],
        environ={"HPCSERVE__MODEL__POOLER__NORMALIZE": "false"},
    )  # fmt: skip
    pooler = config.model.pooler
    assert config.model.task == "embed" and pooler.pooling_type == "MEAN"
    assert pooler.matryoshka_dimensions == [64, 128] and pooler.normalize is False


def test_kv_router_block_size_is_the_engines() -> None:
    """Deprecated: the router hashes at each worker's block size; equal to the engine's it is
    accepted (an old config still loads), different it is an error (above)."""
    config = load_config(overrides=["frontend.kv_router.block_size=32", "engine.block_size=32"],
                         environ={})  # fmt: skip
    assert config.frontend.kv_router.block_size == config.engine.block_size == 32


def test_bad_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "missing.yaml", environ={})
    bad = tmp_path / "bad.yaml"
    bad.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(bad, environ={})
