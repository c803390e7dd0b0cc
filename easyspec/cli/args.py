"""Command-line flags shared by `generate`, `serve` and `bench`."""

from __future__ import annotations

import argparse

from easyspec.engine.options import (
    CALIBRATION_POLICIES,
    DEFAULT_MODEL_DIR,
    METHODS,
    TREE_SAMPLING,
    EngineOptions,
)
from easyspec.parallel.layer_parallel import POLICIES
from easyspec.verify.sampling import SamplingParams


def add_engine_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("models and placement")
    g.add_argument("--model", help="base model folder (Hugging Face format); default: the bundled demo base")
    g.add_argument("--draft", help="draft model folder; default with no --model: the bundled demo draft")
    g.add_argument("--method", choices=METHODS,
                   help="decoding method; default: easyspec when a draft is given, else vanilla")
    g.add_argument("--devices", type=int, default=1, help="processes/GPUs: the base is tensor-parallel over all")
    g.add_argument("--device", default="cpu", help="cpu (gloo between processes) or cuda (NCCL)")
    g.add_argument("--dtype", default="float32", help="float32, bfloat16 or float16")
    g.add_argument("--max-context", type=int, help="KV cache length in tokens (default: up to 2048)")
    g.add_argument("--no-cuda-graphs", action="store_true", help="run every step eagerly")
    g.add_argument("--no-fused-kernels", action="store_true",
                   help="CUDA: run the reference formulas as PyTorch ops instead of the fused Triton kernels")
    g.add_argument("--no-p2p-collectives", action="store_true",
                   help="CUDA: send every collective through NCCL instead of the peer-to-peer path for small ones")
    g.add_argument("--timeout", type=float, default=120.0, help="seconds before a stuck collective fails")
    s = p.add_argument_group("speculation")
    s.add_argument("--num-draft", type=int, default=4, help="draft tokens per round (k)")
    s.add_argument("--adaptive-draft", action="store_true", help="grow k after full acceptance, shrink after a miss")
    s.add_argument("--max-draft", type=int, default=8, help="largest k of the adaptive schedule")
    s.add_argument("--tree-width", type=int, default=1,
                   help="sd/easyspec: draft a tree of this many nodes per level (1 = a chain)")
    s.add_argument("--tree-depth", type=int, help="draft tokens along each path of the tree (default: --num-draft)")
    s.add_argument("--tree-sampling", default=TREE_SAMPLING[0], choices=TREE_SAMPLING,
                   help="temperature > 0: how a tree node's children are drawn from the draft distribution")
    s.add_argument("--draft-tp", type=int, default=1, help="sd: 1 = draft on one device, N = sharded over all")
    s.add_argument("--layer-parallel", type=int, help="easyspec: drafting devices (default: --devices)")
    s.add_argument("--keep-first", type=int, default=1, help="easyspec: leading draft layers kept sequential")
    s.add_argument("--keep-last", type=int, default=1, help="easyspec: trailing draft layers kept sequential")
    s.add_argument("--groups", help="easyspec: explicit layer groups, e.g. 0,1,2-3,4-5,6-7,8,9")
    s.add_argument("--parallel-policy", default="attention", choices=POLICIES, help="easyspec: what runs in parallel")
    s.add_argument("--calibrate", default="every-round", choices=CALIBRATION_POLICIES,
                   help="easyspec: when to rewrite fuzzy draft KV exactly")
    s.add_argument("--ngram-min", type=int, default=1, help="ngram: shortest suffix to match")
    s.add_argument("--ngram-max", type=int, default=4, help="ngram: longest suffix to match")


def add_sampling_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("sampling")
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--seed", type=int)
    g.add_argument("--max-new-tokens", type=int, default=64)
    g.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    g.add_argument("--ignore-eos", action="store_true")


def options_from_args(args: argparse.Namespace) -> EngineOptions:
    model, draft = args.model, args.draft
    if model is None:
        model = str(DEFAULT_MODEL_DIR / "base")
        if draft is None and args.method not in ("vanilla", "ngram"):
            draft = str(DEFAULT_MODEL_DIR / "draft")
    method = args.method or ("easyspec" if draft else "vanilla")
    return EngineOptions(
        model=model,
        draft=draft,
        method=method,
        devices=args.devices,
        device=args.device,
        dtype=args.dtype,
        num_draft=args.num_draft,
        adaptive_draft=args.adaptive_draft,
        max_draft=args.max_draft,
        tree_width=args.tree_width,
        tree_depth=args.tree_depth,
        tree_sampling=args.tree_sampling,
        draft_tp=args.draft_tp,
        layer_parallel=args.layer_parallel or args.devices,
        keep_first=args.keep_first,
        keep_last=args.keep_last,
        groups=args.groups,
        parallel_policy=args.parallel_policy,
        calibrate=args.calibrate,
        ngram_min=args.ngram_min,
        ngram_max=args.ngram_max,
        max_context=args.max_context,
        cuda_graphs=not args.no_cuda_graphs,
        fused_kernels=not args.no_fused_kernels,
        p2p_collectives=not args.no_p2p_collectives,
        timeout_s=args.timeout,
    )


def sampling_from_args(args: argparse.Namespace) -> SamplingParams:
    return SamplingParams(
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        seed=args.seed,
        max_new_tokens=args.max_new_tokens,
        stop=tuple(args.stop),
        ignore_eos=args.ignore_eos,
    )
