"""Skinny matrix products for a few tokens, with the pointwise work around them fused (Triton).

A decode, draft, verify or tree step multiplies T = 1..k+1 rows by each weight matrix: the time is
the time to stream the weights, and everything else is launch overhead. One kernel here computes

    out = epilogue(prologue(x) @ W^T)

for x: [T, K] and W: [N, K] (nn.Linear's layout), where the prologue optionally RMS-normalises each
row of x (every program computes the row's RMS itself while it streams x beside its share of W,
and scales its products by 1/RMS at the end) and the epilogue optionally adds a bias, applies SiLU
gating (W holds gate rows
then up rows; out = silu(gate) * up for the same output index, so each weight is still read once),
or adds a residual. So RMSNorm + qkv/gate_up + SiLU, and o_proj/down_proj + the residual add, are
one kernel each, and the final norm + LM head another.

Each program owns BLOCK_N output columns of ROW_BLOCK (16) rows and streams its weight rows once,
in BLOCK_K slices, through tl.dot (past 16 tokens a second row tile reads the same weights, mostly
from L2). The row tile is 16 whatever T is (rows past T are masked), so a
token's arithmetic is the same whether it is alone or among k+1 others: decode and verification
give bitwise-equal results for the same token, which speculative greedy decoding needs to equal
plain greedy decoding exactly. Rounding otherwise follows the reference formulas (the product is
rounded to the activation type before the residual add, SiLU's output before the up product).
"""

from __future__ import annotations

import torch
from torch import Tensor

from easyspec.model import triton_support as ts
from easyspec.model.triton_support import ROW_BLOCK, tl, triton

if triton is not None:

    @triton.jit(do_not_specialize=["num_rows"])
    def _linear_kernel(
        x_ptr, w_ptr, bias_ptr, norm_ptr, res_ptr, out_ptr,
        num_rows, stride_x, stride_res, stride_out, eps,
        N: tl.constexpr, K: tl.constexpr,
        NORM: tl.constexpr, NORM_FIRST: tl.constexpr, BIAS: tl.constexpr, GATED: tl.constexpr,
        RESIDUAL: tl.constexpr,
        ACT: tl.constexpr, DOT: tl.constexpr, IEEE: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    ):
        # N is the number of outputs; a GATED weight has 2N rows (gate rows, then up rows).
        # Row tiles are the grid's fastest axis: the programs that share a weight tile run side by
        # side, so beyond 16 tokens the second tile's weight reads come from L2, not memory.
        rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = rows < num_rows
        cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        col_ok = cols < N
        ks = tl.arange(0, BLOCK_K)
        # Rows past T read the last real row instead of a masked load: finite values that are never
        # stored, and an unmasked load that the compiler pipelines like the weights' loads.
        x_rows = x_ptr + tl.minimum(rows, num_rows - 1)[:, None] * stride_x
        squares = tl.zeros([BLOCK_M, BLOCK_K], tl.float32)  # each row's squares, summed per column slot
        if NORM and NORM_FIRST:
            # A first pass for each row's RMS, so that x is normalised before the product.
            for k0 in range(0, K, BLOCK_K):
                xk = tl.load(x_rows + (k0 + ks)[None, :]).to(tl.float32)
                squares += xk * xk
            rstd = tl.math.rsqrt(tl.sum(squares, axis=1) / K + eps)  # [BLOCK_M]
        acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        up = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        for k0 in range(0, K, BLOCK_K):
            kk = k0 + ks
            a = tl.load(x_rows + kk[None, :])  # [BLOCK_M, BLOCK_K]
            if NORM:
                scale = tl.load(norm_ptr + kk).to(tl.float32)[None, :]
                if NORM_FIRST:
                    a = ((a.to(tl.float32) * rstd[:, None]).to(ACT).to(tl.float32) * scale).to(ACT)
                else:
                    # One pass: the squares accumulate as x streams by; 1/RMS scales the products below.
                    squares += a.to(tl.float32) * a.to(tl.float32)
                    a = (a.to(tl.float32) * scale).to(ACT)
            a = a.to(DOT)
            w = tl.load(w_ptr + cols[None, :] * K + kk[:, None], mask=col_ok[None, :], other=0.0).to(DOT)
            if IEEE:
                acc = tl.dot(a, w, acc, input_precision="ieee")
            else:
                acc = tl.dot(a, w, acc)  # [BLOCK_M, BLOCK_N]
            if GATED:
                wu = tl.load(w_ptr + (cols[None, :] + N) * K + kk[:, None], mask=col_ok[None, :], other=0.0)
                if IEEE:
                    up = tl.dot(a, wu.to(DOT), up, input_precision="ieee")
                else:
                    up = tl.dot(a, wu.to(DOT), up)
        if NORM and not NORM_FIRST:
            rstd = tl.math.rsqrt(tl.sum(squares, axis=1) / K + eps)[:, None]  # [BLOCK_M, 1]
            acc = acc * rstd
            up = up * rstd
        if BIAS:
            acc += tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        y = acc.to(ACT).to(tl.float32)  # the projection as the reference rounds it
        if GATED:
            gate_act = (y / (1.0 + tl.exp(-y))).to(ACT).to(tl.float32)
            y = (gate_act * up.to(ACT).to(tl.float32)).to(ACT).to(tl.float32)
        out_mask = row_ok[:, None] & col_ok[None, :]
        if RESIDUAL:
            res = tl.load(res_ptr + rows[:, None] * stride_res + cols[None, :], mask=out_mask, other=0.0)
            y = (y + res.to(tl.float32)).to(ACT).to(tl.float32)
        tl.store(out_ptr + rows[:, None] * stride_out + cols[None, :], y.to(out_ptr.dtype.element_ty), mask=out_mask)


def normalise_first(dtype: torch.dtype) -> bool:
    """Whether a fused RMSNorm normalises x before the product (two passes over x), as the
    reference does, or scales the product by 1/RMS after it (one pass: every load is pipelined).
    float16 normalises first: its range may not hold a raw residual times the norm weight."""
    return dtype == torch.float16


def block_sizes(outputs: int, inputs: int, dtype: torch.dtype, device: torch.device) -> tuple[int, int]:
    """(BLOCK_N, BLOCK_K) for a product with `outputs` columns over `inputs`: the widest column
    tile that still leaves >= 4 programs per multiprocessor (at least 16 columns), and 512-byte
    weight-row slices (or the largest power of two that divides the inputs)."""
    target = 4 * ts.multiprocessors(device)
    block_n = next((b for b in (64, 32) if triton.cdiv(outputs, b) >= target), 16)
    block_k = 512 // (torch.finfo(dtype).bits // 8)
    while inputs % block_k:
        block_k //= 2
    return block_n, block_k


def applies(x: Tensor, weight: Tensor) -> bool:
    """Whether the fused product handles x: [..., K] @ weight [N, K]^T here."""
    rows = x.numel() // max(x.shape[-1], 1)
    return (ts.runs_on(x) and ts.tl_type(x.dtype) is not None and weight.dtype == x.dtype
            and weight.is_contiguous() and x.shape[-1] == weight.shape[1] and x.shape[-1] % 16 == 0
            and 0 < rows <= ts.MAX_ROWS and not (torch.is_grad_enabled() and weight.requires_grad))


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None, norm_weight: Tensor | None = None,
           eps: float = 0.0, residual: Tensor | None = None, gated: bool = False,
           out_dtype: torch.dtype | None = None) -> Tensor | None:
    """epilogue(prologue(x) @ weight^T) for x: [..., K]; None if the kernel cannot run here.

    norm_weight: RMS-normalise x first (weight [K], eps). bias: [N]. gated: weight is [2I, K] (gate
    rows, then up rows) and the result silu(gate) * up: [..., I]. residual: [..., N], added to the
    result. out_dtype: the result's type (float32 logits), x's by default.
    """
    inputs = x.shape[-1]
    x2 = x.reshape(-1, inputs).contiguous()  # [T, K]
    rows = x2.shape[0]
    outputs = weight.shape[0] // 2 if gated else weight.shape[0]
    out = torch.empty(rows, outputs, dtype=out_dtype or x.dtype, device=x.device)
    res = residual.reshape(rows, outputs).contiguous() if residual is not None else out
    block_n, block_k = block_sizes(outputs, inputs, x.dtype, x.device)
    grid = (triton.cdiv(rows, ROW_BLOCK), triton.cdiv(outputs, block_n))
    stage_bytes = (ROW_BLOCK + (2 if gated else 1) * block_n) * block_k * x.element_size()  # x and weight slices
    name = "gated linear" if gated else "linear"
    ok = ts.launch(
        name, _linear_kernel, grid,
        x2, weight, bias if bias is not None else weight, norm_weight if norm_weight is not None else weight,
        res, out, rows, x2.stride(0), res.stride(0), out.stride(0), eps,
        N=outputs, K=inputs, NORM=norm_weight is not None, NORM_FIRST=normalise_first(x.dtype),
        BIAS=bias is not None, GATED=gated,
        RESIDUAL=residual is not None, ACT=ts.tl_type(x.dtype), DOT=ts.dot_type(x.dtype),
        IEEE=x.dtype == torch.float32, BLOCK_M=ROW_BLOCK, BLOCK_N=block_n, BLOCK_K=block_k,
        num_warps=4, num_stages=ts.pipeline_stages(stage_bytes),
    )
    return out.view(*x.shape[:-1], outputs) if ok else None
