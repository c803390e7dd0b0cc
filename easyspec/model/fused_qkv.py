"""Everything between the q/k/v projection and attention in one kernel (Triton): q/k norms, rotary
embedding and the KV-cache write.

The projection itself (with the input RMSNorm and its bias) is easyspec.model.fused_linear's
product, which streams the weights at full bandwidth; this kernel reads its [T, (H + 2 Hkv) hd]
result, a few kilobytes. One program owns one head of a tile of 16 tokens: rotary embedding mixes
element i of a head with element i + hd/2 and q/k norms need the head's whole vector, so both halves
are loaded side by side and nothing is exchanged between programs:

    lo' = lo * cos_i - hi * sin_i,    hi' = hi * cos_{i+hd/2} + lo * sin_{i+hd/2}

Programs of q heads write the rotated queries to a [T, H, hd] buffer for attention; programs of
k and v heads write straight into the layer's cache at each token's slot.
"""

from __future__ import annotations

import torch
from torch import Tensor

from easyspec.model import fused_linear
from easyspec.model import triton_support as ts
from easyspec.model.triton_support import ROW_BLOCK, tl, triton

if triton is not None:

    @triton.jit(do_not_specialize=["num_rows"])
    def _rotary_cache_kernel(
        qkv_ptr, cos_ptr, sin_ptr, q_norm_ptr, k_norm_ptr, slot_ptr, q_ptr, key_ptr, value_ptr,
        num_rows, stride_qkv, stride_rope, stride_qt, stride_qh, stride_ch, stride_cs, qk_eps,
        HEADS: tl.constexpr, KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, PAIRS: tl.constexpr,
        QK_NORM: tl.constexpr, ACT: tl.constexpr, BLOCK_M: tl.constexpr,
    ):
        HALF: tl.constexpr = HEAD_DIM // 2
        head = tl.program_id(1)  # q heads, then k heads, then v heads
        pair = tl.arange(0, PAIRS)  # [PAIRS] indices in the first half
        pair_ok = pair < HALF
        rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = rows < num_rows
        rope = row_ok[:, None] & pair_ok[None, :]
        lo_at = qkv_ptr + rows[:, None] * stride_qkv + head * HEAD_DIM + pair[None, :]
        lo = tl.load(lo_at, mask=rope, other=0.0).to(tl.float32)  # [BLOCK_M, PAIRS]
        hi = tl.load(lo_at + HALF, mask=rope, other=0.0).to(tl.float32)
        is_q = head < HEADS
        is_k = (head >= HEADS) & (head < HEADS + KV_HEADS)
        if QK_NORM:  # PAIRS covers the whole head here
            rstd_h = tl.math.rsqrt((tl.sum(lo * lo, axis=1) + tl.sum(hi * hi, axis=1)) / HEAD_DIM + qk_eps)
            q_lo = tl.load(q_norm_ptr + pair, mask=pair_ok, other=0.0).to(tl.float32)
            k_lo = tl.load(k_norm_ptr + pair, mask=pair_ok, other=0.0).to(tl.float32)
            q_hi = tl.load(q_norm_ptr + HALF + pair, mask=pair_ok, other=0.0).to(tl.float32)
            k_hi = tl.load(k_norm_ptr + HALF + pair, mask=pair_ok, other=0.0).to(tl.float32)
            scale_lo = tl.where(is_q, q_lo, k_lo)[None, :]
            scale_hi = tl.where(is_q, q_hi, k_hi)[None, :]
            norm_lo = ((lo * rstd_h[:, None]).to(ACT).to(tl.float32) * scale_lo).to(ACT).to(tl.float32)
            norm_hi = ((hi * rstd_h[:, None]).to(ACT).to(tl.float32) * scale_hi).to(ACT).to(tl.float32)
            lo = tl.where(is_q | is_k, norm_lo, lo)
            hi = tl.where(is_q | is_k, norm_hi, hi)
        rope_lo = rows[:, None] * stride_rope + pair[None, :]
        cos_lo = tl.load(cos_ptr + rope_lo, mask=rope, other=0.0).to(tl.float32)
        sin_lo = tl.load(sin_ptr + rope_lo, mask=rope, other=0.0).to(tl.float32)
        cos_hi = tl.load(cos_ptr + rope_lo + HALF, mask=rope, other=0.0).to(tl.float32)
        sin_hi = tl.load(sin_ptr + rope_lo + HALF, mask=rope, other=0.0).to(tl.float32)
        # q * cos + rotate_half(q) * sin, each product rounded as the reference rounds it.
        rot_lo = ((lo * cos_lo).to(ACT).to(tl.float32) + (-hi * sin_lo).to(ACT).to(tl.float32)).to(ACT)
        rot_hi = ((hi * cos_hi).to(ACT).to(tl.float32) + (lo * sin_hi).to(ACT).to(tl.float32)).to(ACT)
        q_at = q_ptr + rows[:, None] * stride_qt + head * stride_qh + pair[None, :]
        tl.store(q_at, rot_lo, mask=rope & is_q)
        tl.store(q_at + HALF, rot_hi, mask=rope & is_q)
        slots = tl.load(slot_ptr + rows, mask=row_ok, other=0)
        cache_at = slots[:, None] * stride_cs + pair[None, :]
        k_at = key_ptr + (head - HEADS) * stride_ch + cache_at
        tl.store(k_at, rot_lo, mask=rope & is_k)
        tl.store(k_at + HALF, rot_hi, mask=rope & is_k)
        v_at = value_ptr + (head - HEADS - KV_HEADS) * stride_ch + cache_at
        is_v = head >= HEADS + KV_HEADS
        tl.store(v_at, lo.to(ACT), mask=rope & is_v)
        tl.store(v_at + HALF, hi.to(ACT), mask=rope & is_v)


def applies(x: Tensor, weight: Tensor, cos: Tensor, keys: Tensor, values: Tensor) -> bool:
    """Whether the fused kernel handles this step: x [T, D], the projection's weight, the layer's
    cache buffers [Hkv, S, hd] (one layout for keys and values)."""
    head_dim = keys.shape[2]
    return (ts.runs_on(x) and ts.tl_type(x.dtype) is not None and weight.dtype == x.dtype == keys.dtype
            and cos.dtype == x.dtype and weight.is_contiguous() and x.shape[-1] % 16 == 0 and head_dim % 2 == 0
            and 0 < x.shape[0] <= ts.MAX_ROWS and keys.stride() == values.stride() and keys.stride(2) == 1
            and cos.stride(1) == 1 and not (torch.is_grad_enabled() and weight.requires_grad))


def attention_inputs(x: Tensor, norm_weight: Tensor, eps: float, weight: Tensor, bias: Tensor | None,
                     q_norm_weight: Tensor | None, k_norm_weight: Tensor | None, qk_eps: float,
                     cos: Tensor, sin: Tensor, heads: int, kv_heads: int, keys: Tensor, values: Tensor,
                     slots: Tensor) -> Tensor | None:
    """Rotated queries [T, H, hd], the step's keys and values written to the cache; None if the
    kernels cannot run here.

    x: [T, D] (before the input norm); weight: [(H + 2 Hkv) hd, D], bias: its [rows] or None;
    cos, sin: [T, hd]; keys, values: the layer's cache [Hkv, S, hd]; slots: [T] long, where each
    token's entries go.
    """
    qkv = fused_linear.linear(x, weight, bias, norm_weight, eps)  # [T, (H + 2 Hkv) hd]
    if qkv is None:
        return None
    seq, head_dim = x.shape[0], keys.shape[2]
    q = torch.empty(seq, heads, head_dim, dtype=x.dtype, device=x.device)
    qk_norm = q_norm_weight is not None
    ok = ts.launch(
        "rotary+cache", _rotary_cache_kernel, (triton.cdiv(seq, ROW_BLOCK), heads + 2 * kv_heads),
        qkv, cos, sin, q_norm_weight if qk_norm else qkv, k_norm_weight if qk_norm else qkv, slots, q, keys, values,
        seq, qkv.stride(0), cos.stride(0), q.stride(0), q.stride(1), keys.stride(0), keys.stride(1), qk_eps,
        HEADS=heads, KV_HEADS=kv_heads, HEAD_DIM=head_dim, PAIRS=max(16, triton.next_power_of_2(head_dim // 2)),
        QK_NORM=qk_norm, ACT=ts.tl_type(x.dtype), BLOCK_M=ROW_BLOCK, num_warps=4,
    )
    return q if ok else None
