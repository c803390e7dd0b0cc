"""llama.cpp's GGUF files: the model config from their metadata, and their tensors as weights.

A GGUF file holds key/value metadata under llama.cpp's names and tensors, most
of them quantized in blocks along each row. Each tensor is dequantized on its
own (through the gguf library's numpy dequantizers), a few rows at a time,
straight into the target dtype and device, so no float32 copy of the model
ever exists. The tensors are then named and checked exactly as a safetensors
checkpoint's (easyspec.model.checkpoint), and the same slicer makes a
tensor-parallel rank read only its rows (whole quantization blocks: a block
never crosses a row) or, for column splits, dequantize and cut its columns.
As for safetensors, every tensor read must be finite (a NaN or inf weight, or
one that overflows the target dtype, would only show as garbage), and the
metadata goes through the same ModelConfig checks as a config.json.

llama.cpp stores a Llama model's q and k projections with the rows of every
head interleaved (its rotary embedding pairs neighbouring rows, Hugging Face's
pairs the two halves of a head); reading undoes that permutation. Qwen2 and
Qwen3 files are stored unpermuted.

The tokenizer in the same metadata is read by easyspec.model.gguf_tokenizer.
"""

from __future__ import annotations

import functools
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from gguf import GGMLQuantizationType, GGUFReader, ReaderTensor
from gguf.quants import dequantize
from torch import Tensor

from easyspec.model.checkpoint import CheckpointError, TensorSlicer, check_finite, checkpoint_sources
from easyspec.model.config import ConfigError, ModelConfig, RopeScaling
from easyspec.model.progress import bar as progress_bar
from easyspec.model.transformer import Transformer, rope_inverse_frequencies

# general.architecture -> easyspec model_type. llama.cpp writes Mistral 7B as "llama".
ARCHITECTURES = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3"}

Q = GGMLQuantizationType
# Types easyspec dequantizes (each checked against transformers' own dequantizer in tests/test_gguf.py).
SUPPORTED_TYPES = (Q.F32, Q.F16, Q.BF16, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q8_0,
                   Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K)

# Elements dequantized per step: bounds the float32 scratch to 64 MiB whatever the tensor's size.
_CHUNK_ELEMENTS = 1 << 24

_GLOBAL_NAMES = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}
_LAYER_NAMES = {  # inside model.layers.N -> inside blk.N
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.q_proj.bias": "attn_q.bias",
    "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.bias": "attn_v.bias",
    "self_attn.o_proj.weight": "attn_output.weight",
    "self_attn.q_norm.weight": "attn_q_norm.weight",
    "self_attn.k_norm.weight": "attn_k_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}
_REQUIRED = object()


def gguf_name(hf_name: str) -> str:
    """The GGUF tensor name of a Hugging Face checkpoint tensor name."""
    if hf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[hf_name]
    layer, rest = re.fullmatch(r"model\.layers\.(\d+)\.(.+)", hf_name).groups()
    return f"blk.{layer}.{_LAYER_NAMES[rest]}"


@dataclass
class GGUFFile:
    """One parsed GGUF file: metadata fields and tensors (memory-mapped, read on demand)."""

    path: Path
    reader: GGUFReader
    tensors: dict[str, ReaderTensor]

    def has(self, key: str) -> bool:
        return key in self.reader.fields

    def value(self, key: str, default: Any = _REQUIRED) -> Any:
        """A metadata value (str, number, bool, or a list of them); a missing key is an error unless defaulted."""
        field = self.reader.fields.get(key)
        if field is None:
            if default is _REQUIRED:
                raise CheckpointError(f"{self.path}: metadata key {key!r} is missing")
            return default
        try:
            return field.contents()
        except UnicodeDecodeError:
            raise CheckpointError(f"{self.path}: metadata key {key!r} holds text that is not UTF-8") from None

    def scalar(self, key: str, default: Any = _REQUIRED) -> Any:
        value = self.value(key, default)
        if isinstance(value, list):
            raise CheckpointError(f"{self.path}: metadata key {key!r} holds a list (one value per layer?); "
                                  "easyspec needs one value for every layer")
        return value

    def tensor(self, name: str) -> ReaderTensor:
        if name not in self.tensors:
            raise CheckpointError(f"{self.path}: tensor {name!r} is missing")
        return self.tensors[name]

    @property
    def architecture(self) -> str:
        return self.scalar("general.architecture")


def open_gguf(path: str | Path) -> GGUFFile:
    """Parse a GGUF file (once per process and file version: parsing a large vocabulary takes seconds)."""
    path = Path(path)
    try:
        stat = path.stat()
    except FileNotFoundError:
        raise CheckpointError(f"{path}: file not found") from None
    if path.is_dir():
        raise CheckpointError(f"{path}: a directory, not a GGUF file")
    return _parse(path.resolve(), stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=4)
def _parse(path: Path, mtime_ns: int, size: int) -> GGUFFile:
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise CheckpointError(f"{path}: not a GGUF file (it starts with {magic!r}, not b'GGUF'); "
                              "pass a .gguf file or a Hugging Face checkpoint folder")
    try:
        reader = GGUFReader(path)
    except (ValueError, IndexError, KeyError, OverflowError) as err:
        reason = str(err)
        unknown = re.search(r"(\d+)\)? is not a valid GGMLQuantizationType", reason)  # numpy may wrap the id
        if unknown:
            raise CheckpointError(f"{path}: a tensor has quantization type {unknown[1]}, which the installed gguf "
                                  "library does not know (a newer llama.cpp type?)") from None
        if "version" in reason:
            raise CheckpointError(f"{path}: unsupported GGUF version ({reason})") from None
        raise CheckpointError(f"{path}: truncated or corrupt GGUF file ({size} bytes; {reason})") from None
    return GGUFFile(path, reader, {t.name: t for t in reader.tensors})


def hf_shape(tensor: ReaderTensor) -> tuple[int, ...]:
    """The tensor's shape in PyTorch order (GGUF lists dimensions innermost first)."""
    return tuple(int(d) for d in reversed(tensor.shape.tolist()))


def gguf_config(path: str | Path) -> ModelConfig:
    """The model config from the file's metadata, with EOS ids from its tokenizer metadata."""
    f = open_gguf(path)
    arch = f.architecture
    if arch not in ARCHITECTURES:
        raise CheckpointError(f"{f.path}: architecture {arch!r} is not supported; easyspec reads GGUF files of "
                              f"{', '.join(ARCHITECTURES)} (Mistral files are 'llama')")
    try:
        return _config(f, arch)
    except CheckpointError:
        raise
    except ConfigError as err:
        raise CheckpointError(f"{f.path}: {err}") from None
    except (TypeError, ValueError) as err:  # a number stored as text, say
        raise CheckpointError(f"{f.path}: malformed metadata ({err})") from None


def _config(f: GGUFFile, arch: str) -> ModelConfig:
    """The values are taken as stored, not converted: 64.5 or "64" where a count belongs is an error,
    not 64, and ModelConfig checks the rest (ranges, token ids inside the vocabulary), as for folders."""
    def integer(name: str, default: Any = _REQUIRED) -> int:
        value = f.scalar(f"{arch}.{name}", default)
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ConfigError(f"metadata key '{arch}.{name}' must be a positive integer, got {value!r}")
        return value

    def number(name: str, default: Any = _REQUIRED) -> float:
        value = f.scalar(f"{arch}.{name}", default)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
            raise ConfigError(f"metadata key '{arch}.{name}' must be a positive finite number, got {value!r}")
        return float(value)

    hidden, heads = integer("embedding_length"), integer("attention.head_count")
    head_dim = integer("attention.key_length", hidden // heads)
    if integer("attention.value_length", head_dim) != head_dim:
        raise CheckpointError(f"{f.path}: key and value heads of different sizes are not supported")
    rotary = integer("rope.dimension_count", head_dim)
    if rotary != head_dim:
        raise CheckpointError(f"{f.path}: rotary embedding over part of a head "
                              f"({rotary} of {head_dim} dims) is not supported")
    scaling_type = f.scalar(f"{arch}.rope.scaling.type", "none")
    if scaling_type != "none":
        raise CheckpointError(f"{f.path}: rope scaling {scaling_type!r} is not supported")
    theta = number("rope.freq_base", 10000.0)
    eos = [f.scalar(f"tokenizer.ggml.{k}_token_id", None) for k in ("eos", "eot", "eom")]
    # llama.cpp writes Mistral as llama; a window on every layer makes it Mistral again.
    window = f.scalar(f"{arch}.attention.sliding_window", None) if arch == "llama" else None
    window = None if window is None else integer("attention.sliding_window")
    return ModelConfig(
        model_type="mistral" if window is not None else ARCHITECTURES[arch],
        vocab_size=hf_shape(f.tensor("token_embd.weight"))[0],
        hidden_size=hidden,
        intermediate_size=integer("feed_forward_length"),
        num_layers=integer("block_count"),
        num_heads=heads,
        num_kv_heads=integer("attention.head_count_kv", heads),
        head_dim=head_dim,
        rope_theta=theta,
        rope_scaling=_llama3_scaling(f, head_dim, theta),
        rms_norm_eps=number("attention.layer_norm_rms_epsilon"),
        tie_word_embeddings="output.weight" not in f.tensors,
        attention_bias=arch == "qwen2" or "blk.0.attn_q.bias" in f.tensors,
        qk_norm=arch == "qwen3",
        max_position_embeddings=integer("context_length"),
        sliding_window=window,
        bos_token_id=f.scalar("tokenizer.ggml.bos_token_id", None),
        eos_token_ids=tuple(dict.fromkeys(e for e in eos if e is not None)),
    )


def _llama3_scaling(f: GGUFFile, head_dim: int, theta: float) -> RopeScaling | None:
    """Llama 3.1+ files store RoPE scaling as per-frequency divisors (rope_freqs.weight), not as
    parameters; recover the parameters, accepting only divisors that Llama 3's rule produces."""
    if "rope_freqs.weight" not in f.tensors:
        return None
    divisors = torch.from_numpy(np.array(f.tensors["rope_freqs.weight"].data, dtype=np.float32)).flatten()
    if torch.allclose(divisors, torch.ones_like(divisors)):
        return None
    old_len = int(f.scalar(f"{f.architecture}.rope.scaling.original_context_length", 8192))
    scaling = RopeScaling(float(divisors.max()), 1.0, 4.0, old_len)
    plain = rope_inverse_frequencies(head_dim, theta, None)
    expected = plain / rope_inverse_frequencies(head_dim, theta, scaling)
    if divisors.shape != expected.shape or not torch.allclose(divisors, expected, rtol=1e-3):
        raise CheckpointError(f"{f.path}: rope_freqs.weight holds RoPE frequency factors that are not Llama 3's "
                              "scaling rule; this scaling is not supported")
    return scaling


def check_tensors(f: GGUFFile, names: list[str]) -> None:
    """Every tensor the model needs is present and of a type easyspec can dequantize."""
    for name in names:
        qtype = f.tensor(name).tensor_type
        if qtype not in SUPPORTED_TYPES:
            raise CheckpointError(
                f"{f.path}: tensor {name!r} has quantization type {qtype.name}, which easyspec does not dequantize "
                f"(supported: {', '.join(t.name for t in SUPPORTED_TYPES)}); requantize it, e.g. to Q8_0 or Q4_K"
            )


def _dequantize_rows(rows: np.ndarray, qtype: GGMLQuantizationType) -> Tensor:
    """[r, cols] values of r stored rows: float16/bfloat16 as stored, float32 otherwise."""
    if qtype in (Q.F32, Q.F16):
        return torch.from_numpy(np.array(rows))
    if qtype == Q.BF16:  # stored as raw bytes: reinterpret as 16-bit words, then as bfloat16
        return torch.from_numpy(np.array(rows).view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(dequantize(rows, qtype))


def read_tensor(t: ReaderTensor, dtype: torch.dtype, device: torch.device | str,
                cut: tuple[int, int, int] | None = None) -> Tensor:
    """The tensor (or the `cut` = (dim, start, stop) part of it) in `dtype` on `device`,
    dequantized a chunk of rows at a time."""
    shape = hf_shape(t)
    matrix = len(shape) > 1
    data = t.data if matrix else t.data.reshape(1, -1)  # [rows, stored row]
    rows = cols = slice(None)
    if cut is not None:
        dim, start, stop = cut
        if matrix and dim == 0:
            rows = slice(start, stop)
        else:
            cols = slice(start, stop)
    data = data[rows]
    width = shape[-1]
    out_cols = len(range(width)[cols])
    out = torch.empty(data.shape[0], out_cols, dtype=dtype, device=device)
    step = max(1, _CHUNK_ELEMENTS // width)
    for start in range(0, data.shape[0], step):
        out[start : start + step] = _dequantize_rows(data[start : start + step], t.tensor_type)[:, cols]
    return out if matrix else out.reshape(-1)


def _unpermute_heads(rows: Tensor, head_dim: int) -> Tensor:
    """Undo llama.cpp's q/k row order: per head, rows (pair j, element s) back to (half s, index j)."""
    heads = rows.shape[0] // head_dim
    return rows.reshape(heads, head_dim // 2, 2, *rows.shape[1:]).transpose(1, 2).reshape(rows.shape)


def load_gguf_weights(
    model: Transformer,
    path: str | Path,
    dtype: torch.dtype,
    device: torch.device | str,
    slicer: TensorSlicer | None = None,
    progress: str | None = None,
) -> Transformer:
    """Fill `model` (typically built on the meta device) from the GGUF file's tensors; with a
    `progress` label, a bar (a line off a terminal) counts the tensors."""
    f = open_gguf(path)
    cfg = model.config
    sources = checkpoint_sources(cfg)
    tied = "output.weight" not in f.tensors
    if tied:
        sources["lm_head.weight"] = sources["embed_tokens.weight"]
    check_tensors(f, [gguf_name(n) for names in sources.values() for n in names])
    permuted = f.architecture == "llama"

    sums: dict[tuple[Path, str], Tensor] = {}  # for check_finite

    def read(param: str, hf_name: str) -> Tensor:
        t = f.tensors[gguf_name(hf_name)]
        cut = slicer(param, hf_name, hf_shape(t)) if slicer else None
        tensor = read_tensor(t, dtype, device, cut)
        sums[f.path, t.name] = tensor.sum(dtype=torch.float32)
        if permuted and (".q_proj." in hf_name or ".k_proj." in hf_name):
            tensor = _unpermute_heads(tensor, cfg.head_dim)
        return tensor

    state: dict[str, Tensor] = {}
    with progress_bar(len(sources), f"loading {progress} weights", "tensor", progress is not None) as bar:
        for param, names in sources.items():
            pieces = [read(param, n) for n in names]
            tensor = pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=0)
            expected = tuple(model.get_parameter(param).shape)
            if tuple(tensor.shape) != expected:
                raise CheckpointError(f"{f.path}: {' + '.join(gguf_name(n) for n in names)} has shape "
                                      f"{tuple(tensor.shape)}, but the metadata implies {expected}")
            state[param] = tensor
            bar.update()
    check_finite(sums)
    shared = tied and state["lm_head.weight"].shape == state["embed_tokens.weight"].shape
    if shared:
        state["lm_head.weight"] = state["embed_tokens.weight"]
    model.load_state_dict(state, assign=True, strict=True)
    if shared:
        model.lm_head.weight = model.embed_tokens.weight
    return model


def gguf_stored_dtype(path: str | Path) -> str:
    """The dtype the file's matrices are stored in, as --dtype auto reads it: float32 or float16 when
    the q projection of the first layer is stored so, bfloat16 for BF16 and every quantized type."""
    kind = open_gguf(path).tensor("blk.0.attn_q.weight").tensor_type.name
    return {"F32": "float32", "F16": "float16"}.get(kind, "bfloat16")


def gguf_summary(path: str | Path) -> str:
    """One line: architecture, size and the quantization types the file holds (for logs)."""
    f = open_gguf(path)
    counts: dict[str, int] = {}
    for t in f.tensors.values():
        counts[t.tensor_type.name] = counts.get(t.tensor_type.name, 0) + 1
    params = sum(math.prod(hf_shape(t)) for t in f.tensors.values())
    types = ", ".join(f"{n} {name}" for name, n in sorted(counts.items(), key=lambda kv: -kv[1]))
    return f"{f.path.name}: {f.architecture}, {params / 1e6:.1f}M parameters, tensors {types}"
