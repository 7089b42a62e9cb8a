"""`python -m frontend --config FILE [--set k=v ...]`: the frontend process of a deployment.

The launcher (`hpcserve up`, the Slurm job) fills in `services.*.endpoint` and
`model.path`; this only loads the config and runs uvicorn with the fast settings measured in
shared/notes/serving-facts.md (uvloop, httptools, no access log, gc frozen after start-up).

One of several processes sharing the port (`frontend.workers` > 1; the plan sets
HPCSERVE_FRONTEND_PROCESS=INDEX/COUNT), it binds with SO_REUSEPORT; uvicorn listens only
after the app's start-up, so the kernel never hands a connection to a process still starting.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib.util
import logging
import os
import signal
import socket
import sys

import uvicorn

from contract.config import ConfigError, load_config
from frontend.app import create_app
from frontend.state import process_slot

logger = logging.getLogger("frontend")

# one component's debug lines (the KV router's per-decision log) without everything else's,
# which at debug level would slow the frontend being measured
DEBUG_LOGGERS_ENV = "HPCSERVE_DEBUG_LOGGERS"


class _FrozenGcServer(uvicorn.Server):
    """Freezes everything allocated during start-up out of the collector's reach."""

    async def startup(self, sockets: list | None = None) -> None:  # type: ignore[type-arg]
        await super().startup(sockets)
        gc.collect()
        gc.freeze()
        logger.info("start-up objects frozen out of the garbage collector")


def shared_socket(host: str, port: int) -> socket.socket:
    """A socket bound to `host:port` with SO_REUSEPORT (not yet listening): the frontend
    processes of a deployment each bind one and the kernel spreads connections over them."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    sock.set_inheritable(True)
    return sock


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
    parser.add_argument(
        "--debug-loggers",
        default=os.environ.get(DEBUG_LOGGERS_ENV, ""),
        help="comma-separated loggers to log at debug level whatever --log-level says, e.g. "
        f"frontend.kv_router (default: ${DEBUG_LOGGERS_ENV})",
    )
    return parser.parse_args(argv)


def debug_loggers(names: str) -> list[str]:
    """Set each of the comma-separated loggers to debug level; returns their names."""
    chosen = [name for name in (part.strip() for part in names.split(",")) if name]
    for name in chosen:
        logging.getLogger(name).setLevel(logging.DEBUG)
    return chosen


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(),
        format="[frontend] %(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    debug_loggers(args.debug_loggers)
    try:
        config = load_config(args.config, args.overrides)
        index, count = process_slot()
        app = create_app(config)
    except (ConfigError, ValueError) as exc:
        logger.error("%s", exc)
        return 2
    sockets = None
    if count > 1:
        try:
            sockets = [shared_socket(config.frontend.host, config.frontend.port)]
        except OSError as exc:
            logger.error("frontend.port: cannot bind %s:%d with SO_REUSEPORT: %s",
                         config.frontend.host, config.frontend.port, exc)  # fmt: skip
            return 2
        logger.info("frontend process %d of %d on a shared port", index, count)
    has_uvloop = importlib.util.find_spec("uvloop") is not None
    has_httptools = importlib.util.find_spec("httptools") is not None
    uv_config = uvicorn.Config(
        app,
        host=config.frontend.host,
        port=config.frontend.port,
        loop="uvloop" if has_uvloop else "asyncio",
        http="httptools" if has_httptools else "h11",
        access_log=False,
        # nothing here reads the client's address: X-Forwarded-* parsing (a middleware
        # around every request) is work for no one
        proxy_headers=False,
        log_config=None,  # keep our logging format
        log_level=args.log_level,
        timeout_keep_alive=30,
    )
    server = _FrozenGcServer(uv_config)
    # uvicorn re-raises the signal that stopped it; a requested stop is a clean exit
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    with contextlib.suppress(KeyboardInterrupt):
        server.run(sockets=sockets)
    return 0 if server.started else 3  # 3: start-up failed (uvicorn's convention)


if __name__ == "__main__":
    sys.exit(main())
