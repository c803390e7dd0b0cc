"""Attention of a few query tokens over a long KV cache, split along the keys (Triton).

Decode and verification steps ask attention for 1..k+1 query tokens against
hundreds or thousands of cached keys. A general attention kernel parallelises
over heads and query blocks, which here means a handful of thread blocks on a
GPU of 132 multiprocessors: at 4096 cached tokens it streams the cache at a
small fraction of the memory bandwidth. This kernel splits the keys into
chunks instead, one program per (KV head, chunk, block of 16 query rows); each
program computes the softmax-weighted sum over its chunk with a running
maximum, and a second small kernel merges the chunks' partial results by their
log-sum-exp.

The query heads that share a KV head are handled by the same program (rows
m = g * T + t for group member g and token t), so each cached key is read
once per 16 rows. q is read and the output written in the model's own
[T, H, hd] layout, so no transposes are needed around the call. The mask
[G*T, L] says which cache slots each row may see (causal, padding and tree
masks alike); every row must see at least one slot, as every caller's does
(its own position).

A row's arithmetic is the same whatever the step around it: rows come in tiles
of 16 whatever T is, and the chunk length depends on the head size only, not
on how many slots the step reads. A step that reads more slots only adds
chunks (and key blocks) in which the row sees nothing; they contribute exact
zeros. So decoding a token alone and verifying it among k+1 others give
bitwise-equal attention, which lossless speculative decoding relies on. Key
blocks that no row of a tile sees are skipped, reads and all (they would add
exact zeros): a batch's rows each read their own sequence's part of the cache.
"""

from __future__ import annotations

import torch
from torch import Tensor

from easyspec.model import triton_support as ts
from easyspec.model.triton_support import ROW_BLOCK, tl, triton

BLOCK_N = 64  # keys per inner iteration
MERGE_SPLITS = 64  # partial results the merge kernel reads per iteration


def chunk_length(head_dim: int) -> int:
    """Keys per program: 32 KB of bfloat16 keys and values (at least one key block)."""
    return max(BLOCK_N, 8192 // triton.next_power_of_2(head_dim))


def supported(q: Tensor, keys: Tensor, values: Tensor, mask: Tensor, kv_len: int) -> bool:
    """Whether this kernel handles the call (else use PyTorch's attention): few query tokens on a
    device the kernels run on, the cache's layout and a bool mask covering kv_len slots."""
    tokens, _, head_dim = q.shape
    return (ts.runs_on(q) and ts.tl_type(q.dtype) is not None and tokens <= ts.MAX_ROWS and head_dim >= 16
            and keys.dtype == values.dtype == q.dtype and keys.stride() == values.stride() and keys.stride(2) == 1
            and mask.dtype == torch.bool and mask.stride(1) == 1 and mask.shape[1] >= kv_len)


if triton is not None:

    @triton.jit(do_not_specialize=["tokens", "kv_len", "num_splits"])
    def _partial_kernel(
        q_ptr, k_ptr, v_ptr, mask_ptr, part_ptr, lse_ptr,
        stride_qt, stride_qh, stride_kh, stride_kl, stride_mask,
        tokens, kv_len, scale, num_splits,
        GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_PAD: tl.constexpr, CHUNK: tl.constexpr,
        DOT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK: tl.constexpr, IEEE: tl.constexpr,
    ):
        rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)  # m = g * tokens + t
        kv_head = tl.program_id(1)  # row tiles side by side share their chunk's reads
        split = tl.program_id(2)
        row_ok = rows < GROUP * tokens
        g, t = rows // tokens, rows % tokens
        dims = tl.arange(0, HEAD_PAD)
        dim_ok = dims < HEAD_DIM
        head = kv_head * GROUP + g
        q = tl.load(q_ptr + t[:, None] * stride_qt + head[:, None] * stride_qh + dims[None, :],
                    mask=row_ok[:, None] & dim_ok[None, :], other=0.0).to(DOT)  # [BLOCK_M, hd]
        best = tl.full([BLOCK_M], float("-inf"), tl.float32)
        total = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, HEAD_PAD], tl.float32)
        begin = split * CHUNK
        for offset in range(0, CHUNK, BLOCK):
            cols = begin + offset + tl.arange(0, BLOCK)
            col_ok = cols < kv_len
            visible = tl.load(mask_ptr + rows[:, None] * stride_mask + cols[None, :],
                              mask=row_ok[:, None] & col_ok[None, :], other=0)
            # A key block no row of the tile sees adds exact zeros: skip its reads. In a batch,
            # that is every other sequence's part of the cache.
            if tl.max(visible.to(tl.int32)) > 0:
                kv_at = kv_head * stride_kh + cols[:, None] * stride_kl + dims[None, :]
                kv_ok = col_ok[:, None] & dim_ok[None, :]
                k = tl.load(k_ptr + kv_at, mask=kv_ok, other=0.0).to(DOT)  # [BLOCK, hd]
                if IEEE:
                    s = tl.dot(q, tl.trans(k), input_precision="ieee")
                else:
                    s = tl.dot(q, tl.trans(k))
                s = s * scale  # [BLOCK_M, BLOCK]
                s = tl.where(visible != 0, s, float("-inf"))
                new_best = tl.maximum(best, tl.max(s, axis=1))
                # Rows that have seen no visible key yet keep a finite reference point.
                ref = tl.where(new_best == float("-inf"), 0.0, new_best)
                p = tl.exp(s - ref[:, None])
                rescale = tl.exp(best - ref)
                total = total * rescale + tl.sum(p, axis=1)
                v = tl.load(v_ptr + kv_at, mask=kv_ok, other=0.0).to(DOT)
                if IEEE:
                    acc = acc * rescale[:, None] + tl.dot(p.to(DOT), v, input_precision="ieee")
                else:
                    acc = acc * rescale[:, None] + tl.dot(p.to(DOT), v)
                best = new_best
        lse = tl.where(total > 0, best + tl.log(tl.where(total > 0, total, 1.0)), float("-inf"))
        out = acc / tl.where(total > 0, total, 1.0)[:, None]
        base = (kv_head * num_splits + split) * GROUP * tokens + rows
        tl.store(part_ptr + base[:, None] * HEAD_PAD + dims[None, :], out, mask=row_ok[:, None])
        tl.store(lse_ptr + base, lse, mask=row_ok)

    @triton.jit(do_not_specialize=["tokens", "num_splits"])
    def _merge_kernel(
        part_ptr, lse_ptr, out_ptr, stride_ot, stride_oh, tokens, num_splits,
        GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_PAD: tl.constexpr, SPLITS: tl.constexpr,
    ):
        kv_head = tl.program_id(0)
        row = tl.program_id(1)
        rows_per_head = GROUP * tokens
        dims = tl.arange(0, HEAD_PAD)
        # Two passes over the splits, SPLITS at a time: the largest log-sum-exp, then the weighted sum.
        # Splits in which the row sees nothing weigh exactly zero, wherever they are.
        # (While loops over a run-time zero: Triton's interpreter cannot range over a run-time
        # bound, and a loop-carried value must be a tensor.)
        best = tl.full([SPLITS], float("-inf"), tl.float32)
        s0 = num_splits * 0
        while s0 < num_splits:
            splits = s0 + tl.arange(0, SPLITS)
            lse = tl.load(lse_ptr + (kv_head * num_splits + splits) * rows_per_head + row,
                          mask=splits < num_splits, other=float("-inf"))
            best = tl.maximum(best, lse)
            s0 += SPLITS
        top = tl.max(best, axis=0)
        weights = tl.zeros([SPLITS], tl.float32)
        acc = tl.zeros([SPLITS, HEAD_PAD], tl.float32)
        s0 = num_splits * 0
        while s0 < num_splits:
            splits = s0 + tl.arange(0, SPLITS)
            index = (kv_head * num_splits + splits) * rows_per_head + row
            lse = tl.load(lse_ptr + index, mask=splits < num_splits, other=float("-inf"))
            weight = tl.exp(lse - top)
            part = tl.load(part_ptr + index[:, None] * HEAD_PAD + dims[None, :],
                           mask=(splits < num_splits)[:, None], other=0.0)
            weights += weight
            acc += part * weight[:, None]
            s0 += SPLITS
        out = tl.sum(acc, axis=0) / tl.sum(weights, axis=0)
        g, t = row // tokens, row % tokens
        head = kv_head * GROUP + g
        tl.store(out_ptr + t * stride_ot + head * stride_oh + dims, out.to(out_ptr.dtype.element_ty),
                 mask=dims < HEAD_DIM)


def decode_attention(q: Tensor, keys: Tensor, values: Tensor, mask: Tensor, kv_len: int) -> Tensor | None:
    """q: [T, H, hd]; keys/values: [Hkv, max_len, hd] (the cache); mask: bool [G*T, >= kv_len]
    with G = H / Hkv. Returns [T, H, hd] in q's dtype, or None if the kernels cannot run here."""
    tokens, heads, head_dim = q.shape
    kv_heads = keys.shape[0]
    group = heads // kv_heads
    head_pad = triton.next_power_of_2(head_dim)
    chunk = chunk_length(head_dim)
    splits = triton.cdiv(kv_len, chunk)
    rows = group * tokens
    part = torch.empty(kv_heads * splits * rows, head_pad, dtype=torch.float32, device=q.device)
    lse = torch.empty(kv_heads * splits * rows, dtype=torch.float32, device=q.device)
    mask_bytes = mask.view(torch.uint8)
    ok = ts.launch(
        "split-KV attention", _partial_kernel, (triton.cdiv(rows, ROW_BLOCK), kv_heads, splits),
        q, keys, values, mask_bytes, part, lse,
        q.stride(0), q.stride(1), keys.stride(0), keys.stride(1), mask_bytes.stride(0),
        tokens, kv_len, head_dim ** -0.5, splits,
        GROUP=group, HEAD_DIM=head_dim, HEAD_PAD=head_pad, CHUNK=chunk, DOT=ts.dot_type(q.dtype),
        BLOCK_M=ROW_BLOCK, BLOCK=BLOCK_N, IEEE=q.dtype == torch.float32, num_warps=4,
    )
    if not ok:
        return None
    out = torch.empty_like(q)
    ok = ts.launch(
        "split-KV merge", _merge_kernel, (kv_heads, rows),
        part, lse, out, out.stride(0), out.stride(1), tokens, splits,
        GROUP=group, HEAD_DIM=head_dim, HEAD_PAD=head_pad, SPLITS=MERGE_SPLITS, num_warps=4,
    )
    return out if ok else None
