"""`easyspec distill` end to end: base, data, draft, training, export.

Everything about a run that must not change between a stop and a resume (the
base's and the draft's shapes, the layouts, the data settings) is written to
OUT/checkpoint/run.json at the start; a later run in the same folder continues
only if it asks for the same.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from easyspec.distill import data
from easyspec.distill.data import Batches, DataError
from easyspec.distill.export import export_draft
from easyspec.distill.settings import DEFAULT_GEN_BATCH, DistillOptions, check_options
from easyspec.distill.shape import draft_config, init_draft, non_embedding_parameters
from easyspec.distill.train import Stopped, Trainer
from easyspec.model import kernels
from easyspec.model.checkpoint import parse_dtype
from easyspec.model.loader import eos_ids, load_config, load_model, load_tokenizer
from easyspec.model.tokenizer import Tokenizer
from easyspec.model.transformer import Transformer
from easyspec.parallel.layer_parallel import LayerLayout, LayoutError


def _log(message: str) -> None:
    print(f"[distill] {message}", file=sys.stderr, flush=True)


def _base_dtype(device: torch.device) -> torch.dtype:
    """The teacher runs in bfloat16 on a GPU (as it is served), in float32 on the CPU."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def _run_key(opts: DistillOptions, base_cfg: dict, draft_cfg: dict, layouts: list[str]) -> dict[str, Any]:
    """What a resumed run must share with the one it continues."""
    return {"base": base_cfg, "draft": draft_cfg, "init": opts.init, "layouts": layouts,
            "parallel_policy": opts.parallel_policy, "corpus": opts.corpus, "corpus_only": opts.corpus_only,
            "corpus_share": opts.corpus_share, "settings": {k: v for k, v in asdict(opts.train).items()
                                                           if k not in ("steps", "minutes", "checkpoint_minutes")}}


def _open_run(out: Path, key: dict[str, Any]) -> None:
    checkpoint = out / "checkpoint"
    if (checkpoint / "run.json").exists():
        saved = json.loads((checkpoint / "run.json").read_text())
        changed = sorted(k for k in key if saved.get(k) != key[k])
        if changed:
            raise ValueError(f"{out} holds a stopped run with other settings ({', '.join(changed)} differ); "
                             f"repeat its command, choose another --out, or delete {checkpoint}")
        return
    if (out / "config.json").exists():
        raise ValueError(f"{out} already holds a finished draft; choose another --out or remove it")
    if out.exists() and any(out.iterdir()):
        raise ValueError(f"{out} is not empty; choose a new --out folder")
    checkpoint.mkdir(parents=True, exist_ok=True)
    (checkpoint / "run.json").write_text(json.dumps(key, indent=2) + "\n")


def _generated(opts: DistillOptions, base: Transformer, tokenizer: Tokenizer, path: Path,
               gen_batch: int) -> tuple[data.Rows, dict]:
    if path.exists():
        rows, summary = data.load_rows(path, base.config)
        _log(f"read {len(rows)} generated rows ({summary['generated_tokens']:,} tokens) from {path}")
        return rows, summary
    chat = data.read_prompt_set(opts.prompts) if opts.prompts else []
    code = data.read_prompt_set(opts.code_prompts) if opts.code_prompts else []
    _log(f"generating {1 + opts.samples} continuations of {len(chat)} chat and {len(code)} code prompts, "
         f"up to {opts.gen_tokens} tokens, {gen_batch} at once")
    deadline = None if opts.gen_minutes is None else time.monotonic() + 60 * opts.gen_minutes
    rows, summary = data.generate_rows(base, tokenizer, chat, code, opts.samples, opts.gen_tokens,
                                       opts.temperature, opts.top_p, gen_batch, opts.train.seed, _log, deadline)
    data.save_rows(rows, path, base.config, summary)
    _log(f"{summary['generated_tokens']:,} tokens in {summary['seconds']}s "
         f"({summary['generated_tokens_per_s']:,} tokens/s), saved to {path}")
    return rows, summary


def distill(opts: DistillOptions, on_step: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Make (or continue making) a draft in opts.out; returns its distill.json record. With
    opts.data_only: only generate the base's text into opts.data; returns its summary.

    Raises train.Stopped when interrupted (a checkpoint is written first)."""
    check_options(opts)
    started = time.monotonic()
    out = Path(opts.out)
    device = torch.device(opts.device)
    base_cfg = load_config(opts.model)
    tokenizer = load_tokenizer(opts.model)
    if tokenizer is None:
        raise DataError(f"{opts.model}: no tokenizer.json; distillation reads prompts and corpus text through it")
    gen_batch = opts.gen_batch or DEFAULT_GEN_BATCH[device.type]
    if opts.data_only:
        base = load_model(opts.model, _base_dtype(device), device)
        return {"generated_data": _generated(opts, base, tokenizer, Path(opts.data), gen_batch)[1]}
    cfg = draft_config(base_cfg, opts.shape)
    try:
        built = {n: LayerLayout.choose(opts.groups, cfg.num_layers, n, opts.keep_first, opts.keep_last)
                 for n in opts.layer_parallel}
    except LayoutError as err:
        raise ValueError(str(err)) from None
    # Sizes whose layouts coincide (a short draft) share one pass: "N=2/4".
    sizes_of: dict[LayerLayout, list[int]] = {}
    for n, layout in built.items():
        sizes_of.setdefault(layout, []).append(n)
    passes = [("N=" + "/".join(map(str, sizes)), layout) for layout, sizes in sizes_of.items()]
    _open_run(out, _run_key(opts, base_cfg.to_hf(), cfg.to_hf(), [str(layout) for _, layout in passes]))
    base_ne, draft_ne = non_embedding_parameters(base_cfg), non_embedding_parameters(cfg)
    _log(f"draft: {cfg.num_layers} layers, width {cfg.hidden_size}, {cfg.num_heads}/{cfg.num_kv_heads} heads, MLP "
         f"{cfg.intermediate_size}: {draft_ne / 1e6:.2f}M non-embedding parameters, {draft_ne / base_ne:.1%} of the "
         f"base's {base_ne / 1e6:.2f}M")
    base = load_model(opts.model, _base_dtype(device), device)
    stops = eos_ids(base_cfg, tokenizer)
    generated = summary = None
    if not opts.corpus_only:
        data_path = Path(opts.data) if opts.data else out / "checkpoint" / "data.pt"
        generated, summary = _generated(opts, base, tokenizer, data_path, gen_batch)
    corpus = corpus_summary = None
    if opts.corpus:
        corpus, corpus_summary = data.corpus_rows(opts.corpus, tokenizer, stops[0] if stops else 0,
                                                  opts.train.seq_len, int(opts.corpus_max_mb * 2**20))
        _log(f"corpus: {corpus_summary['files']} files, {corpus_summary['tokens']:,} tokens, "
             f"{corpus_summary['windows']} windows")
    batches = Batches(generated, corpus, opts.train.batch_size, opts.corpus_share, opts.train.seq_len,
                      opts.train.seed)
    draft, taken = init_draft(base, cfg, opts.init, opts.train.seed)
    if opts.corpus_only:
        del base  # the base gave the draft its start; no teacher from here on
        base = None
    trainer = Trainer(draft, base, batches, opts.train, passes, opts.parallel_policy, out / "checkpoint", _log)
    if trainer.load():
        _log(f"resuming from step {trainer.step} of {trainer.total or 'a time budget'}")
    record = {
        "command": opts.command,
        "base": opts.model,
        "base_non_embedding_parameters": base_ne,
        "non_embedding_parameters": draft_ne,
        "non_embedding_ratio": round(draft_ne / base_ne, 4),
        "parameters": cfg.num_parameters(),
        "init": opts.init,
        "base_layers": taken,
        "layer_parallel": [{"sizes": sizes, "layout": str(layout)} for layout, sizes in sizes_of.items()],
        "parallel_policy": opts.parallel_policy,
        "teacher": None if opts.corpus_only else "KL(base || draft) on the base's own text",
        "generated_data": summary,
        "corpus": corpus_summary,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
    }
    shown = ", ".join(f"{name} layout {layout}" for name, layout in passes)
    _log(f"training on {device}: the exact forward" + (f" and the layer-parallel one ({shown})" if shown else "")
         + (", next-token loss on the corpus only" if opts.corpus_only else ", KL to the base + next-token loss"))
    kernels.use_fused(opts.compile)
    try:
        result = trainer.run(on_step)
    except Stopped as stop:
        # Whatever was learned so far is saved as a usable draft too; the checkpoint stays for resuming.
        export_draft(draft, out, opts.model, stops, {**record, "stopped_at_step": stop.step},
                     parse_dtype(opts.save_dtype))
        raise
    finally:
        kernels.use_fused(False)
    record.update(result, total_minutes=round((time.monotonic() - started) / 60, 3))
    export_draft(draft, out, opts.model, stops, record, parse_dtype(opts.save_dtype))
    if trainer.step >= trainer.total:
        shutil.rmtree(out / "checkpoint")
        _log(f"done: {trainer.step} steps; wrote the draft to {out}")
    else:
        _log(f"the time budget ended at step {trainer.step} of {trainer.total}; wrote the draft so far to {out} "
             "(the same command continues from its checkpoint)")
    return record
