"""Read and write Hugging Face-format checkpoint folders.

A folder holds config.json, model.safetensors (or model-0000i-of-0000n.safetensors
with model.safetensors.index.json), and optionally generation_config.json and the
tokenizer files (see easyspec.model.tokenizer).

Weights are read tensor by tensor from memory-mapped safetensors files straight
into the target dtype and device. An optional `slicer` names, per checkpoint
tensor, the slice of it that this process needs; sharded loading (tensor
parallelism) uses it so that each process reads only its own bytes.

Every failure names the file it comes from. Shard names in an index must stay
inside the folder, and every loaded tensor must be finite (checked with one
reduction per tensor and one device sync for the whole model): a NaN or inf
weight, or one that overflows the target dtype, would only show as garbage.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path, PurePosixPath
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor

from easyspec.model.config import ConfigError, ModelConfig, as_id_tuple
from easyspec.model.progress import bar as progress_bar
from easyspec.model.transformer import Transformer
from easyspec.options import GENERATION_CONFIG_FIELDS

# (dim, start, stop) of the part of a checkpoint tensor a process keeps, given the
# model parameter it feeds, the checkpoint tensor's name and its full shape.
TensorSlice = tuple[int, int, int]
TensorSlicer = Callable[[str, str, tuple[int, ...]], TensorSlice | None]

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_FLOAT_DTYPES = {torch.float32, torch.bfloat16, torch.float16}


# What a checkpoint folder may hold for its tokenizer besides the weights and config.json.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "chat_template.jinja", "chat_template.json", "vocab.json", "merges.txt", "tokenizer.model")


class CheckpointError(ValueError):
    """A checkpoint folder cannot be loaded; the message names the file and the fault."""


def parse_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise CheckpointError(f"unknown dtype {name!r}; choose one of {', '.join(DTYPES)}")
    return DTYPES[name]


def read_text(path: Path) -> str:
    """A UTF-8 text file of a checkpoint folder; errors name the file."""
    try:
        return path.read_bytes().decode("utf-8")
    except FileNotFoundError:
        raise CheckpointError(f"{path}: file not found") from None
    except OSError as err:
        raise CheckpointError(f"{path}: cannot be read ({err.strerror or err})") from None
    except UnicodeDecodeError as err:
        raise CheckpointError(f"{path}: not UTF-8 text (byte {err.start}); save it as UTF-8") from None


def read_json(path: Path) -> dict:
    """A JSON object file of a checkpoint folder; errors name the file."""
    try:
        data = json.loads(read_text(path))
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{path}: invalid JSON ({err.msg} at line {err.lineno})") from None
    except RecursionError:
        raise CheckpointError(f"{path}: invalid JSON (nested too deeply)") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def load_config(folder: str | Path) -> ModelConfig:
    """config.json, with EOS ids from generation_config.json when it has them."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: not a checkpoint folder (directory not found)")
    try:
        cfg = ModelConfig.from_hf(read_json(folder / "config.json"), str(folder / "config.json"))
    except ConfigError as err:
        raise CheckpointError(str(err)) from None
    gen_path = folder / "generation_config.json"
    if gen_path.exists():
        eos = read_json(gen_path).get("eos_token_id")
        if eos is not None:
            try:
                cfg = cfg.replace(eos_token_ids=as_id_tuple(eos))
            except ConfigError as err:
                raise CheckpointError(f"{gen_path}: {err}") from None
    return cfg


def stored_dtype(folder: str | Path) -> str | None:
    """config.json's torch_dtype (newer transformers write "dtype"), or None when absent."""
    hf = read_json(Path(folder) / "config.json")
    value = hf.get("torch_dtype", hf.get("dtype"))
    return value if isinstance(value, str) else None


def generation_defaults(folder: str | Path) -> dict[str, float | int]:
    """The sampling settings a folder's generation_config.json sets (none when it has no such file),
    named as SamplingParams' fields: temperature, top_p, top_k, min_p, repetition_penalty, max_new_tokens.

    As in transformers, an explicit "do_sample": false means greedy decoding whatever the file's
    temperature, top_p, top_k and min_p say (repetition_penalty still applies, as it does to greedy
    search there); without do_sample the fields apply as they are (as vLLM reads them)."""
    path = Path(folder) / "generation_config.json"
    if not path.is_file():
        return {}
    config = read_json(path)
    if config.get("do_sample") is False:
        defaults: dict[str, float | int] = {"temperature": 0.0}
        names: tuple[str, ...] = ("repetition_penalty", "max_new_tokens")
    else:
        defaults, names = {}, GENERATION_CONFIG_FIELDS
    for name in names:
        value = config.get(name)
        if value is None:
            continue
        integral = name in ("top_k", "max_new_tokens")
        if isinstance(value, bool) or not isinstance(value, int if integral else (int, float)):
            kind = "an integer" if integral else "a number"
            raise CheckpointError(f"{path}: {name} must be {kind}, got {value!r}")
        defaults[name] = value if integral else float(value)
    return defaults


def checkpoint_sources(cfg: ModelConfig) -> dict[str, list[str]]:
    """Model parameter name -> checkpoint tensor names concatenated along dim 0."""
    sources: dict[str, list[str]] = {"embed_tokens.weight": ["model.embed_tokens.weight"]}
    for i in range(cfg.num_layers):
        hf, ours = f"model.layers.{i}", f"layers.{i}"
        attn = f"{hf}.self_attn"
        sources[f"{ours}.input_norm.weight"] = [f"{hf}.input_layernorm.weight"]
        sources[f"{ours}.attn.qkv_proj.weight"] = [f"{attn}.{p}_proj.weight" for p in "qkv"]
        if cfg.attention_bias:
            sources[f"{ours}.attn.qkv_proj.bias"] = [f"{attn}.{p}_proj.bias" for p in "qkv"]
        sources[f"{ours}.attn.o_proj.weight"] = [f"{attn}.o_proj.weight"]
        if cfg.qk_norm:
            sources[f"{ours}.attn.q_norm.weight"] = [f"{attn}.q_norm.weight"]
            sources[f"{ours}.attn.k_norm.weight"] = [f"{attn}.k_norm.weight"]
        sources[f"{ours}.post_attention_norm.weight"] = [f"{hf}.post_attention_layernorm.weight"]
        sources[f"{ours}.mlp.gate_up_proj.weight"] = [f"{hf}.mlp.gate_proj.weight", f"{hf}.mlp.up_proj.weight"]
        sources[f"{ours}.mlp.down_proj.weight"] = [f"{hf}.mlp.down_proj.weight"]
    sources["norm.weight"] = ["model.norm.weight"]
    sources["lm_head.weight"] = ["lm_head.weight"]
    return sources


def _weight_files(folder: Path) -> dict[str, Path]:
    """Checkpoint tensor name -> the safetensors file that holds it."""
    index = folder / "model.safetensors.index.json"
    if index.exists():
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{index}: missing 'weight_map'")
        files = {name: _shard_path(folder, index, file) for name, file in weight_map.items()}
        for file in set(files.values()):
            if not file.exists():
                raise CheckpointError(f"{file}: listed in {index.name} but not found")
        return files
    single = folder / "model.safetensors"
    if not single.exists():
        raise CheckpointError(
            f"{folder}: no model.safetensors or model.safetensors.index.json "
            "(only safetensors checkpoints are supported)"
        )
    with _open_safetensors(single) as f:
        return {name: single for name in f.keys()}


def _shard_path(folder: Path, index: Path, name: Any) -> Path:
    """The folder's file an index entry names. Names are checked as written, not resolved, so that a
    shard may still be a symlink (as in the Hugging Face cache) but no entry reaches outside the folder."""
    shard = PurePosixPath(name) if isinstance(name, str) else None
    if shard is None or not name or shard.is_absolute() or ".." in shard.parts or "\\" in name:
        raise CheckpointError(f"{index}: weight_map entry {name!r} is not a file name inside the folder")
    return folder / shard


def _open_safetensors(path: Path):  # -> safetensors' handle, usable as a context manager
    try:
        return safe_open(path, framework="pt")
    except (SafetensorError, OSError) as err:
        raise CheckpointError(f"{path}: not a readable safetensors file ({err}); download it again") from None


def check_finite(sums: dict[tuple[Path, str], Tensor]) -> None:
    """`sums` maps (file, tensor name) to the loaded tensor's float32 sum, all on one device. A sum is
    finite exactly when every element is (finite weights summing past 3e38 do not exist), so one
    reduction per tensor and one sync here check the whole model."""
    if not sums:
        return
    finite = torch.isfinite(torch.stack(list(sums.values())))
    if not bool(finite.all()):
        path, name = list(sums)[int((~finite).nonzero()[0])]
        raise CheckpointError(f"{path}: tensor {name!r} holds NaN or inf values (or overflows the chosen "
                              "--dtype); the checkpoint is damaged, or needs a wider --dtype")


def _expected_shape(model: Transformer, param: str) -> tuple[int, ...]:
    return tuple(model.get_parameter(param).shape)


def load_weights(
    model: Transformer,
    folder: str | Path,
    dtype: torch.dtype,
    device: torch.device | str,
    slicer: TensorSlicer | None = None,
    progress: str | None = None,
) -> Transformer:
    """Fill `model` (typically built on the meta device) from the folder's safetensors; with a
    `progress` label, a bar (a line off a terminal) counts the tensors."""
    folder = Path(folder)
    cfg = model.config
    files = _weight_files(folder)
    sources = checkpoint_sources(cfg)
    tied = cfg.tie_word_embeddings and "lm_head.weight" not in files
    if tied:
        sources["lm_head.weight"] = sources["embed_tokens.weight"]
    state: dict[str, Tensor] = {}
    sums: dict[tuple[Path, str], Tensor] = {}  # for check_finite
    with ExitStack() as stack:
        handles = {}

        def read(param: str, name: str) -> Tensor:
            if name not in files:
                raise CheckpointError(f"{folder}: checkpoint has no tensor {name!r}")
            path = files[name]
            if path not in handles:
                handles[path] = stack.enter_context(_open_safetensors(path))
            try:
                part = handles[path].get_slice(name)
                shape = tuple(part.get_shape())
                cut = slicer(param, name, shape) if slicer else None
                if cut is None:
                    tensor = part[:]
                else:
                    dim, start, stop = cut
                    tensor = part[start:stop] if dim == 0 else part[:, start:stop]
            except SafetensorError as err:  # e.g. an index that names the wrong shard
                raise CheckpointError(f"{path}: cannot read tensor {name!r} ({err})") from None
            if tensor.dtype not in _FLOAT_DTYPES:
                raise CheckpointError(f"{path.name}: tensor {name!r} has unsupported dtype {tensor.dtype}")
            tensor = tensor.to(device=device, dtype=dtype)
            sums[path, name] = tensor.sum(dtype=torch.float32)
            return tensor

        bar = stack.enter_context(progress_bar(len(sources), f"loading {progress} weights", "tensor",
                                               progress is not None))
        for param, names in sources.items():
            pieces = [read(param, n) for n in names]
            tensor = pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=0)
            expected = _expected_shape(model, param)
            if tuple(tensor.shape) != expected:
                raise CheckpointError(
                    f"{files[names[0]].name}: {' + '.join(names)} has shape {tuple(tensor.shape)}, "
                    f"but config.json implies {expected}"
                )
            state[param] = tensor
            bar.update()
    check_finite(sums)
    if tied and state["lm_head.weight"].shape == state["embed_tokens.weight"].shape:
        state["lm_head.weight"] = state["embed_tokens.weight"]
    model.load_state_dict(state, assign=True, strict=True)
    if tied and state["lm_head.weight"] is state["embed_tokens.weight"]:
        model.lm_head.weight = model.embed_tokens.weight
    return model


def load_model(
    folder: str | Path,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    cfg: ModelConfig | None = None,
) -> Transformer:
    """Load a whole (unsharded) model for one device."""
    cfg = cfg or load_config(folder)
    with torch.device("meta"):
        model = Transformer(cfg)
    return load_weights(model, folder, dtype, device).eval()


def hf_state_dict(model: Transformer) -> Iterator[tuple[str, Tensor]]:
    """The model's weights under checkpoint names, fused projections split again."""
    cfg = model.config
    for param, names in checkpoint_sources(cfg).items():
        if param == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        tensor = model.get_parameter(param).detach()
        if len(names) == 1:
            yield names[0], tensor
            continue
        if "qkv_proj" in param:
            sizes = [cfg.q_size, cfg.kv_size, cfg.kv_size]
        else:
            sizes = [cfg.intermediate_size] * 2
        yield from zip(names, tensor.split(sizes, dim=0), strict=True)


def _save_shard(tensors: dict[str, Tensor], path: Path) -> None:
    save_file(tensors, path, metadata={"format": "pt"})
    path.chmod(0o644)  # safetensors writes owner-only files; a checkpoint is meant to be shared


def save_checkpoint(model: Transformer, folder: str | Path, max_shard_bytes: int = 1 << 30) -> None:
    """Write config.json and safetensors shards (with an index when there is more than one)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    dtype = str(model.embed_tokens.weight.dtype).removeprefix("torch.")
    (folder / "config.json").write_text(json.dumps(model.config.to_hf(dtype), indent=2) + "\n")
    shards: list[dict[str, Tensor]] = [{}]
    size = 0
    for name, tensor in hf_state_dict(model):
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = tensor.contiguous().cpu()
        size += nbytes
    if len(shards) == 1:
        _save_shard(shards[0], folder / "model.safetensors")
        return
    weight_map = {}
    for i, shard in enumerate(shards, start=1):
        file = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        _save_shard(shard, folder / file)
        weight_map.update(dict.fromkeys(shard, file))
    total = sum(t.numel() * t.element_size() for s in shards for t in s.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
