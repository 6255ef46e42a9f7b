"""The server's side of the engine: jobs whose events hop from the engine's thread onto the event loop.

The engine (`llama3.engine`) runs every request at once in one thread, a batched forward per
step; the HTTP handlers never compute.  A handler submits a job and reads its events:

    handler (event loop)                          engine thread
    --------------------                          -------------
    job = queue.submit(prompt_ids, settings)  ->  the request waits, is admitted, decodes in the batch
    async for event in job.events():          <-  ("text", row, piece)  per piece of text
                                              <-  ("end", row, finish_reason, n_tokens, cached_tokens)
                                              <-  None                  the end

`job.cancel()` (the client disconnected) takes the request out at the next step and its KV
blocks go back to the pool; a job cancelled while it waits never runs.  When more requests
wait than --max-queued allows, `submit` raises `QueueFull` (the server answers 429).
"""

from __future__ import annotations

import asyncio
import threading
from typing import AsyncIterator

from llama3.engine import Cancelled, Engine, QueueFull, Request

__all__ = ["Cancelled", "FinishedJob", "GenerationQueue", "Job", "QueueFull"]


class Job:
    """One request in the engine and the channel that carries its events back to the event loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self._loop = loop
        self._events: asyncio.Queue = asyncio.Queue()
        self.request: Request | None = None

    def send(self, events: list) -> None:
        """Called by the engine's thread: hand a list of events (see Request) to the waiting handler."""
        try:
            self._loop.call_soon_threadsafe(self._events.put_nowait, events)
        except RuntimeError:  # the event loop has closed: nobody is listening
            pass

    def cancel(self) -> None:
        """Stop generating for this job (safe from any thread, idempotent)."""
        if self.request is not None:
            self.request.cancel()

    async def batches(self) -> AsyncIterator[list[tuple]]:
        """The job's events, in order, a delivery at a time (the engine hands several over at once),
        until it ends; raises the engine's error if it failed."""
        while True:
            events = await self._events.get()
            last = events[-1]
            if last is None or isinstance(last, BaseException):
                if events[:-1]:
                    yield events[:-1]
                if last is not None:
                    raise last
                return
            yield events

    async def events(self) -> AsyncIterator[tuple]:
        """The job's events one by one (see `batches`)."""
        async for batch in self.batches():
            for event in batch:
                yield event


class FinishedJob:
    """A request that generates nothing (`echo` with max_tokens 0): each choice ends at once."""

    request = None

    def __init__(self, choices: int):
        self.choices = choices

    def cancel(self) -> None:
        pass

    async def batches(self) -> AsyncIterator[list[tuple]]:
        yield [("end", index, "length", 0, 0) for index in range(self.choices)]

    async def events(self) -> AsyncIterator[tuple]:
        for index in range(self.choices):
            yield ("end", index, "length", 0, 0)


class GenerationQueue:
    """The server's handle on one `Engine`: submit jobs, read counters, stop it all."""

    def __init__(self, engine: Engine):
        self.engine = engine

    @property
    def _thread(self) -> threading.Thread:
        """The engine's loop thread now (a never-started one while the engine idles without one)."""
        return self.engine.thread or threading.Thread()

    def submit(self, prompt_ids: list[list[int]], settings, samplers=None) -> Job:
        """Queue a request (call from the event loop); iterate `job.events()` for its output.
        samplers: one per prompt (see Engine.submit).
        Raises QueueFull when the waiting queue is full, Cancelled when the server is stopping."""
        job = Job(asyncio.get_running_loop())
        job.request = self.engine.submit(prompt_ids, settings, job.send, samplers=samplers)
        self.engine.start()
        return job

    def stats(self) -> dict:
        return self.engine.stats()

    def cache_stats(self) -> dict:
        """What /metrics reports of the KV memory: blocks used/free, prefix-cache hits, preemptions."""
        stats = self.engine.stats()
        return {name: value for name, value in stats.items() if name.startswith(("kv_", "prefix_"))} | {
            "preemptions": stats["preemptions"]}

    def cancel_all(self) -> None:
        """End the running and waiting requests with Cancelled, refuse new ones (safe from a signal handler)."""
        self.engine.cancel_all()

    def close(self, timeout: float = 10.0) -> None:
        """Cancel everything and wait (at most `timeout` seconds) for the engine's thread to stop."""
        self.engine.close(timeout)
