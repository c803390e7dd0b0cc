"""One engine thread fed by a bounded queue: requests run one at a time, in order.

Batch size 1 is the regime speculative decoding is built for, so the engine
never interleaves requests; concurrency lives only in the HTTP layer. The
engine is built inside its thread, not the main one, because CUDA's current
device (torch.cuda.set_device) is per thread and every step must run where
the engine was set up.

Each Job carries an asyncio.Queue that the engine thread fills through
loop.call_soon_threadsafe with Deltas (text released since the last one) and
ends with a final Delta or an ApiError. Cancelling a Job (the client went
away) is noticed between engine steps; closing the generator then stops the
request cleanly on every rank.

The text of each Delta is the engine's Chunk.text: the engine ends generation
at stop strings and never releases any part of one, so streamed pieces add up
to the non-streamed text.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field

from easyspec.engine.engine import Engine
from easyspec.options import SamplingParams
from easyspec.server.metrics import Metrics
from easyspec.server.protocol import ApiError

log = logging.getLogger("easyspec.server")


@dataclass
class Delta:
    text: str
    finish_reason: str | None = None
    completion_tokens: int = 0  # on the final Delta: tokens generated in all
    stats: dict = field(default_factory=dict)  # on the final Delta: SpecStats.to_dict()


class Job:
    def __init__(self, prompt_ids: list[int], params: SamplingParams, loop: asyncio.AbstractEventLoop) -> None:
        self.prompt_ids = prompt_ids
        self.params = params
        self.events: asyncio.Queue[Delta | ApiError] = asyncio.Queue()
        self.arrived = time.perf_counter()
        self._loop = loop
        self._cancelled = threading.Event()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def cancel(self) -> None:
        self._cancelled.set()

    def push(self, item: Delta | ApiError) -> None:
        """Hand an event to the request's handler; callable from any thread."""
        try:
            self._loop.call_soon_threadsafe(self.events.put_nowait, item)
        except RuntimeError:  # the event loop is closed: nobody is listening any more
            self.cancel()


class Scheduler:
    def __init__(self, build_engine: Callable[[Callable[[str], None]], Engine], max_queue: int,
                 metrics: Metrics) -> None:
        self._build_engine = build_engine
        self._jobs: queue.Queue[Job | None] = queue.Queue(maxsize=max_queue)
        self.metrics = metrics
        self.engine: Engine | None = None
        self.failure: str | None = None
        self.current: Job | None = None
        self._closing = False
        self._thread: threading.Thread | None = None

    def start(self) -> Engine:
        """Build the engine in its thread; returns once it is ready, or raises what building raised."""
        ready: Future[Engine] = Future()
        self._thread = threading.Thread(target=self._main, args=(ready,), name="easyspec-engine", daemon=True)
        self._thread.start()
        self.engine = ready.result()
        return self.engine

    @property
    def healthy(self) -> bool:
        return self.failure is None

    @property
    def waiting(self) -> int:
        return self._jobs.qsize()

    def mark_failed(self, message: str) -> None:
        """Called by the engine's failure watchdog: refuse new work and fail what is queued."""
        if self.failure is None:
            self.failure = message
            log.error("engine failed: %s; /health now answers 503", message)
        self._drain(ApiError(503, f"the engine is down: {self.failure}", code="engine_down"))

    def submit(self, job: Job) -> None:
        if self._closing:
            raise ApiError(503, "the server is shutting down", code="shutting_down")
        if self.failure is not None:
            raise ApiError(503, f"the engine is down: {self.failure}", code="engine_down")
        try:
            self._jobs.put_nowait(job)
        except queue.Full:
            raise ApiError(429, f"the request queue is full ({self._jobs.maxsize} waiting); retry later",
                           code="queue_full") from None

    def stop(self, timeout_s: float = 10.0) -> None:
        """Fail outstanding requests, let the engine thread finish, close the engine."""
        self._closing = True
        error = ApiError(503, "the server is shutting down", code="shutting_down")
        running = self.current
        if running is not None:
            running.cancel()
            running.push(error)
        self._drain(error)
        if self._thread is None:
            return
        try:
            self._jobs.put(None, timeout=timeout_s)
        except queue.Full:
            return
        self._thread.join(timeout_s)

    def _drain(self, error: ApiError) -> None:
        while True:
            try:
                job = self._jobs.get_nowait()
            except queue.Empty:
                return
            if job is not None:
                job.push(error)

    def _main(self, ready: Future[Engine]) -> None:
        try:
            engine = self._build_engine(self.mark_failed)
        except BaseException as err:  # handed to the main thread, which reports it
            ready.set_exception(err)
            return
        ready.set_result(engine)
        try:
            self._serve(engine)
        finally:
            engine.close()

    def _serve(self, engine: Engine) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            if job.cancelled:
                continue
            if self.failure is not None:
                job.push(ApiError(503, f"the engine is down: {self.failure}", code="engine_down"))
                continue
            self.current = job
            try:
                self._run(engine, job)
            except Exception as err:  # the request fails; the server goes on serving
                log.exception("generation failed")
                if engine.options.devices > 1 and self.failure is None:
                    # Ranks may no longer be in lockstep; only a restart is safe.
                    self.mark_failed(f"{type(err).__name__}: {err}")
                status = 503 if self.failure else 500
                job.push(ApiError(status, f"generation failed: {type(err).__name__}: {err}",
                                  code="generation_failed"))
            finally:
                self.current = None

    def _run(self, engine: Engine, job: Job) -> None:
        started = time.perf_counter()
        self.metrics.record_start(started - job.arrived)
        first_token: float | None = None
        reason, stats = "error", None  # stays "error" only if the engine raises
        recorded = False

        def record() -> None:
            end = time.perf_counter()
            self.metrics.record_finish(reason, len(job.prompt_ids), stats.to_dict(),
                                       None if first_token is None else first_token - job.arrived,
                                       end - job.arrived, end - (first_token or end))

        generation = engine.generate(job.prompt_ids, job.params)
        try:
            for chunk in generation:
                if first_token is None:
                    first_token = time.perf_counter()
                stats = chunk.stats
                if job.cancelled:
                    reason = "cancelled"
                    break
                if not chunk.finished:
                    if chunk.text:
                        job.push(Delta(chunk.text))
                    continue
                reason = chunk.finish_reason
                # Count the request before the client sees its end, so /metrics read right
                # after a response already includes it.
                record()
                recorded = True
                job.push(Delta(chunk.text, reason, stats.generated, stats.to_dict()))
        finally:
            # Stops the engine between steps (on every rank) if it is not done yet.
            generation.close()
            if stats is not None and not recorded:
                record()
