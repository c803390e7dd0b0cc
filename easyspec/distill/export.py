"""Write a draft as a Hugging Face-format folder that easyspec and transformers both load."""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path
from typing import Any

import torch

from easyspec.model.checkpoint import TOKENIZER_FILES, save_checkpoint
from easyspec.model.config import ModelConfig
from easyspec.model.loader import is_gguf
from easyspec.model.transformer import Transformer


def copy_tokenizer(base: str | Path, out: Path, max_len: int) -> None:
    """The base's tokenizer files into `out`: copied from a folder, or written from a GGUF file's
    metadata as `easyspec convert` writes them."""
    if is_gguf(base):
        from easyspec.model.gguf_tokenizer import write_tokenizer_files

        write_tokenizer_files(base, out, max_len)
        return
    for name in TOKENIZER_FILES:
        if (Path(base) / name).is_file():
            shutil.copyfile(Path(base) / name, out / name)


def generation_config(cfg: ModelConfig, stops: list[int]) -> dict[str, Any]:
    """generation_config.json: the ids that end a reply (EOS, also used as padding) and BOS."""
    out: dict[str, Any] = {}
    if cfg.bos_token_id is not None:
        out["bos_token_id"] = cfg.bos_token_id
    if stops:
        out["eos_token_id"] = stops[0] if len(stops) == 1 else stops
        out["pad_token_id"] = stops[0]
    return out


def export_draft(model: Transformer, out: Path, base: str | Path, stops: list[int], record: dict[str, Any],
                 dtype: torch.dtype) -> None:
    """config.json, model.safetensors, the base's tokenizer files, generation_config.json and distill.json."""
    out.mkdir(parents=True, exist_ok=True)
    model = copy.deepcopy(model).to(device="cpu", dtype=dtype).eval()  # the caller's model stays as it is
    save_checkpoint(model, out)
    copy_tokenizer(base, out, model.config.max_position_embeddings)
    generation = generation_config(model.config, stops)
    (out / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    (out / "distill.json").write_text(json.dumps(record, indent=2) + "\n")
