"""`python -m easyspec.bench.kernels`: each fused kernel alone at real layer shapes (CUDA).

Every kernel of the fused decoder layer (easyspec.model.kernels) runs by itself in a CUDA graph
at a preset's layer shape, beside the reference formulas doing the same work, and is reported
with the bytes it must stream (weights, or the KV cache for attention) as achieved bandwidth and
as a share of the measured copy bandwidth. It says which kernel holds a layer back from its floor
and what each block configuration (printed) achieves, for tuning. A layer's weights (8-400 MB) would
stay in the 50 MB L2 cache between calls of one kernel, as they never do in a whole step: each
call follows a write of 128 MB, whose time alone is subtracted.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import torch

from easyspec.bench.steps import copy_bandwidth, graphed, time_ms
from easyspec.model import decode_attention, fused_linear, kernels
from easyspec.model.checkpoint import parse_dtype
from easyspec.model.config import PRESETS, ModelConfig


def _cases(cfg: ModelConfig, tokens: int, context: int, dtype: torch.dtype, dev: torch.device) -> list[tuple]:
    """(name, weight/KV bytes, fused fn, reference fn, config) for one layer of `cfg`; the fused
    functions are the kernels module's own, so the fused kernels must be switched on."""
    def rand(*shape: int, scale: float = 1.0) -> torch.Tensor:
        return (torch.randn(*shape, device=dev) * scale).to(dtype)

    dim, inter, hd = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
    heads, kv_heads = cfg.num_heads, cfg.num_kv_heads
    x, norm = rand(tokens, dim), 1 + rand(dim, scale=0.1)
    qkv_w = rand(cfg.q_size + 2 * cfg.kv_size, dim, scale=dim ** -0.5)
    o_w, attn_out = rand(dim, cfg.q_size, scale=cfg.q_size ** -0.5), rand(tokens, cfg.q_size)
    gate_up_w, down_w = rand(2 * inter, dim, scale=dim ** -0.5), rand(dim, inter, scale=inter ** -0.5)
    hidden, head_w = rand(tokens, inter), rand(cfg.vocab_size, dim, scale=dim ** -0.5)
    cache_len = context + 64
    keys, values = rand(kv_heads, cache_len, hd), rand(kv_heads, cache_len, hd)
    cos, sin = rand(tokens, hd), rand(tokens, hd)
    slots = torch.arange(context - tokens, context, device=dev)
    q = rand(tokens, heads, hd)
    mask = (torch.arange(context, device=dev)[None, :] <= slots[:, None]).repeat(heads // kv_heads, 1)
    size = torch.finfo(dtype).bits // 8

    def qkv(fn: Callable) -> Callable:
        return lambda: fn(x, norm, 1e-5, qkv_w, None, None, None, 0.0, cos, sin, heads, kv_heads, keys, values, slots)

    def blocks(outputs: int, inputs: int, gated: bool = False) -> str:
        cut = fused_linear.blocks(outputs, inputs, dtype, dev, gated)
        return f"BLOCK_N={cut.n} BLOCK_K={cut.k} SPLIT={cut.split}"

    return [
        ("norm+qkv+rotary+cache", qkv_w.numel() * size, qkv(lambda *args: kernels.attention_inputs(*args)),
         qkv(kernels.attention_inputs_reference), blocks(cfg.q_size + 2 * cfg.kv_size, dim)),
        (f"attention ctx {context}", 2 * keys[:, :context].numel() * size,
         lambda: kernels.cached_attention(q, keys, values, mask, context),
         lambda: kernels.cached_attention_reference(q, keys, values, mask, context),
         f"CHUNK={decode_attention.chunk_length(hd)}"),
        ("o_proj+residual", o_w.numel() * size, lambda: kernels.linear(attn_out, o_w, residual=x),
         lambda: kernels.linear_reference(attn_out, o_w, residual=x), blocks(dim, cfg.q_size)),
        ("norm+gate_up+silu", gate_up_w.numel() * size, lambda: kernels.gate_up_silu(x, norm, 1e-5, gate_up_w),
         lambda: kernels.gate_up_silu_reference(x, norm, 1e-5, gate_up_w), blocks(inter, dim, gated=True)),
        ("down+residual", down_w.numel() * size, lambda: kernels.linear(hidden, down_w, residual=x),
         lambda: kernels.linear_reference(hidden, down_w, residual=x), blocks(dim, inter)),
        ("norm+lm_head", head_w.numel() * size,
         lambda: kernels.linear(x, head_w, None, norm, 1e-5, None, torch.float32),
         lambda: kernels.linear_reference(x, head_w, None, norm, 1e-5, None, torch.float32),
         blocks(cfg.vocab_size, dim)),
    ]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m easyspec.bench.kernels", description=__doc__.splitlines()[0])
    p.add_argument("--presets", default="llama-3.2-1b,llama-3.1-8b", help="comma list of layer shapes")
    p.add_argument("--tokens", default="1,5", help="comma list of token counts")
    p.add_argument("--context", type=int, default=4096, help="cached tokens attention reads")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--iters", type=int, default=200)
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("easyspec: the kernel benchmark needs a CUDA device")
    dev, dtype = torch.device("cuda"), parse_dtype(args.dtype)
    bandwidth = copy_bandwidth(dev)
    kernels.use_fused(True)
    print(f"\n## fused kernels alone, {torch.cuda.get_device_name(0)}, {args.dtype}, copy bandwidth "
          f"{bandwidth / 1e12:.2f} TB/s\n")
    print("| layer | kernel | T | fused us | GB/s | % of copy | reference us | config |")
    print("|---|---|---|---|---|---|---|---|")
    scrub = torch.empty(128 << 20, dtype=torch.uint8, device=dev)  # evicts the previous call's weights from L2
    scrub_ms = time_ms(graphed(scrub.zero_), args.iters)

    def cold(fn: Callable) -> float:
        return time_ms(graphed(lambda: (scrub.zero_(), fn())), args.iters) - scrub_ms

    with torch.inference_mode():
        for preset in args.presets.split(","):
            for tokens in (int(t) for t in args.tokens.split(",")):
                for name, nbytes, fused, reference, config in _cases(PRESETS[preset], tokens, args.context, dtype, dev):
                    fused_ms, reference_ms = cold(fused), cold(reference)
                    rate = nbytes / (fused_ms / 1e3)
                    print(f"| {preset} | {name} | {tokens} | {fused_ms * 1e3:.1f} | {rate / 1e9:.0f} | "
                          f"{100 * rate / bandwidth:.0f}% | {reference_ms * 1e3:.1f} | {config} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
