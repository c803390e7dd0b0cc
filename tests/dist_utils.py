"""Run a function on N CPU processes over gloo and collect what each rank returns."""

from __future__ import annotations

import os
import pickle
import traceback

import torch.multiprocessing as mp

from easyspec.parallel.launch import free_port
from easyspec.parallel.state import init_parallel, shutdown_parallel


def _entry(rank, world, port, fn, args, queue):
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    try:
        state = init_parallel(rank, world, "cpu", timeout_s=60)
        # Plain pickle: tensors travel by value, not as shared memory tied to this process.
        queue.put((rank, pickle.dumps(fn(state, *args)), None))
        shutdown_parallel(state)
    except Exception:
        queue.put((rank, None, traceback.format_exc()))


def run_ranks(fn, world: int, *args, timeout_s: float = 120.0) -> list:
    """fn(state, *args) on every rank; returns the per-rank results in rank order."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_entry, args=(r, world, port, fn, args, queue)) for r in range(world)]
    for p in procs:
        p.start()
    results = {}
    try:
        for _ in range(world):
            rank, value, error = queue.get(timeout=timeout_s)
            if error:
                raise AssertionError(f"rank {rank} failed:\n{error}")
            results[rank] = pickle.loads(value)
    finally:
        for p in procs:
            p.join(10)
            if p.is_alive():
                p.kill()
    return [results[r] for r in range(world)]


def idle_follower(rank, world, pipe, parent_pid):
    """A follower process that does nothing but wait for its "close" message."""
    while pipe.recv()[0] != "close":
        pass
