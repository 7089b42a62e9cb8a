"""The API keys a deployment's OpenAI endpoints accept (`frontend.api_key_file` and the
`HPCSERVE_API_KEY` environment variable).

A Slurm cluster's compute nodes are reachable by every user of the cluster, so an endpoint
without keys serves anyone who finds its port. With keys, every `/v1/...` request must carry
`Authorization: Bearer <key>` (the openai client's `api_key`); `/health`, `/live` and
`/metrics` stay open for probes. Keys come from a file (one a line, `#` comments: the config
names the file, never a key, so configs, rendered sbatch scripts and run folders hold no
secret) or from the environment (comma-separated; `sbatch` passes the submitting shell's
environment into the job, not into its script)."""

from __future__ import annotations

import logging
import os
import stat
from collections.abc import Mapping
from pathlib import Path

from contract.config import ConfigError

logger = logging.getLogger(__name__)

API_KEY_ENV = "HPCSERVE_API_KEY"


def load_api_keys(file: Path | None, environ: Mapping[str, str] = os.environ) -> tuple[str, ...]:
    """The accepted keys (empty: the endpoints are open). A named file that cannot be read
    or holds no key is a ConfigError naming `frontend.api_key_file`: a deployment meant to
    be closed must not start open."""
    keys = [key.strip() for key in environ.get(API_KEY_ENV, "").split(",") if key.strip()]
    if file is not None:
        file = file.expanduser()
        try:
            text = file.read_text()
            mode = file.stat().st_mode
        except OSError as exc:
            raise ConfigError(f"frontend.api_key_file: {file}: {exc.strerror}") from None
        found = [
            line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")
        ]
        if not found:
            raise ConfigError(f"frontend.api_key_file: {file} holds no key (one a line)")
        if mode & (stat.S_IRWXG | stat.S_IRWXO):
            logger.warning(
                "frontend.api_key_file: %s can be read by others (chmod 600 it)", file
            )
        keys += found
    if any(any(c.isspace() for c in key) for key in keys):
        raise ConfigError(f"frontend.api_key_file / {API_KEY_ENV}: a key holds whitespace")
    return tuple(dict.fromkeys(keys))
