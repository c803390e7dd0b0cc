"""Who this process is among the workers, held in one explicit object.

Nothing here is global: every component that needs a rank or a process group
receives the ParallelState (or the one group it needs) as an argument.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass, field
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.distributed import ProcessGroup

from easyspec.options import DEFAULT_TIMEOUT_S


@dataclass
class ParallelState:
    rank: int = 0
    world_size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    group: ProcessGroup | None = None  # every rank: tensor parallelism and decisions
    subgroups: dict[tuple[int, ...], ProcessGroup | None] = field(default_factory=dict)

    @property
    def is_driver(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def subgroup(self, ranks: tuple[int, ...]) -> ProcessGroup | None:
        """The process group of `ranks`; creating one is collective, so every rank
        must call this with the same ranks in the same order (see `make_subgroups`)."""
        if ranks not in self.subgroups:
            raise KeyError(f"process group {ranks} was not created at start-up")
        return self.subgroups[ranks]

    def make_subgroups(self, groups: list[tuple[int, ...]]) -> None:
        for ranks in groups:
            if ranks in self.subgroups:
                continue
            if len(ranks) == self.world_size:
                self.subgroups[ranks] = self.group
            elif len(ranks) == 1:
                self.subgroups[ranks] = None  # a group of one needs no communication
            else:
                self.subgroups[ranks] = dist.new_group(list(ranks))


def init_parallel(
    rank: int,
    world_size: int,
    device_type: str,
    init_method: str | None = None,
    timeout_s: float = DEFAULT_TIMEOUT_S,
) -> ParallelState:
    """Join the worker group (NCCL on CUDA, gloo on CPU); world size 1 needs none."""
    if device_type == "cuda":
        local_rank = int(os.environ.get("LOCAL_RANK", rank))
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
        if world_size > 1:
            # Processes share the cores: more threads than cores makes every step slower.
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // world_size))
    if world_size == 1:
        return ParallelState(device=device)
    backend = "nccl" if device_type == "cuda" else "gloo"
    kwargs = {"device_id": device} if device_type == "cuda" else {}
    dist.init_process_group(
        backend,
        init_method=init_method or "env://",
        rank=rank,
        world_size=world_size,
        timeout=timedelta(seconds=timeout_s),
        **kwargs,
    )
    return ParallelState(rank=rank, world_size=world_size, device=device, group=dist.group.WORLD)


def shutdown_parallel(state: ParallelState, timeout_s: float = 5.0) -> None:
    """Leave the process group, waiting at most timeout_s: once NCCL collectives have
    been captured in CUDA graphs, destroying the group can block indefinitely."""
    if not (state.distributed and dist.is_initialized()):
        return
    closer = threading.Thread(target=dist.destroy_process_group, name="easyspec-pg-close", daemon=True)
    closer.start()
    closer.join(timeout_s)
