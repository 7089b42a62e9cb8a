"""`hpcserve gateway DEPLOYMENT`: one stable endpoint for a deployment whose jobs come and go.

A small asyncio proxy (aiohttp server and client, bodies streamed through chunk by chunk,
SSE included) for a login node or any host the user keeps up. Each request goes to the
newest generation whose state file says READY (`slurm.deployment.ready_generations`,
re-read twice a second; generations Slurm no longer runs are dropped, checked every few
seconds). When a successor becomes READY, new requests go to it while requests already
streaming finish on the old one: nothing is cut over, each request keeps the upstream it
started on. A generation that refuses the connection or answers 503 before the response
starts (it is going away) is skipped for the next one. Only while no generation is up does
the gateway answer 503 itself, in the OpenAI error shape, saying so.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

import aiohttp
from aiohttp import web

from slurm.deployment import ready_generations

logger = logging.getLogger("slurm.gateway")

REFRESH_S = 0.5
SLURM_CHECK_S = 5.0
# Hop-by-hop headers, and the ones aiohttp sets itself for the body it sends.
_SKIP_REQUEST = {"host", "content-length", "transfer-encoding", "connection", "keep-alive"}
_SKIP_RESPONSE = {"content-length", "transfer-encoding", "connection", "keep-alive"}


def no_generation_error(name: str) -> web.Response:
    message = (f"deployment {name!r} has no generation serving right now (none READY); "
               "retry shortly")  # fmt: skip
    body = {"error": {"message": message, "type": "service_unavailable", "param": None,
                      "code": "no_generation_available"}}  # fmt: skip
    return web.json_response(body, status=503, headers={"Retry-After": "1"})


class Gateway:
    """The proxy: a list of READY upstreams (newest first), kept fresh in the background."""

    def __init__(self, name: str, refresh_s: float = REFRESH_S) -> None:
        self.name = name
        self.refresh_s = refresh_s
        self.upstreams: list[tuple[str, str]] = []  # (job id, base URL without /v1)
        self.ready_ids: list[str] = []  # every generation whose state file says READY
        self.gone: set[str] = set()  # of those, the ones Slurm does not run (now)
        self.session: aiohttp.ClientSession | None = None
        self._tasks: list[asyncio.Task[None]] = []

    # ----- upstreams -----------------------------------------------------------------------
    async def refresh(self) -> None:
        ready = await asyncio.to_thread(ready_generations, self.name)
        self.ready_ids = [job_id for job_id, _ in ready]
        upstreams = [(job_id, url.removesuffix("/").removesuffix("/v1"))
                     for job_id, url in ready if job_id not in self.gone]  # fmt: skip
        if upstreams[:1] != self.upstreams[:1]:
            live = upstreams[0][0] if upstreams else "none"
            logger.info("live generation: job %s (%d READY)", live, len(upstreams))
        self.upstreams = upstreams

    async def _refresh_forever(self) -> None:
        while True:
            with contextlib.suppress(OSError):
                await self.refresh()
            await asyncio.sleep(self.refresh_s)

    async def _check_slurm_forever(self) -> None:
        """A job killed outright (node failure) never writes FINISHED: ask Slurm."""
        while True:
            await asyncio.sleep(SLURM_CHECK_S)
            ids = list(self.ready_ids)  # gone ones too: a requeued job may run again
            if not ids:
                continue
            with contextlib.suppress(OSError):
                process = await asyncio.create_subprocess_exec(
                    "squeue", "-h", "-j", ",".join(ids), "-o", "%i %T",
                    stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL,
                )  # fmt: skip
                out, _ = await process.communicate()
                if process.returncode != 0:
                    continue
                running = {line.split()[0] for line in out.decode().splitlines()
                           if line.split()[1:] == ["RUNNING"]}  # fmt: skip
                self.gone = set(ids) - running

    # ----- requests ------------------------------------------------------------------------
    async def handle(self, request: web.Request) -> web.StreamResponse:
        assert self.session is not None
        body = await request.read()
        headers = {k: v for k, v in request.headers.items() if k.lower() not in _SKIP_REQUEST}
        candidates = list(self.upstreams)
        for position, (job_id, base) in enumerate(candidates):
            last = position == len(candidates) - 1
            try:
                upstream = await self.session.request(
                    request.method, base + request.path_qs, data=body, headers=headers,
                )  # fmt: skip
            except aiohttp.ClientConnectionError as exc:
                logger.warning("job %s refused %s: %s; trying the next", job_id,
                               request.path, exc)  # fmt: skip
                continue
            try:
                if upstream.status == 503 and not last:
                    continue  # this generation is going away; the next one may serve it
                return await self._relay(request, upstream)
            finally:
                upstream.release()
        return no_generation_error(self.name)

    async def _relay(
        self, request: web.Request, upstream: aiohttp.ClientResponse
    ) -> web.StreamResponse:
        response = web.StreamResponse(status=upstream.status, reason=upstream.reason)
        for key, value in upstream.headers.items():
            if key.lower() not in _SKIP_RESPONSE:
                response.headers.add(key, value)
        await response.prepare(request)
        async for chunk in upstream.content.iter_any():
            await response.write(chunk)
        await response.write_eof()
        return response

    async def health(self, _request: web.Request) -> web.Response:
        live = self.upstreams[0] if self.upstreams else None
        body = {"deployment": self.name, "live_job": live[0] if live else None,
                "upstream": live[1] if live else None}  # fmt: skip
        return web.json_response(body, status=200 if live else 503)

    # ----- life ----------------------------------------------------------------------------
    async def on_startup(self, _app: web.Application) -> None:
        # No total timeout (streams are long); no decompression (bytes go through as sent).
        self.session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0, ttl_dns_cache=300),
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=5),
            auto_decompress=False,
        )  # fmt: skip
        await self.refresh()
        self._tasks = [asyncio.create_task(self._refresh_forever()),
                       asyncio.create_task(self._check_slurm_forever())]  # fmt: skip

    async def on_cleanup(self, _app: web.Application) -> None:
        for task in self._tasks:
            task.cancel()
        if self.session is not None:
            await self.session.close()

    def app(self) -> web.Application:
        app = web.Application(client_max_size=64 * 2**20)
        app.router.add_get("/gateway/health", self.health)
        app.router.add_route("*", "/{tail:.*}", self.handle)
        app.on_startup.append(self.on_startup)
        app.on_cleanup.append(self.on_cleanup)
        return app


def serve(name: str, host: str, port: int) -> None:
    """Run the gateway until SIGINT/SIGTERM; `gateway.json` in the deployment dir names it
    while it runs (`hpcserve status DEPLOYMENT`)."""
    from slurm.deployment import GATEWAY_FILE, write_gateway

    url = f"http://{host}:{port}/v1"
    path = write_gateway(name, url)
    logger.info("gateway for %s on %s (%s)", name, url, time.strftime("%H:%M:%S"))
    try:
        web.run_app(Gateway(name).app(), host=host, port=port, print=None,
                    access_log=None, handle_signals=True)  # fmt: skip
    finally:
        with contextlib.suppress(OSError):
            if path.name == GATEWAY_FILE:
                path.unlink()
