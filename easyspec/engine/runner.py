"""Runs a model's fixed-shape steps, captured as CUDA graphs where possible.

A step is keyed by (mode, T, L): the forward function ("exact" or a drafter's
"fuzzy" one), the number of tokens and how many cache slots attention reads.
L is rounded up to a multiple of `KV_BUCKET` so that the attention cost follows
the context length while only a handful of graphs exist. Each key is captured
once, on first use, after a warm-up that writes only to scratch slots at the
end of the cache; later calls copy tokens and positions into the captured
input buffers and replay.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from easyspec.model.kv_cache import KVCache
from easyspec.model.transformer import Transformer

KV_BUCKET = 256

# fn(tokens [T], positions [T], cache, kv_len) -> float32 logits [T, V]
StepFn = Callable[[Tensor, Tensor, KVCache, int], Tensor]


class _Graph:
    def __init__(self, graph: torch.cuda.CUDAGraph, tokens: Tensor, positions: Tensor, out: Tensor) -> None:
        self.graph, self.tokens, self.positions, self.out = graph, tokens, positions, out


class ModelRunner:
    """One model, its KV cache, and its captured steps."""

    def __init__(
        self,
        model: Transformer,
        max_len: int,
        use_graphs: bool,
        steps: dict[str, StepFn] | None = None,
        scratch: int = 64,
    ) -> None:
        self.model = model
        # Scratch slots past max_len absorb warm-up writes and padding tokens.
        self.cache = model.allocate_cache(max_len + scratch)
        self.max_len = max_len
        self.scratch = scratch
        self.device = model.embed_tokens.weight.device
        self.use_graphs = use_graphs and self.device.type == "cuda"
        self.steps: dict[str, StepFn] = {"exact": self._exact, **(steps or {})}
        self._graphs: dict[tuple[str, int, int], _Graph] = {}
        self._pool = torch.cuda.graph_pool_handle() if self.use_graphs else None
        self._arange = torch.arange(max_len + scratch, device=self.device)

    def _exact(self, tokens: Tensor, positions: Tensor, cache: KVCache, kv_len: int) -> Tensor:
        return self.model(tokens, positions, cache, kv_len)

    def kv_len_for(self, end: int) -> int:
        """Cache slots to read when the highest position is end - 1."""
        bucket = -(-end // KV_BUCKET) * KV_BUCKET
        return min(bucket, self.max_len + self.scratch)

    @torch.inference_mode()
    def forward(self, tokens: Tensor, start: int, mode: str = "exact") -> Tensor:
        """tokens: [T] long on the model's device, at positions start .. start+T-1.

        Returns float32 logits [T, V]. Under CUDA graphs the tensor is the graph's
        output buffer: it stays valid until this same step is run again.
        """
        seq = tokens.shape[0]
        if start + seq > self.max_len + self.scratch:
            raise ValueError(f"position {start + seq - 1} is past the KV cache ({self.max_len} slots)")
        kv_len = self.kv_len_for(start + seq)
        if not self.use_graphs:
            positions = self._arange[start : start + seq]
            return self.steps[mode](tokens, positions, self.cache, kv_len)
        key = (mode, seq, kv_len)
        graph = self._graphs.get(key) or self._capture(key)
        graph.tokens.copy_(tokens)
        graph.positions.copy_(self._arange[start : start + seq])
        graph.graph.replay()
        return graph.out

    def _capture(self, key: tuple[str, int, int]) -> _Graph:
        mode, seq, kv_len = key
        fn = self.steps[mode]
        tokens = torch.zeros(seq, dtype=torch.long, device=self.device)
        # Warm-up runs really execute: point them at the scratch slots.
        end = self.max_len + self.scratch
        positions = self._arange[end - seq : end].clone()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                fn(tokens, positions, self.cache, kv_len)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            out = fn(tokens, positions, self.cache, kv_len)
        captured = _Graph(graph, tokens, positions, out)
        self._graphs[key] = captured
        return captured

    @torch.inference_mode()
    def prefill(self, tokens: Tensor, start: int = 0, chunk: int = 512) -> Tensor:
        """Run a prompt of any length eagerly in chunks; returns the last logits [V]."""
        logits = None
        for begin in range(0, tokens.shape[0], chunk):
            piece = tokens[begin : begin + chunk]
            pos = start + begin
            positions = self._arange[pos : pos + piece.shape[0]]
            logits = self.model(piece, positions, self.cache, self.kv_len_for(pos + piece.shape[0]),
                                last_only=True)
        return logits[-1]
