"""`python -m slurm.wait_ready`: poll one readiness check (bounded) inside the sbatch script.

The script waits on this instead of sleeping. It also watches the srun steps that should
become ready (`--watch NAME=PID`): if one of them exits first, the wait fails at once and
prints that step's name on stdout, so the script can name the failing component.

Exit codes: 0 ready, 1 timed out, 3 a watched step exited.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Callable
from pathlib import Path

from contract.readiness import http_ok, keys_registered, port_open

logger = logging.getLogger("slurm.wait_ready")

EXIT_TIMEOUT, EXIT_STEP_DIED = 1, 3


def pid_alive(pid: int) -> bool:
    """True for a running process; a zombie (its srun exited, not yet reaped) is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"


def build_check(args: argparse.Namespace) -> tuple[Callable[[], bool], str]:
    if args.port:
        host, _, port = args.port.rpartition(":")
        return (lambda: port_open(host, int(port))), f"port {args.port}"
    if args.url:
        return (lambda: http_ok(args.url)), f"GET {args.url}"
    what = f"{args.count} key(s) under {args.prefix} in {args.etcd}"
    return keys_registered(args.etcd, args.prefix, args.count), what


def wait(
    check: Callable[[], bool], watch: dict[str, int], timeout_s: float, poll_s: float = 0.1
) -> str | None:
    """None when ready; the name of a watched step that exited; raise TimeoutError."""
    deadline = time.monotonic() + timeout_s
    while True:
        for name, pid in watch.items():
            if not pid_alive(pid):
                return name
        if check():
            return None
        if time.monotonic() > deadline:
            raise TimeoutError
        time.sleep(poll_s)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m slurm.wait_ready", description=__doc__)
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--port", help="HOST:PORT accepts a TCP connection")
    what.add_argument("--url", help="GET URL answers 2xx")
    what.add_argument("--etcd", help="etcd URL holding --count keys under --prefix")
    parser.add_argument("--prefix", default="")
    parser.add_argument("--count", type=int, default=1)
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds")
    parser.add_argument("--watch", action="append", default=[], metavar="NAME=PID")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="wait_ready: %(message)s", stream=sys.stderr)
    watch = {}
    for item in args.watch:
        name, _, pid = item.partition("=")
        watch[name] = int(pid)
    check, what_text = build_check(args)
    started = time.monotonic()
    try:
        dead = wait(check, watch, args.timeout)
    except TimeoutError:
        logger.error("not ready after %.0f s: %s", args.timeout, what_text)
        return EXIT_TIMEOUT
    if dead is not None:
        logger.error("%s exited before it was ready (%s)", dead, what_text)
        print(dead)
        return EXIT_STEP_DIED
    logger.info("ready in %.1f s: %s", time.monotonic() - started, what_text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
