"""`easyspec bench-steps`: the latency of every stage at real model shapes, and what it is made of.

Random weights are built straight on the devices (nothing is written to disk);
every step runs the engine's own code (ModelRunner with CUDA graphs, TP
sharding, the layer-parallel forward, the comm module), so these are the
numbers the engine gets. Per context length it reports:

- the base model's decode step (T=1) at TP=N, its share of the weight-streaming
  floor (weight bytes per GPU / measured copy bandwidth) and its verification
  step (T=k+1);
- one draft step sequential at TP=1 (one GPU, the others idle), at TP=N, and
  layer-parallel over N GPUs with each policy;
- the parts a draft step is built from, each timed alone in its own graph:
  one layer's attention sub-block, one MLP, one MLP split over N GPUs
  (including its all-reduce), the layer-parallel all-gather, an all-reduce of
  one hidden state. Sums of these explain the step times; they are not a
  profile of the steps themselves;
- one whole decoder layer of the draft (and of the base on one GPU) with the
  fused kernels and with the reference formulas (the --no-fused-kernels
  ablation, in the same run): its kernel launches (counted by the profiler on
  an eager run) and its time against the layer's own weight-streaming floor.

Draft steps on one GPU and at TP=N carry their % of floor like the base's.

With N > 1 GPUs the base is also timed whole on one GPU (TP=1). Rank 0 also
times Hugging Face transformers' eager decode of the base shape on one GPU when
transformers is installed (the reference we must beat by far).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.multiprocessing as mp

from easyspec.bench.core import fill_random_weights
from easyspec.bench.project import load_acceptance, print_step_projection
from easyspec.model import kernels
from easyspec.model.checkpoint import parse_dtype
from easyspec.model.config import PRESETS, ModelConfig
from easyspec.model.transformer import Transformer
from easyspec.options import ParallelPolicy
from easyspec.parallel import comm
from easyspec.parallel.launch import free_port, set_rendezvous
from easyspec.parallel.layer_parallel import LayerLayout, LayerParallelForward, ShardedMLP
from easyspec.parallel.state import ParallelState, init_parallel, shutdown_parallel
from easyspec.parallel.tp import TPError, check_divisible, shard_model
from easyspec.runtime.runner import EXACT, LAYER_PARALLEL, ModelRunner, capture_graph, kv_span


@dataclass(frozen=True)
class StepBenchConfig:
    base: str  # preset name
    draft: str | None
    devices: int
    contexts: tuple[int, ...] = (512, 4096)
    num_draft: int = 4
    dtype: torch.dtype = torch.bfloat16
    fused: bool = True
    p2p: bool = True
    hf: bool = True
    iters: int = 50


def random_model(cfg: ModelConfig, state: ParallelState, tp: bool, dtype: torch.dtype, seed: int) -> Transformer:
    """A model of this shape with random weights on the device, sharded over all ranks when tp is set."""
    with torch.device("meta"):
        model = Transformer(cfg).to(dtype)  # the dtype first: to_empty allocates what the meta tensors say
    if tp:
        shard_model(model, state.rank, state.world_size, state.group)
        model.to(dtype)
    model = model.to_empty(device=state.device)
    # Shards differ per rank; a replicated model is the same on every rank, as in the engine.
    fill_random_weights(model, torch.Generator(state.device).manual_seed(seed + (state.rank if tp else 0)))
    return model.eval()


def streamed_bytes(model: Transformer) -> int:
    """Weight bytes one decode step reads: everything but the embedding table (a lookup reads one
    row); the LM head counts even where it shares the embedding's storage."""
    return sum(p.numel() * p.element_size() for n, p in model.named_parameters(remove_duplicate=False)
               if not n.startswith("embed"))


def copy_bandwidth(device: torch.device) -> float:
    """Device-to-device copy bandwidth in bytes/s, counting bytes read and written."""
    src = torch.empty(1 << 30, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src), iters=20)
    return 2 * src.numel() / (ms / 1e3)


def free_memory() -> None:
    """Return freed models' memory to the device before the next one is built."""
    gc.collect()  # runners and graphs hold reference cycles; `del` alone frees nothing yet
    torch.cuda.empty_cache()


def time_ms(fn: Callable[[], object], iters: int) -> float:
    """Median over 3 runs of the mean time of `iters` calls, in ms, with the device synchronised."""
    fn()
    torch.cuda.synchronize()
    runs = []
    for _ in range(3):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            fn()
        end.record()
        torch.cuda.synchronize()
        runs.append(start.elapsed_time(end) / iters)
    return statistics.median(runs)


def graphed(fn: Callable[[], object]) -> Callable[[], None]:
    """Capture fn (static inputs) in a CUDA graph; returns the replay."""
    return capture_graph(fn)[0].replay


class _Recorder:
    def __init__(self, state: ParallelState) -> None:
        self.state, self.rows = state, []

    def add(self, what: str, context: int, ms: float, **extra: object) -> None:
        self.rows.append({"what": what, "context": context, "ms": round(ms, 4), **extra})

    def barrier(self) -> None:
        if self.state.distributed:
            torch.cuda.synchronize()
            comm.all_reduce(torch.zeros(1, device=self.state.device), self.state.group)
            torch.cuda.synchronize()


def _step(runner: ModelRunner, seq: int, context: int, mode: str = EXACT) -> Callable[[], object]:
    tokens = torch.zeros(seq, dtype=torch.long, device=runner.device)
    return lambda: runner.forward(tokens, context - seq, mode)


def _measure(cfg: StepBenchConfig, state: ParallelState) -> list[dict]:
    rec = _Recorder(state)
    n, tp = state.world_size, state.world_size > 1
    max_len = max(cfg.contexts) + cfg.num_draft + 1
    base_cfg = PRESETS[cfg.base]
    base = random_model(base_cfg, state, tp, cfg.dtype, seed=0)
    bandwidth = copy_bandwidth(state.device)
    floor_ms = streamed_bytes(base) / bandwidth * 1e3
    base_runner = ModelRunner(base, max_len, use_graphs=True)
    for ctx in cfg.contexts:
        ms = time_ms(_step(base_runner, 1, ctx), cfg.iters)
        rec.add(f"base {cfg.base} decode TP={n}", ctx, ms, floor_ms=round(floor_ms, 4),
                floor_pct=round(100 * floor_ms / ms, 1), copy_tb_s=round(bandwidth / 1e12, 2))
        ms = time_ms(_step(base_runner, cfg.num_draft + 1, ctx), cfg.iters)
        rec.add(f"base {cfg.base} verify {cfg.num_draft + 1} tokens TP={n}", ctx, ms)
    del base_runner
    if n == 1:
        _measure_layer(cfg, state, rec, base, f"base {cfg.base}", bandwidth)
    del base
    free_memory()
    if n > 1:
        # The same base whole on one GPU (rank 0; the others wait): the TP=1 baseline of this run.
        if state.rank == 0:
            whole = random_model(base_cfg, ParallelState(device=state.device), False, cfg.dtype, seed=0)
            floor_one = streamed_bytes(whole) / bandwidth * 1e3
            runner = ModelRunner(whole, max_len, use_graphs=True)
            for ctx in cfg.contexts:
                ms = time_ms(_step(runner, 1, ctx), cfg.iters)
                rec.add(f"base {cfg.base} decode TP=1", ctx, ms, floor_ms=round(floor_one, 4),
                        floor_pct=round(100 * floor_one / ms, 1))
            del runner, whole
            free_memory()
        rec.barrier()
    if cfg.draft:
        _measure_draft(cfg, state, rec, max_len, bandwidth)
    if cfg.hf and state.rank == 0:
        _measure_hf(base_cfg, cfg, state, rec)
    rec.barrier()
    return rec.rows


def _floor(model: Transformer, bandwidth: float, ms: float) -> dict:
    """A step's weight-streaming floor and its share of the measured time, as row fields."""
    floor_ms = streamed_bytes(model) / bandwidth * 1e3
    return dict(floor_ms=round(floor_ms, 4), floor_pct=round(100 * floor_ms / ms, 1))


def _measure_draft(cfg: StepBenchConfig, state: ParallelState, rec: _Recorder, max_len: int,
                   bandwidth: float) -> None:
    n, rank = state.world_size, state.rank
    draft_cfg = PRESETS[cfg.draft]
    name = f"draft {cfg.draft}"
    whole = random_model(draft_cfg, state, tp=False, dtype=cfg.dtype, seed=1)
    seq_runner = ModelRunner(whole, max_len, use_graphs=True)
    for ctx in cfg.contexts:
        # TP=1: rank 0 drafts alone, the others wait, as in sd with the draft on one GPU.
        if rank == 0:
            ms = time_ms(_step(seq_runner, 1, ctx), cfg.iters)
            rec.add(f"{name} step TP=1", ctx, ms, **_floor(whole, bandwidth, ms))
            # The exact forward that opens each round (catch-up or calibration) feeds k+1 tokens.
            rec.add(f"{name} opening forward {cfg.num_draft + 1} tokens TP=1", ctx,
                    time_ms(_step(seq_runner, cfg.num_draft + 1, ctx), cfg.iters))
        rec.barrier()
    del seq_runner
    if rank == 0:
        _measure_layer(cfg, state, rec, whole, name, bandwidth)
    if n == 1:
        _measure_parts(cfg, state, rec, whole, name)
        return
    try:
        check_divisible(draft_cfg, n, "draft")
    except TPError as err:
        print(f"easyspec: no draft TP={n} row: {err}", file=sys.stderr)
    else:
        sharded = random_model(draft_cfg, state, tp=True, dtype=cfg.dtype, seed=1)
        tp_runner = ModelRunner(sharded, max_len, use_graphs=True)
        for ctx in cfg.contexts:
            ms = time_ms(_step(tp_runner, 1, ctx), cfg.iters)
            rec.add(f"{name} step TP={n}", ctx, ms, **_floor(sharded, bandwidth, ms))
            rec.add(f"{name} opening forward {cfg.num_draft + 1} tokens TP={n}", ctx,
                    time_ms(_step(tp_runner, cfg.num_draft + 1, ctx), cfg.iters))
        del tp_runner, sharded
        free_memory()
    layout = LayerLayout.build(draft_cfg.num_layers, n, keep_first=1, keep_last=1)
    for policy in ParallelPolicy.names():
        forward = LayerParallelForward(whole, layout, rank, n, state.group, policy)
        runner = ModelRunner(whole, max_len, use_graphs=True, steps={LAYER_PARALLEL: forward})
        for ctx in cfg.contexts:
            ms = time_ms(_step(runner, 1, ctx, LAYER_PARALLEL), cfg.iters)
            rec.add(f"{name} step layer-parallel N={n} {policy}", ctx, ms, groups=str(layout))
        del runner
    _measure_parts(cfg, state, rec, whole, name)


def count_kernels(fn: Callable[[], object]) -> int:
    """Device kernels (and copies) one eager call of fn launches, as the profiler sees them."""
    fn()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return sum(1 for event in prof.events() if event.device_type == torch.autograd.DeviceType.CUDA)


def _measure_layer(cfg: StepBenchConfig, state: ParallelState, rec: _Recorder, model: Transformer, name: str,
                   bandwidth: float) -> None:
    """One decoder layer (one token) with the fused kernels and with the reference formulas:
    kernels per layer and time against the layer's weight-streaming floor."""
    block = model.layers[1]
    layer_bytes = sum(p.numel() * p.element_size() for p in block.parameters())
    floor_ms = layer_bytes / bandwidth * 1e3
    x = torch.randn(1, 1, model.config.hidden_size, device=state.device, dtype=cfg.dtype) * 0.1
    for ctx in cfg.contexts:
        cache = model.allocate_cache(ctx + 8)
        positions = torch.tensor([ctx - 1], device=state.device)
        step = model.step_inputs(positions, cache, kv_span(ctx, cache.max_len))
        for fused in (True, False):
            kernels.use_fused(fused)
            launches = count_kernels(lambda step=step: block(x, step))
            ms = time_ms(graphed(lambda step=step: block(x, step)), cfg.iters)
            rec.add(f"{name} one layer, {'fused' if fused else 'reference'} ({launches} kernels)", ctx, ms,
                    floor_ms=round(floor_ms, 5), floor_pct=round(100 * floor_ms / ms, 1), kernels=launches,
                    fused=fused)
        del cache
    kernels.use_fused(cfg.fused)


def _measure_parts(cfg: StepBenchConfig, state: ParallelState, rec: _Recorder, model: Transformer,
                   name: str) -> None:
    """One layer's attention and MLP, the split MLP, and the collectives, each in its own graph."""
    n, dev = state.world_size, state.device
    block = model.layers[1]
    dim = model.config.hidden_size
    kv = model.config.kv_size
    x = torch.randn(1, 1, dim, device=dev, dtype=cfg.dtype) * 0.1
    for ctx in cfg.contexts:
        cache = model.allocate_cache(ctx + 8)
        positions = torch.tensor([ctx - 1], device=dev)
        kv_len = kv_span(ctx, cache.max_len)  # as the runner rounds it
        step = model.step_inputs(positions, cache, kv_len)
        replay = graphed(lambda step=step: block.attention(x, step))
        rec.add(f"{name} one attention sub-block", ctx, time_ms(replay, cfg.iters))
        del cache
    rec.add(f"{name} one MLP sub-block", 0, time_ms(graphed(lambda: block.feed_forward(x)), cfg.iters))
    if n > 1:
        split = ShardedMLP(block, state.rank, n)
        rec.add(f"{name} one MLP split over {n} (with its all-reduce)", 0,
                time_ms(graphed(lambda: split(x, state.group)), cfg.iters))
        payload = torch.randn(1, dim + 2 * kv, device=dev, dtype=cfg.dtype)
        rec.add(f"all-gather of one layer-parallel payload ({payload.numel() * payload.element_size()} B)", 0,
                time_ms(graphed(lambda: comm.all_gather(payload, state.group)), cfg.iters))
        rec.add(f"all-reduce of one hidden state ({x.numel() * x.element_size()} B)", 0,
                time_ms(graphed(lambda: comm.all_reduce(x.clone(), state.group)), cfg.iters))


def _measure_hf(base_cfg: ModelConfig, cfg: StepBenchConfig, state: ParallelState, rec: _Recorder) -> None:
    """transformers' own eager decode of the base shape (random weights), ms per generated token."""
    try:
        import transformers
    except ImportError:
        print("easyspec: transformers is not installed; skipping the HF eager row", file=sys.stderr)
        return
    hf_cfg = transformers.AutoConfig.for_model(**base_cfg.to_hf("bfloat16"))
    with torch.device(state.device):  # random init on the GPU: seconds, not minutes on the CPU
        model = transformers.AutoModelForCausalLM.from_config(hf_cfg, dtype=cfg.dtype).eval()
    new_tokens, ctx = 32, cfg.contexts[0]
    prompt = torch.randint(0, base_cfg.vocab_size, (1, ctx - new_tokens), device=state.device)

    def run(count: int) -> None:
        model.generate(prompt, max_new_tokens=count, min_new_tokens=count, do_sample=False)

    # Time the whole generate twice and take the difference: the prefill cancels out.
    long_ms = time_ms(lambda: run(new_tokens), 1)
    short_ms = time_ms(lambda: run(1), 1)
    rec.add(f"HF transformers {transformers.__version__} eager decode {cfg.base}", ctx,
            (long_ms - short_ms) / (new_tokens - 1))


def _worker(rank: int, cfg: StepBenchConfig, result_path: str) -> None:
    # Ranks wait at barriers while rank 0 times the TP=1 and HF rows alone: allow minutes.
    state = init_parallel(rank, cfg.devices, "cuda", timeout_s=900)
    kernels.use_fused(cfg.fused)
    if cfg.p2p:
        comm.enable_p2p(state.group, state.device, (cfg.dtype,))
    with torch.inference_mode():
        rows = _measure(cfg, state)
    gathered = [rows]
    if state.distributed:
        gathered = [None] * state.world_size
        torch.distributed.all_gather_object(gathered, rows, group=state.group)
    if rank == 0:
        Path(result_path).write_text(json.dumps([row | {"rank": r} for r, part in enumerate(gathered)
                                                 for row in part]))
    torch.cuda.synchronize()
    shutdown_parallel(state)
    # Graph-captured collectives can block interpreter shutdown; the results are written.
    os._exit(0)


def run_step_bench(cfg: StepBenchConfig) -> list[dict]:
    """Every row measured on each rank (rank 0's first); ranks differ only where work differs."""
    for preset in (cfg.base, cfg.draft):
        if preset is not None and preset not in PRESETS:
            raise ValueError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    if not torch.cuda.is_available() or torch.cuda.device_count() < cfg.devices:
        raise ValueError(f"bench-steps needs {cfg.devices} CUDA device(s); this machine has "
                         f"{torch.cuda.device_count()}")
    set_rendezvous(free_port())
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "rows.json")
        mp.start_processes(_worker, args=(cfg, path), nprocs=cfg.devices, join=True, start_method="spawn")
        return json.loads(Path(path).read_text())


def markdown(rows: list[dict]) -> str:
    """Rank 0's rows as a table (the JSON keeps every rank's). Draft steps carry their speedup
    over the same draft at TP=1, and base steps over TP=1 likewise."""
    mine = [row for row in rows if row["rank"] == 0]
    reference = {(row["what"].rsplit(" TP=", 1)[0].replace(" step", ""), row["context"]): row["ms"]
                 for row in mine if row["what"].endswith(" TP=1")}
    lines = ["| what | context | ms | % of floor | vs TP=1 |", "|---|---|---|---|---|"]
    for row in mine:
        what = row["what"]
        pct = f"{row['floor_pct']}%" if "floor_pct" in row else ""
        family = what.split(" step")[0] if " step" in what else what.split(" decode")[0] + " decode"
        ref = reference.get((family, row["context"]))
        ratio = f"{ref / row['ms']:.2f}x" if ref and ("step" in what or "decode" in what) else ""
        ms = f"{row['ms']:.3f}" if row["ms"] >= 0.1 else f"{row['ms']:.4f}"  # one layer: tens of microseconds
        lines.append(f"| {what} | {row['context'] or '-'} | {ms} | {pct} | {ratio} |")
    return "\n".join(lines)


def cmd_bench_steps(args: argparse.Namespace) -> int:
    try:
        contexts = tuple(int(c) for c in args.contexts.split(","))
    except ValueError:
        raise ValueError(f"--contexts takes comma-separated integers, got {args.contexts!r}") from None
    cfg = StepBenchConfig(
        base=args.preset,
        draft=None if args.draft_preset in (None, "none") else args.draft_preset,
        devices=args.devices,
        contexts=contexts,
        num_draft=args.num_draft,
        dtype=parse_dtype(args.dtype),
        fused=not args.no_fused_kernels,
        p2p=not args.no_p2p_collectives,
        hf=not args.no_hf,
    )
    acceptance = load_acceptance(args.acceptance_from) if args.acceptance_from else None
    rows = run_step_bench(cfg)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        config = {k: v for k, v in vars(args).items() if k != "func"}
        Path(args.out).write_text(json.dumps({"device": torch.cuda.get_device_name(0), "config": config,
                                              "rows": rows}, indent=1))
    print(f"\n## bench-steps: {cfg.base} base, {cfg.draft} draft, {cfg.devices} x {torch.cuda.get_device_name(0)}, "
          f"fused={cfg.fused}, p2p={cfg.p2p}\n")
    print(markdown(rows))
    if acceptance is not None:
        print()
        print_step_projection(rows, acceptance, args.acceptance_from, cfg.num_draft)
    return 0
