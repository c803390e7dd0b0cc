"""The draft's shape, and its initial weights taken from the base.

A draft shares the base's vocabulary, tokenizer, chat template, RoPE and norm
settings; only its size differs. Initialised from the base (the default), it
copies the embeddings, LM head and final norm and an evenly spaced subset of
the base's layers (the first and last always among them): layers of one model
share one residual stream, so the cut model already predicts much of what the
whole one does, and distillation starts from there instead of from noise.
"""

from __future__ import annotations

import torch

from easyspec.distill.settings import INITS, DraftShape
from easyspec.model.config import ConfigError, ModelConfig
from easyspec.model.transformer import Transformer
from easyspec.zoo.train import build_model


class ShapeError(ValueError):
    """The requested draft shape cannot be built; the message says what to change."""


def non_embedding_parameters(cfg: ModelConfig) -> int:
    """Parameters outside the embedding table and the LM head (the norms count)."""
    embeddings = cfg.vocab_size * cfg.hidden_size
    return cfg.num_parameters() - embeddings * (1 if cfg.tie_word_embeddings else 2)


def draft_config(base: ModelConfig, shape: DraftShape) -> ModelConfig:
    """The draft's config: the base's with the requested sizes."""
    hidden = shape.hidden_size or base.hidden_size
    head_dim = shape.head_dim or base.head_dim
    heads = shape.num_heads or (base.num_heads if hidden == base.hidden_size else max(1, hidden // head_dim))
    kv_heads = shape.num_kv_heads or (base.num_kv_heads if heads == base.num_heads else heads)
    layers = shape.layers or max(1, base.num_layers // 4)
    try:
        return base.replace(num_layers=layers, hidden_size=hidden, num_heads=heads, num_kv_heads=kv_heads,
                            head_dim=head_dim, intermediate_size=shape.intermediate_size or base.intermediate_size)
    except ConfigError as err:
        raise ShapeError(f"draft shape: {err}") from None


def same_layer_shape(a: ModelConfig, b: ModelConfig) -> bool:
    keys = ("hidden_size", "intermediate_size", "num_heads", "num_kv_heads", "head_dim", "attention_bias", "qk_norm")
    return all(getattr(a, k) == getattr(b, k) for k in keys)


def spaced_layers(total: int, count: int) -> list[int]:
    """`count` of `total` layer indices, evenly spaced, the first and the last included."""
    if not 1 <= count <= total:
        raise ShapeError(f"--layers {count}: a draft initialised from the base takes 1 to {total} of its layers")
    if count == 1:
        return [0]
    return [round(i * (total - 1) / (count - 1)) for i in range(count)]


@torch.no_grad()
def init_draft(base: Transformer, cfg: ModelConfig, init: str, seed: int) -> tuple[Transformer, list[int]]:
    """A float32 draft on the base's device, and the base layers it was cut from (empty: none).

    init "base": the base's embeddings, LM head, final norm and spaced layers (the layer
    shape must be the base's); "random": fresh layers, with the embeddings, LM head and
    final norm still copied when the widths match (they are the costliest part to learn).
    """
    if init not in INITS:
        raise ShapeError(f"unknown --init {init!r}; choose one of {', '.join(INITS)}")
    same_layers = same_layer_shape(base.config, cfg)
    if init == "base" and not same_layers:
        raise ShapeError("--init base copies the base's layers, so the draft's width, heads and MLP must be the "
                         "base's; change only --layers, or pass --init random")
    model = build_model(cfg, seed)
    device = base.embed_tokens.weight.device
    if cfg.hidden_size == base.config.hidden_size:
        model.embed_tokens.weight.copy_(base.embed_tokens.weight)
        model.norm.weight.copy_(base.norm.weight)
        if not cfg.tie_word_embeddings:
            model.lm_head.weight.copy_(base.lm_head.weight)
    taken: list[int] = []
    if init == "base":
        taken = spaced_layers(base.config.num_layers, cfg.num_layers)
        for mine, theirs in enumerate(taken):
            model.layers[mine].load_state_dict(base.layers[theirs].state_dict())
    return model.to(device=device, dtype=torch.float32), taken
