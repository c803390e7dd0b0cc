"""The decoder's pointwise pieces, each with an optional fused form.

A decode step at batch 1 is a long chain of small kernels: written as plain
PyTorch, the float32 RMSNorm alone is six launches and rotary embedding of q
and k a dozen more, each costing a few microseconds whatever its size. The
functions below are the reference formulas; `use_fused(True)` swaps in
torch.compile'd versions that run each as one generated kernel with the same
arithmetic (float32 inside the norm, the same casts). The model always calls
them through this module, so swapping them changes every layer at once.

They are compiled with dynamic shapes: one compilation serves every token
count and every layer. Fused kernels are used on CUDA only; on CPU the eager
formulas run (and are what the tests compare against references).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor


def rms_norm_reference(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """x: [..., D]. Normalise in float32, cast back, then scale, as the reference models do."""
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


def _rotate_half(x: Tensor) -> Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def rotary_reference(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor]:
    """q: [B, T, H, hd], k: [B, T, Hkv, hd], cos/sin: [T, 1, hd] -> rotated q and k."""
    return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin


def silu_mul_reference(gate_up: Tensor) -> Tensor:
    """gate_up: [..., 2I] (gate rows first) -> silu(gate) * up: [..., I]."""
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


rms_norm: Callable[[Tensor, Tensor, float], Tensor] = rms_norm_reference
rotary: Callable[[Tensor, Tensor, Tensor, Tensor], tuple[Tensor, Tensor]] = rotary_reference
silu_mul: Callable[[Tensor], Tensor] = silu_mul_reference

_fused: dict[str, Callable] = {}


def use_fused(enabled: bool) -> None:
    """Route every layer through the compiled kernels (True) or the eager formulas (False)."""
    global rms_norm, rotary, silu_mul
    if not enabled:
        rms_norm, rotary, silu_mul = rms_norm_reference, rotary_reference, silu_mul_reference
        return
    if not _fused:
        for name, fn in (("rms_norm", rms_norm_reference), ("rotary", rotary_reference),
                         ("silu_mul", silu_mul_reference)):
            _fused[name] = torch.compile(fn, dynamic=True, fullgraph=True)
    rms_norm, rotary, silu_mul = _fused["rms_norm"], _fused["rotary"], _fused["silu_mul"]


def fused_enabled() -> bool:
    return rms_norm is not rms_norm_reference
