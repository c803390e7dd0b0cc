"""One engine thread fed by a bounded queue: requests run one at a time, in order.

Batch size 1 is the regime speculative decoding is built for, so the engine
never interleaves requests; concurrency lives only in the HTTP layer. The
engine is built inside its thread, not the main one, because CUDA's current
device (torch.cuda.set_device) is per thread and every step must run where
the engine was set up.

Each Job carries an asyncio.Queue that the engine thread fills through
loop.call_soon_threadsafe with Deltas (text released since the last one) and
ends with a final Delta or an ApiError. A client that goes away withdraws its
Job: a waiting one leaves the queue at once (its slot is free for the next
client), a running one is noticed between engine steps; closing the generator
then stops the request cleanly on every rank.

Failures: a request that fails on its own (RequestFailed, or any error with
one device) is answered 500 and serving goes on. An error that may have left
the ranks out of step, or a worker process that dies, marks the engine failed:
every waiting request gets 503 and `on_failure` is called, which makes the
server exit non-zero so that its supervisor starts a fresh one.

The text of each Delta is the engine's Chunk.text: the engine ends generation
at stop strings and never releases any part of one, so streamed pieces add up
to the non-streamed text.

A request for n choices is n Jobs, queued together (all or none) and so run
one after another.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field

from easyspec.engine.decision import RequestFailed
from easyspec.engine.engine import Engine, WorkerFailure
from easyspec.options import SamplingParams
from easyspec.runtime.stats import SpecStats
from easyspec.server.metrics import Metrics
from easyspec.server.protocol import ApiError
from easyspec.verify.logprobs import TokenLogprob

log = logging.getLogger("easyspec.server")


@dataclass
class Delta:
    text: str
    logprobs: list[TokenLogprob] | None = None  # the step's tokens', when the request asked for them
    finish_reason: str | None = None
    stop_reason: str | int | None = None  # on the final Delta: the stop string or stop token that ended it
    completion_tokens: int = 0  # on the final Delta: tokens generated in all
    stats: SpecStats = field(default_factory=SpecStats)  # on the final Delta: the generation's


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


def headline(message: str) -> str:
    """A failure message without its detail: "worker rank 1 failed: <transport error>" -> "worker rank 1
    failed". The detail can hold internal text, so it goes to the log, not into error bodies."""
    return message.split(": ", 1)[0]


class Scheduler:
    def __init__(self, build_engine: Callable[[Callable[[str], None]], Engine], max_queue: int,
                 metrics: Metrics) -> None:
        self._build_engine = build_engine
        self.max_queue = max_queue
        self._waiting: deque[Job] = deque()
        self._wake = threading.Condition()  # guards _waiting and _closing
        self.metrics = metrics
        self.engine: Engine | None = None
        self.failure: str | None = None
        self.on_failure: Callable[[], None] | None = None  # set by the server: begin shutting down
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
        return len(self._waiting)

    def down_error(self) -> ApiError:
        return ApiError(503, f"the engine is down ({headline(self.failure or '')}); the server is exiting so "
                             "that its supervisor can restart it", code="engine_down")

    def mark_failed(self, message: str) -> None:
        """The engine cannot go on (called by the worker watchdog, or by the engine thread): refuse
        new work, fail what is queued, and have the server exit."""
        first = self.failure is None
        if first:
            self.failure = message
            log.error("engine failed: %s; exiting so that a supervisor can restart the server", message)
        self._drain(self.down_error())
        if first and self.on_failure is not None:
            self.on_failure()

    def submit(self, jobs: list[Job]) -> None:
        """Queue a request's jobs (one per choice), all of them or, when the queue has no room, none."""
        if len(jobs) > self.max_queue:
            raise ApiError(400, f"'n' ({len(jobs)}) is more than this server queues at once (--max-queue "
                                f"{self.max_queue}); ask for fewer choices", param="n")
        with self._wake:
            if self._closing:
                raise ApiError(503, "the server is shutting down", code="shutting_down")
            if self.failure is not None:
                raise self.down_error()
            if len(self._waiting) + len(jobs) > self.max_queue:
                raise ApiError(429, f"the request queue is full ({self.max_queue} waiting); retry later",
                               code="queue_full")
            self._waiting.extend(jobs)
            self._wake.notify()

    def withdraw(self, job: Job) -> None:
        """The request's client is gone or its answer is complete: stop the job, and give its queue
        slot back at once if it has not started."""
        job.cancel()
        with self._wake:
            try:
                self._waiting.remove(job)
            except ValueError:
                return  # running or done
        self.metrics.record_withdrawn()

    def stop(self, timeout_s: float = 10.0) -> None:
        """Fail outstanding requests, let the engine thread finish, close the engine."""
        error = self.down_error() if self.failure else ApiError(503, "the server is shutting down",
                                                                  code="shutting_down")
        with self._wake:
            self._closing = True
            self._wake.notify_all()
        running = self.current
        if running is not None:
            running.cancel()
            running.push(error)
        self._drain(error)
        if self._thread is not None:
            self._thread.join(timeout_s)

    def _drain(self, error: ApiError) -> None:
        with self._wake:
            jobs, self._waiting = list(self._waiting), deque()
        for job in jobs:
            job.push(error)

    def _next(self) -> Job | None:
        """The next job to run, waiting for one; None once the server is closing."""
        with self._wake:
            while not self._waiting and not self._closing:
                self._wake.wait()
            return None if self._closing else self._waiting.popleft()

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
        while (job := self._next()) is not None:
            if job.cancelled:
                continue
            if self.failure is not None:
                job.push(self.down_error())
                continue
            self.current = job
            try:
                self._run(engine, job)
            except Exception as err:
                self._fail(engine, job, err)
            finally:
                self.current = None

    def _fail(self, engine: Engine, job: Job, err: Exception) -> None:
        """A request raised in the engine: answer it without internal detail, which goes to the log."""
        incident = uuid.uuid4().hex[:12]
        log.error("request %s failed in the engine", incident, exc_info=err)
        if engine.options.devices > 1 and not isinstance(err, RequestFailed) and self.failure is None:
            # The ranks may be out of step: only a fresh engine is safe.
            self.mark_failed(str(err) if isinstance(err, WorkerFailure) else f"{type(err).__name__}: {err}")
        if self.failure is not None:
            job.push(self.down_error())
        else:
            job.push(ApiError(500, f"generation failed (incident {incident} in the server log)",
                              code="generation_failed"))

    def _run(self, engine: Engine, job: Job) -> None:
        started = time.perf_counter()
        self.metrics.record_start(started - job.arrived)
        first_token: float | None = None
        reason, stats = "error", None  # stays "error" only if the engine raises
        recorded = False

        def record() -> None:
            end = time.perf_counter()
            self.metrics.record_finish(reason, len(job.prompt_ids), None if stats is None else stats.to_dict(),
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
                    if chunk.text or chunk.logprobs:
                        job.push(Delta(chunk.text, chunk.logprobs))
                    continue
                reason = chunk.finish_reason
                # Count the request before the client sees its end, so /metrics read right
                # after a response already includes it.
                record()
                recorded = True
                job.push(Delta(chunk.text, chunk.logprobs, reason, chunk.stop_reason, stats.generated, stats))
        finally:
            # Stops the engine between steps (on every rank) if it is not done yet.
            generation.close()
            if not recorded:  # cancelled, or the engine raised (before its first chunk too)
                record()
