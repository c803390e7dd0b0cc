"""The decoder's pointwise pieces, each with an optional fused form.

A decode step at batch 1 is a long chain of small kernels: written as plain
PyTorch, the float32 RMSNorm alone is six launches and rotary embedding of q
and k a dozen more, each costing a few microseconds whatever its size. The
functions below are the reference formulas; `use_fused(True)` swaps in
torch.compile'd versions that run each as one generated kernel with the same
arithmetic (float32 inside the norm, the same casts). The model always calls
them through this module, so swapping them changes every layer at once.

They are compiled with dynamic shapes, so a handful of compilations (per
weight shape, and for one token versus several) serve every layer and every
token count; past the recompile limit a new shape falls back to the eager
formula rather than failing. Attention over the KV cache for a few query tokens
goes to a split-KV Triton kernel (easyspec.model.decode_attention). Fused
kernels are used on CUDA only; on CPU the eager formulas run (and are what the
tests compare against references).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from easyspec.model import decode_attention


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


def cached_attention_reference(q: Tensor, keys: Tensor, values: Tensor, group_mask: Tensor, kv_len: int) -> Tensor:
    """Attention of T query tokens over the first kv_len cache slots.

    q: [T, H, hd]; keys/values: [Hkv, max_len, hd]; group_mask: bool [G*T, >= kv_len]
    (G = H / Hkv, row g*T + t for group member g and token t). Returns [T, H, hd].
    """
    seq, heads, head_dim = q.shape
    kv_heads = keys.shape[0]
    group = heads // kv_heads
    # Fold the query heads that share a KV head into the query axis so each cached key is read once.
    qg = q.view(seq, kv_heads, group, head_dim).permute(1, 2, 0, 3).reshape(1, kv_heads, group * seq, head_dim)
    out = F.scaled_dot_product_attention(qg, keys[None, :, :kv_len], values[None, :, :kv_len],
                                         attn_mask=group_mask[:, :kv_len])  # [1, Hkv, G*T, hd]
    return out.view(kv_heads, group, seq, head_dim).permute(2, 0, 1, 3).reshape(seq, heads, head_dim)


def _cached_attention_split(q: Tensor, keys: Tensor, values: Tensor, group_mask: Tensor, kv_len: int) -> Tensor:
    """The split-KV Triton kernel where it applies (few query tokens), else the reference."""
    if decode_attention.supported(q, keys, values, group_mask, kv_len):
        return decode_attention.decode_attention(q.contiguous(), keys, values, group_mask, kv_len)
    return cached_attention_reference(q, keys, values, group_mask, kv_len)


rms_norm: Callable[[Tensor, Tensor, float], Tensor] = rms_norm_reference
rotary: Callable[[Tensor, Tensor, Tensor, Tensor], tuple[Tensor, Tensor]] = rotary_reference
silu_mul: Callable[[Tensor], Tensor] = silu_mul_reference
cached_attention: Callable[[Tensor, Tensor, Tensor, Tensor, int], Tensor] = cached_attention_reference

_fused: dict[str, Callable] = {}


def use_fused(enabled: bool) -> None:
    """Route every layer through the compiled kernels (True) or the eager formulas (False)."""
    global rms_norm, rotary, silu_mul, cached_attention
    if not enabled:
        rms_norm, rotary, silu_mul = rms_norm_reference, rotary_reference, silu_mul_reference
        cached_attention = cached_attention_reference
        return
    cached_attention = _cached_attention_split
    if not _fused:
        # Base and draft norms of several widths, q/k norms, 1 vs many tokens: more variants
        # than dynamo's default limit of 8 per function.
        config = torch._dynamo.config
        if hasattr(config, "recompile_limit"):
            config.recompile_limit = max(config.recompile_limit, 64)
        for name, fn in (("rms_norm", rms_norm_reference), ("rotary", rotary_reference),
                         ("silu_mul", silu_mul_reference)):
            _fused[name] = torch.compile(fn, dynamic=True)
    rms_norm, rotary, silu_mul = _fused["rms_norm"], _fused["rotary"], _fused["silu_mul"]
