"""Starting the worker processes, and stopping them when anything goes wrong.

Two ways in:
- `--devices N`: this process becomes rank 0 and spawns ranks 1..N-1 itself
  (torch.multiprocessing, "spawn"); requests reach them through a pipe each.
- `torchrun --nproc-per-node N -m easyspec ...`: torchrun starts every rank; each
  runs the same command (RANK / WORLD_SIZE / MASTER_ADDR come from torchrun,
  so multi-node works through torchrun's own rendezvous flags).

Failure handling: rank 0 watches its children; a child that dies ends the run
with one line naming the rank. A child watches its parent and exits if the
parent is gone, so no process is left behind.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Callable
from multiprocessing.connection import Connection
from pathlib import Path

import torch.multiprocessing as mp

POLL_S = 0.2


def torchrun_rank() -> tuple[int, int] | None:
    """(rank, world size) when started by torchrun, else None."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ and "TORCHELASTIC_RUN_ID" in os.environ:
        return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    return None


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def set_rendezvous(port: int) -> None:
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)


class Followers:
    """Ranks 1..N-1 spawned by rank 0, each with a pipe for requests."""

    def __init__(self, target: Callable, world_size: int, args: tuple) -> None:
        ctx = mp.get_context("spawn")
        self.procs: list[mp.Process] = []
        self.pipes: list[Connection] = []
        for rank in range(1, world_size):
            parent_end, child_end = ctx.Pipe()
            proc = ctx.Process(target=target, args=(rank, world_size, child_end, os.getpid(), *args),
                               daemon=True)
            proc.start()
            child_end.close()
            self.procs.append(proc)
            self.pipes.append(parent_end)
        self._stop = threading.Event()
        # Held by the watchdog while it decides that a follower died, and by _quiet() (before this process
        # kills its followers itself), so that a death we cause is never reported as a failure.
        self._watch_lock = threading.Lock()

    def send(self, message: object) -> None:
        for pipe in self.pipes:
            pipe.send(message)

    def watch(self, on_failure: Callable[[str], None]) -> None:
        """Call on_failure(message) from a background thread if any follower dies."""

        def loop() -> None:
            while not self._stop.wait(POLL_S):
                with self._watch_lock:
                    if self._stop.is_set():
                        return
                    dead = self._first_dead()
                    if dead is not None:
                        self._stop.set()
                if dead is not None:
                    rank, proc, pipe = dead
                    on_failure(f"worker rank {rank} failed: {self._last_words(pipe, proc)}")
                    return

        threading.Thread(target=loop, name="easyspec-watchdog", daemon=True).start()

    def failure(self, wait_s: float = 2.0) -> str | None:
        """A line naming a follower that has died (waiting up to wait_s for one to be seen), or None."""
        deadline = time.monotonic() + wait_s
        while True:
            dead = self._first_dead()
            if dead is not None:
                rank, proc, pipe = dead
                return f"worker rank {rank} failed: {self._last_words(pipe, proc)}"
            if time.monotonic() >= deadline:
                return None
            time.sleep(0.05)

    def diagnose(self, error: Exception, timeout_s: float) -> str | None:
        """After a collective raised `error` on rank 0: a line naming the follower to blame (dead,
        stopped, or silent past the timeout), or None when no follower is to blame."""
        for rank, proc in enumerate(self.procs, start=1):
            if _process_state(proc.pid) in ("T", "t"):
                return (f"worker rank {rank} is stopped (process {proc.pid} got SIGSTOP or sits in a debugger) "
                        f"and did not answer within --timeout {timeout_s:g} s")
        dead = self.failure()
        if dead is not None:
            return dead
        if "timed out" in str(error).lower():
            ranks = "rank 1" if len(self.procs) == 1 else f"one of ranks 1-{len(self.procs)}"
            return f"worker {ranks} did not answer within --timeout {timeout_s:g} s (alive, but stuck)"
        return None

    def _first_dead(self) -> tuple[int, mp.Process, Connection] | None:
        for rank, (proc, pipe) in enumerate(zip(self.procs, self.pipes, strict=True), start=1):
            if not proc.is_alive():
                return rank, proc, pipe
        return None

    def _quiet(self) -> None:
        """End the watchdog: what happens to the followers from here on is this process's doing."""
        with self._watch_lock:
            self._stop.set()

    @staticmethod
    def _last_words(pipe: Connection, proc: mp.Process) -> str:
        try:
            if pipe.poll(0.5):
                kind, text = pipe.recv()
                if kind == "error":
                    return text
        except (EOFError, OSError, ValueError):
            pass
        return f"the process exited unexpectedly (exit code {proc.exitcode})"

    def stop(self, timeout_s: float = 10.0) -> None:
        """Ask followers to exit, then make sure they are gone within the timeout."""
        self._quiet()
        for pipe in self.pipes:
            try:
                pipe.send(("close",))
            except (BrokenPipeError, OSError):
                pass
        deadline = time.monotonic() + timeout_s
        for proc in self.procs:
            proc.join(max(0.0, deadline - time.monotonic()))
        self.kill()

    def kill(self) -> None:
        self._quiet()
        for proc in self.procs:
            if proc.is_alive():
                proc.kill()
        for proc in self.procs:
            proc.join(5.0)


def _process_state(pid: int) -> str | None:
    """The one-letter state of a process from /proc (R, S, D, T, Z, ...), or None where unknown."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat[stat.rindex(")") + 2 :].split(" ", 1)[0]  # the name in parentheses may hold spaces


def watch_parent(parent_pid: int) -> None:
    """In a follower: exit as soon as the spawning process is gone."""

    def loop() -> None:
        while True:
            time.sleep(POLL_S)
            if os.getppid() != parent_pid:
                os._exit(1)

    threading.Thread(target=loop, name="easyspec-parent-watch", daemon=True).start()
