"""Skinny matrix products for a few tokens, with the pointwise work around them fused (Triton).

A decode, draft, verify or tree step multiplies T = 1..k+1 rows by each weight matrix: the time is
the time to stream the weights, and everything else is launch overhead. One kernel here computes

    out = epilogue(prologue(x) @ W^T)

for x: [T, K] and W: [N, K] (nn.Linear's layout), where the epilogue optionally adds a bias,
applies SiLU gating (W holds gate rows then up rows; out = silu(gate) * up for the same output
index, so each weight is still read once), or adds a residual. An RMSNorm before the product runs
as its own small kernel over the T rows, rounded exactly as the reference rounds: folded into the
product's loop, its per-slice arithmetic held the weight stream back (BENCHMARKS.md, section K).
So qkv/gate_up + SiLU, and
o_proj/down_proj + the residual add, are one product kernel each, and the LM head another.

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
    def _rms_norm_kernel(x_ptr, weight_ptr, out_ptr, num_rows, stride_x, eps,
                         K: tl.constexpr, ACT: tl.constexpr, BLOCK: tl.constexpr):
        # One row per program, rounded exactly as the reference formula rounds it: normalised in
        # float32, cast to the activation type, then scaled by the weight and cast again.
        row = tl.program_id(0)
        ks = tl.arange(0, BLOCK)
        ok = ks < K
        x = tl.load(x_ptr + row * stride_x + ks, mask=ok, other=0.0).to(tl.float32)
        rstd = tl.math.rsqrt(tl.sum(x * x, axis=0) / K + eps)
        normed = (x * rstd).to(ACT).to(tl.float32)
        scale = tl.load(weight_ptr + ks, mask=ok, other=0.0).to(tl.float32)
        tl.store(out_ptr + row * K + ks, (normed * scale).to(ACT), mask=ok)

    @triton.jit(do_not_specialize=["num_rows"])
    def _linear_kernel(
        x_ptr, w_ptr, bias_ptr, res_ptr, out_ptr, part_ptr,
        num_rows, stride_x, stride_res, stride_out,
        N: tl.constexpr, K: tl.constexpr, SPLIT: tl.constexpr, BIAS: tl.constexpr, GATED: tl.constexpr,
        RESIDUAL: tl.constexpr, ACT: tl.constexpr, DOT: tl.constexpr, IEEE: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    ):
        # N is the number of outputs; a GATED weight has 2N rows (gate rows, then up rows).
        # Row tiles are the grid's fastest axis: the programs that share a weight tile run side by
        # side, so beyond 16 tokens the second tile's weight reads come from L2, not memory.
        # With SPLIT > 1, program_id(2) picks a slice of K; the sums go to part_ptr and
        # _split_sum_kernel finishes them.
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
        # Weight tiles are read as stored, [BLOCK_N, BLOCK_K] rows contiguous along K (coalesced),
        # and transposed for the product in shared memory.
        w_rows = w_ptr + cols[:, None] * K
        acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        up = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        for k0 in range(0, K_SLICE, BLOCK_K):
            kk = k_first + k0 + ks
            a = tl.load(x_rows + kk[None, :]).to(DOT)  # [BLOCK_M, BLOCK_K]
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
        out_mask = row_ok[:, None] & col_ok[None, :]
        if SPLIT > 1:
            # Partial sums in float32: [SPLIT, rows, N].
            plane = tl.program_id(2) * num_rows
            tl.store(part_ptr + (plane + rows)[:, None] * N + cols[None, :], acc, mask=out_mask)
        else:
            if BIAS:
                acc += tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
            y = acc.to(ACT).to(tl.float32)  # the projection as the reference rounds it
            if GATED:
                gate_act = (y / (1.0 + tl.exp(-y))).to(ACT).to(tl.float32)
                y = (gate_act * up.to(ACT).to(tl.float32)).to(ACT).to(tl.float32)
            if RESIDUAL:
                res = tl.load(res_ptr + rows[:, None] * stride_res + cols[None, :], mask=out_mask, other=0.0)
                y = (y + res.to(tl.float32)).to(ACT).to(tl.float32)
            tl.store(out_ptr + rows[:, None] * stride_out + cols[None, :], y.to(out_ptr.dtype.element_ty),
                     mask=out_mask)

    @triton.jit(do_not_specialize=["num_rows"])
    def _split_sum_kernel(
        part_ptr, bias_ptr, res_ptr, out_ptr, num_rows, stride_res, stride_out,
        N: tl.constexpr, SPLIT: tl.constexpr, BIAS: tl.constexpr, RESIDUAL: tl.constexpr, ACT: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    ):
        # The slices' sums added in a fixed order (the same result for a token however many share the
        # step), then the epilogue of _linear_kernel.
        rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = rows < num_rows
        cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        col_ok = cols < N
        mask = row_ok[:, None] & col_ok[None, :]
        acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        for s in range(SPLIT):
            acc += tl.load(part_ptr + (s * num_rows + rows)[:, None] * N + cols[None, :], mask=mask, other=0.0)
        if BIAS:
            acc += tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        y = acc.to(ACT).to(tl.float32)
        if RESIDUAL:
            res = tl.load(res_ptr + rows[:, None] * stride_res + cols[None, :], mask=mask, other=0.0)
            y = (y + res.to(tl.float32)).to(ACT).to(tl.float32)
        tl.store(out_ptr + rows[:, None] * stride_out + cols[None, :], y.to(out_ptr.dtype.element_ty), mask=mask)


class Blocks(NamedTuple):
    """How a product is cut: BLOCK_N outputs per program, BLOCK_K inputs per loop step, and the
    inputs split over SPLIT programs (whose sums a second kernel adds) when the outputs alone give
    too few programs to keep every multiprocessor streaming."""

    n: int
    k: int
    split: int


def blocks(outputs: int, inputs: int, dtype: torch.dtype, device: torch.device, gated: bool = False) -> Blocks:
    """The cut of a product with `outputs` columns over `inputs`. It depends on the shapes, never on
    the number of tokens, so a token's sums are added in the same order in every step."""
    block_n = 64
    block_k = (256 if gated else 512) // torch.finfo(dtype).bits * 8  # 256 or 512 bytes of each weight row
    while inputs % block_k:
        block_k //= 2
    split, target = 1, 2 * ts.multiprocessors(device)
    if not gated:
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


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor | None:
    """x: [T, K] -> RMS-normalised and scaled [T, K], bitwise as the reference formula; None if the
    kernel cannot run here."""
    out = torch.empty_like(x)
    ok = ts.launch("rms norm", _rms_norm_kernel, (x.shape[0],), x, weight, out, x.shape[0], x.stride(0), eps,
                   K=x.shape[1], ACT=ts.tl_type(x.dtype), BLOCK=triton.next_power_of_2(x.shape[1]), num_warps=4)
    return out if ok else None


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None, norm_weight: Tensor | None = None,
           eps: float = 0.0, residual: Tensor | None = None, gated: bool = False,
           out_dtype: torch.dtype | None = None) -> Tensor | None:
    """epilogue(norm(x) @ weight^T) for x: [..., K]; None if the kernels cannot run here.

    norm_weight: RMS-normalise x first (weight [K], eps). bias: [N]. gated: weight is [2I, K] (gate
    rows, then up rows) and the result silu(gate) * up: [..., I]. residual: [..., N], added to the
    result. out_dtype: the result's type (float32 logits), x's by default.
    """
    inputs = x.shape[-1]
    x2 = x.reshape(-1, inputs).contiguous()  # [T, K]
    if norm_weight is not None:
        x2 = rms_norm(x2, norm_weight, eps)
        if x2 is None:
            return None
    rows = x2.shape[0]
    outputs = weight.shape[0] // 2 if gated else weight.shape[0]
    out = torch.empty(rows, outputs, dtype=out_dtype or x.dtype, device=x.device)
    res = residual.reshape(rows, outputs).contiguous() if residual is not None else out
    cut = blocks(outputs, inputs, x.dtype, x.device, gated)
    parts = torch.empty(cut.split, rows, outputs, dtype=torch.float32, device=x.device) if cut.split > 1 else out
    stage_bytes = (ROW_BLOCK + (2 if gated else 1) * cut.n) * cut.k * x.element_size()  # x and weight slices
    name = "gated linear" if gated else "linear"
    flags = dict(N=outputs, SPLIT=cut.split, BIAS=bias is not None, RESIDUAL=residual is not None,
                 ACT=ts.tl_type(x.dtype), BLOCK_M=ROW_BLOCK, BLOCK_N=cut.n)
    bias_arg = bias if bias is not None else weight
    ok = ts.launch(
        name, _linear_kernel, (triton.cdiv(rows, ROW_BLOCK), triton.cdiv(outputs, cut.n), cut.split),
        x2, weight, bias_arg, res, out, parts, rows, x2.stride(0), res.stride(0), out.stride(0),
        K=inputs, GATED=gated, DOT=ts.dot_type(x.dtype), IEEE=x.dtype == torch.float32, BLOCK_K=cut.k, **flags,
        num_warps=4, num_stages=ts.pipeline_stages(stage_bytes),
    )
    if ok and cut.split > 1:
        ok = ts.launch(
            "linear split sum", _split_sum_kernel, (triton.cdiv(rows, ROW_BLOCK), triton.cdiv(outputs, cut.n)),
            parts, bias_arg, res, out, rows, res.stride(0), out.stride(0), **flags, num_warps=4,
        )
    return out.view(*x.shape[:-1], outputs) if ok else None
