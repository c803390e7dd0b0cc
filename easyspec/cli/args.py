"""Command-line flags shared by `generate`, `serve` and `bench`."""

from __future__ import annotations

import argparse

from easyspec.options import (
    DEFAULT_CONTEXT,
    DEFAULT_MODEL_DIR,
    Calibration,
    EngineOptions,
    Method,
    ParallelPolicy,
    SamplingParams,
    TreeSampling,
)

# Every flag's default is read from the options' own (one place for each default).
ENGINE_DEFAULTS = EngineOptions()
SAMPLING_DEFAULTS = SamplingParams()


def add_engine_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("models and placement")
    g.add_argument("--model", help="base model: a Hugging Face folder or a GGUF file; default: the bundled demo base")
    g.add_argument("--draft", help="draft model (folder or GGUF file); default with no --model: the bundled demo draft")
    g.add_argument("--method", choices=Method.names(),
                   help="decoding method; default: easyspec when a draft is given, else vanilla")
    g.add_argument("--devices", type=int, default=ENGINE_DEFAULTS.devices,
                   help="processes/GPUs: the base is tensor-parallel over all")
    g.add_argument("--device", default=ENGINE_DEFAULTS.device, help="cpu (gloo between processes) or cuda (NCCL)")
    g.add_argument("--dtype", default=ENGINE_DEFAULTS.dtype, help="float32, bfloat16 or float16")
    g.add_argument("--max-context", type=int, help=f"KV cache length in tokens (default: up to {DEFAULT_CONTEXT})")
    g.add_argument("--no-cuda-graphs", action="store_true", help="run every step eagerly")
    g.add_argument("--no-fused-kernels", action="store_true",
                   help="CUDA: run the reference formulas as PyTorch ops instead of the fused Triton kernels")
    g.add_argument("--no-p2p-collectives", action="store_true",
                   help="CUDA: send every collective through NCCL instead of the peer-to-peer path for small ones")
    g.add_argument("--timeout", type=float, default=ENGINE_DEFAULTS.timeout_s,
                   help="seconds before a stuck collective fails")
    s = p.add_argument_group("speculation")
    s.add_argument("--num-draft", type=int, default=ENGINE_DEFAULTS.num_draft, help="draft tokens per round")
    s.add_argument("--adaptive-draft", action="store_true",
                   help="grow --num-draft after full acceptance, shrink it after a miss")
    s.add_argument("--max-draft", type=int, default=ENGINE_DEFAULTS.max_draft,
                   help="largest --num-draft of the adaptive schedule")
    s.add_argument("--tree-width", type=int, default=ENGINE_DEFAULTS.tree_width,
                   help="sd/easyspec: draft a tree of this many nodes per level (1 = a chain)")
    s.add_argument("--tree-depth", type=int, help="draft tokens along each path of the tree (default: --num-draft)")
    s.add_argument("--tree-sampling", default=ENGINE_DEFAULTS.tree_sampling, choices=TreeSampling.names(),
                   help="temperature > 0: how a tree node's children are drawn from the draft distribution")
    s.add_argument("--draft-tp", type=int, default=ENGINE_DEFAULTS.draft_tp,
                   help="sd: 1 = draft on one device, N = sharded over all")
    s.add_argument("--layer-parallel", type=int, help="easyspec: drafting devices (default: --devices)")
    s.add_argument("--keep-first", type=int, default=ENGINE_DEFAULTS.keep_first,
                   help="easyspec: leading draft layers kept sequential")
    s.add_argument("--keep-last", type=int, default=ENGINE_DEFAULTS.keep_last,
                   help="easyspec: trailing draft layers kept sequential")
    s.add_argument("--groups", help="easyspec: explicit layer groups, e.g. 0,1,2-3,4-5,6-7,8,9")
    s.add_argument("--parallel-policy", default=ENGINE_DEFAULTS.parallel_policy, choices=ParallelPolicy.names(),
                   help="easyspec: what runs in parallel")
    s.add_argument("--calibrate", default=ENGINE_DEFAULTS.calibrate, choices=Calibration.names(),
                   help="easyspec: when to rewrite the layer-parallel draft KV exactly")
    s.add_argument("--ngram-min", type=int, default=ENGINE_DEFAULTS.ngram_min, help="ngram: shortest suffix to match")
    s.add_argument("--ngram-max", type=int, default=ENGINE_DEFAULTS.ngram_max, help="ngram: longest suffix to match")


def add_sampling_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("sampling")
    g.add_argument("--temperature", type=float, default=SAMPLING_DEFAULTS.temperature, help="0 = greedy")
    g.add_argument("--top-p", type=float, default=SAMPLING_DEFAULTS.top_p)
    g.add_argument("--top-k", type=int, default=SAMPLING_DEFAULTS.top_k)
    g.add_argument("--seed", type=int)
    g.add_argument("--max-new-tokens", type=int, default=SAMPLING_DEFAULTS.max_new_tokens)
    g.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    g.add_argument("--ignore-eos", action="store_true")


def options_from_args(args: argparse.Namespace) -> EngineOptions:
    model, draft = args.model, args.draft
    if model is None:
        model = str(DEFAULT_MODEL_DIR / "base")
        if draft is None and (args.method is None or Method(args.method).uses_draft_model):
            draft = str(DEFAULT_MODEL_DIR / "draft")
    method = args.method or (Method.EASYSPEC if draft else Method.VANILLA).value
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
