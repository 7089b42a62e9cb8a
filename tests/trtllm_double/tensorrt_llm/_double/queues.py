"""A queue filled by the double's executor thread and read from sync code or any event loop.

Why: the real GenerationResult reads responses through an AsyncQueue whose sync side also
works (`result()` and `async for` on the same object); the double's executor runs on its own
thread and loop, so consumers need a thread-safe queue that can also wake an asyncio waiter.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import queue
import threading
import time
from typing import Generic, TypeVar

T = TypeVar("T")


class Empty(queue.Empty):
    """Nothing arrived within the timeout."""


class WakeQueue(Generic[T]):
    """FIFO; `put` from any thread, `get` (blocking) or `aget` (asyncio) from the consumer."""

    def __init__(self, maxlen: int | None = None) -> None:
        self._items: collections.deque[T] = collections.deque(maxlen=maxlen)
        self._cond = threading.Condition()
        self._waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Event]] = []

    def put(self, item: T) -> None:
        with self._cond:
            self._items.append(item)
            self._cond.notify_all()
            waiters, self._waiters = self._waiters, []
        for loop, event in waiters:
            with contextlib.suppress(RuntimeError):  # a closed consumer loop: nobody to wake
                loop.call_soon_threadsafe(event.set)

    def get_nowait(self) -> T:
        with self._cond:
            if not self._items:
                raise Empty
            return self._items.popleft()

    def get(self, timeout: float | None = None) -> T:
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while not self._items:
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    raise Empty
                self._cond.wait(remaining)
            return self._items.popleft()

    async def aget(self, timeout: float | None = None) -> T:
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        while True:
            event = asyncio.Event()
            remaining = None if deadline is None else deadline - loop.time()
            with self._cond:
                if self._items:
                    return self._items.popleft()
                if remaining is not None and remaining <= 0:
                    raise Empty
                self._waiters.append((loop, event))
            try:
                await asyncio.wait_for(event.wait(), remaining)
            except TimeoutError:
                with self._cond:
                    if self._items:
                        return self._items.popleft()
                raise Empty from None
            finally:
                with self._cond:
                    if (loop, event) in self._waiters:
                        self._waiters.remove((loop, event))
