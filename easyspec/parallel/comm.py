"""The one place where collectives are called.

Each function takes the process group explicitly; a group of None means a single
participant, where every collective is the identity. Collectives here are
synchronous so that they can be captured inside CUDA graphs.

On CUDA a group can be given a peer-to-peer path (`enable_p2p`): small
floating-point all-reduces then run as one kernel that reads every peer's copy
of a symmetric-memory buffer directly over NVLink, cheaper than an NCCL launch
inside a graph (BENCHMARKS.md section 1 has what it bought), and small
all-gathers ride on the same kernel (each rank fills its own slot of a zeroed
stack, and the sum is the stack).
Anything larger than the buffer, or of another dtype, goes through NCCL.
"""

from __future__ import annotations

import sys

import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed import ProcessGroup


class _PeerBuffer:
    """A symmetric-memory buffer per dtype for one group, and the one-shot reduction over it."""

    def __init__(self, group: ProcessGroup, device: torch.device, dtypes: tuple[torch.dtype, ...],
                 max_bytes: int) -> None:
        import torch.distributed._symmetric_memory as symm_mem

        self.group_name = group.group_name
        self.rank, self.size = dist.get_rank(group), dist.get_world_size(group)
        self.buffers: dict[torch.dtype, Tensor] = {}
        for dtype in dtypes:
            buffer = symm_mem.empty(max_bytes // dtype.itemsize, dtype=dtype, device=device)
            symm_mem.rendezvous(buffer, self.group_name)  # collective over the group
            self.buffers[dtype] = buffer

    def fits(self, numel: int, dtype: torch.dtype, offset_bytes: int = 0) -> bool:
        """The kernel's own limits: a registered dtype, room in the buffer, 16-byte sizes and alignment."""
        buffer = self.buffers.get(dtype)
        return (buffer is not None and numel <= buffer.numel() and (numel * dtype.itemsize) % 16 == 0
                and offset_bytes % 16 == 0)

    def all_reduce(self, x: Tensor) -> Tensor:
        slot = self.buffers[x.dtype][: x.numel()].view(x.shape)
        return torch.ops.symm_mem.one_shot_all_reduce_copy(slot, x.contiguous(), "sum", self.group_name)


_peer: dict[str, _PeerBuffer] = {}


# The one-shot kernel reduces these dtypes only.
P2P_DTYPES = (torch.bfloat16, torch.float32)


def enable_p2p(group: ProcessGroup | None, device: torch.device, dtypes: tuple[torch.dtype, ...],
               max_bytes: int = 4 << 20) -> bool:
    """Set up the peer-to-peer path for `group` (collective: every member calls it).

    Every member reports whether its setup worked and the path is used only if all
    of them succeeded: a member on NCCL while the others wait in the peer kernel
    would hang. Returns False, leaving NCCL in charge, where the device, the torch
    build or the GPUs' connection doesn't allow it.
    """
    if group is None or device.type != "cuda":
        return False
    if group.group_name in _peer:
        return True
    dtypes = tuple(d for d in dtypes if d in P2P_DTYPES)
    peer, reason = None, "no dtype it can reduce"
    if dtypes and not hasattr(torch.ops.symm_mem, "one_shot_all_reduce_copy"):
        reason = "this torch has no symm_mem.one_shot_all_reduce_copy"
    elif dtypes:
        try:
            peer = _PeerBuffer(group, device, dtypes, max_bytes)
        except (RuntimeError, ImportError, AttributeError) as err:
            reason = str(err).splitlines()[0]
    agreed = torch.tensor([peer is not None], dtype=torch.int32, device=device)
    dist.all_reduce(agreed, op=dist.ReduceOp.MIN, group=group)
    if not agreed.item():
        if dist.get_rank(group) == 0:
            why = reason if peer is None else "not on every rank"
            print(f"easyspec: peer-to-peer collectives unavailable ({why}); using NCCL", file=sys.stderr)
        return False
    _peer[group.group_name] = peer
    return True


def all_reduce(x: Tensor, group: ProcessGroup | None) -> Tensor:
    """Sum `x` over the group and return the sum. Use the returned tensor: it is x reduced in
    place (NCCL) or a new tensor (peer-to-peer), and x may or may not have been changed."""
    if group is None:
        return x
    peer = _peer.get(group.group_name)
    if peer is not None and peer.fits(x.numel(), x.dtype, x.storage_offset() * x.element_size()):
        return peer.all_reduce(x)
    dist.all_reduce(x, group=group)
    return x


def all_gather(x: Tensor, group: ProcessGroup | None) -> Tensor:
    """Stack every member's x (same shape everywhere) along a new leading dim: [n, *x.shape]."""
    if group is None:
        return x[None]
    size = dist.get_world_size(group)
    peer = _peer.get(group.group_name)
    if peer is not None and peer.fits(size * x.numel(), x.dtype):
        # Adding zeros is exact, so the sum of the zero-padded stacks is the gathered stack.
        stack = x.new_zeros(size, *x.shape)
        stack[peer.rank] = x
        return peer.all_reduce(stack)
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
