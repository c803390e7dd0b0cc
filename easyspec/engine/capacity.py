"""How long a context the KV caches may hold, and for how many sequences at once: settled once per
engine, before any process starts.

Default: the models' max_position_embeddings (base and draft), capped so that the caches fit.
On CUDA the rank that holds the most (rank 0: its share of the base plus the draft, whole or
sharded) must fit its weights, its caches and ACTIVATION_RESERVE_BYTES in
--gpu-memory-utilization of the GPU's memory; on the CPU the caches may take CPU_KV_CACHE_BYTES.
An explicit --max-context is taken as given when the models reach it (and, on CUDA, it fits).
Weights are estimated from the configs (parameter count x dtype size), not measured.

Each of the --max-num-seqs sequences of a batch has a cache of the whole context. Without the flag,
the context is settled for one sequence first, then the batch is as many sequences as the memory
holds at that context, at most DEFAULT_MAX_NUM_SEQS (a shorter --max-context leaves room for more).
"""

from __future__ import annotations

from dataclasses import dataclass

from easyspec.model.config import ModelConfig
from easyspec.options import (
    ACTIVATION_RESERVE_BYTES,
    CPU_KV_CACHE_BYTES,
    DEFAULT_MAX_NUM_SEQS,
    MIN_CONTEXT,
    EngineOptions,
    OptionsError,
)

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
# Cache slots past the context that a runner keeps for warm-up writes and padding (its `scratch`).
SCRATCH_SLOTS = 64


def gib(nbytes: float) -> str:
    """A byte count for messages: GiB, or MiB below one GiB."""
    if abs(nbytes) < 1 << 30:
        return f"{nbytes / (1 << 20):.1f} MiB"
    return f"{nbytes / (1 << 30):.2f} GiB"


def kv_bytes_per_token(cfg: ModelConfig, dtype: str, shards: int = 1) -> int:
    """Keys and values of one token over every layer, for one of `shards` tensor-parallel ranks."""
    return 2 * cfg.num_layers * (cfg.num_kv_heads // shards) * cfg.head_dim * DTYPE_BYTES[dtype]


@dataclass(frozen=True)
class Capacity:
    """What rank 0 holds: weight bytes and KV bytes per context token, base and draft."""

    weights: int
    base_kv: int
    draft_kv: int

    @classmethod
    def of(cls, options: EngineOptions, base: ModelConfig, draft: ModelConfig | None) -> Capacity:
        size = DTYPE_BYTES[options.dtype]
        weights = base.num_parameters() * size // options.devices
        base_kv = kv_bytes_per_token(base, options.dtype, options.devices)
        draft_kv = 0
        if draft is not None:
            # sd with --draft-tp N shards the draft like the base; otherwise rank 0 holds it whole.
            shards = options.draft_tp if not options.is_layer_parallel else 1
            weights += draft.num_parameters() * size // shards
            draft_kv = kv_bytes_per_token(draft, options.dtype, shards)
        return cls(weights, base_kv, draft_kv)

    def cache_bytes(self, context: int, rows: int = 1) -> int:
        return (self.base_kv + self.draft_kv) * (rows * context + SCRATCH_SLOTS)


def kv_budget(options: EngineOptions, capacity: Capacity) -> tuple[int, str]:
    """Bytes the caches may take on rank 0, and what bounds them (for messages)."""
    if options.device != "cuda":
        return CPU_KV_CACHE_BYTES, f"the CPU's cap of {gib(CPU_KV_CACHE_BYTES)} for the KV cache"
    import torch

    total = torch.cuda.get_device_properties(0).total_memory
    usable = int(options.gpu_memory_utilization * total)
    budget = usable - capacity.weights - ACTIVATION_RESERVE_BYTES
    why = (f"--gpu-memory-utilization {options.gpu_memory_utilization} of {gib(total)}, less {gib(capacity.weights)} "
           f"of weights and {gib(ACTIVATION_RESERVE_BYTES)} for activations")
    return budget, why


def settle_context(options: EngineOptions, base: ModelConfig, draft: ModelConfig | None) -> tuple[int, int, str]:
    """The context length in tokens, the sequences decoded together, and one line saying how they
    were chosen and what the cache takes."""
    limits = {"the base model": base.max_position_embeddings}
    if draft is not None:
        limits["the draft"] = draft.max_position_embeddings
    model_limit = min(limits.values())
    shortest = min(limits, key=limits.get)
    if options.max_context is None and model_limit < MIN_CONTEXT:
        raise OptionsError(f"the models support {model_limit} positions (max_position_embeddings), fewer than the "
                           f"{MIN_CONTEXT} easyspec needs; check their config.json")
    capacity = Capacity.of(options, base, draft)
    budget, why = kv_budget(options, capacity)
    slots = max(0, budget // (capacity.base_kv + capacity.draft_kv) - SCRATCH_SLOTS)  # cache slots that fit
    rows = options.max_num_seqs or 1
    fits = slots // rows  # the context each of `rows` sequences can have
    if options.max_context is not None:
        context = options.max_context
        if context > model_limit:
            raise OptionsError(f"--max-context {context} exceeds {shortest}'s max_position_embeddings "
                               f"({model_limit}); lower it")
        if options.device == "cuda" and context > fits:
            raise OptionsError(f"--max-context {context} for --max-num-seqs {rows} needs "
                               f"{gib(capacity.cache_bytes(context, rows))} of KV cache, more than the "
                               f"{gib(max(budget, 0))} left ({why}); lower --max-context or --max-num-seqs, raise "
                               "--gpu-memory-utilization or use more --devices")
        source = "--max-context"
    elif fits < model_limit:
        context = fits
        if context < MIN_CONTEXT:
            raise OptionsError(f"no room for {rows} KV cache(s) of {MIN_CONTEXT} tokens ({why}); lower "
                               "--max-num-seqs, raise --gpu-memory-utilization, use more --devices or a smaller "
                               "--dtype")
        source = f"{shortest}'s max_position_embeddings {model_limit}, capped by {why}"
    else:
        context = model_limit
        source = f"{shortest}'s max_position_embeddings"
    if options.max_num_seqs is None:
        rows = max(1, min(DEFAULT_MAX_NUM_SEQS, slots // context))
    base_bytes = capacity.base_kv * (rows * context + SCRATCH_SLOTS)
    parts = f"base {gib(base_bytes)}, draft {gib(capacity.cache_bytes(context, rows) - base_bytes)}" \
        if draft is not None else "base model"
    per = " on rank 0" if options.devices > 1 else ""
    line = (f"context {context} tokens ({source}), {rows} sequence{'s' if rows > 1 else ''} at once: KV cache "
            f"{gib(capacity.cache_bytes(context, rows))}{per} ({parts})")
    return context, rows, line
