"""Generation for hundreds of sequences at once, with a KV cache of its own.

The engine's cache holds one sequence; distillation data and acceptance
measurement need many continuations of many prompts. Prompts of a batch are
left-padded to a common length, so every row writes its next token into the
same cache column; each row has its own positions (column minus its padding),
and a key mask hides the padding. Per decode step the cost is one pass over
the weights for the whole batch, so on a GPU a small base is bound by kernel
launches up to batches of about a thousand rows: the batch size is a flag.

Shapes: B rows, T tokens in this forward, S cache columns, H query heads, Hkv
key/value heads, G = H / Hkv, hd head dim, V vocabulary.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from easyspec.model.transformer import Transformer
from easyspec.options import SamplingParams
from easyspec.verify.sampling import process_logits, sample


class BatchCache:
    """Keys and values of B sequences: [B, Hkv, S, hd] per layer, plus which columns hold real tokens."""

    def __init__(self, model: Transformer, rows: int, columns: int) -> None:
        attn = model.layers[0].attn
        weight = model.embed_tokens.weight
        shape = (rows, attn.num_kv_heads, columns, attn.head_dim)
        self.keys = [torch.zeros(shape, dtype=weight.dtype, device=weight.device) for _ in model.layers]
        self.values = [torch.zeros(shape, dtype=weight.dtype, device=weight.device) for _ in model.layers]
        self.valid = torch.zeros(rows, columns, dtype=torch.bool, device=weight.device)  # [B, S]


def _attention(q: Tensor, keys: Tensor, values: Tensor, group_mask: Tensor) -> Tensor:
    """q: [B, T, H, hd]; keys, values: [B, Hkv, L, hd]; group_mask: [B, 1, G*T, L] bool -> [B, T, H * hd].

    The G query heads that share a KV head are folded into the query axis, so no key is copied.
    """
    rows, seq, heads, hd = q.shape
    kv_heads = keys.shape[1]
    group = heads // kv_heads
    qg = q.view(rows, seq, kv_heads, group, hd).permute(0, 2, 3, 1, 4).reshape(rows, kv_heads, group * seq, hd)
    out = F.scaled_dot_product_attention(qg, keys, values, attn_mask=group_mask)  # [B, Hkv, G*T, hd]
    return out.view(rows, kv_heads, group, seq, hd).permute(0, 3, 1, 2, 4).reshape(rows, seq, heads * hd)


def forward_rows(model: Transformer, tokens: Tensor, positions: Tensor, cache: BatchCache, start: int) -> Tensor:
    """tokens, positions: [B, T] for cache columns start .. start+T-1 -> float32 logits of the last column [B, V].

    cache.valid must already mark these columns' real tokens.
    """
    seq = tokens.shape[1]
    end = start + seq
    if model.rope_cos is None or model.rope_cos.shape[0] < end:
        model.init_rope(max(end, 1), tokens.device)
    dtype = model.embed_tokens.weight.dtype
    cos = model.rope_cos[positions].to(dtype)[:, :, None, :]  # [B, T, 1, hd]
    sin = model.rope_sin[positions].to(dtype)[:, :, None, :]
    columns = torch.arange(end, device=tokens.device)
    causal = columns[None, :] <= columns[start:end, None]  # [T, end]
    # A padding column sees only itself: a query with no key at all would turn its row into NaN,
    # and NaN keys and values poison even the rows that mask them out (0 * NaN).
    own = columns[None, :] == columns[start:end, None]
    mask = causal[None] & cache.valid[:, None, :end] | own[None]  # [B, T, end]
    group = model.config.num_heads // model.config.num_kv_heads
    group_mask = mask.repeat(1, group, 1)[:, None]  # [B, 1, G*T, end], row g*T + t is token t's
    x = model.embed_tokens(tokens)  # [B, T, D]
    for i, block in enumerate(model.layers):
        q, k, v = block.attn.qkv(x, block.input_norm, cos, sin)
        cache.keys[i][:, :, start:end] = k.transpose(1, 2)
        cache.values[i][:, :, start:end] = v.transpose(1, 2)
        attended = _attention(q, cache.keys[i][:, :, :end], cache.values[i][:, :, :end], group_mask)
        x = block.attn.o_proj(attended, residual=x)
        x = block.feed_forward(x, residual=x)
    return model.logits(x[:, -1])


@torch.inference_mode()
def generate_batch(model: Transformer, prompts: Sequence[Sequence[int]], max_new: int, params: SamplingParams,
                  stop_ids: Sequence[int] = (), generator: torch.Generator | None = None,
                  pad_id: int = 0, deadline: float | None = None) -> list[list[int]]:
    """One batch: each prompt's continuation of at most `max_new` tokens, ending at the first stop id
    (or, past `deadline` (time.monotonic()), where it has got to).

    Greedy when params.temperature == 0, else sampled (temperature, top-k, top-p as in the engine).
    """
    device = model.embed_tokens.weight.device
    rows, width = len(prompts), max(len(p) for p in prompts)
    cache = BatchCache(model, rows, width + max_new)
    tokens = torch.full((rows, width), pad_id, dtype=torch.long)
    for row, prompt in enumerate(prompts):
        tokens[row, width - len(prompt):] = torch.tensor(prompt, dtype=torch.long)
    pads = torch.tensor([width - len(p) for p in prompts], device=device)  # [B]
    cache.valid[:] = torch.arange(width + max_new, device=device)[None, :] >= pads[:, None]
    positions = (torch.arange(width, device=device)[None, :] - pads[:, None]).clamp_min(0)  # [B, width]
    logits = forward_rows(model, tokens.to(device), positions, cache, 0)
    stops = torch.tensor(list(stop_ids), dtype=torch.long, device=device)
    done = torch.zeros(rows, dtype=torch.bool, device=device)
    out = torch.full((rows, max_new), pad_id, dtype=torch.long, device=device)  # [B, max_new]
    lengths = torch.full((rows,), max_new, dtype=torch.long, device=device)
    for step in range(max_new):
        picked = logits.argmax(-1) if params.greedy else sample(process_logits(logits, params), generator)  # [B]
        out[:, step] = torch.where(done, pad_id, picked)
        stopped = ~done & torch.isin(picked, stops)
        lengths = torch.where(stopped, step + 1, lengths)
        done |= stopped
        # One host read every 16 steps: a batch whose rows all stopped ends early without a sync per token.
        if step + 1 == max_new or step % 16 == 15 and (
                bool(done.all()) or deadline is not None and time.monotonic() > deadline):
            break
        logits = forward_rows(model, picked[:, None], (width - pads + step)[:, None], cache, width + step)
    lengths = torch.where(done, lengths, step + 1)  # rows cut by the deadline end where they got to
    return [row[:n] for row, n in zip(out.tolist(), lengths.tolist(), strict=True)]


def generate(model: Transformer, prompts: Sequence[Sequence[int]], max_new: int, params: SamplingParams,
             batch_size: int, stop_ids: Sequence[int] = (), seed: int = 0,
             on_batch: Callable[[int], None] | None = None,
             deadline: float | None = None) -> list[list[int] | None]:
    """Continuations of every prompt, in prompt order, in batches of prompts of similar length.

    Sampling is seeded: the same prompts, settings and batch size give the same text.
    `on_batch(rows)` is called after each batch (progress). Past `deadline` (time.monotonic()) the
    batch in progress ends where it has got to and no other starts: their prompts get None.
    """
    if batch_size < 1:
        raise ValueError(f"the generation batch size must be >= 1, got {batch_size}")
    device = model.embed_tokens.weight.device
    generator = None if params.greedy else torch.Generator(device).manual_seed(seed)
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))  # little padding per batch
    results: list[list[int] | None] = [None] * len(prompts)
    for begin in range(0, len(order), batch_size):
        if deadline is not None and time.monotonic() > deadline:
            break
        chunk = order[begin:begin + batch_size]
        batch = generate_batch(model, [prompts[i] for i in chunk], max_new, params, stop_ids, generator,
                               deadline=deadline)
        for index, continuation in zip(chunk, batch, strict=True):
            results[index] = continuation
        if on_batch is not None:
            on_batch(len(chunk))
    return results
