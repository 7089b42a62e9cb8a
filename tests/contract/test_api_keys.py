"""Where a deployment's API keys come from (`contract.api_keys`): the HPCSERVE_API_KEY
environment variable and `frontend.api_key_file`, and the config errors that keep a
deployment meant to be closed from starting open."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from contract.api_keys import API_KEY_ENV, load_api_keys
from contract.config import ConfigError, load_config


def test_no_source_means_open() -> None:
    assert load_api_keys(None, {}) == ()


def test_keys_from_the_environment_and_a_file(tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    keys.write_text("# team keys\nalpha-1\n\n  beta-2  \n# old: gamma\nalpha-1\n")
    keys.chmod(0o600)
    env = {API_KEY_ENV: " env-key , ,other "}
    assert load_api_keys(keys, env) == ("env-key", "other", "alpha-1", "beta-2")
    assert load_api_keys(None, env) == ("env-key", "other")


@pytest.mark.parametrize(
    ("text", "message"),
    [(None, "No such file"), ("# only a comment\n\n", "holds no key"),
     ("good\nbad key\n", "holds whitespace")],
)  # fmt: skip
def test_a_key_file_that_gives_no_usable_key_is_a_config_error(
    tmp_path: Path, text: str | None, message: str
) -> None:
    keys = tmp_path / "keys"
    if text is not None:
        keys.write_text(text)
    with pytest.raises(ConfigError, match=message) as refused:
        load_api_keys(keys, {})
    assert str(refused.value).startswith("frontend.api_key_file")


def test_a_key_file_others_can_read_is_warned_of(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    keys = tmp_path / "keys"
    keys.write_text("k\n")
    keys.chmod(0o644)
    with caplog.at_level(logging.WARNING):
        assert load_api_keys(keys, {}) == ("k",)
    assert "chmod 600" in caplog.text
    caplog.clear()
    keys.chmod(0o600)
    load_api_keys(keys, {})
    assert "chmod" not in caplog.text


def test_a_relative_key_file_names_a_file_beside_the_config(tmp_path: Path) -> None:
    config = tmp_path / "deploy.yaml"
    config.write_text("frontend:\n  api_key_file: secrets/keys\n")
    loaded = load_config(config, [])
    assert loaded.frontend.api_key_file == (tmp_path / "secrets" / "keys").resolve()


def test_a_key_file_under_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / ".keys").write_text("home-key\n")
    (tmp_path / ".keys").chmod(0o600)
    config = load_config(None, ["frontend.api_key_file=~/.keys"])
    assert load_api_keys(config.frontend.api_key_file, {}) == ("home-key",)
