"""The public entry point: `Engine(options).generate(prompt, params)` yields Chunks;
`generate_many(prompts)` returns whole results, decoded together.

Underneath, requests wait in a queue and run in a batch of up to --max-num-seqs
sequences: `add_request` queues one, `step` admits what fits and advances every
running sequence by one round, `abort` cancels one. `generate` drives `step`
itself and keeps the other requests' outputs for them, so several generators
may be open at once; the server drives `step` from its own thread.

The Engine process is rank 0. With `devices > 1` it spawns the other ranks
itself (or, under torchrun, every rank builds an Engine and runs the same
calls). Followers receive each step's joining requests through a pipe and run
the step in lockstep.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from multiprocessing.connection import Connection
from pathlib import Path

import torch

from easyspec.engine.decision import RequestFailed, seed_box
from easyspec.engine.preflight import preflight, request_defaults
from easyspec.engine.request import Chunk, GenerationResult, Join, RequestOutput
from easyspec.engine.worker import Worker
from easyspec.model.checkpoint import read_text
from easyspec.model.progress import bar
from easyspec.model.tokenizer import Tokenizer
from easyspec.options import (
    DEFAULT_MAX_NEW_TOKENS,
    EngineOptions,
    OptionsError,
    SamplingParams,
)
from easyspec.parallel import comm
from easyspec.parallel.launch import Followers, free_port, set_rendezvous, torchrun_rank, watch_parent
from easyspec.parallel.state import init_parallel, shutdown_parallel

log = logging.getLogger("easyspec")


class WorkerFailure(RuntimeError):
    """A worker process died or its collectives broke; the message names the rank."""


_fatal_lock = threading.Lock()


def exit_on_failure(message: str) -> None:
    """Print one error line and leave at once. A peer is gone and rank 0 may be blocked in
    a collective that will never finish; the lock keeps the watchdog thread and the main
    thread from both reporting the same failure."""
    with _fatal_lock:
        print(f"error: {message}", file=sys.stderr, flush=True)
        os._exit(1)


class Engine:
    """One model (and draft) on its devices, decoding a batch of requests.

    `generate` streams one prompt's Chunks; `generate_many` runs a list of prompts together and
    returns their results; `add_request` / `step` / `abort` drive the batch directly (one thread
    at a time). A prompt is a string (encoded as raw text, with the tokenizer's own special
    tokens, as vLLM's LLM.generate does; `encode_prompt` applies the chat template) or token ids.
    Without SamplingParams a request takes the engine's defaults (`sampling_params()`).
    """

    def __init__(
        self,
        options: EngineOptions | None = None,
        on_worker_failure: Callable[[str], None] | None = None,
        **overrides: object,
    ) -> None:
        options = (options or EngineOptions()).replace(**overrides)
        options, context_line = preflight(options)
        self.options = options
        self.request_defaults = request_defaults(options)
        self.followers: Followers | None = None
        self._waiting: deque[Join] = deque()  # checked requests, not yet in the batch
        self._next_id = 0
        self._aborted: list[RequestOutput] = []  # waiting requests aborted: their last output, at the next step
        self._cancels: list[int] = []  # running requests aborted since the last step, for the followers
        self._kept: dict[int, deque[RequestOutput]] = {}  # outputs of requests a generate() streams
        self._unclaimed: list[RequestOutput] = []  # outputs a generate() stepped past for step()'s callers
        self._dropped: set[int] = set()  # running requests whose reader left mid-step: their outputs go nowhere
        self._stepping = False  # inside _step (a generator the garbage collector closes then must not step)
        self._closed = False
        launched = torchrun_rank()
        if launched:
            rank, world = launched
            if world != options.devices:
                raise OptionsError(f"torchrun started {world} processes but --devices is {options.devices}")
            state = init_parallel(rank, world, options.device, timeout_s=options.timeout_s)
        elif options.devices > 1:
            set_rendezvous(free_port())
            self.followers = Followers(_follower_main, options.devices, (options,))
            self.followers.watch(on_worker_failure or exit_on_failure)
            state = init_parallel(0, options.devices, options.device, timeout_s=options.timeout_s)
        else:
            state = init_parallel(0, 1, options.device)
        self.state = state
        if state.is_driver:
            log.info("%s", context_line)
        self.worker = Worker(options, state)
        if options.chat_template is not None:
            self.tokenizer.chat_template = read_text(Path(options.chat_template))

    @property
    def tokenizer(self) -> Tokenizer | None:
        return self.worker.tokenizer

    @property
    def is_driver(self) -> bool:
        return self.state.is_driver

    def encode_prompt(self, text: str, raw: bool = False) -> list[int]:
        """Text to token ids, through the chat template unless `raw` or the model has none."""
        return self._text_tokenizer().encode_prompt(text, raw)

    def _text_tokenizer(self) -> Tokenizer:
        if self.tokenizer is None:
            raise OptionsError(f"{self.options.model} has no tokenizer.json; pass token ids (a list of ints) "
                               "instead of text")
        return self.tokenizer

    def prompt_ids(self, prompt: str | list[int]) -> list[int]:
        """A prompt as token ids: a string encoded as raw text, token ids as they are (the worker's
        check_request says which one is not an integer or not in the vocabulary)."""
        if isinstance(prompt, str):
            return self._text_tokenizer().encode(prompt)
        if isinstance(prompt, (list, tuple)):
            return list(prompt)
        raise TypeError(f"a prompt is a str or a list of token ids (ints), got {type(prompt).__name__}")

    def sampling_params(self, prompt_len: int | None = None, defaults: dict[str, object] | None = None,
                        **settings: object) -> SamplingParams:
        """A request's SamplingParams: `settings`, then the engine's defaults (--generation-config:
        the model's generation_config.json by default), then the caller's `defaults` (a surface's
        own, as the server's OpenAI ones), then SamplingParams' own. Given `prompt_len`, a
        max_new_tokens that comes from the defaults is lowered to what the context leaves."""
        params = {**(defaults or {}), **self.request_defaults, **settings}
        if prompt_len is not None and "max_new_tokens" not in settings:
            room = self.options.max_context - prompt_len - self.options.draft_room
            default = params.get("max_new_tokens", DEFAULT_MAX_NEW_TOKENS)
            params["max_new_tokens"] = max(1, min(default, room))
        return SamplingParams(**params)

    @property
    def num_running(self) -> int:
        """Requests in the batch (reading their prompt or decoding)."""
        return len(self.worker.running)

    @property
    def num_waiting(self) -> int:
        """Requests queued for a free place in the batch."""
        return len(self._waiting)

    def has_unfinished(self) -> bool:
        """Whether step() has outputs still to give: requests waiting or running, or outputs a
        generate() stepped past for step()'s callers."""
        return bool(self._waiting or self.worker.running or self._aborted or self._unclaimed)

    def add_request(self, prompt: str | list[int], params: SamplingParams | None = None) -> int:
        """Queue a request (checked now: OptionsError says what is wrong); returns its id. It joins the
        batch at a later step() when there is room, first come first served."""
        join = self._checked(prompt, params)
        self._waiting.append(join)
        return join.request_id

    def _checked(self, prompt: str | list[int], params: SamplingParams | None) -> Join:
        prompt_ids = self.prompt_ids(prompt)
        params = params or self.sampling_params(len(prompt_ids))
        self.worker.check_request(prompt_ids, params)
        try:
            seed = int(seed_box(params.seed)[0])
        except (RuntimeError, OverflowError, ValueError) as err:
            raise OptionsError(f"seed {params.seed} does not fit a signed 64-bit integer") from err
        self._next_id += 1
        return Join(self._next_id - 1, prompt_ids, params, seed)

    def abort(self, request_id: int) -> None:
        """Cancel a request: a waiting one leaves the queue (its last output comes at the next step), a
        running one ends with "cancelled" at its next decision. Unknown or finished ids are ignored."""
        for join in self._waiting:
            if join.request_id == request_id:
                self._waiting.remove(join)
                last = RequestOutput(request_id, Chunk([], finished=True, finish_reason="cancelled"))
                (self._kept[request_id] if request_id in self._kept else self._aborted).append(last)
                return
        if self.worker.holds(request_id):
            self.worker.cancel(request_id)
            self._cancels.append(request_id)

    def step(self) -> list[RequestOutput]:
        """Admit waiting requests while the batch has room, then advance every running one by a step;
        returns what each committed (each request's last output has chunk.finished set). Raises
        WorkerFailure when a worker process died or a collective broke: the engine is then unusable."""
        outputs = self._unclaimed + self._aborted
        self._unclaimed, self._aborted = [], []
        self._route(self._step(), outputs)
        return outputs

    def _route(self, outputs: list[RequestOutput], others: list[RequestOutput]) -> None:
        """Each output to its open generate(), nowhere (a dropped request's), or else onto `others`."""
        for out in outputs:
            if out.request_id in self._kept:
                self._kept[out.request_id].append(out)
            elif out.request_id in self._dropped:
                if out.chunk.finished:
                    self._dropped.discard(out.request_id)
            else:
                others.append(out)

    def _step(self) -> list[RequestOutput]:
        joins = []
        while self._waiting and len(joins) < self.worker.room:
            joins.append(self._waiting.popleft())
        if not joins and not self.worker.running:
            return []
        # Every rank knows which requests are cancelled, so that one still reading its prompt ends at once.
        cancels, self._cancels = self._cancels, []
        self._stepping = True
        try:
            if self.followers is not None:
                self.followers.send(("step", joins, cancels))
            elif self.state.distributed and joins:
                self._agree_seeds(joins)
            self.worker.admit(joins)
            return self.worker.step()
        except (RuntimeError, OSError) as err:
            # A collective that fails (or the pipe to a follower: it is written every step) usually means a peer
            # died or hangs: name it rather than the transport error.
            culprit = self.followers.diagnose(err, self.options.timeout_s) if self.followers is not None else None
            if culprit is not None:
                self.followers.kill()  # out of step for good; a stopped one would hold up close() too
                raise WorkerFailure(culprit) from err
            raise
        finally:
            self._stepping = False

    def _agree_seeds(self, joins: list[Join]) -> None:
        """Under torchrun every rank queued the same requests itself: rank 0's seeds (drawn where the
        request gave none) become every rank's."""
        seeds = comm.broadcast(torch.tensor([j.seed for j in joins], device=self.state.device), 0, self.state.group)
        for join, seed in zip(joins, seeds.tolist(), strict=True):
            join.seed = seed

    def _next_output(self, request_id: int) -> RequestOutput:
        """The request's next output, stepping the engine until there is one; other requests' outputs
        are kept for their own generate() or handed to the next step() caller."""
        kept = self._kept[request_id]
        while not kept:
            if not self._waiting and not self.worker.running:
                raise RuntimeError(f"request {request_id} is neither waiting nor running")
            self._route(self._step(), self._unclaimed)
        return kept.popleft()

    def _leave(self, request_ids: Sequence[int]) -> None:
        """Cancel requests whose reader is gone without running the batch (a generator closed by the
        garbage collector in the middle of a step, or an interrupted generate_many): their outputs from
        now on are dropped."""
        for request_id in request_ids:
            self.abort(request_id)
            if self.worker.holds(request_id):
                self._dropped.add(request_id)

    def generate(self, prompt: str | list[int], params: SamplingParams | None = None) -> Iterator[Chunk]:
        """Yield Chunks as tokens are committed; stop iterating (or close the generator) to cancel.
        The request is checked now and queued at the first iteration; other requests (other
        generators, add_request) run in the same batch meanwhile. A request that fails on its own
        raises RequestFailed (the engine goes on)."""
        return self._stream(self._checked(prompt, params))

    def _stream(self, join: Join) -> Iterator[Chunk]:
        request_id = join.request_id
        self._kept[request_id] = deque()
        self._waiting.append(join)
        try:
            finished = False
            while not finished:
                out = self._next_output(request_id)
                finished = out.chunk.finished
                if out.error is not None:
                    raise RequestFailed(out.error)
                yield out.chunk
        except GeneratorExit:
            if self._stepping and not finished:  # the garbage collector, inside a step: a step must not start
                self._leave([request_id])
            elif not self._closed and not finished:  # cancel, and run the batch to the request's last decision
                self.abort(request_id)
                while not self._next_output(request_id).chunk.finished:
                    pass
            raise
        finally:
            del self._kept[request_id]

    def generate_many(self, prompts: Sequence[str | list[int]],
                      params: SamplingParams | Sequence[SamplingParams] | None = None,
                      progress: bool | None = None) -> list[GenerationResult]:
        """Every prompt's whole generation, in the order given (as vLLM's LLM.generate(list)), decoded
        together in batches of up to --max-num-seqs.

        `params`: one SamplingParams for all prompts, one per prompt, or None for the engine's
        defaults. Every prompt and its params are checked before the first one runs. `progress`
        (default: the engine's --no-progress setting) shows one bar over the prompts on stderr.
        A prompt whose request fails on its own raises RequestFailed once the others are done."""
        if isinstance(prompts, str) or not isinstance(prompts, Sequence):
            raise TypeError("generate_many takes a list of prompts (each a str or a list of token ids); "
                            "use generate for one")
        ids = [self.prompt_ids(p) for p in prompts]
        if params is None or isinstance(params, SamplingParams):
            each = [params or self.sampling_params(len(p)) for p in ids]
        else:
            each = list(params)
            if len(each) != len(ids) or not all(isinstance(p, SamplingParams) for p in each):
                raise ValueError(f"generate_many: give one SamplingParams, or a list of {len(ids)} (one per "
                                 f"prompt); got {len(each)} items")
        joins = [self._checked(prompt_ids, request) for prompt_ids, request in zip(ids, each, strict=True)]
        self._waiting.extend(joins)  # all checked before the first is queued
        order = [join.request_id for join in joins]
        for request_id in order:
            self._kept[request_id] = deque()
        parts: dict[int, list[RequestOutput]] = {request_id: [] for request_id in order}
        show = self.options.progress if progress is None else progress
        try:
            with bar(len(ids), "prompts", unit="prompt", enabled=show and self.is_driver) as counter:
                for request_id in order:
                    while not parts[request_id] or not parts[request_id][-1].chunk.finished:
                        out = self._next_output(request_id)
                        parts[request_id].append(out)
                    counter.update(1)
        except BaseException:  # interrupted (Ctrl-C, a worker failure): the requests left are nobody's
            self._leave([request_id for request_id in order if not parts[request_id]
                         or not parts[request_id][-1].chunk.finished])
            raise
        finally:
            for request_id in order:
                del self._kept[request_id]
        failed = next((outs[-1].error for outs in parts.values() if outs[-1].error is not None), None)
        if failed is not None:
            raise RequestFailed(failed)
        results = []
        for request_id, prompt_ids, request in zip(order, ids, each, strict=True):
            chunks = [out.chunk for out in parts[request_id]]
            last = chunks[-1]
            logprobs = [e for c in chunks for e in c.logprobs or ()] if request.logprobs is not None else None
            results.append(GenerationResult(prompt_ids, [t for c in chunks for t in c.token_ids],
                                            "".join(c.text for c in chunks), last.finish_reason, last.stop_reason,
                                            last.stats, logprobs))
        return results

    def close(self) -> None:
        self._closed = True
        if self.followers is not None:
            self.followers.stop()
            self.followers = None
        shutdown_parallel(self.state)

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _follower_main(rank: int, world: int, conn: Connection, parent_pid: int, options: EngineOptions) -> None:
    watch_parent(parent_pid)
    state = None
    try:
        state = init_parallel(rank, world, options.device, timeout_s=options.timeout_s)
        worker = Worker(options, state)
        while True:
            message = conn.recv()
            if message[0] == "close":
                break
            _, joins, cancels = message
            worker.admit(joins)
            for request_id in cancels:
                worker.cancel(request_id)
            worker.step()
    except (EOFError, KeyboardInterrupt):
        pass
    except Exception as err:  # any failure must reach rank 0 as one line, then end this rank
        try:
            conn.send(("error", f"{type(err).__name__}: {err}"))
        finally:
            os._exit(1)
    if state is not None:
        shutdown_parallel(state)
