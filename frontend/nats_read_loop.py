"""One subscription's messages taken straight from nats-py's protocol parser.

nats-py's own path for each message builds a `Msg`, queues it, and wakes the subscription's
task, which awaits the callback: a task hop and a few objects per message. For the messages a
frontend gets most of (every worker's KV event batches; the replies of every request it sends),
that path cost more than the work done with them. nats-py has no public way around it, so this
wraps its per-message call (`Client._process_msg`, called by the parser with the raw message)
for one subscription id, and leaves every other subscription's messages to it. `read_loop_hook`
checks the call's shape first; without it the caller subscribes with a callback as usual.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable

from nats.aio.client import Client as NatsClient

_PROCESS_MSG_PARAMETERS = ["sid", "subject", "reply", "data", "headers"]  # nats-py 2.x

# What a taker gets: the message's subject, payload and raw header block (None: no headers).
Take = Callable[[bytes, bytes, bytes | None], None]


def read_loop_hook(nc: NatsClient) -> bool:
    """Whether `nc` has the protocol parser's per-message call `take_in_read_loop` wraps."""
    process_msg = getattr(nc, "_process_msg", None)
    if not inspect.iscoroutinefunction(process_msg):
        return False
    return list(inspect.signature(process_msg).parameters) == _PROCESS_MSG_PARAMETERS


def take_in_read_loop(nc: NatsClient, sid: int, take: Take) -> None:
    """Hand subscription `sid`'s messages to `take`, in the read loop's turn (`take` must not
    block); the other subscriptions of `nc` go on as before. Check `read_loop_hook` first."""
    deliver = nc._process_msg

    async def process_msg(
        msg_sid: int, subject: bytes, reply: bytes, data: bytes, headers: bytes | None
    ) -> None:
        if msg_sid == sid:
            take(subject, data, headers)
        else:
            await deliver(msg_sid, subject, reply, data, headers)

    nc._process_msg = process_msg  # type: ignore[method-assign]


def no_responders(headers: bytes | None) -> bool:
    """NATS's "no responders" status (a request to a subject nobody listens on), from a raw
    header block as `take` gets it (nats-py would say `msg.headers["Status"] == "503"`)."""
    return headers is not None and headers.startswith(b"NATS/1.0 503")
