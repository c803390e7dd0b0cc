"""Attention of a few query tokens over a long KV cache, split along the keys (CUDA, Triton).

Decode and verification steps ask attention for 1..k+1 query tokens against
hundreds or thousands of cached keys. A general attention kernel parallelises
over heads and query blocks, which here means a handful of thread blocks on a
GPU of 132 multiprocessors: at 4096 cached tokens it streams the cache at a
small fraction of the memory bandwidth. This kernel splits the keys into
chunks instead, one program per (KV head, chunk); each program computes the
softmax-weighted sum over its chunk with a running maximum, and a second small
kernel merges the chunks' partial results by their log-sum-exp.

The query heads that share a KV head are handled by the same program (rows
m = g * T + t for group member g and token t), so each cached key is read
once. q is read and the output written in the model's own [T, H, hd] layout,
so no transposes are needed around the call. The mask [G*T, L] says which
cache slots each row may see (causal, padding and tree masks alike); every row
must see at least one slot, as every caller's does (its own position).
"""

from __future__ import annotations

import torch
from torch import Tensor

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the caller falls back to PyTorch's attention
    triton = None

BLOCK_N = 64  # keys per inner iteration
MAX_ROWS = 64  # query rows (group x tokens) per KV head this kernel takes


def supported(q: Tensor, keys: Tensor, values: Tensor, mask: Tensor, kv_len: int) -> bool:
    """Whether this kernel handles the call (else use PyTorch's attention): few query rows,
    a power-of-two head size, the cache's layout and a bool mask covering kv_len slots."""
    tokens, heads, head_dim = q.shape
    rows = tokens * (heads // keys.shape[0])
    return (triton is not None and q.is_cuda and rows <= MAX_ROWS and head_dim >= 16
            and head_dim & (head_dim - 1) == 0 and keys.stride() == values.stride() and keys.stride(2) == 1
            and mask.dtype == torch.bool and mask.stride(1) == 1 and mask.shape[1] >= kv_len)


if triton is not None:

    @triton.jit
    def _partial_kernel(
        q_ptr, k_ptr, v_ptr, mask_ptr, part_ptr, lse_ptr,
        stride_qt, stride_qh, stride_kh, stride_kl, stride_mask,
        kv_len, chunk, scale, num_splits,
        TOKENS: tl.constexpr, GROUP: tl.constexpr, HEAD_DIM: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK: tl.constexpr, IEEE: tl.constexpr,
    ):
        kv_head = tl.program_id(0)
        split = tl.program_id(1)
        rows = tl.arange(0, BLOCK_M)  # m = g * TOKENS + t
        row_ok = rows < GROUP * TOKENS
        g, t = rows // TOKENS, rows % TOKENS
        dims = tl.arange(0, HEAD_DIM)
        head = kv_head * GROUP + g
        q = tl.load(q_ptr + t[:, None] * stride_qt + head[:, None] * stride_qh + dims[None, :],
                    mask=row_ok[:, None], other=0.0)  # [BLOCK_M, hd]
        best = tl.full([BLOCK_M], float("-inf"), tl.float32)
        total = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
        begin = split * chunk
        end = tl.minimum(begin + chunk, kv_len)
        for start in range(begin, end, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            col_ok = cols < end
            k = tl.load(k_ptr + kv_head * stride_kh + cols[:, None] * stride_kl + dims[None, :],
                        mask=col_ok[:, None], other=0.0)  # [BLOCK, hd]
            if IEEE:
                s = tl.dot(q, tl.trans(k), input_precision="ieee")
            else:
                s = tl.dot(q, tl.trans(k))
            s = s * scale  # [BLOCK_M, BLOCK]
            visible = tl.load(mask_ptr + rows[:, None] * stride_mask + cols[None, :],
                              mask=row_ok[:, None] & col_ok[None, :], other=0)
            s = tl.where(visible != 0, s, float("-inf"))
            new_best = tl.maximum(best, tl.max(s, axis=1))
            # Rows that have seen no visible key yet keep a finite reference point.
            ref = tl.where(new_best == float("-inf"), 0.0, new_best)
            p = tl.exp(s - ref[:, None])
            rescale = tl.exp(best - ref)
            total = total * rescale + tl.sum(p, axis=1)
            v = tl.load(v_ptr + kv_head * stride_kh + cols[:, None] * stride_kl + dims[None, :],
                        mask=col_ok[:, None], other=0.0)
            if IEEE:
                acc = acc * rescale[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
            else:
                acc = acc * rescale[:, None] + tl.dot(p.to(v.dtype), v)
            best = new_best
        lse = tl.where(total > 0, best + tl.log(total), float("-inf"))
        out = acc / tl.where(total > 0, total, 1.0)[:, None]
        base = (kv_head * num_splits + split) * BLOCK_M
        tl.store(part_ptr + (base + rows[:, None]) * HEAD_DIM + dims[None, :], out)
        tl.store(lse_ptr + base + rows, lse)

    @triton.jit
    def _merge_kernel(
        part_ptr, lse_ptr, out_ptr, stride_ot, stride_oh, num_splits,
        TOKENS: tl.constexpr, GROUP: tl.constexpr, HEAD_DIM: tl.constexpr,
        BLOCK_M: tl.constexpr, SPLITS: tl.constexpr,
    ):
        kv_head = tl.program_id(0)
        row = tl.program_id(1)
        splits = tl.arange(0, SPLITS)
        split_ok = splits < num_splits
        dims = tl.arange(0, HEAD_DIM)
        index = (kv_head * num_splits + splits) * BLOCK_M + row
        lse = tl.load(lse_ptr + index, mask=split_ok, other=float("-inf"))  # [SPLITS]
        weight = tl.exp(lse - tl.max(lse, axis=0))
        part = tl.load(part_ptr + index[:, None] * HEAD_DIM + dims[None, :], mask=split_ok[:, None], other=0.0)
        out = tl.sum(part * weight[:, None], axis=0) / tl.sum(weight, axis=0)
        g, t = row // TOKENS, row % TOKENS
        head = kv_head * GROUP + g
        tl.store(out_ptr + t * stride_ot + head * stride_oh + dims, out.to(out_ptr.dtype.element_ty))


def decode_attention(q: Tensor, keys: Tensor, values: Tensor, mask: Tensor, kv_len: int) -> Tensor:
    """q: [T, H, hd]; keys/values: [Hkv, max_len, hd] (the cache); mask: bool [G*T, >= kv_len]
    with G = H / Hkv. Returns [T, H, hd] in q's dtype."""
    tokens, heads, head_dim = q.shape
    kv_heads = keys.shape[0]
    group = heads // kv_heads
    block_m = max(16, triton.next_power_of_2(group * tokens))
    # Enough chunks to give every multiprocessor work, none shorter than one key block.
    target = max(1, 2 * torch.cuda.get_device_properties(q.device).multi_processor_count // kv_heads)
    chunk = max(BLOCK_N, triton.cdiv(triton.cdiv(kv_len, target), BLOCK_N) * BLOCK_N)
    splits = triton.cdiv(kv_len, chunk)
    part = torch.empty(kv_heads * splits * block_m, head_dim, dtype=torch.float32, device=q.device)
    lse = torch.empty(kv_heads * splits * block_m, dtype=torch.float32, device=q.device)
    mask_bytes = mask.view(torch.uint8)
    _partial_kernel[(kv_heads, splits)](
        q, keys, values, mask_bytes, part, lse,
        q.stride(0), q.stride(1), keys.stride(0), keys.stride(1), mask_bytes.stride(0),
        kv_len, chunk, head_dim ** -0.5, splits,
        TOKENS=tokens, GROUP=group, HEAD_DIM=head_dim, BLOCK_M=block_m, BLOCK=BLOCK_N,
        IEEE=q.dtype == torch.float32, num_warps=4,
    )
    out = torch.empty_like(q)
    _merge_kernel[(kv_heads, group * tokens)](
        part, lse, out, out.stride(0), out.stride(1), splits,
        TOKENS=tokens, GROUP=group, HEAD_DIM=head_dim, BLOCK_M=block_m,
        SPLITS=max(2, triton.next_power_of_2(splits)), num_warps=1,
    )
    return out
