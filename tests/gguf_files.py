"""Small GGUF files written the way llama.cpp's converter writes them, for tests.

`write_gguf` takes a Hugging Face model (see hf_models.py) and a vocabulary (a
byte-level BPE tokenizer.json's, or a SentencePiece one trained here) and writes
llama.cpp's metadata keys and tensor names, with Llama's q/k rows permuted as
llama.cpp stores them and Llama-3 RoPE scaling as a rope_freqs tensor. Each 2-D
weight gets the quantization type `types` assigns it: quantized by the gguf
library where it can, else (K-quants, IQ4_NL) filled with random blocks whose
scales are set to small finite values.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np
import torch
from tokenizers import SentencePieceBPETokenizer

Q = gguf.GGMLQuantizationType
NORMAL, UNKNOWN, CONTROL, BYTE = 1, 2, 3, 6  # llama.cpp's token types
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
CHAT_TOKENS = ("<|im_start|>", "<|im_end|>")
_QUANTIZABLE = (Q.F32, Q.F16, Q.BF16, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q8_0)
# Byte offsets of the float16 scale fields inside one block, for types written as random blocks.
_SCALE_OFFSETS = {Q.Q2_K: (80, 82), Q.Q3_K: (108,), Q.Q4_K: (0, 2), Q.Q5_K: (0, 2), Q.Q6_K: (208,),
                  Q.IQ4_NL: (0,)}
_HF_TO_GGUF = {
    "input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "self_attn.q_norm": "attn_q_norm",
    "self_attn.k_norm": "attn_k_norm", "post_attention_layernorm": "ffn_norm", "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
}


@dataclass
class Vocab:
    """Tokenizer metadata as llama.cpp writes it."""

    model: str  # tokenizer.ggml.model
    tokens: list[str]
    types: list[int]
    bos: int
    eos: int
    merges: list[str] | None = None  # byte-level BPE
    scores: list[float] | None = None  # SentencePiece


def byte_level_vocab(tokenizer_json: Path, extra_control: tuple[str, ...] = CHAT_TOKENS) -> Vocab:
    """A byte-level BPE tokenizer.json's vocabulary, plus control tokens appended; EOS is <|im_end|>."""
    data = json.loads(Path(tokenizer_json).read_text())
    vocab = data["model"]["vocab"]
    tokens = [None] * len(vocab)
    for token, i in vocab.items():
        tokens[i] = token
    special = {t["content"] for t in data["added_tokens"] if t["special"]}
    types = [CONTROL if t in special else NORMAL for t in tokens] + [CONTROL] * len(extra_control)
    tokens += list(extra_control)
    merges = [" ".join(m) if isinstance(m, list) else m for m in data["model"]["merges"]]
    return Vocab("gpt2", tokens, types, 0, tokens.index("<|im_end|>"), merges=merges)


def sentencepiece_vocab(texts: list[str], size: int) -> Vocab:
    """A SentencePiece-style BPE vocabulary as Llama 2's GGUF files hold one: <unk> <s> </s>, the 256 byte
    tokens, then pieces trained on `texts` scored by merge order (earlier merges score higher)."""
    trainer = SentencePieceBPETokenizer()
    trainer.train_from_iterator(texts, vocab_size=size, special_tokens=["<unk>", "<s>", "</s>"],
                                show_progress=False)
    pieces = [t for t, _ in sorted(trainer.get_vocab().items(), key=lambda kv: kv[1])][3:]
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + pieces
    types = [UNKNOWN, CONTROL, CONTROL] + [BYTE] * 256 + [NORMAL] * len(pieces)
    scores = [0.0] * 259 + [-float(i) for i in range(len(pieces))]
    return Vocab("llama", tokens, types, 1, 2, scores=scores)


def random_blocks(qtype: Q, rows: int, cols: int, rng: np.random.Generator) -> np.ndarray:
    """[rows, bytes] random blocks of a type the gguf library cannot quantize, with finite scales of about 1e-4."""
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    data = rng.integers(0, 256, (rows, cols // block, size), dtype=np.uint8)
    for offset in _SCALE_OFFSETS[qtype]:
        scales = (rng.uniform(0.5, 1.5, (rows, cols // block)) * 1e-4).astype(np.float16)
        data[:, :, offset : offset + 2] = scales.view(np.uint8).reshape(rows, cols // block, 2)
    return data.reshape(rows, -1)


def _permute(w: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's row order for q/k: per head, the two halves interleaved."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_gguf(path: Path, model, vocab: Vocab | Path, *, arch: str = "llama", pre: str = "gpt-2",
               types: Callable[[str], Q] = lambda name: Q.F32, seed: int = 0, skip: tuple[str, ...] = (),
               extra: Callable[[gguf.GGUFWriter], None] | None = None) -> Path:
    """Write `model` (a transformers causal LM) as `path`, with `vocab` (or the byte-level vocabulary of a
    tokenizer.json); `skip` names tensors, metadata keys or "tokenizer" (all tokenizer metadata) to leave out,
    and `extra` writes metadata of its own (say, a skipped key with a value of the wrong type)."""
    cfg = model.config
    rng = np.random.default_rng(seed)
    w = gguf.GGUFWriter(str(path), arch)
    heads, kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    keys = {
        f"{arch}.block_count": cfg.num_hidden_layers, f"{arch}.context_length": cfg.max_position_embeddings,
        f"{arch}.embedding_length": cfg.hidden_size, f"{arch}.feed_forward_length": cfg.intermediate_size,
        f"{arch}.attention.head_count": heads, f"{arch}.attention.head_count_kv": kv_heads,
        f"{arch}.attention.key_length": head_dim, f"{arch}.attention.value_length": head_dim,
        f"{arch}.rope.dimension_count": head_dim,
    }
    for key, value in keys.items():
        if key not in skip:
            w.add_uint32(key, value)
    rope = getattr(cfg, "rope_parameters", None) or {"rope_theta": getattr(cfg, "rope_theta", 10000.0)}
    w.add_rope_freq_base(float(rope["rope_theta"]))
    w.add_layer_norm_rms_eps(float(cfg.rms_norm_eps))
    vocab = vocab if isinstance(vocab, Vocab) else byte_level_vocab(vocab)
    if "tokenizer" not in skip:
        w.add_tokenizer_model(vocab.model)
        if vocab.model == "gpt2":
            w.add_tokenizer_pre(pre)
        w.add_token_list(vocab.tokens)
        w.add_token_types(vocab.types)
        if vocab.merges is not None:
            w.add_token_merges(vocab.merges)
        if vocab.scores is not None:
            w.add_token_scores(vocab.scores)
        w.add_bos_token_id(vocab.bos)
        w.add_eos_token_id(vocab.eos)
        w.add_add_bos_token(True)
        if "tokenizer.chat_template" not in skip:
            w.add_chat_template(CHAT_TEMPLATE)
    if extra is not None:
        extra(w)

    scaling = rope if rope.get("rope_type") == "llama3" else None
    if scaling is not None:  # llama.cpp writes Llama-3 scaling as per-frequency divisors
        w.add_rope_scaling_orig_ctx_len(scaling["original_max_position_embeddings"])
        w.add_tensor("rope_freqs.weight", _llama3_divisors(head_dim, rope["rope_theta"], scaling))
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        target = gguf_tensor_name(name)
        if target in skip:
            continue
        data = tensor.float().numpy()
        if arch == "llama" and (".q_proj." in name or ".k_proj." in name):
            data = _permute(data, heads if ".q_proj." in name else kv_heads)
        qtype = types(target) if data.ndim == 2 else Q.F32
        if qtype in _QUANTIZABLE:
            w.add_tensor(target, gguf.quants.quantize(data, qtype), raw_dtype=qtype)
        else:
            w.add_tensor(target, random_blocks(qtype, *data.shape, rng), raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def gguf_tensor_name(hf_name: str) -> str:
    fixed = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}
    if hf_name in fixed:
        return fixed[hf_name]
    _, _, layer, rest = hf_name.split(".", 3)
    module, kind = rest.rsplit(".", 1)
    return f"blk.{layer}.{_HF_TO_GGUF[module]}.{kind}"


def _llama3_divisors(head_dim: int, theta: float, s: dict) -> np.ndarray:
    """llama.cpp's rope_freqs: by how much Llama-3 scaling divides each rotary frequency."""
    freqs = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    old = s["original_max_position_embeddings"]
    low_wavelen, high_wavelen = old / s["low_freq_factor"], old / s["high_freq_factor"]
    out = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < high_wavelen:
            out.append(1.0)
        elif wavelen > low_wavelen:
            out.append(s["factor"])
        else:
            smooth = (old / wavelen - s["low_freq_factor"]) / (s["high_freq_factor"] - s["low_freq_factor"])
            out.append(1 / ((1 - smooth) / s["factor"] + smooth))
    return np.array(out, dtype=np.float32)


def hf_logits(model, ids: list[int]) -> torch.Tensor:
    """[T, V] float32 logits of a transformers model over one sequence."""
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float()
