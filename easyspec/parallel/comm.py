"""The one place where collectives are called.

Each function takes the process group explicitly; a group of None means a single
participant, where every collective is the identity. Collectives here are
synchronous so that they can be captured inside CUDA graphs.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed import ProcessGroup


def all_reduce(x: Tensor, group: ProcessGroup | None) -> Tensor:
    """Sum `x` over the group, in place; returns x."""
    if group is not None:
        dist.all_reduce(x, group=group)
    return x


def all_gather(x: Tensor, group: ProcessGroup | None) -> Tensor:
    """Stack every member's x (same shape everywhere) along a new leading dim: [n, *x.shape]."""
    if group is None:
        return x[None]
    size = dist.get_world_size(group)
    # Gathered flat (the layout every backend accepts), then viewed as a stack.
    out = torch.empty(size * x.numel(), dtype=x.dtype, device=x.device)
    _all_gather_flat(out, x.reshape(-1), group=group)
    return out.view(size, *x.shape)


# torch 2.13 renamed all_gather_into_tensor; older releases only have the old name.
_all_gather_flat = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


def broadcast(x: Tensor, src: int, group: ProcessGroup | None) -> Tensor:
    """Overwrite x on every member with the copy held by global rank `src`; returns x."""
    if group is not None:
        dist.broadcast(x, src=src, group=group)
    return x
