"""Tiny random checkpoints of every supported family, written by HF transformers itself."""

from __future__ import annotations

from pathlib import Path

import torch

FAMILIES = ("llama2", "llama3", "mistral", "qwen2", "qwen3")

_COMMON = dict(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    rms_norm_eps=1e-5,
)


def hf_config(family: str, **overrides):
    import transformers as tf

    kw = dict(_COMMON, **overrides)
    if family == "llama2":
        return tf.LlamaConfig(**kw, tie_word_embeddings=False)
    if family == "llama3":
        scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                   "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
        return tf.LlamaConfig(**kw, rope_theta=500000.0, rope_scaling=scaling, tie_word_embeddings=True)
    if family == "mistral":
        return tf.MistralConfig(**{"sliding_window": None, **kw}, tie_word_embeddings=False)
    if family == "qwen2":
        return tf.Qwen2Config(**kw, tie_word_embeddings=True, use_sliding_window=False)
    if family == "qwen3":
        return tf.Qwen3Config(**kw, head_dim=24, tie_word_embeddings=False, use_sliding_window=False)
    raise ValueError(family)


def make_hf_checkpoint(family: str, folder: Path, seed: int = 0, **overrides):
    """Save a random HF model of `family` to `folder`; returns the HF model (float32, eval)."""
    import transformers as tf

    torch.manual_seed(seed)
    cfg = hf_config(family, **overrides)
    model = tf.AutoModelForCausalLM.from_config(cfg, torch_dtype=torch.float32).eval()
    # Random init leaves norms at 1 and biases at 0; perturb them so they are tested too.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(folder, safe_serialization=True)
    return model
