"""The public entry point: `Engine(options).generate(prompt_ids, params)` yields Chunks.

The Engine process is rank 0. With `devices > 1` it spawns the other ranks
itself (or, under torchrun, every rank builds an Engine and runs the same
calls). Followers receive each request through a pipe and run it in lockstep.
"""

from __future__ import annotations

import os
import sys
import threading
from collections.abc import Callable, Iterator
from multiprocessing.connection import Connection

from easyspec.draft.setup import check_draft
from easyspec.engine.worker import Chunk, Worker
from easyspec.model.loader import load_config
from easyspec.options import DEFAULT_CONTEXT, MIN_CONTEXT, EngineOptions, OptionsError, SamplingParams
from easyspec.parallel.launch import Followers, free_port, set_rendezvous, torchrun_rank, watch_parent
from easyspec.parallel.state import init_parallel, shutdown_parallel
from easyspec.parallel.tp import check_divisible


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


def preflight(options: EngineOptions) -> EngineOptions:
    """Checks that need only config files, done before any process is started;
    returns the options with the context length settled."""
    options.validate()
    base = load_config(options.model)
    if options.max_context is None:
        limits = [DEFAULT_CONTEXT, base.max_position_embeddings]
        if options.draft:
            limits.append(load_config(options.draft).max_position_embeddings)
        options = options.replace(max_context=min(limits))
        if options.max_context < MIN_CONTEXT:
            raise OptionsError(f"the models support {options.max_context} positions (max_position_embeddings), "
                               f"fewer than the {MIN_CONTEXT} easyspec needs; check their config.json")
    if options.devices > 1:
        check_divisible(base, options.devices, "base model")
    if options.draft:
        check_draft(base, load_config(options.draft), options)
    if base.max_position_embeddings < options.max_context:
        raise OptionsError(
            f"--max-context {options.max_context} exceeds the base model's "
            f"max_position_embeddings ({base.max_position_embeddings}); lower it"
        )
    if options.tree_width > base.vocab_size:
        raise OptionsError(f"--tree-width {options.tree_width} exceeds the vocabulary "
                           f"({base.vocab_size} tokens); lower it")
    if options.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise OptionsError("--device cuda was asked for but no CUDA device is visible; use --device cpu")
        if torch.cuda.device_count() < options.devices:
            raise OptionsError(
                f"--devices {options.devices} but only {torch.cuda.device_count()} CUDA devices are visible"
            )
    return options


class Engine:
    def __init__(
        self,
        options: EngineOptions | None = None,
        on_worker_failure: Callable[[str], None] | None = None,
        **overrides: object,
    ) -> None:
        options = (options or EngineOptions()).replace(**overrides)
        options = preflight(options)
        self.options = options
        self.followers: Followers | None = None
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
        self.worker = Worker(options, state)

    @property
    def tokenizer(self):
        return self.worker.tokenizer

    @property
    def is_driver(self) -> bool:
        return self.state.is_driver

    def encode_prompt(self, text: str, raw: bool = False) -> list[int]:
        """Text to token ids, through the chat template unless `raw` or the model has none."""
        tok = self.tokenizer
        if tok is None:
            raise OptionsError(f"{self.options.model} has no tokenizer.json; pass token ids with --prompt-ids")
        return tok.encode_prompt(text, raw)

    def generate(self, prompt_ids: list[int], params: SamplingParams | None = None) -> Iterator[Chunk]:
        """Yield Chunks as tokens are committed; stop iterating to cancel."""
        params = params or SamplingParams()
        self.worker.check_request(prompt_ids, params)
        if self.followers is not None:
            self.followers.send(("generate", prompt_ids, params))
        try:
            yield from self.worker.generate(prompt_ids, params)
        except RuntimeError as err:
            # A collective that fails usually means a peer died or hangs: name it rather than the transport error.
            culprit = self.followers.diagnose(err, self.options.timeout_s) if self.followers is not None else None
            if culprit is not None:
                self.followers.kill()  # out of step for good; a stopped one would hold up close() too
                raise WorkerFailure(culprit) from err
            raise

    def close(self) -> None:
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
            _, prompt_ids, params = message
            for _ in worker.generate(prompt_ids, params):
                pass
    except (EOFError, KeyboardInterrupt):
        pass
    except Exception as err:  # any failure must reach rank 0 as one line, then end this rank
        try:
            conn.send(("error", f"{type(err).__name__}: {err}"))
        finally:
            os._exit(1)
    if state is not None:
        shutdown_parallel(state)
