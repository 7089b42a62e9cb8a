"""`python -m frontend --config FILE [--set k=v ...]`: the frontend process of a deployment.

The launcher (`hpcserve up`, the Slurm job) fills in `services.*.endpoint` and
`model.path`; this only loads the config and runs uvicorn with the fast settings measured in
shared/notes/serving-facts.md (uvloop, httptools, no access log, gc frozen after start-up).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib.util
import logging
import os
import signal
import sys

import uvicorn

from contract.config import ConfigError, load_config
from frontend.app import create_app

logger = logging.getLogger("frontend")


class _FrozenGcServer(uvicorn.Server):
    """Freezes everything allocated during start-up out of the collector's reach."""

    async def startup(self, sockets: list | None = None) -> None:  # type: ignore[type-arg]
        await super().startup(sockets)
        gc.collect()
        gc.freeze()
        logger.info("start-up objects frozen out of the garbage collector")


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m frontend", description=__doc__)
    parser.add_argument("--config", help="deployment YAML (defaults when omitted)")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config field, e.g. --set frontend.port=8001 (repeatable)",
    )
    parser.add_argument(
        "--log-level",
        default=os.environ.get("HPCSERVE_LOG_LEVEL", "info"),
        help="debug, info, warning, error (default: $HPCSERVE_LOG_LEVEL or info)",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(),
        format="[frontend] %(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        config = load_config(args.config, args.overrides)
        app = create_app(config)
    except (ConfigError, ValueError) as exc:
        logger.error("%s", exc)
        return 2
    has_uvloop = importlib.util.find_spec("uvloop") is not None
    has_httptools = importlib.util.find_spec("httptools") is not None
    uv_config = uvicorn.Config(
        app,
        host=config.frontend.host,
        port=config.frontend.port,
        loop="uvloop" if has_uvloop else "asyncio",
        http="httptools" if has_httptools else "h11",
        access_log=False,
        log_config=None,  # keep our logging format
        log_level=args.log_level,
        timeout_keep_alive=30,
    )
    server = _FrozenGcServer(uv_config)
    # uvicorn re-raises the signal that stopped it; a requested stop is a clean exit
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    with contextlib.suppress(KeyboardInterrupt):
        server.run()
    return 0 if server.started else 3  # 3: start-up failed (uvicorn's convention)


if __name__ == "__main__":
    sys.exit(main())
