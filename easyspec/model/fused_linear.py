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
in BLOCK_K slices read as stored (each row contiguous along K), through tl.dot (past 16 tokens a
second row tile reads the same weights, mostly from L2). Where the outputs give too few programs
to keep every multiprocessor streaming (o_proj and down_proj: few outputs, many inputs), the
inputs are split over up to 8 programs per column tile and a second small kernel adds their float32
sums in a fixed order and applies the epilogue. The cut depends on the weight's shape only, and
the row tile is 16 whatever T is (rows past T are masked), so a
token's arithmetic is the same whether it is alone or among k+1 others: decode and verification
give bitwise-equal results for the same token, which speculative greedy decoding needs to equal
plain greedy decoding exactly. Rounding otherwise follows the reference formulas (the product is
rounded to the activation type before the residual add, SiLU's output before the up product).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from easyspec.model import triton_support as ts
from easyspec.model.triton_support import ROW_BLOCK, tl, triton

if triton is not None:

    @triton.jit(do_not_specialize=["num_rows"])
    def _linear_kernel(
        x_ptr, w_ptr, bias_ptr, norm_ptr, res_ptr, out_ptr, part_ptr, squares_ptr,
        num_rows, stride_x, stride_res, stride_out, eps,
        N: tl.constexpr, K: tl.constexpr, SPLIT: tl.constexpr,
        NORM: tl.constexpr, NORM_FIRST: tl.constexpr, BIAS: tl.constexpr, GATED: tl.constexpr,
        RESIDUAL: tl.constexpr,
        ACT: tl.constexpr, DOT: tl.constexpr, IEEE: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    ):
        # N is the number of outputs; a GATED weight has 2N rows (gate rows, then up rows).
        # Row tiles are the grid's fastest axis: the programs that share a weight tile run side by
        # side, so beyond 16 tokens the second tile's weight reads come from L2, not memory.
        # With SPLIT > 1, program_id(2) picks a slice of K; the sums go to part_ptr and _split_sum_kernel
        # finishes them.
        rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = rows < num_rows
        cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        col_ok = cols < N
        ks = tl.arange(0, BLOCK_K)
        K_SLICE: tl.constexpr = K // SPLIT
        k_first = tl.program_id(2) * K_SLICE
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
        # Weight tiles are read as stored, [BLOCK_N, BLOCK_K] rows contiguous along K (coalesced),
        # and transposed for the product in shared memory.
        w_rows = w_ptr + cols[:, None] * K
        acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        up = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        for k0 in range(0, K_SLICE, BLOCK_K):
            kk = k_first + k0 + ks
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
            w = tl.load(w_rows + kk[None, :], mask=col_ok[:, None], other=0.0).to(DOT)  # [BLOCK_N, BLOCK_K]
            if IEEE:
                acc = tl.dot(a, tl.trans(w), acc, input_precision="ieee")
            else:
                acc = tl.dot(a, tl.trans(w), acc)  # [BLOCK_M, BLOCK_N]
            if GATED:
                wu = tl.load(w_rows + N * K + kk[None, :], mask=col_ok[:, None], other=0.0).to(DOT)
                if IEEE:
                    up = tl.dot(a, tl.trans(wu), up, input_precision="ieee")
                else:
                    up = tl.dot(a, tl.trans(wu), up)
        if SPLIT > 1:
            # Partial sums (and, for a norm, each row's partial sum of squares) in float32: [SPLIT, rows, N].
            plane = tl.program_id(2) * num_rows
            part_mask = row_ok[:, None] & col_ok[None, :]
            tl.store(part_ptr + (plane + rows)[:, None] * N + cols[None, :], acc, mask=part_mask)
            if NORM and not NORM_FIRST:
                tl.store(squares_ptr + plane + rows, tl.sum(squares, axis=1), mask=row_ok & (tl.program_id(1) == 0))
        else:
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
            tl.store(out_ptr + rows[:, None] * stride_out + cols[None, :], y.to(out_ptr.dtype.element_ty),
                     mask=out_mask)

    @triton.jit(do_not_specialize=["num_rows"])
    def _split_sum_kernel(
        part_ptr, squares_ptr, bias_ptr, res_ptr, out_ptr,
        num_rows, stride_res, stride_out, eps,
        N: tl.constexpr, K: tl.constexpr, SPLIT: tl.constexpr, NORM: tl.constexpr, BIAS: tl.constexpr,
        RESIDUAL: tl.constexpr, ACT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    ):
        # The slices' sums added in a fixed order (the same result for a token however many share the
        # step), then the epilogue of _linear_kernel.
        rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = rows < num_rows
        cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        col_ok = cols < N
        mask = row_ok[:, None] & col_ok[None, :]
        acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        sums = tl.zeros([BLOCK_M], tl.float32)
        for s in range(SPLIT):
            acc += tl.load(part_ptr + (s * num_rows + rows)[:, None] * N + cols[None, :], mask=mask, other=0.0)
            if NORM:
                sums += tl.load(squares_ptr + s * num_rows + rows, mask=row_ok, other=0.0)
        if NORM:
            acc = acc * tl.math.rsqrt(sums / K + eps)[:, None]
        if BIAS:
            acc += tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        y = acc.to(ACT).to(tl.float32)
        if RESIDUAL:
            res = tl.load(res_ptr + rows[:, None] * stride_res + cols[None, :], mask=mask, other=0.0)
            y = (y + res.to(tl.float32)).to(ACT).to(tl.float32)
        tl.store(out_ptr + rows[:, None] * stride_out + cols[None, :], y.to(out_ptr.dtype.element_ty), mask=mask)


def normalise_first(dtype: torch.dtype) -> bool:
    """Whether a fused RMSNorm normalises x before the product (two passes over x), as the
    reference does, or scales the product by 1/RMS after it (one pass: every load is pipelined).
    float16 normalises first: its range may not hold a raw residual times the norm weight."""
    return dtype == torch.float16


class Blocks(NamedTuple):
    """How a product is cut: BLOCK_N outputs per program, BLOCK_K inputs per loop step, and the
    inputs split over SPLIT programs (whose sums a second kernel adds) when the outputs alone give
    too few programs to keep every multiprocessor streaming."""

    n: int
    k: int
    split: int


def blocks(outputs: int, inputs: int, dtype: torch.dtype, device: torch.device, gated: bool = False,
           norm_first: bool = False) -> Blocks:
    """The cut of a product with `outputs` columns over `inputs`. It depends on the shapes, never on
    the number of tokens, so a token's sums are added in the same order in every step."""
    block_n = 64
    block_k = (256 if gated else 512) // torch.finfo(dtype).bits * 8  # 256 or 512 bytes of each weight row
    while inputs % block_k:
        block_k //= 2
    split, target = 1, 2 * ts.multiprocessors(device)
    if not (gated or norm_first):
        while (split < 8 and triton.cdiv(outputs, block_n) * split < target
               and inputs % (2 * split * block_k) == 0):
            split *= 2
    return Blocks(block_n, block_k, split)


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
    norm_first = normalise_first(x.dtype)
    cut = blocks(outputs, inputs, x.dtype, x.device, gated, norm_first and norm_weight is not None)
    parts = torch.empty(cut.split, rows, outputs, dtype=torch.float32, device=x.device) if cut.split > 1 else out
    squares = torch.empty(cut.split, rows, dtype=torch.float32, device=x.device) if cut.split > 1 else out
    stage_bytes = (ROW_BLOCK + (2 if gated else 1) * cut.n) * cut.k * x.element_size()  # x and weight slices
    name = "gated linear" if gated else "linear"
    flags = dict(N=outputs, K=inputs, SPLIT=cut.split, NORM=norm_weight is not None, BIAS=bias is not None,
                 RESIDUAL=residual is not None, ACT=ts.tl_type(x.dtype), BLOCK_M=ROW_BLOCK, BLOCK_N=cut.n)
    bias_arg = bias if bias is not None else weight
    ok = ts.launch(
        name, _linear_kernel, (triton.cdiv(rows, ROW_BLOCK), triton.cdiv(outputs, cut.n), cut.split),
        x2, weight, bias_arg, norm_weight if norm_weight is not None else weight,
        res, out, parts, squares, rows, x2.stride(0), res.stride(0), out.stride(0), eps,
        NORM_FIRST=norm_first, GATED=gated, DOT=ts.dot_type(x.dtype), IEEE=x.dtype == torch.float32,
        BLOCK_K=cut.k, **flags, num_warps=4, num_stages=ts.pipeline_stages(stage_bytes),
    )
    if ok and cut.split > 1:
        ok = ts.launch(
            "linear split sum", _split_sum_kernel, (triton.cdiv(rows, ROW_BLOCK), triton.cdiv(outputs, cut.n)),
            parts, squares, bias_arg, res, out, rows, res.stride(0), out.stride(0), eps, **flags, num_warps=4,
        )
    return out.view(*x.shape[:-1], outputs) if ok else None
