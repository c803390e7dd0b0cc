"""`easyspec bench`: every method on the same prompts; a progress bar on stderr, the tables on stdout at the end."""

from __future__ import annotations

import argparse
import json
import sys
from datetime import date
from pathlib import Path

from easyspec.cli.args import (
    ENGINE_DEFAULTS,
    SAMPLING_DEFAULTS,
    HelpFormatter,
    add_engine_args,
    options_from_args,
    torchrun_world_size,
)
from easyspec.model.config import PRESETS
from easyspec.options import AUTO_DTYPE, GenerationConfig, Method, SamplingParams, auto_dtype

DEFAULT_METHODS = "vanilla,sd-tp1,sd-tpN,ngram,easyspec"
SWEEP_HELP = ("EasySpec settings to sweep, each an easyspec row after the --methods rows: the cartesian product "
              "of 'key=v1,v2;key=...', e.g. 'layer_parallel=1,2;groups=auto|0,1-2,3;num_draft=3,4,5;"
              "calibrate=every-round,on-mismatch'. Keys: layer_parallel, groups, num_draft, calibrate, "
              "parallel_policy, keep_first, keep_last; values split on ',' except groups values, split on '|' "
              "(auto = built from --keep-first/--keep-last). Prints rows by speedup and the best setting last")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="compare decoding methods side by side",
                       description="Runs every method of --methods on the same prompts, each in its own process, "
                                   "and prints a table of speed, acceptance and per-stage times.",
                       formatter_class=HelpFormatter)
    add_engine_args(p, method=False, request_defaults=False, progress=False)
    b = p.add_argument_group("benchmark")
    b.add_argument("--methods",
                   help="comma list of vanilla, sd-tp1, sd-tpN, ngram, easyspec[:policy[:calibration[:N]]], hf "
                        "(HF transformers eager generate, one device); vanilla first; sd and easyspec rows take "
                        "':tree=WxD' (a tree) or ':adaptive' (adaptive k). Default: "
                        f"{DEFAULT_METHODS}, or vanilla alone with --sweep")
    b.add_argument("--sweep", metavar="SPEC", help=SWEEP_HELP)
    b.add_argument("--acceptance-from", metavar="BENCH_JSON",
                   help="with --preset: bench.json of an end-to-end run on a trained pair; rows of the same label "
                        "get a projected speedup from its acceptance (printed and stored as projected)")
    b.add_argument("--prompts", help="Spec-Bench jsonl file; default: random prompt ids")
    b.add_argument("--num-prompts", type=int, default=8, help="prompts to run, taken in turn from each category")
    b.add_argument("--prompt-len", type=int, default=128, help="length of random prompts")
    b.add_argument("--max-new-tokens", type=int, default=SAMPLING_DEFAULTS.max_new_tokens,
                   help="tokens generated per prompt (end-of-sequence ignored, so every method does the same work)")
    b.add_argument("--temperature", type=float, default=SAMPLING_DEFAULTS.temperature,
                   help="0 = greedy (outputs compared with vanilla's); > 0 samples with a fixed seed")
    b.add_argument("--raw", action="store_true",
                   help="encode --prompts as raw text; default: through the chat template when the model has one")
    b.add_argument("--repeats", type=int, default=2, help="timed runs per prompt (spread reported)")
    b.add_argument("--warmup", type=int,
                   help="untimed prompts per method before the timed runs (default: every prompt once, so that "
                        "one-time costs, a CUDA graph captured per prompt piece and context bucket or a kernel "
                        "compiled for a new shape, stay out of the timings; a server meets them on the first "
                        "requests of each new length); with --concurrency each level is also timed after an untimed "
                        "wave of as many prompts as it keeps in flight, unless --warmup is 0")
    b.add_argument("--concurrency", metavar="LEVELS",
                   help="comma list of request concurrency levels, e.g. 1,2,4,8,16: after the main table's runs, "
                        "each method's engine (built with --max-num-seqs of at least the largest level) serves the "
                        "--num-prompts prompts at each level, keeping that many requests in flight (a new one "
                        "added as one finishes); prints a table of total tokens/s, TTFT and inter-token latency "
                        "per level and method last, and stores it in bench.json's \"concurrency\" section")
    b.add_argument("--preset", help="random-weight base of a real shape (e.g. llama-3.1-8b): timing only")
    b.add_argument("--draft-preset", help="random-weight draft of a real shape (e.g. llama-3.2-1b)")
    b.add_argument("--workdir", default="/tmp/easyspec-bench", help="where preset checkpoints are written")
    b.add_argument("--out", default="bench-out", help="folder for bench.json and bench.png")
    b.add_argument("--title", default="easyspec bench", help="title of the tables and the plot")
    b.add_argument("--quiet", action="store_true", help="no progress bar on stderr")
    p.set_defaults(func=cmd_bench)


def register_steps(sub: argparse._SubParsersAction) -> None:
    """Add `bench-steps`; its module (torch, the models) is imported only when the command runs."""
    p = sub.add_parser("bench-steps", help="time each stage's step at real shapes (random weights, CUDA)",
                       formatter_class=HelpFormatter)
    p.add_argument("--preset", default="llama-3.1-8b", help=f"base shape: {', '.join(PRESETS)}")
    p.add_argument("--draft-preset", default="llama-3.2-1b", help="draft shape, or 'none'")
    p.add_argument("--devices", type=int, default=2, help="GPUs: the base is tensor-parallel over all")
    p.add_argument("--contexts", default="512,4096", help="comma list of context lengths")
    p.add_argument("--num-draft", type=int, default=ENGINE_DEFAULTS.num_draft,
                   help="verification scores --num-draft + 1 tokens")
    p.add_argument("--dtype", default="bfloat16", help="bfloat16, float16 or float32")
    p.add_argument("--no-fused-kernels", action="store_true", help="the reference formulas, not the fused kernels")
    p.add_argument("--no-p2p-collectives", action="store_true", help="every collective through NCCL")
    p.add_argument("--no-hf", action="store_true", help="skip the transformers eager row (one GPU)")
    p.add_argument("--out", help="write the rows as JSON here")
    p.add_argument("--acceptance-from", metavar="BENCH_JSON",
                   help="an end-to-end bench.json on a trained pair: also print speedups projected from these "
                        "latencies and its measured acceptance (labelled projected)")
    p.set_defaults(func=_cmd_bench_steps)


def _cmd_bench_steps(args: argparse.Namespace) -> int:
    from easyspec.bench.steps import cmd_bench_steps

    return cmd_bench_steps(args)


def cmd_bench(args: argparse.Namespace) -> int:
    from easyspec.bench.concurrency import ITL_NOTE, levels_section, levels_table, parse_levels, summarise_levels
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
    from easyspec.bench.efficiency import LEGEND
    from easyspec.bench.hf import LABEL as HF_LABEL
    from easyspec.bench.hf import transformers_missing
    from easyspec.bench.progress import Progress
    from easyspec.bench.project import NOTE, load_acceptance, project, projected_table, stage_ms_per_round
    from easyspec.bench.sweep import best_line, parse_sweep, ranked, sweep_specs
    from easyspec.engine.preflight import check_device

    args.devices = args.devices or torchrun_world_size() or ENGINE_DEFAULTS.devices
    check_device(args.device, args.devices)  # before a preset checkpoint is built on it or a row starts
    if args.dtype == AUTO_DTYPE and args.preset:  # presets are the shapes of 16-bit checkpoints
        args.dtype = auto_dtype(args.device, "bfloat16")
    # Everything that only reads the command line or a file is checked before any checkpoint is written.
    specs = parse_methods(args.methods or ("vanilla" if args.sweep else DEFAULT_METHODS), args.devices)
    if not specs or specs[0].label != "vanilla":
        raise ValueError("--methods must start with vanilla (speedups are measured against it)")
    if args.warmup is not None and args.warmup < 0:
        raise ValueError(f"--warmup takes a number of prompts, 0 or more; got {args.warmup}")
    grid = parse_sweep(args.sweep) if args.sweep else None
    levels = parse_levels(args.concurrency) if args.concurrency is not None else []
    if levels and max(levels) > args.num_prompts:
        raise ValueError(f"--concurrency {max(levels)} keeps {max(levels)} requests in flight, more than "
                         f"--num-prompts {args.num_prompts}; raise --num-prompts to {max(levels)} or more")
    acceptance = load_acceptance(args.acceptance_from) if args.acceptance_from else None
    work = Path(args.workdir)
    if args.preset:
        args.model = str(random_checkpoint(args.preset, work / args.preset, args.dtype, args.device))
    if args.draft_preset:
        args.draft = str(random_checkpoint(args.draft_preset, work / args.draft_preset, args.dtype, args.device,
                                           seed=1))
    # The rows pick their methods; the shared options only need one that fits the models given.
    args.method = (Method.SD if args.draft or args.model is None else Method.VANILLA).value
    # The bench draws its own bar, and its requests set every sampling field themselves.
    base = options_from_args(args).replace(progress=False, generation_config=GenerationConfig.NONE.value)
    if base.dtype == AUTO_DTYPE:
        from easyspec.model.loader import stored_dtype

        args.dtype = auto_dtype(args.device, stored_dtype(base.model))
        base = base.replace(dtype=args.dtype)
    if levels and base.max_num_seqs is None:  # one engine per method serves every level
        base = base.replace(max_num_seqs=max(levels))
    elif levels and base.max_num_seqs < max(levels):
        raise ValueError(f"--concurrency {max(levels)} needs --max-num-seqs {max(levels)} or more, got "
                         f"{base.max_num_seqs}; leave --max-num-seqs out to size it to the largest level")
    draft_methods = {m.value for m in Method if m.uses_draft_model}
    if (grid or any(s.changes["method"] in draft_methods for s in specs)) and not base.draft:
        raise ValueError("sd and easyspec rows need a draft: pass --draft DIR or --draft-preset NAME")
    swept, notes = sweep_specs(grid, base) if grid else ([], [])  # notes: one line per row not run
    specs += swept
    if any(s.label == HF_LABEL for s in specs) and (missing := transformers_missing()):
        notes.append(f"{HF_LABEL}: not run, {missing}")
        specs = [s for s in specs if s.label != HF_LABEL]
    params = SamplingParams(temperature=args.temperature, max_new_tokens=args.max_new_tokens, ignore_eos=True,
                            seed=0)
    prompts = load_prompt_ids(base, args.prompts, args.num_prompts, args.prompt_len, args.raw)
    if levels and len(prompts) < max(levels):
        raise ValueError(f"{args.prompts} holds {len(prompts)} prompts, fewer than --concurrency {max(levels)} "
                         "keeps in flight; lower the largest level or use a larger prompts file")
    engine_rows = sum(s.label != HF_LABEL for s in specs)
    progress = Progress(len(specs) * len(prompts) * args.repeats + engine_rows * len(levels), quiet=args.quiet)
    for line in notes:
        progress.note(line)
    results, served = [], []
    for i, spec in enumerate(specs, start=1):
        progress.begin(spec.label, i, len(specs))
        try:
            result, levels_run = run_method(spec, base, prompts, params, args.repeats, args.warmup, progress.step,
                                            levels)
            results.append(result)
            served += levels_run
        except RuntimeError as err:
            if spec.label != HF_LABEL:  # an optional baseline must not cost the rest of the run
                progress.close()
                raise
            notes.append(f"{HF_LABEL}: not run, {str(err).removeprefix(HF_LABEL + ': ')}")
            progress.note(notes[-1])
    progress.close()
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
        "preset": args.preset,
        "draft_preset": args.draft_preset,
        "prompts": args.prompts or f"{args.num_prompts} random prompts of {args.prompt_len} ids",
        "max_new_tokens": args.max_new_tokens,
        "temperature": args.temperature,
        "repeats": args.repeats,
        "warmup_prompts": len(prompts) if args.warmup is None else min(args.warmup, len(prompts)),
    }
    extra: dict = {"not_run": notes, "vanilla_bandwidth": _bandwidth(base.model, args.dtype, args.devices,
                                                                     stage_ms_per_round(results[0].stats)["verify"])}
    if grid:
        extra["sweep"] = {"spec": args.sweep, "grid": grid, "ranking": [r.label for r in ranked(results)],
                          "best": best_line(results, {s.label for s in swept})}
    projected = missing_projection = None
    if acceptance is not None:
        projected, missing_projection = project(results, acceptance)
        extra["projected"] = {"note": NOTE, "acceptance_from": args.acceptance_from, "rows": projected,
                              "not_projected": missing_projection}
    if levels:
        summarise_levels(served, results)
        skipped = [f"{HF_LABEL}: no concurrency levels (the HF baseline runs one prompt at a time)"
                   for r in results if r.label == HF_LABEL]
        extra["concurrency"] = levels_section(served, levels, len(prompts), skipped)
    plot_note = write_outputs(results, Path(args.out), meta, extra)
    print(f"\n## {args.title}\n{json.dumps(meta)}\n")
    if grid:
        print("Sorted by speedup:\n")
    print(markdown_table(ranked(results) if grid else results))
    print(f"\n{LEGEND}")
    bw = extra["vanilla_bandwidth"]
    unit = "GPU" if args.device == "cuda" else "device"
    print(f"\nvanilla: {bw['weight_mb_per_gpu']:.1f} MB of weights streamed per {unit} per token in "
          f"{bw['step_ms']:.3f} ms: {bw['gb_per_s_per_gpu']:.1f} GB/s per {unit}")
    for line in notes:
        print(line)
    if len(set(results[0].categories)) > 1:
        print("\nSpeedup by prompt category:\n")
        print(by_category(results))
    if projected is not None:
        print("\n" + projected_table(projected, args.acceptance_from))
        for line in missing_projection:
            print(line)
    if grid:
        print("\n" + extra["sweep"]["best"])
    if levels:
        print(f"\nConcurrency ({len(prompts)} requests per level; ITL {ITL_NOTE}):")
        for line in extra["concurrency"]["not_run"]:
            print(line)
        print("\n" + levels_table(served))
    if plot_note:
        print(plot_note, file=sys.stderr)
    return 0


def _bandwidth(model: str, dtype: str, devices: int, step_ms: float) -> dict:
    """Achieved weight-streaming bandwidth of plain decoding: the bytes a decode step reads per GPU
    (every weight but the embedding table, whose lookup reads one row; a tied LM head counts)."""
    from easyspec.bench.efficiency import decode_weight_bytes
    from easyspec.model.loader import load_config

    per_gpu = decode_weight_bytes(load_config(model), dtype) / devices
    return {"weight_mb_per_gpu": per_gpu / 1e6, "step_ms": step_ms,
            "gb_per_s_per_gpu": per_gpu / 1e9 / (step_ms / 1e3) if step_ms > 0 else 0.0}


def _device_name(device: str) -> str:
    if device != "cuda":
        return "cpu"
    import torch

    return torch.cuda.get_device_name(0)
