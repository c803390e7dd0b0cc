"""`easyspec zoo inflate`: a trained model written at a larger shape, computing the same function.

End-to-end timings mean most at real model shapes, and acceptance means something only for a
trained pair. Zero-padding a trained pair to, say, an 8B-shape base and a 1B-wide draft gives
both at once: every weight of the real shape is streamed and multiplied, while the logits stay
those of the trained models (easyspec.zoo.shape says where each piece goes and why the
function is unchanged).

Only the trained values are written (easyspec.zoo.sparse_writer: the zeros are holes in the
files), so inflating to an 8B shape takes about as long as copying the small model, and memory
holds the trained model plus one tensor's non-zero block. Every tensor is stored in `dtype`:
float32 keeps the trained function to float32 rounding; bfloat16 also rounds the rescaled
weights (norms, q projections), the noise any bfloat16 checkpoint has. Tokenizer files, chat
template and generation config are copied unchanged, and inflate.json records the source and
the layout.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import Tensor

from easyspec.model.checkpoint import DTYPES, TOKENIZER_FILES, hf_state_dict, load_config, load_model
from easyspec.model.config import ModelConfig
from easyspec.zoo.shape import InflateError, Plan, Shape, plan_inflation
from easyspec.zoo.sparse_writer import Placed, SparseShardWriter

SIDE_FILES = (*TOKENIZER_FILES, "generation_config.json")  # copied unchanged
DEFAULT_SHARD_BYTES = 4 << 30  # logical size: the zeros in a shard are not stored


def inflate(source: str | Path, shape: Shape, out: str | Path, draft: bool = False, dtype: str = "bfloat16",
            overwrite: bool = False, max_shard_bytes: int = DEFAULT_SHARD_BYTES) -> dict:
    """Write `source` (a checkpoint folder, or a GGUF file when `easyspec convert` exists) inflated
    to `shape` into `out`; returns the summary also written to out/inflate.json."""
    start = time.perf_counter()
    source, out = Path(source), Path(out)
    if dtype not in DTYPES:
        raise InflateError(f"--dtype {dtype!r}: choose one of {', '.join(DTYPES)}")
    if out.is_file():
        raise InflateError(f"--out {out} is a file; give a folder to write")
    with tempfile.TemporaryDirectory(prefix="easyspec-inflate-") as scratch:
        folder = _as_folder(source, Path(scratch))
        plan = plan_inflation(load_config(folder), shape, draft)
        if out.exists() and any(out.iterdir()) and not overwrite:
            raise InflateError(f"{out} exists and is not empty; choose a new --out or pass --overwrite")
        trained = dict(hf_state_dict(load_model(folder)))
        # Written next to `out` and renamed at the end: a half-written folder never looks like a checkpoint.
        staging = out.with_name(f".{out.name}.partial")
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        try:
            writer = SparseShardWriter(staging, DTYPES[dtype], max_shard_bytes)
            for tensor in target_tensors(plan, trained):
                writer.add(tensor)
            size = writer.close()
            (staging / "config.json").write_text(json.dumps(plan.target.to_hf(dtype), indent=2) + "\n")
            for name in SIDE_FILES:
                if (folder / name).is_file():
                    shutil.copy2(folder / name, staging / name)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
    summary = {
        "source": str(source),
        "shape": shape.spec,
        "role": "draft" if draft else "base",
        "dtype": dtype,
        "added_layers": plan.target.num_layers - plan.source.num_layers,
        "rope_stride": plan.rope_stride,
        "q_heads": list(plan.q_heads),
        "kv_heads": [list(h) for h in plan.kv_heads],
        "notes": list(plan.notes),
        "source_config": plan.source.to_hf(dtype),
        "bytes": size,
        "seconds": round(time.perf_counter() - start, 2),
    }
    (staging / "inflate.json").write_text(json.dumps(summary, indent=2) + "\n")
    if out.exists():
        shutil.rmtree(out)
    staging.rename(out)
    return summary


def _as_folder(source: Path, scratch: Path) -> Path:
    """A checkpoint folder holding `source`: itself, or a GGUF file converted by `easyspec convert`."""
    if source.is_dir():
        return source
    if not source.is_file():
        raise InflateError(f"--model {source}: no such checkpoint folder or file")
    converted = scratch / "source"
    done = subprocess.run([sys.executable, "-m", "easyspec", "convert", str(source), str(converted)],
                          capture_output=True, text=True)
    if done.returncode != 0 or not (converted / "config.json").is_file():
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise InflateError(f"--model {source}: not a checkpoint folder, and `easyspec convert` could not turn it "
                           f"into one ({last})")
    return converted


def target_tensors(plan: Plan, trained: dict[str, Tensor]) -> Iterator[Placed]:
    """The inflated checkpoint's tensors under Hugging Face names, in file order, one at a time.
    `trained`: the source's tensors under the same names (float32)."""
    src, dst = plan.source, plan.target
    width, every = slice(0, src.hidden_size), slice(None)
    yield Placed("model.embed_tokens.weight", (src.vocab_size, dst.hidden_size), (every, width),
                 trained["model.embed_tokens.weight"])
    for i in range(dst.num_layers):
        if i < src.num_layers:
            yield from _layer_tensors(plan, i, trained)
        else:
            yield from (Placed(name, shape) for name, shape in _layer_shapes(dst, i).items())
    yield Placed("model.norm.weight", (dst.hidden_size,), (width,), trained["model.norm.weight"] * plan.norm_scale)
    if not dst.tie_word_embeddings:
        yield Placed("lm_head.weight", (src.vocab_size, dst.hidden_size), (every, width), trained["lm_head.weight"])


def _layer_tensors(plan: Plan, i: int, trained: dict[str, Tensor]) -> Iterator[Placed]:
    """Layer i's tensors, each trained tensor placed and rescaled as easyspec.zoo.shape describes."""
    src, dst = plan.source, plan.target
    width, inter = slice(0, src.hidden_size), slice(0, src.intermediate_size)
    q_rows = plan.q_rows()
    kv_rows = torch.cat([plan.kv_rows(c) for c in range(plan.copies)])  # every copy's rows, copy by copy
    attn_index = {"q_proj": (q_rows,), "k_proj": (kv_rows,), "v_proj": (kv_rows,)}
    scales = {"q_proj": plan.q_scale, "k_proj": plan.k_scale, "v_proj": 1.0}
    copies = {"q_proj": 1, "k_proj": plan.copies, "v_proj": plan.copies}
    for name, shape in _layer_shapes(dst, i).items():
        values = trained[name]
        kind = name.split(".")[-2]  # e.g. q_proj, input_layernorm, down_proj
        if kind in attn_index:  # q/k/v weight [rows, D] or bias [rows]: rows into heads, k/v once per copy
            values = (values * scales[kind]).repeat((copies[kind],) + (1,) * (values.dim() - 1))
            index = attn_index[kind] + ((width,) if name.endswith("weight") else ())
        elif kind == "o_proj":
            index = (width, q_rows)
        elif kind in ("q_norm", "k_norm"):
            values = values * (plan.k_norm_scale if kind == "k_norm" else 1.0)
            index = (plan.head_dims(),)
        elif kind in ("input_layernorm", "post_attention_layernorm"):
            values, index = values * plan.norm_scale, (width,)
        else:
            index = (width, inter) if kind == "down_proj" else (inter, width)
        yield Placed(name, shape, index, values)


def _layer_shapes(cfg: ModelConfig, i: int) -> dict[str, tuple[int, ...]]:
    """Checkpoint name -> shape of every tensor of layer i, in file order."""
    hf, D, inter = f"model.layers.{i}", cfg.hidden_size, cfg.intermediate_size
    attn = f"{hf}.self_attn"
    shapes = {f"{hf}.input_layernorm.weight": (D,), f"{attn}.q_proj.weight": (cfg.q_size, D),
              f"{attn}.k_proj.weight": (cfg.kv_size, D), f"{attn}.v_proj.weight": (cfg.kv_size, D)}
    if cfg.attention_bias:
        shapes.update({f"{attn}.q_proj.bias": (cfg.q_size,), f"{attn}.k_proj.bias": (cfg.kv_size,),
                       f"{attn}.v_proj.bias": (cfg.kv_size,)})
    shapes[f"{attn}.o_proj.weight"] = (D, cfg.q_size)
    if cfg.qk_norm:
        shapes.update({f"{attn}.q_norm.weight": (cfg.head_dim,), f"{attn}.k_norm.weight": (cfg.head_dim,)})
    shapes.update({f"{hf}.post_attention_layernorm.weight": (D,), f"{hf}.mlp.gate_proj.weight": (inter, D),
                   f"{hf}.mlp.up_proj.weight": (inter, D), f"{hf}.mlp.down_proj.weight": (D, inter)})
    return shapes
