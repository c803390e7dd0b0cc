"""The Llama-family decoder (Llama 2/3, Mistral, Qwen2/2.5, Qwen3) on one device.

It knows nothing of parallelism or speculation. Tensor parallelism swaps some of
its Linear modules for sharded ones (easyspec.parallel.tp); layer-parallel
drafting calls each block's two sub-blocks (`attention`, `feed_forward`)
directly. Batch size is 1 whenever a KV cache is used; a leading batch
dimension is accepted without a cache (training).

Shapes: T tokens in this forward, D hidden size, H query heads, Hkv key/value
heads, hd head dim, L = kv_len slots of the cache read by attention.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from easyspec.model import kernels
from easyspec.model.config import ModelConfig, RopeScaling
from easyspec.model.kv_cache import KVCache


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        return kernels.rms_norm(x, self.weight, self.eps)


class Linear(nn.Linear):
    """nn.Linear that can normalise its input first and add its result to a residual, in one
    fused kernel where one applies (kernels.linear). Tensor parallelism subclasses it to decide
    how its shards do both (easyspec.parallel.tp)."""

    def forward(self, x: Tensor, norm: RMSNorm | None = None, residual: Tensor | None = None,
                out_dtype: torch.dtype | None = None) -> Tensor:
        """x: [..., in] -> [..., out]: residual + linear(norm(x)), in out_dtype if given."""
        norm_weight, eps = (None, 0.0) if norm is None else (norm.weight, norm.eps)
        return kernels.linear(x, self.weight, self.bias, norm_weight, eps, residual, out_dtype)


def rope_inverse_frequencies(head_dim: int, theta: float, scaling: RopeScaling | None) -> Tensor:
    """[hd/2] float32 inverse frequencies, with Llama-3 wavelength-dependent scaling."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    if scaling is None:
        return inv_freq
    old_len = scaling.original_max_position_embeddings
    low_wavelen = old_len / scaling.low_freq_factor  # longer wavelengths are slowed down fully
    high_wavelen = old_len / scaling.high_freq_factor  # shorter ones are kept as they are
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / scaling.factor, inv_freq)
    # In between, interpolate smoothly between the scaled and unscaled frequency.
    smooth = (old_len / wavelen - scaling.low_freq_factor) / (
        scaling.high_freq_factor - scaling.low_freq_factor
    )
    smoothed = (1 - smooth) * scaled / scaling.factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(medium, smoothed, scaled)


@dataclass
class StepInputs:
    """What every layer of one forward shares.

    cos, sin: [T, hd] in the activation dtype; mask: [T, L] bool (True = attend)
    or, without a cache, None for plain causal attention ([T, T] under a sliding
    window); positions: [T] long.
    group_mask: the mask repeated for the query heads that share a KV head,
    [group*T, L], built once per forward instead of once per layer.
    """

    positions: Tensor
    cos: Tensor
    sin: Tensor
    mask: Tensor | None
    cache: KVCache | None
    kv_len: int
    group_mask: Tensor | None = None
    # Eager CPU steps: the spans of cache slots some token sees (group_mask holds only their columns),
    # None: slots 0..kv_len-1. A batch's step spans every row up to the highest in use, though each
    # token sees only its own row's: without this, 4 rows at a long context read 4 contexts per token.
    kv_spans: list[slice] | None = None


SEEN_BLOCK = 128  # cache slots kept or dropped together by seen_spans


def seen_spans(mask: Tensor) -> list[slice] | None:
    """The runs of SEEN_BLOCK-slot blocks of mask [T, L] that some token sees, as column slices;
    None when every block is seen. Dropped columns weigh exactly 0 in the softmax, so attention over
    the kept ones is the same (to float rounding, as any change of the step's shape gives)."""
    slots = mask.shape[1]
    blocks = -(-slots // SEEN_BLOCK)
    padded = F.pad(mask, (0, blocks * SEEN_BLOCK - slots))  # [T, blocks * SEEN_BLOCK]
    seen = padded.view(-1, blocks, SEEN_BLOCK).any(2).any(0)  # [blocks]
    if bool(seen.all()):
        return None
    edges = torch.diff(F.pad(seen.to(torch.int8), (1, 1))).nonzero()[:, 0].tolist()  # run starts and ends
    return [slice(start * SEEN_BLOCK, min(end * SEEN_BLOCK, slots)) for start, end in zip(edges[::2], edges[1::2],
                                                                                             strict=True)]


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        # Head counts are attributes (not read from cfg at run time) so that tensor
        # parallelism can give each rank its share of heads.
        self.num_heads = cfg.num_heads
        self.num_kv_heads = cfg.num_kv_heads
        self.head_dim = cfg.head_dim
        # q, k and v in one matmul: one weight read and one launch instead of three.
        self.qkv_proj = Linear(cfg.hidden_size, cfg.q_size + 2 * cfg.kv_size, bias=cfg.attention_bias)
        self.o_proj = Linear(cfg.q_size, cfg.hidden_size, bias=False)
        self.q_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps) if cfg.qk_norm else None
        self.k_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps) if cfg.qk_norm else None

    def qkv(self, x: Tensor, norm: RMSNorm, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Rotated queries, keys and values of x: [B, T, D] before the input `norm`, for callers that
        attend elsewhere than the cache. cos, sin: [T, 1, hd], or [B, T, 1, hd] for positions per row.
        Returns q [B, T, H, hd], k and v [B, T, Hkv, hd]."""
        batch, seq, _ = x.shape
        hd, nh, nkv = self.head_dim, self.num_heads, self.num_kv_heads
        q, k, v = self.qkv_proj(x, norm=norm).split([nh * hd, nkv * hd, nkv * hd], dim=-1)
        q = q.view(batch, seq, nh, hd)
        k = k.view(batch, seq, nkv, hd)
        v = v.view(batch, seq, nkv, hd)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = kernels.rotary(q, k, cos, sin)
        return q, k, v

    def forward(self, x: Tensor, norm: RMSNorm, step: StepInputs, layer: int, residual: Tensor | None = None) -> Tensor:
        """x: [B, T, D] before the input `norm` -> the attention output projected to [B, T, D]
        (before any tensor-parallel reduction), added to `residual` if given."""
        batch, seq, _ = x.shape
        hd, nh, nkv = self.head_dim, self.num_heads, self.num_kv_heads
        if step.cache is not None:
            assert batch == 1, "a KV cache holds one sequence"
            keys, values = step.cache.keys[layer], step.cache.values[layer]  # [Hkv, S, hd]
            qk_norms = (None, None, 0.0) if self.q_norm is None else (self.q_norm.weight, self.k_norm.weight,
                                                                     self.q_norm.eps)
            # Norm, projection, q/k norms, rotary embedding and the cache write: one kernel where fused.
            q = kernels.attention_inputs(x[0], norm.weight, norm.eps, self.qkv_proj.weight, self.qkv_proj.bias,
                                         *qk_norms, step.cos, step.sin, nh, nkv, keys, values,
                                         step.cache.slots_for(step.positions))  # [T, H, hd]
            kv_len = step.kv_len
            if step.kv_spans is not None:  # only the slots some token sees, [Hkv, L', hd]
                keys = torch.cat([keys[:, span] for span in step.kv_spans], dim=1)
                values = torch.cat([values[:, span] for span in step.kv_spans], dim=1)
                kv_len = keys.shape[1]
            out = kernels.cached_attention(q, keys, values, step.group_mask, kv_len)  # [T, H, hd]
            return self.o_proj(out.reshape(1, seq, nh * hd), residual=residual)

        # No cache (training or a one-off full forward): causal attention over this forward's
        # own keys, with GQA heads expanded for the fused kernels.
        q, k, v = self.qkv(x, norm, step.cos[:, None, :], step.sin[:, None, :])  # cos, sin: [T, 1, hd]
        group = nh // nkv
        qh = q.transpose(1, 2)  # [B, H, T, hd]
        kh = k.transpose(1, 2).repeat_interleave(group, dim=1)
        vh = v.transpose(1, 2).repeat_interleave(group, dim=1)
        if step.mask is None:
            out = F.scaled_dot_product_attention(qh, kh, vh, is_causal=True)
        else:  # a sliding window: [T, T] bool
            out = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=step.mask)
        out = out.transpose(1, 2).reshape(batch, seq, nh * hd)
        return self.o_proj(out, residual=residual)


class FeedForward(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        # gate and up projections fused: rows [0, I) are gate, [I, 2I) are up.
        self.gate_up_proj = Linear(cfg.hidden_size, 2 * cfg.intermediate_size, bias=False)
        self.down_proj = Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: Tensor, norm: RMSNorm, residual: Tensor | None = None) -> Tensor:
        """x: [B, T, D] before the post-attention `norm` -> the MLP's output (before any
        tensor-parallel reduction), added to `residual` if given."""
        hidden = kernels.gate_up_silu(x, norm.weight, norm.eps, self.gate_up_proj.weight)  # [B, T, I]
        return self.down_proj(hidden, residual=residual)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, index: int) -> None:
        super().__init__()
        self.index = index
        self.input_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.attn = Attention(cfg)
        self.post_attention_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = FeedForward(cfg)

    def attention(self, x: Tensor, step: StepInputs, residual: Tensor | None = None) -> Tensor:
        """The attention sub-block's residual update for input x: [B, T, D], or residual + update
        when `residual` is given (added in the output projection's epilogue where fused)."""
        return self.attn(x, self.input_norm, step, self.index, residual)

    def feed_forward(self, x: Tensor, residual: Tensor | None = None) -> Tensor:
        """The MLP sub-block's residual update for input x: [B, T, D], or residual + update."""
        return self.mlp(x, self.post_attention_norm, residual)

    def forward(self, x: Tensor, step: StepInputs) -> Tensor:
        x = self.attention(x, step, residual=x)
        return self.feed_forward(x, residual=x)


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.config = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.rope_cos: Tensor | None = None
        self.rope_sin: Tensor | None = None

    def init_rope(self, max_len: int, device: torch.device | str) -> None:
        """Precompute cos/sin for positions [0, max_len) as float32 [max_len, hd]."""
        cfg = self.config
        inv_freq = rope_inverse_frequencies(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling)
        freqs = torch.outer(torch.arange(max_len, dtype=torch.float32), inv_freq)
        angles = torch.cat((freqs, freqs), dim=-1)
        self.rope_cos = angles.cos().to(device)
        self.rope_sin = angles.sin().to(device)

    def allocate_cache(self, max_len: int, device: torch.device | str | None = None) -> KVCache:
        """A KV cache for `max_len` positions (per-rank head count under TP)."""
        attn = self.layers[0].attn
        param = self.embed_tokens.weight
        device = device or param.device
        if self.rope_cos is None or self.rope_cos.shape[0] < max_len:
            self.init_rope(max_len, device)
        return KVCache(len(self.layers), attn.num_kv_heads, attn.head_dim, max_len, param.dtype, device)

    def step_inputs(
        self,
        positions: Tensor,
        cache: KVCache | None,
        kv_len: int | None = None,
        mask: Tensor | None = None,
    ) -> StepInputs:
        """positions: [T] long. Without an explicit mask a query attends to every
        cached slot at or before its own position (causal over absolute positions)."""
        if self.rope_cos is None or (cache is None and int(positions.max()) >= self.rope_cos.shape[0]):
            needed = cache.max_len if cache is not None else int(positions.max()) + 1
            self.init_rope(max(needed, 1), positions.device)
        dtype = self.embed_tokens.weight.dtype
        cos = self.rope_cos[positions].to(dtype)
        sin = self.rope_sin[positions].to(dtype)
        window = self.config.sliding_window
        if cache is None:
            # Causal over this forward's own tokens; a [T, T] mask only where a window cuts it.
            causal = None if window is None else self._windowed(positions[None, :] <= positions[:, None], positions,
                                                                positions)
            return StepInputs(positions, cos, sin, causal, None, 0)
        if kv_len is None:
            kv_len = cache.max_len if mask is None else mask.shape[1]
        if mask is None:
            slots = torch.arange(kv_len, device=positions.device)
            mask = slots[None, :] <= positions[:, None]  # [T, L]
        if window is not None:
            mask = self._windowed(mask, torch.arange(mask.shape[1], device=positions.device), positions)
        group = self.config.num_heads // self.config.num_kv_heads
        group_mask, spans = mask.repeat(group, 1), None
        if positions.device.type == "cpu":  # eager: the kept count may depend on the data
            spans = seen_spans(mask[:, :kv_len])
            if spans is not None:
                group_mask = torch.cat([group_mask[:, span] for span in spans], dim=1)
        return StepInputs(positions, cos, sin, mask, cache, kv_len, group_mask, spans)

    def _windowed(self, mask: Tensor, key_positions: Tensor, positions: Tensor) -> Tensor:
        """mask [T, L] limited to keys among the last sliding_window positions of each query
        (positions [T]; key_positions [L], a cache slot standing for its position). Tree tokens
        sit at slots past their positions, so for them this is exact while the window is longer
        than the tree is deep (the engine checks)."""
        return mask & (key_positions[None, :] > positions[:, None] - self.config.sliding_window)

    def logits(self, hidden: Tensor) -> Tensor:
        """Final norm and LM head (one kernel where fused): [..., D] -> float32 [..., V]."""
        return self.lm_head(hidden, norm=self.norm, out_dtype=torch.float32)

    def forward(
        self,
        tokens: Tensor,
        positions: Tensor,
        cache: KVCache | None = None,
        kv_len: int | None = None,
        mask: Tensor | None = None,
        last_only: bool = False,
        select: Tensor | None = None,
    ) -> Tensor:
        """tokens: [T] (or [B, T] without a cache), positions: [T] long.

        Returns float32 logits [T, V] ([B, T, V] for batched input), or [1, V] for
        the last token only when `last_only` is set (prefill needs no more), or [S, V]
        for the tokens at indices `select` [S] (the last of each prompt in a batch).
        """
        batched = tokens.dim() == 2
        x = self.embed_tokens(tokens if batched else tokens[None])  # [B, T, D]
        step = self.step_inputs(positions, cache, kv_len, mask)
        for block in self.layers:
            x = block(x, step)
        if last_only:
            x = x[:, -1:]
        elif select is not None:
            x = x[:, select]
        out = self.logits(x)
        return out if batched else out[0]
