"""Everything before attention in one kernel (Triton): RMSNorm, the q/k/v projection with its bias,
q/k norms, rotary embedding and the KV-cache write.

Rotary embedding mixes element i of a head with element i + hd/2, so a program computes output
columns in pairs: PAIRS indices i of one head's first half and the same indices of its second
half, as two dot products over the same normalised input rows. Both halves of every rotated pair
are then in registers and rotation needs no exchange between programs:

    lo' = lo * cos_i - hi * sin_i,    hi' = hi * cos_{i+hd/2} + lo * sin_{i+hd/2}

Programs of q heads write the rotated queries to a [T, H, hd] buffer for attention; programs of
k and v heads write straight into the layer's cache at each token's slot. With q/k norms (Qwen3)
the norm needs a head's whole vector, so a program then owns a whole head (PAIRS >= hd/2): fewer
programs, the same single kernel. Rows (tokens) come in tiles of 16 whatever T is, as in
easyspec.model.fused_linear, so a token's arithmetic does not depend on the others.
"""

from __future__ import annotations

import torch
from torch import Tensor

from easyspec.model import fused_linear
from easyspec.model import triton_support as ts
from easyspec.model.triton_support import ROW_BLOCK, tl, triton

if triton is not None:

    @triton.jit(do_not_specialize=["num_rows"])
    def _qkv_kernel(
        x_ptr, norm_ptr, w_ptr, bias_ptr, cos_ptr, sin_ptr, q_norm_ptr, k_norm_ptr, slot_ptr,
        q_ptr, key_ptr, value_ptr,
        num_rows, stride_x, stride_rope, stride_qt, stride_qh, stride_ch, stride_cs, eps, qk_eps,
        K: tl.constexpr, HEADS: tl.constexpr, KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr,
        PAIRS: tl.constexpr, NORM_FIRST: tl.constexpr, BIAS: tl.constexpr, QK_NORM: tl.constexpr,
        ACT: tl.constexpr, DOT: tl.constexpr, IEEE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
    ):
        HALF: tl.constexpr = HEAD_DIM // 2
        TILES: tl.constexpr = (HALF + PAIRS - 1) // PAIRS  # programs per head
        head = tl.program_id(1) // TILES  # q heads, then k heads, then v heads
        pair = (tl.program_id(1) % TILES) * PAIRS + tl.arange(0, PAIRS)  # [PAIRS] indices in the first half
        pair_ok = pair < HALF
        lo_cols = head * HEAD_DIM + pair  # weight rows of this program's outputs
        hi_cols = lo_cols + HALF
        rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)  # row tiles side by side share weight reads
        row_ok = rows < num_rows
        ks = tl.arange(0, BLOCK_K)
        # Rows past T read the last real row instead of a masked load: finite values that are never
        # stored, and an unmasked load that the compiler pipelines like the weights' loads.
        x_rows = x_ptr + tl.minimum(rows, num_rows - 1)[:, None] * stride_x
        squares = tl.zeros([BLOCK_M, BLOCK_K], tl.float32)  # each row's squares, summed per column slot
        if NORM_FIRST:  # as in easyspec.model.fused_linear: a first pass for the RMS
            for k0 in range(0, K, BLOCK_K):
                xk = tl.load(x_rows + (k0 + ks)[None, :]).to(tl.float32)
                squares += xk * xk
            rstd = tl.math.rsqrt(tl.sum(squares, axis=1) / K + eps)  # [BLOCK_M]
        lo = tl.zeros([BLOCK_M, PAIRS], tl.float32)
        hi = tl.zeros([BLOCK_M, PAIRS], tl.float32)
        for k0 in range(0, K, BLOCK_K):
            kk = k0 + ks
            a = tl.load(x_rows + kk[None, :]).to(tl.float32)
            scale = tl.load(norm_ptr + kk).to(tl.float32)[None, :]
            if NORM_FIRST:
                a = ((a * rstd[:, None]).to(ACT).to(tl.float32) * scale).to(ACT).to(DOT)
            else:  # one pass: 1/RMS scales the products after the loop
                squares += a * a
                a = (a * scale).to(ACT).to(DOT)
            w_lo = tl.load(w_ptr + lo_cols[None, :] * K + kk[:, None], mask=pair_ok[None, :], other=0.0).to(DOT)
            w_hi = tl.load(w_ptr + hi_cols[None, :] * K + kk[:, None], mask=pair_ok[None, :], other=0.0).to(DOT)
            if IEEE:
                lo = tl.dot(a, w_lo, lo, input_precision="ieee")
                hi = tl.dot(a, w_hi, hi, input_precision="ieee")
            else:
                lo = tl.dot(a, w_lo, lo)  # [BLOCK_M, PAIRS]
                hi = tl.dot(a, w_hi, hi)
        if not NORM_FIRST:
            rstd = tl.math.rsqrt(tl.sum(squares, axis=1) / K + eps)[:, None]  # [BLOCK_M, 1]
            lo = lo * rstd
            hi = hi * rstd
        if BIAS:
            lo += tl.load(bias_ptr + lo_cols, mask=pair_ok, other=0.0).to(tl.float32)[None, :]
            hi += tl.load(bias_ptr + hi_cols, mask=pair_ok, other=0.0).to(tl.float32)[None, :]
        lo = lo.to(ACT).to(tl.float32)  # the projection as the reference rounds it
        hi = hi.to(ACT).to(tl.float32)
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
        rope = row_ok[:, None] & pair_ok[None, :]
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
    kernel cannot run here.

    x: [T, D] (before the input norm); weight: [(H + 2 Hkv) hd, D], bias: its [rows] or None;
    cos, sin: [T, hd]; keys, values: the layer's cache [Hkv, S, hd]; slots: [T] long, where each
    token's entries go.
    """
    seq = x.shape[0]
    head_dim = keys.shape[2]
    half = head_dim // 2
    x = x.contiguous()
    q = torch.empty(seq, heads, head_dim, dtype=x.dtype, device=x.device)
    qk_norm = q_norm_weight is not None
    pairs = max(16, triton.next_power_of_2(half)) if qk_norm else 16
    block_k = 512 // (torch.finfo(x.dtype).bits // 8)
    while x.shape[1] % block_k:
        block_k //= 2
    grid = (triton.cdiv(seq, ROW_BLOCK), (heads + 2 * kv_heads) * triton.cdiv(half, pairs))
    ok = ts.launch(
        "qkv+rotary+cache", _qkv_kernel, grid,
        x, norm_weight, weight, bias if bias is not None else weight, cos, sin,
        q_norm_weight if qk_norm else weight, k_norm_weight if qk_norm else weight, slots,
        q, keys, values,
        seq, x.stride(0), cos.stride(0), q.stride(0), q.stride(1), keys.stride(0), keys.stride(1), eps, qk_eps,
        K=x.shape[1], HEADS=heads, KV_HEADS=kv_heads, HEAD_DIM=head_dim, PAIRS=pairs,
        NORM_FIRST=fused_linear.normalise_first(x.dtype), BIAS=bias is not None,
        QK_NORM=qk_norm, ACT=ts.tl_type(x.dtype), DOT=ts.dot_type(x.dtype), IEEE=x.dtype == torch.float32,
        BLOCK_M=ROW_BLOCK, BLOCK_K=block_k, num_warps=4,
        num_stages=ts.pipeline_stages((ROW_BLOCK + 2 * pairs) * block_k * x.element_size()),
    )
    return q if ok else None
