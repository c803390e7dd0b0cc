"""`easyspec convert FILE.gguf OUT_DIR`: a GGUF file as a Hugging Face checkpoint folder.

The folder holds config.json, model.safetensors (dequantized to --dtype),
tokenizer.json, tokenizer_config.json (chat template, special tokens) and
generation_config.json (EOS ids), and loads in easyspec and in transformers.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from easyspec.options import DTYPE_NAMES


def convert_gguf(path: str | Path, out_dir: str | Path, dtype: str = "float32") -> Path:
    """Write the folder; returns it. OUT_DIR must not exist yet or be empty."""
    from easyspec.model.checkpoint import parse_dtype, save_checkpoint
    from easyspec.model.gguf_file import gguf_config, gguf_summary
    from easyspec.model.gguf_tokenizer import write_tokenizer_files
    from easyspec.model.loader import load_model

    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"{out}: already exists and is not an empty folder; pick a new output folder")
    cfg = gguf_config(path)
    model = load_model(path, parse_dtype(dtype), "cpu", cfg)
    print(gguf_summary(path), flush=True)
    save_checkpoint(model, out)
    generation = {"bos_token_id": cfg.bos_token_id, "eos_token_id": list(cfg.eos_token_ids)}
    (out / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    write_tokenizer_files(path, out, cfg.max_position_embeddings)
    return out


def cmd_convert(args: argparse.Namespace) -> int:
    out = convert_gguf(args.file, args.out_dir, args.dtype)
    print(f"wrote {out} ({args.dtype}): easyspec generate --model {out} --prompt ...")
    return 0


class _Formatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """The description as written, defaults after each flag's help."""


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("convert", help="convert a GGUF file to a Hugging Face checkpoint folder",
                       description=__doc__, formatter_class=_Formatter)
    p.add_argument("file", help="the .gguf file (llama, qwen2 or qwen3 architecture)")
    p.add_argument("out_dir", help="the folder to write (new or empty)")
    p.add_argument("--dtype", default="float32", choices=DTYPE_NAMES, help="dtype of the written weights")
    p.set_defaults(func=cmd_convert)
