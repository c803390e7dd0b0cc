"""`python -m easyspec.zoo` (or `easyspec zoo`): train a pair, cut a prompt set, measure a pair's
greedy acceptance, inflate a trained model to a real shape.

  train-pair --pair demo|bench --out DIR [--minutes M | --steps S] [--seed 0]
             [--devices cuda:0,cuda:1|cuda:0|cpu] [--site-packages]
  prompts    --out FILE [--pair demo] [--n 48] [--seed 0] [--site-packages]
  eval-pair  DIR [--prompts FILE] [--k 4] [--max-new-tokens 128] [--limit N] [--device cpu]
  inflate    --model DIR --shape NAME[,key=N...] --out DIR [--draft] [--dtype bfloat16] [--overwrite]

User mistakes end with one line on stderr and exit code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NoReturn

import torch

from easyspec.model.checkpoint import CheckpointError, parse_dtype
from easyspec.zoo.pairs import PAIRS
from easyspec.zoo.pipeline import DEFAULT_PROMPTS, PairError, default_devices, parse_devices, train_pair
from easyspec.zoo.shape import SHAPE_KEYS, InflateError

PROG = "python -m easyspec.zoo"


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        # argparse prints the whole usage block first; one line is easier to read in a log.
        _fail(f"{self.prog}: {message} (see --help)")


def _fail(message: str) -> NoReturn:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def _positive(kind: type[int] | type[float]) -> Callable[[str], int | float]:
    def parse(text: str) -> int | float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a {kind.__name__}") from None
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be positive, got {text}")
        return value

    parse.__name__ = kind.__name__
    return parse


def build_parser(prog: str = PROG) -> argparse.ArgumentParser:
    parser = _Parser(prog=prog, description="Train and check easyspec's own same-family model pairs; inflate a "
                                            "trained model to a real shape.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    train = sub.add_parser("train-pair", help="build corpus + tokenizer, train base and draft")
    train.add_argument("--pair", required=True, choices=sorted(PAIRS), help="which pair (easyspec.zoo.pairs)")
    train.add_argument("--out", required=True, type=Path, help="output folder")
    budget = train.add_mutually_exclusive_group()
    budget.add_argument("--minutes", type=_positive(float),
                        help="training time per model (default: the pair's own)")
    budget.add_argument("--steps", type=_positive(int), help="optimiser steps per model")
    train.add_argument("--seed", type=int, default=0, help="seed of the prompts drawn, the initialisation and the "
                                                         "data order (default: %(default)s)")
    train.add_argument("--devices", default=None,
                       help="base device, then draft device; two train in parallel "
                            f"(default: {default_devices()})")
    train.add_argument("--site-packages", action="store_true",
                       help="add installed packages' sources to the standard library's")

    prompts = sub.add_parser("prompts", help="write code-completion prompts cut from held-out files")
    prompts.add_argument("--out", required=True, type=Path, help="jsonl file to write")
    prompts.add_argument("--pair", default="demo", choices=sorted(PAIRS),
                         help="whose corpus cap to use (default: %(default)s)")
    prompts.add_argument("--n", type=_positive(int), default=DEFAULT_PROMPTS,
                         help="prompts to write (default: %(default)s)")
    prompts.add_argument("--seed", type=int, default=0, help="seed of the draw of prompts (default: %(default)s)")
    prompts.add_argument("--site-packages", action="store_true",
                         help="add installed packages' sources to the standard library's")

    ev = sub.add_parser("eval-pair", help="greedy mean accepted length of a trained pair")
    ev.add_argument("dir", type=Path, help="a train-pair output folder (holds base/ and draft/)")
    ev.add_argument("--prompts", type=Path, help="Spec-Bench jsonl (default: DIR/prompts.jsonl)")
    ev.add_argument("--k", type=_positive(int), default=4, help="draft tokens per round (default: %(default)s)")
    ev.add_argument("--max-new-tokens", type=_positive(int), default=128,
                    help="tokens generated per prompt (default: %(default)s)")
    ev.add_argument("--limit", type=_positive(int), help="use only the first N prompts")
    ev.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                    help="cpu or cuda (default: %(default)s)")
    ev.add_argument("--dtype", default="float32", help="float32, bfloat16 or float16 (default: %(default)s)")

    inf = sub.add_parser("inflate", help="write a trained model at a larger shape that computes the same function")
    inf.add_argument("--model", required=True, type=Path,
                     help="the trained model: a checkpoint folder (or a GGUF file, converted by `easyspec convert`)")
    inf.add_argument("--shape", required=True,
                     help="a preset (llama-3.2-1b, llama-3.1-8b, qwen2.5-32b, ...), optionally followed by "
                          f"overrides, or every key: e.g. 'llama-3.1-8b', 'llama-3.2-1b,layers=8', "
                          f"'{','.join(k + '=N' for k in SHAPE_KEYS)}'. The vocabulary stays the model's")
    inf.add_argument("--out", required=True, type=Path, help="the folder to write")
    inf.add_argument("--draft", action="store_true",
                     help="the model is a draft: widen it only, it keeps its own layer count")
    inf.add_argument("--dtype", default="bfloat16",
                     help="storage dtype: float32 keeps the trained function to float32 rounding, bfloat16 "
                          "also rounds the rescaled weights (norms, q projections) (default: %(default)s)")
    inf.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    return parser


def main(argv: Sequence[str] | None = None, prog: str = PROG) -> None:
    """`prog`: how the user called it (`easyspec zoo` from the easyspec command), for --help and errors."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser(prog).parse_args(argv)
    try:
        if args.command == "train-pair":
            _train_pair(args, shlex.join([*prog.split(), *argv]))
        elif args.command == "prompts":
            _prompts(args)
        elif args.command == "inflate":
            _inflate(args)
        else:
            _eval_pair(args)
    except (PairError, CheckpointError, InflateError) as err:
        _fail(str(err))


def _train_pair(args: argparse.Namespace, command: str) -> None:
    devices = parse_devices(args.devices or default_devices())
    summary = train_pair(PAIRS[args.pair], args.out, devices, seed=args.seed, steps=args.steps,
                         minutes=args.minutes, site_packages=args.site_packages, command=command)
    print(json.dumps(summary, indent=2))


def _prompts(args: argparse.Namespace) -> None:
    from easyspec.zoo.corpus import build_corpus
    from easyspec.zoo.prompts import make_prompts, write_prompts

    corpus = build_corpus(site_packages=args.site_packages, max_bytes=PAIRS[args.pair].corpus_max_bytes)
    prompts = make_prompts(corpus.val, args.n, args.seed)
    if not prompts:
        raise PairError("no prompts could be cut from the held-out files")
    write_prompts(prompts, args.out)
    print(f"wrote {len(prompts)} prompts to {args.out}", file=sys.stderr)


def _eval_pair(args: argparse.Namespace) -> None:
    from easyspec.zoo.evaluate import evaluate_pair
    from easyspec.zoo.prompts import read_prompts

    for role in ("base", "draft"):
        if not (args.dir / role / "config.json").exists():
            raise PairError(f"{args.dir / role}: no checkpoint there; pass a train-pair --out folder")
    try:
        prompts = read_prompts(args.prompts or args.dir / "prompts.jsonl")
    except ValueError as err:
        raise PairError(str(err)) from None
    try:
        device = torch.device(args.device)
    except RuntimeError:
        raise PairError(f"--device: {args.device!r} is not a device name (try cpu, cuda)") from None
    result = evaluate_pair(args.dir / "base", args.dir / "draft", prompts[: args.limit], k=args.k,
                           max_new_tokens=args.max_new_tokens, device=str(device),
                           dtype=parse_dtype(args.dtype))
    print(json.dumps(result, indent=2))


def _inflate(args: argparse.Namespace) -> None:
    from easyspec.zoo.inflate import inflate
    from easyspec.zoo.shape import parse_shape

    summary = inflate(args.model, parse_shape(args.shape), args.out, draft=args.draft, dtype=args.dtype,
                      overwrite=args.overwrite)
    for note in summary["notes"]:
        print(f"note: {note}", file=sys.stderr)
    cfg = summary["source_config"]
    print(f"wrote {args.out}: {summary['role']} of {cfg['hidden_size']} wide x {cfg['num_hidden_layers']} layers "
          f"inflated to {args.shape} ({summary['added_layers']} zero layers added), {summary['bytes'] / 1e9:.2f} GB "
          f"in {summary['seconds']:.1f} s", file=sys.stderr)
