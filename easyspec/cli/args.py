"""Command-line flags shared by `generate`, `serve` and `bench`."""

from __future__ import annotations

import argparse
import os

from easyspec.options import (
    AUTO_DTYPE,
    CPU_KV_CACHE_BYTES,
    DEFAULT_MAX_NUM_SEQS,
    DEFAULT_MODEL_DIR,
    DTYPE_NAMES,
    GENERATION_CONFIG_FIELDS,
    SPECULATIVE_CONFIG_KEYS,
    VLLM_SAMPLING_DEFAULTS,
    Calibration,
    EngineOptions,
    Method,
    OptionsError,
    ParallelPolicy,
    SamplingParams,
    TreeSampling,
    parse_speculative_config,
    speculative_options,
)

# Every flag's default is read from the options' own (one place for each default).
ENGINE_DEFAULTS = EngineOptions()
SAMPLING_DEFAULTS = SamplingParams()


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows "(default: X)" after a flag's help where X says something: flags whose default is
    None, False or empty describe it in their own words (or have none)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        # `is`, not `in`: 0 and 0.0 equal False but are defaults worth showing; an empty list or tuple is not.
        unstated = action.default is None or action.default is False or action.default in ([], (), argparse.SUPPRESS)
        if unstated or "%(default)" in (action.help or ""):
            return action.help or ""
        return super()._get_help_string(action)


class Given(argparse.Action):
    """Stores a flag's value and records that the command line gave it (in `given`, dest -> flag), so
    that --speculative-config can refuse to set what a flag already sets."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: object,
                 option_string: str | None = None) -> None:
        setattr(namespace, self.dest, values)
        namespace.given = {**getattr(namespace, "given", {}), self.dest: option_string}


def torchrun_world_size() -> int | None:
    """WORLD_SIZE when started by torchrun (which sets TORCHELASTIC_RUN_ID), else None."""
    if "TORCHELASTIC_RUN_ID" in os.environ and "WORLD_SIZE" in os.environ:
        return int(os.environ["WORLD_SIZE"])
    return None


def add_engine_args(p: argparse.ArgumentParser, method: bool = True, request_defaults: bool = True,
                    progress: bool = True, batch: bool = True) -> None:
    """The engine's flags. `bench` leaves out what it sets itself: --method (each row has its own),
    --generation-config (its requests set every sampling field), --no-progress (its own bar)."""
    g = p.add_argument_group("models and placement")
    g.add_argument("--model", help="base model: a Hugging Face folder or a GGUF file; default: the bundled demo base")
    g.add_argument("--draft", action=Given,
                   help="draft model (folder or GGUF file); default with no --model: the bundled demo draft")
    if method:
        g.add_argument("--method", choices=Method.names(), action=Given,
                       help="decoding method; default: easyspec when a draft is given, else vanilla")
    g.add_argument("--devices", "--tensor-parallel-size", type=int,
                   help="processes (GPUs with --device cuda): the base model is tensor-parallel over all "
                        "(--tensor-parallel-size: vLLM's name); default: torchrun's world size under torchrun, "
                        "else 1")
    g.add_argument("--device", default=ENGINE_DEFAULTS.device, help="cpu (gloo between processes) or cuda (NCCL)")
    g.add_argument("--dtype", default=ENGINE_DEFAULTS.dtype,
                   help=f"weights and activations: {', '.join((AUTO_DTYPE, *DTYPE_NAMES))}; auto: float32 on the "
                        "CPU, on CUDA the checkpoint's dtype when it is 16-bit (bfloat16 for a quantized GGUF file), "
                        "else float32")
    g.add_argument("--max-context", "--max-model-len", type=int,
                   help="KV cache length in tokens (prompt + generated + draft room; --max-model-len: vLLM's "
                        "name); default: the models' "
                        "max_position_embeddings, capped so the cache fits in memory (on CUDA by "
                        f"--gpu-memory-utilization, on the CPU at {CPU_KV_CACHE_BYTES >> 30} GiB); the engine logs "
                        "what it chose")
    g.add_argument("--gpu-memory-utilization", type=float, default=ENGINE_DEFAULTS.gpu_memory_utilization,
                   help="CUDA: share of each GPU's memory that weights, KV cache and activations may take")
    if batch:
        g.add_argument("--max-num-seqs", type=int,
                       help="requests decoded together, each with a KV cache of the whole context (vLLM's name); "
                            f"default: as many as the memory holds, at most {DEFAULT_MAX_NUM_SEQS}")
    if request_defaults:
        g.add_argument("--generation-config", default=ENGINE_DEFAULTS.generation_config,
                       help="sampling defaults of requests that do not set them: auto = the model's "
                            f"generation_config.json ({', '.join(GENERATION_CONFIG_FIELDS)}; do_sample false "
                            "means greedy), vllm = vLLM's defaults (temperature "
                            f"{VLLM_SAMPLING_DEFAULTS['temperature']:g}, {VLLM_SAMPLING_DEFAULTS['max_new_tokens']} "
                            f"new tokens), none = easyspec's (greedy, {SAMPLING_DEFAULTS.max_new_tokens} new tokens), "
                            "or a folder holding a generation_config.json")
    g.add_argument("--chat-template", metavar="FILE",
                   help="Jinja chat template to use instead of the tokenizer's own (as in transformers)")
    if progress:
        g.add_argument("--no-progress", action="store_true",
                       help="no progress bars or lines on stderr while loading weights and capturing CUDA graphs")
    g.add_argument("--no-cuda-graphs", action="store_true", help="CUDA: run every step eagerly")
    g.add_argument("--no-fused-kernels", action="store_true",
                   help="CUDA: run the reference formulas as PyTorch ops instead of the fused Triton kernels")
    g.add_argument("--no-p2p-collectives", action="store_true",
                   help="CUDA: send every collective through NCCL instead of the peer-to-peer path for small ones")
    g.add_argument("--timeout", type=float, default=ENGINE_DEFAULTS.timeout_s,
                   help="seconds before a collective that has not finished fails (a peer is dead or stuck)")
    s = p.add_argument_group("speculation")
    if method:
        s.add_argument("--speculative-config", metavar="JSON",
                       help="vLLM's speculative config, mapped onto these flags: method (draft_model = sd, ngram, "
                            "or easyspec), model (--draft), num_speculative_tokens (--num-draft), "
                            "draft_tensor_parallel_size (--draft-tp), prompt_lookup_min/max (--ngram-min/max)")
    s.add_argument("--num-draft", type=int, default=ENGINE_DEFAULTS.num_draft, action=Given,
                   help="draft tokens per round")
    s.add_argument("--adaptive-draft", action="store_true",
                   help="grow --num-draft after full acceptance, shrink it after a miss")
    s.add_argument("--max-draft", type=int, default=ENGINE_DEFAULTS.max_draft,
                   help="largest --num-draft of the adaptive schedule")
    s.add_argument("--tree-width", type=int, default=ENGINE_DEFAULTS.tree_width,
                   help="sd/easyspec: draft a tree of this many nodes per level (1 = a chain)")
    s.add_argument("--tree-depth", type=int,
                   help="draft tokens along each path of the tree; default: --num-draft")
    s.add_argument("--tree-sampling", default=ENGINE_DEFAULTS.tree_sampling, choices=TreeSampling.names(),
                   help="temperature > 0: how a tree node's children are drawn from the draft distribution")
    s.add_argument("--draft-tp", type=int, default=ENGINE_DEFAULTS.draft_tp, action=Given,
                   help="sd: 1 = draft on one device, N = sharded over all")
    s.add_argument("--layer-parallel", type=int, help="easyspec: drafting devices; default: --devices")
    s.add_argument("--keep-first", type=int, default=ENGINE_DEFAULTS.keep_first,
                   help="easyspec: leading draft layers kept sequential")
    s.add_argument("--keep-last", type=int, default=ENGINE_DEFAULTS.keep_last,
                   help="easyspec: trailing draft layers kept sequential")
    s.add_argument("--groups", help="easyspec: explicit layer groups, e.g. 0,1,2-3,4-5,6-7,8,9; "
                                    "default: built from --keep-first/--keep-last")
    s.add_argument("--parallel-policy", default=ENGINE_DEFAULTS.parallel_policy, choices=ParallelPolicy.names(),
                   help="easyspec: what the ranks of a layer group compute in parallel")
    s.add_argument("--calibrate", default=ENGINE_DEFAULTS.calibrate, choices=Calibration.names(),
                   help="easyspec: when to rewrite the layer-parallel draft KV exactly")
    s.add_argument("--ngram-min", type=int, default=ENGINE_DEFAULTS.ngram_min, action=Given,
                   help="ngram: shortest suffix to match")
    s.add_argument("--ngram-max", type=int, default=ENGINE_DEFAULTS.ngram_max, action=Given,
                   help="ngram: longest suffix to match")
    if batch:
        s.add_argument("--draft-token-budget", type=int, default=ENGINE_DEFAULTS.draft_token_budget,
                       help="draft tokens per round over the whole batch: each running request drafts at most "
                            "this divided by the running count (fewer as the batch grows, none below one each); "
                            "never less than one request's whole draft")


# Sampling flags whose default is the engine's (the model's generation_config.json, see
# --generation-config), so they have no argparse default: None means "not given".
GENERATION_DEFAULT_HELP = "; default: the model's generation_config.json, else {}"


def add_sampling_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("sampling")
    g.add_argument("--temperature", type=float,
                   help="0 = greedy" + GENERATION_DEFAULT_HELP.format(SAMPLING_DEFAULTS.temperature))
    g.add_argument("--top-p", type=float, help="nucleus sampling: keep the smallest set of tokens whose probability "
                   "reaches this (1 = off)" + GENERATION_DEFAULT_HELP.format(SAMPLING_DEFAULTS.top_p))
    g.add_argument("--top-k", type=int, help="keep the k most likely tokens (0 = off)"
                   + GENERATION_DEFAULT_HELP.format(SAMPLING_DEFAULTS.top_k))
    g.add_argument("--min-p", type=float, help="drop tokens less likely than this times the most likely one (0 = off)"
                   + GENERATION_DEFAULT_HELP.format(SAMPLING_DEFAULTS.min_p))
    g.add_argument("--repetition-penalty", type=float,
                   help="> 1 makes tokens of the prompt and the output less likely, < 1 more (1 = off; greedy too)"
                        + GENERATION_DEFAULT_HELP.format(SAMPLING_DEFAULTS.repetition_penalty))
    g.add_argument("--presence-penalty", type=float, default=SAMPLING_DEFAULTS.presence_penalty,
                   help="-2 to 2: subtracted from the logit of every token the output already holds")
    g.add_argument("--frequency-penalty", type=float, default=SAMPLING_DEFAULTS.frequency_penalty,
                   help="-2 to 2: subtracted from a token's logit once per time the output holds it")
    g.add_argument("--seed", type=int, help="seed of the request's sampling; default: a random one")
    g.add_argument("--max-new-tokens", type=int, help="most tokens to generate"
                   + GENERATION_DEFAULT_HELP.format(SAMPLING_DEFAULTS.max_new_tokens))
    g.add_argument("--min-tokens", type=int, default=SAMPLING_DEFAULTS.min_tokens,
                   help="no EOS, stop token or stop string ends the output before this many tokens")
    g.add_argument("--stop", action="append", default=[], help="stop string (repeatable); the text ends before it")
    g.add_argument("--stop-token-ids", help="comma-separated token ids that end the output as EOS does")
    g.add_argument("--ignore-eos", action="store_true", help="keep generating past end-of-sequence tokens")
    g.add_argument("--no-skip-special-tokens", action="store_true",
                   help="show special tokens (<|im_start|>, ...) in the text; the EOS or stop token that ends "
                        "the output is never shown")
    g.add_argument("--logprobs", type=int,
                   help="with --json: each token's log-probability and this many most likely tokens' (0 to 20)")


def speculation_from_args(args: argparse.Namespace) -> dict[str, object]:
    """The speculation flags, with what --speculative-config sets in place of theirs; a key that sets
    what a flag on the command line sets too is refused rather than one silently winning."""
    chosen = {name: getattr(args, name, None) for name in SPECULATIVE_CONFIG_KEYS.values()}
    if getattr(args, "speculative_config", None) is None:
        return chosen
    config = parse_speculative_config(args.speculative_config)
    given = getattr(args, "given", {})
    clash = next((key for key in config if SPECULATIVE_CONFIG_KEYS.get(key) in given), None)
    if clash is not None:
        raise OptionsError(f"--speculative-config sets {clash!r} and {given[SPECULATIVE_CONFIG_KEYS[clash]]} is "
                           "given too; keep one")
    fields = speculative_options(config, args.method)
    if args.model is not None and Method(fields["method"]).uses_draft_model and not (fields.get("draft") or args.draft):
        name = config.get("method", fields["method"])
        raise OptionsError(f'--speculative-config: method {name!r} needs a draft "model" (or --draft)')
    return {**chosen, **fields}


def options_from_args(args: argparse.Namespace) -> EngineOptions:
    speculation = speculation_from_args(args)
    model, draft, method = args.model, speculation["draft"], speculation["method"]
    if model is None:
        model = str(DEFAULT_MODEL_DIR / "base")
        if draft is None and (method is None or Method(method).uses_draft_model):
            draft = str(DEFAULT_MODEL_DIR / "draft")
    method = method or (Method.EASYSPEC if draft else Method.VANILLA).value
    devices = args.devices or torchrun_world_size() or ENGINE_DEFAULTS.devices
    return EngineOptions(
        model=model,
        draft=draft,
        method=method,
        devices=devices,
        device=args.device,
        dtype=args.dtype,
        num_draft=speculation["num_draft"],
        adaptive_draft=args.adaptive_draft,
        max_draft=args.max_draft,
        tree_width=args.tree_width,
        tree_depth=args.tree_depth,
        tree_sampling=args.tree_sampling,
        draft_tp=speculation["draft_tp"],
        layer_parallel=args.layer_parallel or devices,
        keep_first=args.keep_first,
        keep_last=args.keep_last,
        groups=args.groups,
        parallel_policy=args.parallel_policy,
        calibrate=args.calibrate,
        ngram_min=speculation["ngram_min"],
        ngram_max=speculation["ngram_max"],
        max_context=args.max_context,
        # One prompt (`generate`) needs one sequence's cache; serve and bench batch.
        max_num_seqs=getattr(args, "max_num_seqs", 1),
        draft_token_budget=getattr(args, "draft_token_budget", ENGINE_DEFAULTS.draft_token_budget),
        gpu_memory_utilization=args.gpu_memory_utilization,
        generation_config=getattr(args, "generation_config", ENGINE_DEFAULTS.generation_config),
        chat_template=args.chat_template,
        progress=not getattr(args, "no_progress", False),
        cuda_graphs=not args.no_cuda_graphs,
        fused_kernels=not args.no_fused_kernels,
        p2p_collectives=not args.no_p2p_collectives,
        timeout_s=args.timeout,
    )


def sampling_from_args(args: argparse.Namespace) -> dict[str, object]:
    """The sampling settings given on the command line, as SamplingParams fields: the rest come
    from the engine's request defaults (Engine.sampling_params)."""
    if args.logprobs is not None and not getattr(args, "json", False):
        raise ValueError("--logprobs are printed in the --json output; add --json")
    given = {
        "temperature": args.temperature,
        "top_p": args.top_p,
        "top_k": args.top_k,
        "min_p": args.min_p,
        "repetition_penalty": args.repetition_penalty,
        "presence_penalty": args.presence_penalty,
        "frequency_penalty": args.frequency_penalty,
        "seed": args.seed,
        "max_new_tokens": args.max_new_tokens,
        "min_tokens": args.min_tokens,
        "stop": tuple(args.stop),
        "stop_token_ids": parse_ids(args.stop_token_ids, "--stop-token-ids") if args.stop_token_ids else (),
        "ignore_eos": args.ignore_eos,
        "skip_special_tokens": not args.no_skip_special_tokens,
        "logprobs": args.logprobs,
    }
    # Left out when they say what the defaults say: the engine's defaults (generation_config.json) apply.
    given = {name: value for name, value in given.items()
             if value is not None and (name in GENERATION_CONFIG_FIELDS or value != getattr(SAMPLING_DEFAULTS, name))}
    SamplingParams(**given)  # its checks, before any model loads
    return given



def parse_ids(text: str, flag: str) -> tuple[int, ...]:
    """Comma-separated token ids ("1, 2,3")."""
    try:
        return tuple(int(t) for t in text.replace(" ", "").split(",") if t)
    except ValueError:
        raise ValueError(f"{flag} must be comma-separated integers, got {text!r}") from None
