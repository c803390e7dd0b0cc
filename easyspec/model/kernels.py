"""The decoder's operations, each with its reference formula and an optional fused form.

A decode step at batch 1 is a long chain of small kernels, each costing a few
microseconds whatever its size, around matrix products that only stream
weights. The functions below are the reference formulas; `use_fused(True)`
swaps in fused forms of the same formulas (float32 inside, rounded to the
activation type where the reference rounds), so that a decoder layer is eight
to eleven kernels:

- `attention_inputs`: input RMSNorm (a small kernel over the step's rows), the
  q/k/v projection (+ bias) as one product, then q/k norms, rotary embedding
  and the KV-cache write as one small kernel (easyspec.model.fused_qkv);
- `cached_attention`: split-KV attention and its merge (easyspec.model.decode_attention);
- `linear` with a residual: o_proj and down_proj adding their result to the
  residual stream in the epilogue (easyspec.model.fused_linear; where the
  outputs are few, the inputs are split and a second small kernel adds the sums);
- `gate_up_silu`: post-attention RMSNorm, then the gate/up projection with SiLU
  gating in its epilogue;
- and `linear` with a norm: the final norm and LM head.

The fused forms are Triton kernels for up to MAX_ROWS tokens (decode, draft,
verify and tree steps); they run on CUDA, and on the CPU under Triton's
interpreter (the tests). Where they do not apply (longer prompt pieces,
training, a machine without Triton, a kernel that fails to compile) the same
formulas run as PyTorch operations, with RMSNorm, rotary embedding and SiLU
gating as torch.compile'd single kernels. A token's arithmetic in the fused
kernels does not depend on how many tokens share its step, so decoding a token
and verifying it in a chain of drafts give bitwise-equal logits. (A tree's
tokens read their ancestors' keys from other cache slots than plain decoding
would, so attention sums them in another order: equal up to rounding.)

The model always calls these through this module, so `use_fused` changes every
layer at once.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from easyspec.model import decode_attention, fused_linear, fused_qkv


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
    keys, values, group_mask = keys[:, :kv_len], values[:, :kv_len], group_mask[:, :kv_len]
    # Fold the query heads that share a KV head into the query axis so each cached key is read once.
    qg = q.view(seq, kv_heads, group, head_dim).permute(1, 2, 0, 3).reshape(1, kv_heads, group * seq, head_dim)
    out = F.scaled_dot_product_attention(qg, keys[None], values[None], attn_mask=group_mask)  # [1, Hkv, G*T, hd]
    return out.view(kv_heads, group, seq, head_dim).permute(2, 0, 1, 3).reshape(seq, heads, head_dim)


def _linear(x: Tensor, weight: Tensor, bias: Tensor | None, norm_weight: Tensor | None, eps: float,
            residual: Tensor | None, out_dtype: torch.dtype | None, norm: Callable) -> Tensor:
    if norm_weight is not None:
        x = norm(x, norm_weight, eps)
    y = F.linear(x, weight, bias)
    if residual is not None:
        y = residual + y
    return y if out_dtype is None else y.to(out_dtype)


def linear_reference(x: Tensor, weight: Tensor, bias: Tensor | None = None, norm_weight: Tensor | None = None,
                     eps: float = 0.0, residual: Tensor | None = None, out_dtype: torch.dtype | None = None) -> Tensor:
    """x: [..., K] -> [..., N]: residual + linear(rms_norm(x)), the norm (weight [K], eps) and the
    residual [..., N] optional, cast to out_dtype if given."""
    return _linear(x, weight, bias, norm_weight, eps, residual, out_dtype, rms_norm_reference)


def gate_up_silu_reference(x: Tensor, norm_weight: Tensor, eps: float, weight: Tensor) -> Tensor:
    """x: [..., D], weight: [2I, D] (gate rows, then up rows) -> silu(gate) * up of the normalised x: [..., I]."""
    return silu_mul_reference(F.linear(rms_norm_reference(x, norm_weight, eps), weight))


def _attention_inputs(x: Tensor, norm_weight: Tensor, eps: float, weight: Tensor, bias: Tensor | None,
                      q_norm_weight: Tensor | None, k_norm_weight: Tensor | None, qk_eps: float, cos: Tensor,
                      sin: Tensor, heads: int, kv_heads: int, keys: Tensor, values: Tensor, slots: Tensor,
                      norm: Callable, rotate: Callable) -> Tensor:
    seq, head_dim = x.shape[0], keys.shape[2]
    qkv = F.linear(norm(x, norm_weight, eps), weight, bias)  # [T, (H + 2 Hkv) hd]
    q, k, v = qkv.split([heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], dim=-1)
    q, k = q.view(1, seq, heads, head_dim), k.view(1, seq, kv_heads, head_dim)
    if q_norm_weight is not None:
        q, k = norm(q, q_norm_weight, qk_eps), norm(k, k_norm_weight, qk_eps)
    q, k = rotate(q, k, cos[:, None, :], sin[:, None, :])
    keys.index_copy_(1, slots, k[0].transpose(0, 1))
    values.index_copy_(1, slots, v.view(seq, kv_heads, head_dim).transpose(0, 1))
    return q[0]


def attention_inputs_reference(x: Tensor, norm_weight: Tensor, eps: float, weight: Tensor, bias: Tensor | None,
                               q_norm_weight: Tensor | None, k_norm_weight: Tensor | None, qk_eps: float,
                               cos: Tensor, sin: Tensor, heads: int, kv_heads: int, keys: Tensor, values: Tensor,
                               slots: Tensor) -> Tensor:
    """Queries for attention over the cache, and this step's keys and values stored in it.

    x: [T, D] (before the input norm); weight: [(H + 2 Hkv) hd, D] and bias (or None) of the q/k/v
    projection; q/k norm weights [hd] (Qwen3) or None; cos, sin: [T, hd]; keys, values: the
    layer's cache [Hkv, S, hd], written at slots [T]. Returns the rotated queries [T, H, hd].
    """
    return _attention_inputs(x, norm_weight, eps, weight, bias, q_norm_weight, k_norm_weight, qk_eps, cos, sin,
                             heads, kv_heads, keys, values, slots, rms_norm_reference, rotary_reference)


def _linear_fused(x: Tensor, weight: Tensor, bias: Tensor | None = None, norm_weight: Tensor | None = None,
                  eps: float = 0.0, residual: Tensor | None = None, out_dtype: torch.dtype | None = None) -> Tensor:
    if fused_linear.applies(x, weight) and (residual is None or residual.dtype == x.dtype):
        out = fused_linear.linear(x, weight, bias, norm_weight, eps, residual, out_dtype=out_dtype)
        if out is not None:
            return out
    return _linear(x, weight, bias, norm_weight, eps, residual, out_dtype, rms_norm)


def _gate_up_silu_fused(x: Tensor, norm_weight: Tensor, eps: float, weight: Tensor) -> Tensor:
    if fused_linear.applies(x, weight):
        out = fused_linear.linear(x, weight, norm_weight=norm_weight, eps=eps, gated=True)
        if out is not None:
            return out
    return silu_mul(F.linear(rms_norm(x, norm_weight, eps), weight))


def _attention_inputs_fused(x: Tensor, norm_weight: Tensor, eps: float, weight: Tensor, bias: Tensor | None,
                            q_norm_weight: Tensor | None, k_norm_weight: Tensor | None, qk_eps: float,
                            cos: Tensor, sin: Tensor, heads: int, kv_heads: int, keys: Tensor, values: Tensor,
                            slots: Tensor) -> Tensor:
    args = (x, norm_weight, eps, weight, bias, q_norm_weight, k_norm_weight, qk_eps, cos, sin, heads, kv_heads,
            keys, values, slots)
    if fused_qkv.applies(x, weight, cos, keys, values):
        q = fused_qkv.attention_inputs(*args)
        if q is not None:
            return q
    return _attention_inputs(*args, rms_norm, rotary)


def _cached_attention_fused(q: Tensor, keys: Tensor, values: Tensor, group_mask: Tensor, kv_len: int) -> Tensor:
    """The split-KV Triton kernel where it applies (few query tokens), else the reference."""
    if decode_attention.supported(q, keys, values, group_mask, kv_len):
        out = decode_attention.decode_attention(q.contiguous(), keys, values, group_mask, kv_len)
        if out is not None:
            return out
    return cached_attention_reference(q, keys, values, group_mask, kv_len)


rms_norm: Callable[[Tensor, Tensor, float], Tensor] = rms_norm_reference
rotary: Callable[[Tensor, Tensor, Tensor, Tensor], tuple[Tensor, Tensor]] = rotary_reference
silu_mul: Callable[[Tensor], Tensor] = silu_mul_reference
cached_attention: Callable[[Tensor, Tensor, Tensor, Tensor, int], Tensor] = cached_attention_reference
linear: Callable[..., Tensor] = linear_reference
gate_up_silu: Callable[[Tensor, Tensor, float, Tensor], Tensor] = gate_up_silu_reference
attention_inputs: Callable[..., Tensor] = attention_inputs_reference

_compiled: dict[str, Callable] = {}


def _on_cuda(compiled: Callable, reference: Callable) -> Callable:
    """The compiled form for CUDA tensors; the reference elsewhere (the CPU under Triton's interpreter)."""

    def run(*args: Tensor) -> Tensor:
        return compiled(*args) if args[0].is_cuda else reference(*args)

    return run


def use_fused(enabled: bool) -> None:
    """Route every layer through the fused kernels (True) or the reference formulas (False)."""
    global rms_norm, rotary, silu_mul, cached_attention, linear, gate_up_silu, attention_inputs
    if not enabled:
        rms_norm, rotary, silu_mul = rms_norm_reference, rotary_reference, silu_mul_reference
        cached_attention, linear = cached_attention_reference, linear_reference
        gate_up_silu, attention_inputs = gate_up_silu_reference, attention_inputs_reference
        return
    cached_attention, linear = _cached_attention_fused, _linear_fused
    gate_up_silu, attention_inputs = _gate_up_silu_fused, _attention_inputs_fused
    if not _compiled:
        # Base and draft norms of several widths, q/k norms, 1 vs many tokens: more variants
        # than dynamo's default limit of 8 per function.
        config = torch._dynamo.config
        if hasattr(config, "recompile_limit"):
            config.recompile_limit = max(config.recompile_limit, 64)
        for name, fn in (("rms_norm", rms_norm_reference), ("rotary", rotary_reference),
                         ("silu_mul", silu_mul_reference)):
            _compiled[name] = _on_cuda(torch.compile(fn, dynamic=True), fn)
    rms_norm, rotary, silu_mul = _compiled["rms_norm"], _compiled["rotary"], _compiled["silu_mul"]
