"""`easyspec distill` (make a draft for a base) and `easyspec acceptance` (measure drafts on one device)."""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

from easyspec.cli.args import ENGINE_DEFAULTS, HelpFormatter
from easyspec.distill import HELD_OUT_PROMPTS
from easyspec.distill.settings import (
    DEFAULT_GEN_BATCH,
    DEFAULT_MINUTES,
    INITS,
    DistillOptions,
    DraftShape,
    TrainSettings,
)
from easyspec.options import DEFAULT_MAX_NEW_TOKENS, DTYPE_NAMES, Calibration, ParallelPolicy

DEFAULTS = DistillOptions(model="", out="")  # every flag's default is the options' own
TRAIN = TrainSettings()


def _sizes(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected sizes like 2 or 2,4; got {text!r}") from None


def _device(name: str | None) -> str:
    """The --device flag (checked), or cuda when there is one."""
    import torch

    if name is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name not in ("cpu", "cuda"):
        raise ValueError(f"unknown --device {name!r}; choose cpu or cuda")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is visible; use --device cpu")
    return name


def _add_layer_parallel_args(p: argparse.ArgumentParser, what: str) -> None:
    g = p.add_argument_group("layer-parallel drafting (as `easyspec generate --method easyspec` lays it out)")
    g.add_argument("--layer-parallel", type=_sizes, default=(), metavar="N[,N...]", help=what)
    g.add_argument("--keep-first", type=int, default=ENGINE_DEFAULTS.keep_first,
                   help="leading draft layers kept sequential")
    g.add_argument("--keep-last", type=int, default=ENGINE_DEFAULTS.keep_last,
                   help="trailing draft layers kept sequential")
    g.add_argument("--groups", help="explicit layer groups, e.g. 0,1-2,3-4,5,6 (with one --layer-parallel size)")
    g.add_argument("--parallel-policy", default=ENGINE_DEFAULTS.parallel_policy, choices=ParallelPolicy.names(),
                   help="what runs in parallel")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("distill", help="make a draft model for a base model by distillation",
                       description="Make a draft for --model: it generates text from prompt sets, then trains a "
                                   "small model of the same tokenizer to match its token distributions. Stopped "
                                   "runs continue when the same command is run again.",
                       formatter_class=HelpFormatter)
    p.add_argument("--model", required=True, help="the base model: a Hugging Face folder or a GGUF file")
    p.add_argument("--out", help="folder for the draft (and the checkpoint while it trains)")
    p.add_argument("--device", help="cuda or cpu (default: cuda when there is one)")
    d = p.add_argument_group("draft shape (default: a quarter of the base's layers, as wide as the base)")
    d.add_argument("--layers", type=int, help="decoder layers of the draft")
    d.add_argument("--hidden-size", type=int, help="width of the draft (default: the base's)")
    d.add_argument("--heads", type=int, help="attention heads (default: the base's)")
    d.add_argument("--kv-heads", type=int, help="key/value heads (default: the base's)")
    d.add_argument("--intermediate-size", type=int, help="MLP width")
    d.add_argument("--head-dim", type=int, help="width of one head (default: the base's)")
    d.add_argument("--init", default=DEFAULTS.init, choices=INITS,
                   help="base: copy embeddings, LM head, final norm and evenly spaced layers of the base; "
                        "random: fresh layers (embeddings still copied when the width matches)")
    d.add_argument("--save-dtype", default=DEFAULTS.save_dtype, choices=DTYPE_NAMES, help="dtype of the saved weights")
    _add_layer_parallel_args(p, "also train through the layer-parallel forward of these drafting sizes, "
                                "e.g. 2,4 (one extra pass each)")
    g = p.add_argument_group("data")
    g.add_argument("--prompts", default=DEFAULTS.prompts,
                   help="chat prompts (Spec-Bench jsonl), through the chat template; '' for none")
    g.add_argument("--code-prompts", default=DEFAULTS.code_prompts,
                   help="code prompts continued as raw text (Spec-Bench jsonl); '' for none")
    g.add_argument("--samples", type=int, default=DEFAULTS.samples,
                   help="sampled continuations per prompt, besides the greedy one")
    g.add_argument("--gen-tokens", type=int, default=DEFAULTS.gen_tokens, help="longest continuation")
    g.add_argument("--gen-batch", type=int, help="continuations generated at once (default: "
                   f"{DEFAULT_GEN_BATCH['cuda']} on CUDA, {DEFAULT_GEN_BATCH['cpu']} on CPU)")
    g.add_argument("--gen-minutes", type=float,
                   help="stop generating after this long and keep what the base has written (greedy replies first)")
    g.add_argument("--temperature", type=float, default=DEFAULTS.temperature, help="of the sampled continuations")
    g.add_argument("--top-p", type=float, default=DEFAULTS.top_p, help="of the sampled continuations")
    g.add_argument("--data", help="file of generated text: read if it exists, else written (to share between runs)")
    g.add_argument("--data-only", action="store_true",
                   help="only let the base write its text into --data (for drafts trained on it later)")
    g.add_argument("--corpus", help="a text file or a folder of them to mix in")
    g.add_argument("--corpus-share", type=float, default=DEFAULTS.corpus_share,
                   help="share of each batch's rows from the corpus")
    g.add_argument("--corpus-only", action="store_true",
                   help="train on the corpus alone with next-token loss (no text or distributions from the base)")
    g.add_argument("--corpus-max-mb", type=float, default=DEFAULTS.corpus_max_mb,
                   help="read at most this much corpus text")
    t = p.add_argument_group("training")
    t.add_argument("--minutes", type=float,
                   help=f"training time (data generation not counted); default {DEFAULT_MINUTES:g} without --steps")
    t.add_argument("--steps", type=int, help="optimiser steps (with --minutes: at most this many)")
    t.add_argument("--batch-size", type=int, default=TRAIN.batch_size, help="rows per step")
    t.add_argument("--seq-len", type=int, default=TRAIN.seq_len, help="longest row in tokens (longer rows are cut)")
    t.add_argument("--lr", type=float, default=TRAIN.lr, help="peak learning rate")
    t.add_argument("--warmup-steps", type=int, default=TRAIN.warmup_steps, help="steps of linear learning-rate warm-up")
    t.add_argument("--kl-weight", type=float, default=TRAIN.kl_weight, help="weight of KL(base || draft)")
    t.add_argument("--ntp-weight", type=float, default=TRAIN.ntp_weight, help="weight of the next-token loss")
    t.add_argument("--seed", type=int, default=TRAIN.seed, help="seed of the initialisation, data order and sampling")
    t.add_argument("--checkpoint-minutes", type=float, default=TRAIN.checkpoint_minutes,
                   help="time between checkpoints")
    t.add_argument("--compile", action="store_true",
                   help="run norms, rotary and SiLU-gating as torch.compile'd kernels (compiles for a minute first)")
    p.set_defaults(func=cmd_distill)

    a = sub.add_parser("acceptance", help="greedy acceptance of drafts, layer-parallel drafting emulated on one device",
                       description="Mean accepted length and acceptance rate of each draft drafting sequentially "
                                   "and layer-parallel (every group member on this one device: the acceptance of "
                                   "N devices, not their speed), and of the ngram drafter, on held-out prompts.",
                       formatter_class=HelpFormatter)
    a.add_argument("--model", required=True, help="the base model: a Hugging Face folder or a GGUF file")
    a.add_argument("--draft", action="append", default=[], metavar="[NAME=]DIR", help="a draft (repeatable)")
    a.add_argument("--ngram", action="store_true", help="add the ngram drafter's row")
    a.add_argument("--prompts", default=str(HELD_OUT_PROMPTS), help="Spec-Bench jsonl prompts")
    a.add_argument("--limit", type=int, help="only N prompts (the categories taken in turn)")
    a.add_argument("--time-limit", type=float, metavar="SECONDS",
                   help="start no prompt after this many seconds (every row keeps the same prompts)")
    a.add_argument("--num-draft", type=int, default=ENGINE_DEFAULTS.num_draft, help="draft tokens per round (k)")
    a.add_argument("--max-new-tokens", type=int, default=DEFAULT_MAX_NEW_TOKENS, help="tokens generated per prompt")
    a.add_argument("--ignore-eos", action="store_true", help="generate past EOS to the token budget (as bench does)")
    a.add_argument("--calibrate", default=ENGINE_DEFAULTS.calibrate, choices=Calibration.names(),
                   help="when layer-parallel drafting rewrites its KV exactly")
    _add_layer_parallel_args(a, "layer-parallel sizes to measure, e.g. 2,4")
    a.add_argument("--device", help="cuda or cpu (default: cuda when there is one)")
    a.add_argument("--dtype", default="float32", choices=DTYPE_NAMES, help="of the base and the drafts")
    a.add_argument("--gen-batch", type=int, default=64, help="prompts the base continues at once")
    a.add_argument("--no-fused-kernels", action="store_true",
                   help="CUDA: draft with the reference formulas as PyTorch ops (no Triton compiling first)")
    a.add_argument("--out", help="JSON file for the full results (rewritten after every prompt)")
    a.add_argument("--table", help="markdown file for the table (rewritten after every prompt)")
    a.set_defaults(func=cmd_acceptance)


def cmd_distill(args: argparse.Namespace) -> int:
    from easyspec.distill.run import distill
    from easyspec.distill.train import Stopped

    minutes = args.minutes if args.minutes is not None or args.steps is not None else DEFAULT_MINUTES
    train = TrainSettings(steps=args.steps, minutes=minutes, batch_size=args.batch_size, seq_len=args.seq_len,
                          lr=args.lr, warmup_steps=args.warmup_steps, kl_weight=args.kl_weight,
                          ntp_weight=args.ntp_weight, seed=args.seed, checkpoint_minutes=args.checkpoint_minutes)
    shape = DraftShape(args.layers, args.hidden_size, args.heads, args.kv_heads, args.intermediate_size,
                       args.head_dim)
    opts = DistillOptions(
        model=args.model, out=args.out or "", device=_device(args.device), shape=shape, init=args.init,
        layer_parallel=args.layer_parallel, keep_first=args.keep_first, keep_last=args.keep_last,
        groups=args.groups, parallel_policy=args.parallel_policy, prompts=args.prompts,
        code_prompts=args.code_prompts, samples=args.samples, gen_tokens=args.gen_tokens, gen_batch=args.gen_batch,
        gen_minutes=args.gen_minutes, temperature=args.temperature, top_p=args.top_p, data=args.data,
        data_only=args.data_only,
        corpus=args.corpus, corpus_share=args.corpus_share, corpus_only=args.corpus_only,
        corpus_max_mb=args.corpus_max_mb,
        save_dtype=args.save_dtype, compile=args.compile, train=train, command=shlex.join(["easyspec", *sys.argv[1:]]))
    try:
        distill(opts)
    except Stopped as stop:
        print(f"stopped at step {stop.step}; checkpoint in {Path(args.out) / 'checkpoint'}: run the same command "
              "to continue", file=sys.stderr)
        return 130
    return 0


def _named(spec: str) -> tuple[str, str]:
    name, sep, folder = spec.partition("=")
    return (name, folder) if sep else (Path(spec).name, spec)


def cmd_acceptance(args: argparse.Namespace) -> int:
    started = time.monotonic()
    from easyspec.bench.core import spread_over_categories
    from easyspec.distill.data import read_prompt_set
    from easyspec.distill.evaluate import Row, measure, table
    from easyspec.model.checkpoint import parse_dtype

    if not args.draft and not args.ngram:
        raise ValueError("nothing to measure: give --draft DIR (repeatable) and/or --ngram")
    if args.groups and len(args.layer_parallel) != 1:
        raise ValueError("--groups describes one layout: give it with exactly one --layer-parallel size")
    if args.num_draft < 1 or args.max_new_tokens < 1 or args.gen_batch < 1 or (args.limit or 1) < 1:
        raise ValueError("--num-draft, --max-new-tokens, --gen-batch and --limit must be >= 1")
    if args.time_limit is not None and not args.time_limit > 0:
        raise ValueError(f"--time-limit must be a positive number of seconds, got {args.time_limit}")
    prompts = read_prompt_set(args.prompts)
    prompts = [p for _, p in spread_over_categories([(p.category, p) for p in prompts], args.limit or len(prompts))]
    drafts = [_named(d) for d in args.draft]
    device = _device(args.device)
    settings = {"model": args.model, "prompts": args.prompts, "num_prompts": 0, "prompts_asked": len(prompts),
                "time_limit_s": args.time_limit, "k": args.num_draft, "max_new_tokens": args.max_new_tokens,
                "ignore_eos": args.ignore_eos, "calibrate": args.calibrate, "parallel_policy": args.parallel_policy,
                "keep_first": args.keep_first, "keep_last": args.keep_last, "groups": args.groups, "device": device,
                "dtype": args.dtype, "fused_kernels": not args.no_fused_kernels,
                "note": "layer-parallel rows run every group member on one device: the acceptance of N devices, "
                        "not their speed"}

    def report(rows: list[Row]) -> str:
        """The table so far; --out and --table rewritten (after every prompt, so a killed run keeps them)."""
        settings["num_prompts"] = measured = len(rows[0].per_prompt)
        cut = f" (so far, of {len(prompts)})" if measured < len(prompts) else ""
        text = (f"greedy, k={args.num_draft}, {measured} prompts of {args.prompts}{cut}, up to "
                f"{args.max_new_tokens} new tokens\n\n{table(rows)}\n")
        if args.out:
            Path(args.out).write_text(json.dumps({"settings": settings, "rows": [r.to_dict() for r in rows]},
                                                 indent=2) + "\n")
        if args.table:
            Path(args.table).write_text(text)
        return text

    rows = measure(args.model, drafts, prompts, k=args.num_draft, max_new=args.max_new_tokens, device=device,
                   dtype=parse_dtype(args.dtype), batch_size=args.gen_batch,
                   log=lambda m: print(f"[acceptance] {m}", file=sys.stderr, flush=True),
                   sizes=args.layer_parallel, keep_first=args.keep_first, keep_last=args.keep_last,
                   groups=args.groups, policy=args.parallel_policy, calibrate=args.calibrate, ngram=args.ngram,
                   ignore_eos=args.ignore_eos, fused=not args.no_fused_kernels, on_prompt=report,
                   deadline=None if args.time_limit is None else started + args.time_limit)
    print(report(rows), end="")
    return 0
