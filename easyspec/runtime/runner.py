"""Runs a model's fixed-shape steps, captured as CUDA graphs where possible.

A step is keyed by (mode, T, L): the forward function (EXACT, the model itself, or
LAYER_PARALLEL, a layer-parallel draft's), the number of tokens and how many cache slots attention reads.
L is rounded up to a multiple of `KV_BUCKET` so that the attention cost follows
the context length while only a handful of graphs exist. Each key is captured
once, on first use, after a warm-up that writes only to scratch slots at the
end of the cache; later calls copy their inputs (tokens and positions, plus
slots and the attention mask for masked steps, or the slot lists of a KV move)
into the captured input buffers and replay.

Two kinds of forward: `forward` runs T consecutive positions with the causal
mask; `forward_masked` takes explicit positions, the slots to write and a
[T, L] mask, which is what tree drafting and verification need (tokens that
share a position, each attending only to its own ancestors). `prefill` runs a
prompt as pieces of power-of-two lengths, each a captured step too; their
warm-up uses the piece's own inputs, since a piece may be longer than the
scratch area.

Rows: a runner made with `rows` > 1 holds that many sequences, each in its own region
of `max_len` cache slots (row r owns slots r * max_len ..), with the scratch slots
after the last row. `forward_rows` runs one Feed per sequence as a single forward over
all their tokens (a batch): each token writes its row's slots and attends only to its
own row, through a mask the step builds from per-token slot bounds (causal feeds) or
from the feed's own row-local mask (trees). The single-sequence methods above work on
row 0, so a one-row runner is the runner it always was.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from easyspec.model.kv_cache import SlotView
from easyspec.model.transformer import Transformer

# Step names: the model's own forward, and a layer-parallel draft's (easyspec.parallel.layer_parallel).
EXACT = "exact"
LAYER_PARALLEL = "layer-parallel"

log = logging.getLogger("easyspec")

KV_BUCKET = 256
PREFILL_PIECE = 512  # the longest prompt piece run as one step (a power of two)

# fn(tokens [T], positions [T], cache, kv_len, mask [T, kv_len] bool or None for causal) -> float32 logits [T, V]
StepFn = Callable[..., Tensor]


def kv_span(end: int, slots: int) -> int:
    """Cache slots a step reads when the highest slot written is end - 1: end rounded up to a
    multiple of KV_BUCKET, at most the cache's `slots`."""
    return min(-(-end // KV_BUCKET) * KV_BUCKET, slots)


def capture_graph(fn: Callable[[], object], pool: object = None) -> tuple[torch.cuda.CUDAGraph, object]:
    """Capture fn() (over static inputs) in a CUDA graph after two warm-up runs on a side
    stream (they compile kernels and settle allocations); returns the graph and fn's output."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool):
        out = fn()
    return graph, out


def graphs_supported(device: torch.device) -> bool:
    """Whether steps on `device` can be captured (CUDA only; the tests stand a replaying fake in)."""
    return device.type == "cuda"


def new_graph_pool() -> object:
    """A memory pool that every graph of one runner shares."""
    return torch.cuda.graph_pool_handle()


@dataclass
class Feed:
    """One sequence's tokens in a batched step (ModelRunner.forward_rows).

    tokens: [T] long on the runner's device. A causal feed sits at positions start ..
    start + T - 1, written at those slots of its row, each token reading its row's slots at or
    before its position. A masked feed (a tree's tokens) gives positions and row-local slots
    ([T] long each) and mask: [T, L] bool over its row's slots 0 .. L-1."""

    row: int
    tokens: Tensor
    start: int = 0
    positions: Tensor | None = None
    slots: Tensor | None = None
    mask: Tensor | None = None

    @property
    def num_tokens(self) -> int:
        return self.tokens.shape[0]


def padded_length(tokens: int) -> int:
    """Tokens of a captured batched step: the next power of two, so that a handful of graphs
    serve every mix of sequences (padding tokens write scratch slots and are discarded)."""
    return 1 << max(tokens - 1, 0).bit_length()


class _Graph:
    def __init__(self, graph: torch.cuda.CUDAGraph, inputs: tuple[Tensor, ...], out: Tensor | None) -> None:
        self.graph, self.inputs, self.out = graph, inputs, out


class ModelRunner:
    """One model, its KV cache, and its captured steps."""

    def __init__(
        self,
        model: Transformer,
        max_len: int,
        use_graphs: bool,
        steps: dict[str, StepFn] | None = None,
        scratch: int = 64,
        label: str | None = None,
        rows: int = 1,
    ) -> None:
        """`label` names the model in a log line per captured graph (None: no lines); `rows`:
        sequences held at once, each with max_len slots."""
        self.model = model
        self.label = label
        # Scratch slots past the rows absorb warm-up writes and padding tokens, so no step
        # may be longer than `scratch` tokens.
        self.rows = rows
        self.cache = model.allocate_cache(rows * max_len + scratch)
        self.max_len = max_len
        self.scratch = scratch
        self.slots = rows * max_len + scratch  # the cache's length
        self.device = model.embed_tokens.weight.device
        self.use_graphs = use_graphs and graphs_supported(self.device)
        # The model itself is the exact step (same call signature); a bound method here
        # would make every runner a reference cycle that outlives `del`.
        self.steps: dict[str, StepFn] = {EXACT: model, **(steps or {})}
        self._graphs: dict[tuple, _Graph] = {}
        self._pool = new_graph_pool() if self.use_graphs else None
        self._arange = torch.arange(self.slots, device=self.device)

    def kv_len_for(self, end: int) -> int:
        """Cache slots to read when the highest slot written is end - 1."""
        return kv_span(end, self.slots)

    def row_base(self, row: int) -> int:
        """The first cache slot of `row`."""
        return row * self.max_len

    def _scratch_slots(self, n: int) -> Tensor:
        """The last n slots of the cache: warm-up runs really execute, so they write here."""
        return self._arange[self.slots - n : self.slots].clone()

    @torch.inference_mode()
    def forward(self, tokens: Tensor, start: int, mode: str = EXACT) -> Tensor:
        """tokens: [T] long on the model's device, at positions start .. start+T-1.

        Returns float32 logits [T, V]. Under CUDA graphs the tensor is the graph's
        output buffer: it stays valid until this same step is run again.
        """
        seq = tokens.shape[0]
        if start + seq > self.slots:
            raise ValueError(f"position {start + seq - 1} is past the KV cache ({self.max_len} slots)")
        kv_len = self.kv_len_for(start + seq)
        fn = self.steps[mode]

        def step(tokens: Tensor, positions: Tensor) -> Tensor:
            return fn(tokens, positions, self.cache, kv_len)

        def warm() -> tuple[Tensor, ...]:
            return torch.zeros(seq, dtype=torch.long, device=self.device), self._scratch_slots(seq)

        return self._run((mode, seq, kv_len), step, (tokens, self._arange[start : start + seq]), warm)

    @torch.inference_mode()
    def forward_masked(self, tokens: Tensor, positions: Tensor, slots: Tensor, mask: Tensor,
                       mode: str = EXACT) -> Tensor:
        """One forward with explicit positions, write slots and attention mask.

        tokens, positions, slots: [T] long; mask: [T, L] bool (True = attend) with
        L = kv_len_for(highest slot read or written + 1). Returns float32 logits
        [T, V] (under CUDA graphs, the graph's output buffer, as in `forward`).
        """
        seq, kv_len = mask.shape
        if seq > self.scratch:
            raise ValueError(f"a masked step of {seq} tokens needs more than the runner's {self.scratch} scratch slots")
        fn = self.steps[mode]

        def step(tokens: Tensor, positions: Tensor, slots: Tensor, mask: Tensor) -> Tensor:
            return fn(tokens, positions, SlotView(self.cache, slots), kv_len, mask)

        def warm() -> tuple[Tensor, ...]:
            scratch = self._scratch_slots(seq)
            ones = torch.ones(seq, kv_len, dtype=torch.bool, device=self.device)
            return torch.zeros(seq, dtype=torch.long, device=self.device), scratch, scratch.clone(), ones

        return self._run((mode, seq, kv_len, "masked"), step, (tokens, positions, slots, mask), warm)

    @torch.inference_mode()
    def move_kv(self, src: Tensor, dst: Tensor) -> None:
        """Copy every layer's cache entries at slots src [n] to slots dst [n] (long, dst distinct).

        All sources are read before any destination is written, so the lists may overlap.
        """

        def move(src: Tensor, dst: Tensor) -> None:
            for buffers in (self.cache.keys, self.cache.values):
                for buf in buffers:  # [Hkv, S, hd]
                    buf.index_copy_(1, dst, buf.index_select(1, src))

        def warm() -> tuple[Tensor, ...]:
            # Every entry onto the last scratch slot: a batch's moves may outnumber the scratch slots.
            last = torch.full_like(src, self.slots - 1)
            return last, last.clone()

        self._run(("move", src.shape[0]), move, (src, dst), warm)

    @torch.inference_mode()
    def forward_rows(self, feeds: Sequence[Feed], mode: str = EXACT, last_only: bool = False) -> list[Tensor]:
        """One forward over every feed's tokens, each feed a sequence in its own row (feeds are
        all causal or all masked). Returns each feed's float32 logits [T_i, V], or [1, V] for its
        last token with `last_only` (EXACT steps only); under CUDA graphs these are views of the
        graph's output buffer, valid until this same step runs again."""
        sizes = [feed.num_tokens for feed in feeds]
        total = sum(sizes)
        width = padded_length(total) if self.use_graphs else total
        tokens = torch.cat([feed.tokens for feed in feeds])  # [total]
        if width > total:
            tokens = torch.cat((tokens, tokens.new_zeros(width - total)))  # [width]
        # Padding tokens write the last scratch slot and read slot 0: their results are discarded.
        pad_slot = self.slots - 1
        select = None
        if last_only:
            ends = torch.tensor(sizes).cumsum(0) - 1
            select = ends.to(self.device, non_blocking=True)  # [F]
        masked = feeds[0].mask is not None
        if any((feed.mask is not None) != masked for feed in feeds):
            raise ValueError("forward_rows takes causal feeds or masked feeds, not both")
        if masked:
            # A row-local mask may run past its row (its width is rounded up to KV_BUCKET); those columns
            # are the next row's slots, never attended: a feed reads at most max_len of them.
            kv_len = self.kv_len_for(max(self.row_base(f.row) + min(f.mask.shape[1], self.max_len) for f in feeds))
            args = self._masked_inputs(feeds, width, kv_len, pad_slot)
        else:
            kv_len = self.kv_len_for(max(self.row_base(f.row) + f.start + f.num_tokens for f in feeds))
            args = (self._causal_inputs(feeds, width, pad_slot),)
        # Named "prefill" when only the last logits are kept (prompts): the capture log says so.
        key = ("prefill" if last_only else mode, width, kv_len, "rows-masked" if masked else "rows",
               last_only and len(feeds))
        fn = self.steps[mode]
        cols = self._arange[:kv_len]

        def step(tokens: Tensor, rest: Tensor, *extra: Tensor) -> Tensor:
            """rest: [2, width] positions and slots written, then (causal) each token's lowest and highest
            slot read; extra: the mask [width, L] (masked), then `select` (last_only)."""
            if masked:
                mask = extra[0]
            else:
                mask = (cols[None, :] >= rest[2][:, None]) & (cols[None, :] <= rest[3][:, None])  # [width, L]
            kwargs = {"select": extra[-1]} if last_only else {}
            return fn(tokens, rest[0], SlotView(self.cache, rest[1]), kv_len, mask, **kwargs)

        def warm() -> tuple[Tensor, ...]:
            zeros = torch.zeros(width, dtype=torch.long, device=self.device)
            rest = torch.stack((zeros, zeros + pad_slot) if masked else (zeros, zeros + pad_slot, zeros, zeros))
            extra = []
            if masked:
                extra.append(torch.zeros(width, kv_len, dtype=torch.bool, device=self.device))
                extra[0][:, 0] = True
            if last_only:
                extra.append(torch.zeros_like(select))
            return (zeros, rest, *extra)

        out = self._run(key, step, (tokens, *args, *(() if select is None else (select,))), warm)
        if last_only:
            return [out[i : i + 1] for i in range(len(feeds))]
        return list(out[:total].split(sizes))

    def _causal_inputs(self, feeds: Sequence[Feed], width: int, pad_slot: int) -> Tensor:
        """[4, width] long: each token's position, the slot it writes, and the lowest and highest
        slot it reads (its row's start, or where a sliding window begins; its own slot)."""
        window = self.model.config.sliding_window
        rows = [[], [], [], []]
        for feed in feeds:
            base = self.row_base(feed.row)
            for position in range(feed.start, feed.start + feed.num_tokens):
                rows[0].append(position)
                rows[1].append(base + position)
                rows[2].append(base if window is None else base + max(0, position - window + 1))
                rows[3].append(base + position)
        pad = width - len(rows[0])
        for row, value in zip(rows, (0, pad_slot, 0, 0), strict=True):
            row.extend([value] * pad)
        return torch.tensor(rows, dtype=torch.long).to(self.device, non_blocking=True)

    def _masked_inputs(self, feeds: Sequence[Feed], width: int, kv_len: int, pad_slot: int) -> tuple[Tensor, Tensor]:
        """[2, width] long positions and written slots, and the [width, kv_len] bool mask: each
        feed's row-local mask placed at its row (a sliding window applied row-locally)."""
        window = self.model.config.sliding_window
        total = sum(feed.num_tokens for feed in feeds)
        positions = torch.cat([feed.positions for feed in feeds])  # [total]
        slots = torch.cat([feed.slots + self.row_base(feed.row) for feed in feeds])  # [total]
        pad = width - total
        rest = torch.stack((torch.cat((positions, positions.new_zeros(pad))),
                            torch.cat((slots, slots.new_full((pad,), pad_slot)))))  # [2, width]
        mask = torch.zeros(width, kv_len, dtype=torch.bool, device=self.device)
        mask[total:, 0] = True
        first = 0
        for feed in feeds:
            local = feed.mask[:, : self.max_len]  # [T, L], L <= max_len
            if window is not None:
                keys = self._arange[: local.shape[1]]
                local = local & (keys[None, :] > feed.positions[:, None] - window)
            base = self.row_base(feed.row)
            mask[first : first + feed.num_tokens, base : base + local.shape[1]] = local
            first += feed.num_tokens
        return rest, mask

    def _run(self, key: tuple, fn: Callable[..., Tensor | None], args: tuple[Tensor, ...],
             warm: Callable[[], tuple[Tensor, ...]]) -> Tensor | None:
        """fn(*args) eagerly, or by replaying the graph captured for `key`."""
        if not self.use_graphs:
            return fn(*args)
        graph = self._graphs.get(key) or self._capture(key, fn, warm())
        for buffer, arg in zip(graph.inputs, args, strict=True):
            buffer.copy_(arg)
        graph.graph.replay()
        return graph.out

    def _capture(self, key: tuple, fn: Callable[..., Tensor | None], inputs: tuple[Tensor, ...]) -> _Graph:
        """Capture fn over `inputs`: buffers whose values make the two warm-up runs write only
        what may be overwritten (scratch slots, or the very entries the step will write)."""
        start = time.perf_counter()
        graph, out = capture_graph(lambda: fn(*inputs), self._pool)
        if self.label is not None:
            # Captures happen on a shape's first use: these lines say why the first requests are slower.
            sizes = ", ".join(f"{n} {unit}{'' if n == 1 else 's'}"
                              for n, unit in zip(key[1:3], ("token", "cache slot"), strict=False))
            log.info("captured a CUDA graph: %s %s step, %s (%.2f s)", self.label, key[0], sizes,
                     time.perf_counter() - start)
        captured = _Graph(graph, inputs, out)
        self._graphs[key] = captured
        return captured

    @torch.inference_mode()
    def prefill(self, tokens: Tensor, start: int = 0) -> Tensor:
        """Run a prompt of any length, tokens: [T] long at positions start ..; returns the
        last token's logits [V] (a copy: graphs share one memory pool).

        The prompt goes in pieces of power-of-two lengths, longest first, so that
        every piece is a captured graph: run eagerly, a prompt launches every kernel
        of every layer from Python, which on a small model costs far more than the
        arithmetic. Each piece attends to the earlier ones through the cache and
        returns logits for its last token only. Pieces read a power-of-two number
        of cache slots, so the graphs number (log2 of the longest piece) x (log2 of
        the context), not one per bucket of KV_BUCKET.
        """
        if tokens.shape[0] == 0:
            raise ValueError("prefill needs at least one token")
        if start + tokens.shape[0] > self.max_len:
            raise ValueError(f"a prompt ending at position {start + tokens.shape[0] - 1} does not fit the "
                             f"KV cache ({self.max_len} slots)")
        model = self.steps[EXACT]
        logits = None
        pos = start
        for size in prefill_pieces(tokens.shape[0]):
            piece = tokens[pos - start : pos - start + size]
            positions = self._arange[pos : pos + size]
            kv_len = min(max(KV_BUCKET, 1 << (pos + size - 1).bit_length()), self.slots)

            def step(tokens: Tensor, positions: Tensor, kv_len: int = kv_len) -> Tensor:
                return model(tokens, positions, self.cache, kv_len, last_only=True)  # [1, V]

            def warm(piece: Tensor = piece, positions: Tensor = positions) -> tuple[Tensor, ...]:
                # The real inputs: the warm-up runs write the very KV entries this piece is about to write.
                return piece.clone(), positions.clone()

            logits = self._run(("prefill", size, kv_len), step, (piece, positions), warm)
            pos += size
        return logits[-1].clone()


def prefill_pieces(length: int, largest: int = PREFILL_PIECE) -> list[int]:
    """Power-of-two piece lengths that add up to `length`, longest first:
    whole pieces of `largest`, then the binary digits of the rest (300 -> 256, 32, 8, 4)."""
    pieces = [largest] * (length // largest)
    rest = length % largest
    bit = largest // 2
    while rest:
        if rest >= bit:
            pieces.append(bit)
            rest -= bit
        bit //= 2
    return pieces
