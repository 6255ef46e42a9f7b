"""One generation at a time, off the event loop: the server's worker thread and its queue.

The model is one big computation that uses every CPU core (or the GPU), so running
two requests at once would only make both slower.  Instead the HTTP handlers put a
`Job` in a FIFO queue and a single worker thread runs them in turn.  While the worker
computes, the event loop keeps accepting connections and streaming text:

    handler (event loop)                  worker thread
    --------------------                  -------------
    job = queue.submit(generation)  ->    takes the next job, iterates its TextGeneration
    async for event in job.events():  <-  job.send(("text", row, piece))  per piece of text
                                      <-  job.send(("end", row, finish_reason, n_tokens))
                                      <-  job.send(None)                   the end

`job.cancel()` (the client disconnected, or the server is stopping) is checked by the
worker after every piece of text it hands over, so a cancelled job stops within a token
or two and the next one starts.  A job cancelled while it waits never runs.
"""

from __future__ import annotations

import asyncio
import queue
import threading
from typing import AsyncIterator

from llama3.errors import Llama3Error
from llama3.generate import TextGeneration


class Cancelled(Llama3Error):
    """The job was cancelled before it finished (the server is shutting down)."""


class Job:
    """One request's generation and the channel that carries its events back to the event loop."""

    def __init__(self, generation: TextGeneration, loop: asyncio.AbstractEventLoop):
        self.generation: TextGeneration | None = generation
        self._loop = loop
        self._events: asyncio.Queue = asyncio.Queue()
        self._cancelled = threading.Event()

    def cancel(self) -> None:
        """Ask the worker to stop this job (safe from any thread, idempotent)."""
        self._cancelled.set()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def send(self, event) -> None:
        """Called by the worker thread: hand one event to the waiting handler."""
        try:
            self._loop.call_soon_threadsafe(self._events.put_nowait, event)
        except RuntimeError:  # the event loop has closed: nobody is listening
            pass

    async def events(self) -> AsyncIterator[tuple]:
        """The job's events, in order, until it ends; raises the worker's error if it failed."""
        while (event := await self._events.get()) is not None:
            if isinstance(event, BaseException):
                raise event
            yield event


class GenerationQueue:
    """A FIFO of jobs and the one daemon thread that runs them.  `stats()` reports counters."""

    def __init__(self):
        self._jobs: queue.Queue[Job | None] = queue.Queue()
        self._running: Job | None = None
        self._closed = False
        self.requests = self.completion_tokens = self.cancelled = 0
        self._thread = threading.Thread(target=self._work, name="llama3-generation", daemon=True)
        self._thread.start()

    def submit(self, generation: TextGeneration) -> Job:
        """Queue a generation (call from the event loop); iterate `job.events()` for its output."""
        if self._closed:
            raise Cancelled("the server is shutting down; try again later")
        job = Job(generation, asyncio.get_running_loop())
        self._jobs.put(job)
        return job

    def stats(self) -> dict:
        return {"queued": self._jobs.qsize(), "running": self._running is not None, "requests": self.requests,
                "completion_tokens": self.completion_tokens, "cancelled": self.cancelled}

    def cancel_all(self) -> None:
        """Stop the running job and every waiting one (safe from a signal handler)."""
        self._closed = True
        running = self._running
        if running is not None:
            running.cancel()
        for job in list(self._jobs.queue):
            if job is not None:
                job.cancel()

    def close(self, timeout: float = 10.0) -> None:
        """Cancel everything and wait (at most `timeout` seconds) for the worker to stop."""
        self.cancel_all()
        self._jobs.put(None)
        self._thread.join(timeout)

    # ----------------------------------------------------------- worker thread
    def _work(self) -> None:
        while (job := self._jobs.get()) is not None:
            self._running = job
            try:
                self._run(job)
            except Exception as error:  # a bug or a bad request: the handler reports it
                job.send(error)
            finally:
                self._running, job.generation = None, None  # free the KV cache now
                job.send(None)

    def _run(self, job: Job) -> None:
        generation = job.generation
        if job.cancelled:  # cancelled while it waited: never start
            raise Cancelled("the request was cancelled before it started")
        self.requests += 1
        try:
            for row, piece in generation:
                job.send(("text", row, piece))
                if job.cancelled:
                    self.cancelled += 1
                    raise Cancelled("generation was cancelled: the client left or the server is shutting down")
        finally:
            self.completion_tokens += sum(len(tokens) for tokens in generation.tokens.tokens)
        for row, completion in enumerate(generation.completions()):
            job.send(("end", row, completion.finish_reason, completion.completion_tokens))
