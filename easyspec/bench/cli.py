"""`easyspec bench`: every method on the same prompts, a markdown table printed last."""

from __future__ import annotations

import argparse
import json
import sys
from datetime import date
from pathlib import Path

from easyspec.cli.args import add_engine_args, options_from_args
from easyspec.verify.sampling import SamplingParams


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="compare decoding methods side by side")
    add_engine_args(p)
    b = p.add_argument_group("benchmark")
    b.add_argument("--methods", default="vanilla,sd-tp1,sd-tpN,ngram,easyspec",
                   help="comma list of vanilla, sd-tp1, sd-tpN, ngram, easyspec[:policy[:calibration[:N]]]")
    b.add_argument("--prompts", help="Spec-Bench jsonl file; default: random prompt ids")
    b.add_argument("--num-prompts", type=int, default=8)
    b.add_argument("--prompt-len", type=int, default=128, help="length of random prompts")
    b.add_argument("--max-new-tokens", type=int, default=128)
    b.add_argument("--temperature", type=float, default=0.0)
    b.add_argument("--repeats", type=int, default=2, help="timed runs per prompt (spread reported)")
    b.add_argument("--warmup", type=int, default=1, help="untimed prompts per method first")
    b.add_argument("--preset", help="random-weight base of a real shape (e.g. llama-3.1-8b): timing only")
    b.add_argument("--draft-preset", help="random-weight draft of a real shape (e.g. llama-3.2-1b)")
    b.add_argument("--workdir", default="/tmp/easyspec-bench", help="where preset checkpoints are written")
    b.add_argument("--out", default="bench-out", help="folder for bench.json and bench.png")
    b.add_argument("--title", default="easyspec bench")
    p.set_defaults(func=cmd_bench)


def cmd_bench(args: argparse.Namespace) -> int:
    from easyspec.bench.core import (
        by_category,
        load_prompt_ids,
        markdown_table,
        parse_methods,
        random_checkpoint,
        run_method,
        summarise,
        write_outputs,
    )

    work = Path(args.workdir)
    if args.preset:
        args.model = str(random_checkpoint(args.preset, work / args.preset, args.dtype, args.device))
    if args.draft_preset:
        args.draft = str(random_checkpoint(args.draft_preset, work / args.draft_preset, args.dtype, args.device,
                                           seed=1))
    if args.method is None:
        args.method = "sd" if args.draft or args.model is None else "vanilla"
    base = options_from_args(args)
    specs = parse_methods(args.methods, args.devices)
    if not specs or specs[0].label != "vanilla":
        raise ValueError("--methods must start with vanilla (speedups are measured against it)")
    if any(s.changes["method"] in ("sd", "easyspec") for s in specs) and not base.draft:
        raise ValueError("sd and easyspec rows need a draft: pass --draft DIR or --draft-preset NAME")
    params = SamplingParams(temperature=args.temperature, max_new_tokens=args.max_new_tokens, ignore_eos=True,
                            seed=0)
    prompts = load_prompt_ids(base, args.prompts, args.num_prompts, args.prompt_len)
    results = []
    for i, spec in enumerate(specs, start=1):
        print(f"[{i}/{len(specs)}] {spec.label}", file=sys.stderr, flush=True)
        results.append(run_method(spec, base, prompts, params, args.repeats, args.warmup))
    summarise(results)
    meta = {
        "title": args.title,
        "date": date.today().isoformat(),
        "command": " ".join(sys.argv),
        "device": _device_name(args.device),
        "devices": args.devices,
        "dtype": args.dtype,
        "model": base.model,
        "draft": base.draft,
        "prompts": args.prompts or f"{args.num_prompts} random prompts of {args.prompt_len} ids",
        "max_new_tokens": args.max_new_tokens,
        "temperature": args.temperature,
    }
    write_outputs(results, Path(args.out), meta)
    print(f"\n## {args.title}\n{json.dumps(meta)}\n")
    print(markdown_table(results))
    if len(set(results[0].categories)) > 1:
        print("\nSpeedup by prompt category:\n")
        print(by_category(results))
    return 0


def _device_name(device: str) -> str:
    if device != "cuda":
        return "cpu"
    import torch

    return torch.cuda.get_device_name(0)
