"""One model, one request at a time: a bounded FIFO queue in front of a single worker thread.

The worker runs each job's generation; the job hands what it produces back to the event loop
through an asyncio queue (`Job.emit`), so no HTTP code runs on the worker and no model code on the
loop. A job whose client has gone is cancelled: if it is waiting it leaves the queue, if it runs it
stops at its next token (the generation loop checks `Job.cancelled` after every token).
"""

from __future__ import annotations

import asyncio
import collections
import threading
import time
from collections.abc import Callable
from typing import Any


class Job:
    def __init__(self, loop: asyncio.AbstractEventLoop, work: Callable[["Job"], None]):
        self.loop = loop
        self.work = work
        self.events: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
        self.cancelled = threading.Event()
        self.tokens = 0  # generated so far (written by the worker)
        self.admitted = time.monotonic()
        self.started: float | None = None
        self._queue: ModelQueue | None = None

    def emit(self, kind: str, payload: Any = None) -> None:
        """From the worker thread: hand an event to the request's coroutine."""
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, payload))
        except RuntimeError:  # the loop has closed (server shutting down): nobody is listening
            pass

    def cancel(self) -> None:
        """The client is gone (or the request is over): stop at the next token, or never start."""
        if not self.cancelled.is_set():
            self.cancelled.set()
            if self._queue is not None:
                self._queue.discard(self)


class QueueFull(Exception):
    def __init__(self, retry_after: int):
        super().__init__(f"the request queue is full; retry in {retry_after} s")
        self.retry_after = retry_after


class ModelQueue:
    """At most `capacity` jobs wait while one runs; `submit` beyond that raises QueueFull."""

    def __init__(self, capacity: int):
        if capacity < 1:
            raise ValueError("the queue must hold at least one request")
        self.capacity = capacity
        self._waiting: collections.deque[Job] = collections.deque()
        self._cv = threading.Condition()
        self._running: Job | None = None
        self._closed = False
        self._service = collections.deque(maxlen=32)  # recent seconds per job, for Retry-After
        self._thread = threading.Thread(target=self._loop, name="localmoe-model", daemon=True)
        self._thread.start()

    # -- the event loop's side ---------------------------------------------------------------------
    def submit(self, job: Job) -> None:
        with self._cv:
            if self._closed:
                raise QueueFull(self.retry_after_locked())
            if len(self._waiting) >= self.capacity:
                raise QueueFull(self.retry_after_locked())
            job._queue = self
            self._waiting.append(job)
            self._cv.notify()

    def discard(self, job: Job) -> None:
        with self._cv:
            try:
                self._waiting.remove(job)
            except ValueError:
                return  # running or done: it stops at its next token
        job.emit("cancelled")

    def depth(self) -> int:
        with self._cv:
            return len(self._waiting)

    def running(self) -> int:
        with self._cv:
            return int(self._running is not None)

    def retry_after_locked(self) -> int:
        """Seconds until a slot is likely free: the mean recent service time × the jobs ahead."""
        mean = sum(self._service) / len(self._service) if self._service else 1.0
        return max(1, round(mean * (len(self._waiting) + 1)))

    def close(self) -> None:
        with self._cv:
            self._closed = True
            waiting, self._waiting = list(self._waiting), collections.deque()
            running = self._running
            self._cv.notify_all()
        for job in waiting:
            job.cancelled.set()
            job.emit("cancelled")
        if running is not None:
            running.cancel()
        self._thread.join(timeout=10)

    # -- the worker ---------------------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self._cv:
                while not self._waiting and not self._closed:
                    self._cv.wait()
                if self._closed:
                    return
                job = self._waiting.popleft()
                self._running = job
            job.started = time.monotonic()
            try:
                job.work(job)
            except BaseException as exc:  # reported to the request; the worker lives on
                job.emit("error", exc)
            finally:
                with self._cv:
                    self._running = None
                    self._service.append(time.monotonic() - job.started)
