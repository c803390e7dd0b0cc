"""One engine thread drives a batch: up to --max-num-seqs requests decode together, the rest
wait in a bounded queue.

The engine thread loops: it hands waiting Jobs to the engine while the engine has a free
sequence slot (engine.add_request; FIFO), aborts the Jobs whose client went away
(engine.abort), runs one engine.step() (a chunk of each newcomer's prompt, one round for
every decoding sequence) and gives each RequestOutput's tokens to its Job; with nothing
waiting or running it sleeps on a condition that submit() signals. The engine is built
inside this thread, not the main one, because CUDA's current device
(torch.cuda.set_device) is per thread and every step must run where the engine was set up.

Each Job carries an asyncio.Queue that the engine thread fills through
loop.call_soon_threadsafe with Deltas (text released since the last one) and ends with a
final Delta or an ApiError. A client that goes away withdraws its Job: a waiting one leaves
the queue at once (its place is free for the next client), a running one is aborted before
the next step and ends "cancelled" at its next decision, on every rank; its sequence slot then
takes the next waiting Job. The other sequences of the batch go on undisturbed.

Admission: --max-num-seqs requests run and --max-queue more wait; a request that would pass
that total is answered 429. A request for n choices is n Jobs, admitted together (all or
none); they run side by side as slots allow.

Failures: a request that fails on its own (a RequestOutput with an error) is answered 500,
its detail in the log under an incident id, and the batch goes on. An error raised by step()
(a worker process that died or a broken collective, WorkerFailure; or anything else, since
a batched step that raised leaves no sequence's state to trust) marks the engine failed:
every running and waiting request gets 503 and `on_failure` is called, which makes the
server exit non-zero so that its supervisor starts a fresh one. On shutdown every outstanding
request gets 503 and the engine thread aborts its batch, stepping until every rank has ended
it, before the engine closes.

The text of each Delta is the engine's Chunk.text: the engine ends generation at stop
strings and never releases any part of one, so streamed pieces add up to the non-streamed text.
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

from easyspec.engine.engine import Engine, WorkerFailure
from easyspec.engine.request import RequestOutput
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
        self.request_id: int | None = None  # the engine's, once the job is handed to it
        self.aborted = False  # engine.abort was called for it
        self.first_token: float | None = None
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
        self._waiting: deque[Job] = deque()  # submitted, not yet handed to the engine
        self._in_engine: dict[int, Job] = {}  # handed to the engine (admitted or about to be), by request id
        self._wake = threading.Condition()  # guards _waiting, _in_engine and _closing
        self.metrics = metrics
        self.engine: Engine | None = None
        self.failure: str | None = None
        self.on_failure: Callable[[], None] | None = None  # set by the server: begin shutting down
        # The engine's counts after its last step, for /metrics (the engine is read by its own thread only).
        self.running = 0
        self._engine_waiting = 0
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
    def max_num_seqs(self) -> int:
        assert self.engine is not None, "read once the engine is ready"
        return self.engine.options.max_num_seqs

    @property
    def waiting(self) -> int:
        """Requests not yet decoding: in this queue, or handed to the engine and not admitted yet."""
        return len(self._waiting) + self._engine_waiting

    def down_error(self) -> ApiError:
        return ApiError(503, f"the engine is down ({headline(self.failure or '')}); the server is exiting so "
                             "that its supervisor can restart it", code="engine_down")

    def mark_failed(self, message: str) -> None:
        """The engine cannot go on (called by the worker watchdog, or by the engine thread): refuse
        new work, fail every running and waiting request, and have the server exit."""
        first = self.failure is None
        if first:
            self.failure = message
            log.error("engine failed: %s; exiting so that a supervisor can restart the server", message)
        self._fail_all(self.down_error())
        if first and self.on_failure is not None:
            self.on_failure()

    def submit(self, jobs: list[Job]) -> None:
        """Take a request's jobs (one per choice), all of them or, when the server has no room, none."""
        capacity = self.max_num_seqs + self.max_queue
        if len(jobs) > capacity:
            raise ApiError(400, f"'n' ({len(jobs)}) is more than this server holds at once (--max-num-seqs "
                                f"{self.max_num_seqs} running and --max-queue {self.max_queue} waiting); ask for "
                                "fewer choices", param="n")
        with self._wake:
            if self._closing:
                raise ApiError(503, "the server is shutting down", code="shutting_down")
            if self.failure is not None:
                raise self.down_error()
            if len(self._waiting) + len(self._in_engine) + len(jobs) > capacity:
                raise ApiError(429, f"the request queue is full ({self.max_num_seqs} running, {self.max_queue} "
                                    "waiting); retry later", code="queue_full")
            self._waiting.extend(jobs)
            self._wake.notify()

    def withdraw(self, job: Job) -> None:
        """The request's client is gone or its answer is complete: stop the job (the engine thread
        aborts it if it runs), and give its place back at once if it has not started."""
        job.cancel()
        with self._wake:
            try:
                self._waiting.remove(job)
            except ValueError:
                return  # in the engine, or done
        self.metrics.record_withdrawn()

    def stop(self, timeout_s: float = 10.0) -> None:
        """Fail outstanding requests, let the engine thread wind down its batch, close the engine."""
        error = self.down_error() if self.failure else ApiError(503, "the server is shutting down",
                                                                  code="shutting_down")
        with self._wake:
            self._closing = True
            self._wake.notify_all()
        self._fail_all(error)
        if self._thread is not None:
            self._thread.join(timeout_s)

    def _fail_all(self, error: ApiError) -> None:
        """Answer every waiting and running job with `error`; the running ones are also cancelled, so
        the engine thread sends them nothing more."""
        with self._wake:
            jobs, self._waiting = [*self._waiting, *self._in_engine.values()], deque()
        for job in jobs:
            if not job.cancelled:
                job.cancel()
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
        while self._admit(engine):
            for job in list(self._in_engine.values()):
                if job.cancelled and not job.aborted:
                    engine.abort(job.request_id)
                    job.aborted = True
            try:
                outputs = engine.step()
            except Exception as err:
                self._step_failed(err)
                continue
            self.running, self._engine_waiting = engine.num_running, engine.num_waiting
            now = time.perf_counter()
            self.metrics.record_step(sum(1 for out in outputs if out.chunk.token_ids))
            for out in outputs:
                self._deliver(out, now)
        if self.failure is None:
            self._wind_down(engine)

    def _admit(self, engine: Engine) -> bool:
        """Wait until there is work, then hand waiting jobs to the engine while it has a free sequence
        slot. False once the server is closing."""
        with self._wake:
            while not self._closing and (self.failure is not None or not (self._waiting or self._in_engine)):
                self._wake.wait()
            if self._closing:
                return False
            while self._waiting and engine.num_running + engine.num_waiting < engine.options.max_num_seqs:
                job = self._waiting.popleft()
                try:
                    job.request_id = engine.add_request(job.prompt_ids, job.params)
                except Exception as err:  # the server checked the request already: a bug, told as a 500
                    self._answer_error(job, f"{type(err).__name__}: {err}", None)
                    continue
                self._in_engine[job.request_id] = job
                self.metrics.record_start(time.perf_counter() - job.arrived)
            self._engine_waiting = engine.num_waiting
            return True

    def _deliver(self, out: RequestOutput, now: float) -> None:
        """Give one request's output of a step to its job."""
        chunk = out.chunk
        with self._wake:
            job = self._in_engine.pop(out.request_id) if chunk.finished else self._in_engine.get(out.request_id)
        if job is None:
            return
        if job.first_token is None and chunk.token_ids:
            job.first_token = now
        if out.error is not None or chunk.finish_reason == "error":
            self._answer_error(job, out.error or "the engine ended the request with an error", chunk.stats)
        elif not chunk.finished:
            if not job.cancelled and (chunk.text or chunk.logprobs):
                job.push(Delta(chunk.text, chunk.logprobs))
        else:
            # Count the request before its client sees the end, so /metrics read right after a
            # response already includes it.
            self._record(job, chunk.finish_reason, chunk.stats)
            if not job.cancelled:
                job.push(Delta(chunk.text, chunk.logprobs, chunk.finish_reason, chunk.stop_reason,
                               chunk.stats.generated, chunk.stats))

    def _answer_error(self, job: Job, detail: str, stats: SpecStats | None) -> None:
        """A request that failed on its own: the detail goes to the log, the client gets an incident id."""
        incident = uuid.uuid4().hex[:12]
        log.error("request %s failed in the engine: %s", incident, detail)
        self._record(job, "error", stats)
        if not job.cancelled:
            job.push(ApiError(500, f"generation failed (incident {incident} in the server log)",
                              code="generation_failed"))

    def _record(self, job: Job, reason: str, stats: SpecStats | None) -> None:
        end = time.perf_counter()
        first = job.first_token
        self.metrics.record_finish(reason, len(job.prompt_ids), None if stats is None else stats.to_dict(),
                                   None if first is None else first - job.arrived, end - job.arrived,
                                   end - (first or end))

    def _step_failed(self, err: Exception) -> None:
        """step() raised: no sequence of the batch can be trusted to be in step any more."""
        log.error("the engine step failed", exc_info=err)
        with self._wake:
            jobs = list(self._in_engine.values())
        for job in jobs:
            self._record(job, "error", None)
        self.running = self._engine_waiting = 0
        self.mark_failed(str(err) if isinstance(err, WorkerFailure) else f"{type(err).__name__}: {err}")

    def _wind_down(self, engine: Engine) -> None:
        """The server is closing: abort the batch and step until every rank has ended it, so the
        engine closes between requests (stop() has answered their clients)."""
        for rid in list(self._in_engine):
            engine.abort(rid)
        try:
            while engine.has_unfinished():
                engine.step()
        except Exception as err:  # closing anyway; the log says why it was not clean
            log.warning("the engine failed while its requests were cancelled at shutdown: %s", err)
