"""The `n` choices of one request: one engine request per choice, all sent to one worker so
that they share the prompt's KV blocks, read back as one stream of (choice index, chunk).

Choice i is the prompt with the request's sampling settings and `choice_index` i; with a
`seed`, choice i samples with seed + i (`contract.messages.choice_seed`: the choices differ,
and each is reproducible: vLLM's convention). Greedy choices (temperature 0) are identical.
Choice 0 is routed like any request; the others follow it to its worker (while that worker is
routable), whose prefix cache then holds the prompt's blocks for them: the engine's scheduler
admits them once choice 0 has published those blocks, so the prompt is prefilled once. From
then on each choice is on its own: a lost worker migrates each choice's stream separately
(`MigratingStream`), a stop string ends only its own.

With one choice the chunks come straight from its stream (the common case costs nothing
extra). With several, one pump task per choice forwards its chunks into a shared queue in
arrival order, so the choices interleave as their tokens come. `close()` aborts every choice
still running: a client that left, an error in any choice, or the end of the response.

A batch of prompts (/v1/completions) is read the same way: its streams are every prompt's
choices, prompt by prompt (`frontend.serving._start`); each prompt's choice 0 is routed on its
own, so only the choices of one prompt share a worker.
"""

from __future__ import annotations

import asyncio
import uuid
from collections import deque

from contract.discovery import WorkerCard
from contract.messages import GenerateOutput, GenerateRequest, choice_seed
from frontend.errors import raise_for_worker_error
from frontend.migration import MigratingStream

_Item = tuple[int, GenerateOutput | BaseException]


def choice_requests(first: GenerateRequest, n: int) -> list[GenerateRequest]:
    """`first` (choice 0) and the engine requests of choices 1..n-1: a fresh id each, the same
    prompt and sampling, the choice's index, the seed (if any) `choice_seed`'s."""
    requests = [first]
    seed = first.sampling.seed
    for index in range(1, n):
        sampling = first.sampling
        if seed is not None:
            sampling = sampling.model_copy(update={"seed": choice_seed(seed, index)})
        else:
            sampling = sampling.model_copy()
        requests.append(
            GenerateRequest(
                request_id=uuid.uuid4().hex,
                client_id=first.client_id,
                token_ids=first.token_ids,
                sampling=sampling,
                choice_index=index,
                media=first.media,
            )
        )
    return requests


class ChoiceStreams:
    """The streams of one request's choices, read as one: `next()` gives (index, chunk)."""

    def __init__(self, streams: list[MigratingStream]) -> None:
        self.streams = streams
        self._single = streams[0] if len(streams) == 1 else None  # read directly, no pumps
        self._ready: deque[tuple[int, GenerateOutput]] = deque()  # read before `start` ended
        self._queue: asyncio.Queue[_Item] | None = None  # the pumps' (n > 1 only)
        self._pumps: list[asyncio.Task[None]] = []
        self._done: set[int] = set()  # choices that ended (finish read, or closed)

    @property
    def n(self) -> int:
        return len(self.streams)

    def card(self, index: int) -> WorkerCard:
        """The worker serving choice `index` now."""
        return self.streams[index].card

    @property
    def has_pending(self) -> bool:
        """Whether a chunk is already waiting (the caller may batch it into one event)."""
        if self._ready:
            return True
        if self._single is not None:
            return self._single.has_pending
        return self._queue is not None and not self._queue.empty()

    async def start(self, deadline: float) -> None:
        """Send every choice (choice 0 first: the others follow its worker) and wait for the
        first chunk of any of them: a stream starts with the first token to come, not the
        last choice's (a batch's prompts run on several workers). A worker's error before
        that is raised here (an HTTP error, even for a stream); a later choice's error
        arrives through `next` (in a stream: its error event). Everything sent is aborted if
        this fails."""
        try:
            for stream in self.streams:
                await stream.open()
            if self._single is not None:
                first = await self._single.next(deadline)
                raise_for_worker_error(first, self._single.card)
                self._ready.append((0, first))
                return
            self._queue = asyncio.Queue()
            self._pumps = [
                asyncio.get_running_loop().create_task(self._pump(index, deadline))
                for index in range(self.n)
            ]
            self._ready.append(await self._take(deadline))
        except BaseException:
            self.close()
            raise

    async def next(self, deadline: float) -> tuple[int, GenerateOutput]:
        """The next chunk of any running choice, with its index; a worker's error reply is
        raised as its HTTP error (`raise_for_worker_error`), a lost worker's failure as
        `MigratingStream.next` raises it; TimeoutError past `deadline` (loop time)."""
        while self._ready:
            index, output = self._ready.popleft()
            if index not in self._done:
                self._note_finish(index, output)
                return index, output
        single = self._single
        if single is not None:  # the common case: as cheap as reading the stream itself
            output = await single.next(deadline)
            if output.finish_reason is not None:
                raise_for_worker_error(output, single.card)
                self._done.add(0)
            return 0, output
        index, output = await self._take(deadline)
        self._note_finish(index, output)
        return index, output

    def finish(self, index: int) -> None:
        """Choice `index` needs no more chunks (a stop string ended it): abort it now."""
        self._done.add(index)
        self.streams[index].close()
        if self._pumps:
            self._pumps[index].cancel()

    def close(self) -> None:
        """Idempotent; aborts every choice that did not finish on its worker."""
        for pump in self._pumps:
            pump.cancel()
        for stream in self.streams:
            stream.close()
        self._done.update(range(self.n))

    def _note_finish(self, index: int, output: GenerateOutput) -> None:
        if output.finish_reason is not None:
            self._done.add(index)

    async def _take(self, deadline: float) -> tuple[int, GenerateOutput]:
        """The next chunk from the pumps of a choice still running; a choice's failure is
        raised here. Chunks of choices that ended meanwhile (a stop string) are dropped."""
        queue = self._queue
        assert queue is not None, "start() first"
        while True:
            if queue.empty():
                async with asyncio.timeout_at(deadline):
                    index, item = await queue.get()
            else:
                index, item = queue.get_nowait()
            if index in self._done:
                continue
            if isinstance(item, BaseException):
                raise item
            if item.finish_reason is not None:
                raise_for_worker_error(item, self.card(index))
            return index, item

    async def _pump(self, index: int, deadline: float) -> None:
        """Forward choice `index`'s chunks into the shared queue until its final chunk or
        its failure (which the reader raises)."""
        stream = self.streams[index]
        queue = self._queue
        assert queue is not None
        while True:
            try:
                output = await stream.next(deadline)
            except asyncio.CancelledError:
                raise
            except BaseException as exc:  # a lost request, a timeout: the reader decides
                queue.put_nowait((index, exc))
                return
            queue.put_nowait((index, output))
            if output.finish_reason is not None:
                return
