"""Open a checkpoint given as a path: a Hugging Face folder or a GGUF file.

Everything that takes a model path (--model, --draft, the Python API) goes
through these functions; they pick the format by what the path is (a
file, or a name ending in .gguf, is read as GGUF) and return the same
ModelConfig, weights and Tokenizer either way. The GGUF modules are imported
only when a GGUF file is opened, so folders need no gguf library. `eos_ids`
reads the two together: the ids that end a reply.
"""

from __future__ import annotations

from pathlib import Path

import torch

from easyspec.model import checkpoint
from easyspec.model.checkpoint import TensorSlicer
from easyspec.model.config import ModelConfig
from easyspec.model.tokenizer import Tokenizer
from easyspec.model.transformer import Transformer


def is_gguf(path: str | Path) -> bool:
    path = Path(path)
    return path.suffix.lower() == ".gguf" or path.is_file()


def load_config(path: str | Path) -> ModelConfig:
    if is_gguf(path):
        from easyspec.model.gguf_file import gguf_config

        return gguf_config(path)
    return checkpoint.load_config(path)


def stored_dtype(path: str | Path) -> str | None:
    """The dtype a checkpoint's weights are stored in (config.json's torch_dtype, or the GGUF
    tensors' type), or None when the checkpoint does not say."""
    if is_gguf(path):
        from easyspec.model.gguf_file import gguf_stored_dtype

        return gguf_stored_dtype(path)
    return checkpoint.stored_dtype(path)


def generation_defaults(path: str | Path) -> dict[str, float | int]:
    """The sampling settings of a checkpoint's generation_config.json (a GGUF file has none)."""
    if is_gguf(path):
        return {}
    return checkpoint.generation_defaults(path)


def load_weights(model: Transformer, path: str | Path, dtype: torch.dtype, device: torch.device | str,
                 slicer: TensorSlicer | None = None, progress: str | None = None) -> Transformer:
    """Fill `model` (built on the meta device, sharded or not) from the checkpoint; `progress`
    labels a progress bar over its tensors (None: none)."""
    if is_gguf(path):
        from easyspec.model.gguf_file import load_gguf_weights

        return load_gguf_weights(model, path, dtype, device, slicer, progress)
    return checkpoint.load_weights(model, path, dtype, device, slicer, progress)


def load_model(path: str | Path, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
               cfg: ModelConfig | None = None) -> Transformer:
    """A whole (unsharded) model on one device."""
    cfg = cfg or load_config(path)
    with torch.device("meta"):
        model = Transformer(cfg)
    return load_weights(model, path, dtype, device).eval()


def load_tokenizer(path: str | Path) -> Tokenizer | None:
    """The checkpoint's tokenizer; None for a folder without tokenizer.json (a GGUF file always has one)."""
    if is_gguf(path):
        from easyspec.model.gguf_tokenizer import gguf_tokenizer

        return gguf_tokenizer(path)
    return Tokenizer.from_folder(path)


def eos_ids(cfg: ModelConfig, tokenizer: Tokenizer | None) -> list[int]:
    """The ids that end a reply: the config's EOS ids and the tokenizer's EOS token, sorted."""
    ids = set(cfg.eos_token_ids)
    if tokenizer is not None and tokenizer.eos_token:
        eos = tokenizer.token_id(tokenizer.eos_token)
        if eos is not None:
            ids.add(eos)
    return sorted(ids)
