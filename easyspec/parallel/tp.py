"""Tensor parallelism as a transformation of a model built on the meta device.

Per block: q/k/v and gate/up are split by output rows (whole GQA heads per rank),
o_proj and down_proj by input columns, each followed by exactly one all-reduce
(`RowParallelLinear`), which also carries the residual add (from the first rank
only). The LM head is split by vocabulary and its logits all-gathered; the
embedding stays whole on every rank (a lookup reads one row, so splitting it
saves memory but no time).

`shard_model` rewrites the modules' shapes and returns the slicer that makes the
checkpoint loader read only this rank's bytes; `load_sharded` puts the two together.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.distributed import ProcessGroup

from easyspec.model.checkpoint import TensorSlice, TensorSlicer
from easyspec.model.config import ModelConfig
from easyspec.model.loader import load_config, load_weights
from easyspec.model.transformer import Linear, RMSNorm, Transformer
from easyspec.parallel import comm
from easyspec.parallel.state import ParallelState


class TPError(ValueError):
    """The model cannot be split over this many devices; the message says why."""


class RowParallelLinear(Linear):
    """A Linear whose input features are split over ranks: local matmul, then one all-reduce.

    A residual must be added once: only the first rank's partial sum carries it into the
    all-reduce (in its matmul's epilogue where fused), the others add nothing.
    """

    def __init__(self, in_features: int, out_features: int, group: ProcessGroup | None, rank: int) -> None:
        super().__init__(in_features, out_features, bias=False)
        self.group, self.rank = group, rank

    def forward(self, x: Tensor, norm: RMSNorm | None = None, residual: Tensor | None = None,
                out_dtype: torch.dtype | None = None) -> Tensor:
        partial = super().forward(x, norm, residual if self.rank == 0 else None, out_dtype)
        return comm.all_reduce(partial, self.group)


class VocabParallelHead(Linear):
    """The LM head split over the vocabulary; the shards' logits are gathered back in order."""

    def __init__(self, in_features: int, vocab_per_rank: int, group: ProcessGroup | None) -> None:
        super().__init__(in_features, vocab_per_rank, bias=False)
        self.group = group

    def forward(self, x: Tensor, norm: RMSNorm | None = None, residual: Tensor | None = None,
                out_dtype: torch.dtype | None = None) -> Tensor:
        assert residual is None, "the LM head adds no residual"
        # Gathered in the activation type (half the bytes of float32, the type the collectives are set up for).
        local = super().forward(x, norm)  # [..., V/n]
        gathered = comm.all_gather(local, self.group)  # [n, ..., V/n]
        logits = torch.cat(gathered.unbind(0), dim=-1)  # [..., V]
        return logits if out_dtype is None else logits.to(out_dtype)


def check_divisible(cfg: ModelConfig, tp: int, what: str = "model") -> None:
    """Raise TPError unless heads, KV heads and the MLP width divide by tp."""
    for name, value in (
        ("num_attention_heads", cfg.num_heads),
        ("num_key_value_heads", cfg.num_kv_heads),
        ("intermediate_size", cfg.intermediate_size),
    ):
        if value % tp:
            raise TPError(
                f"the {what}'s {name} ({value}) is not divisible by {tp} devices; "
                f"use a device count that divides it"
            )


def shard_model(model: Transformer, rank: int, tp: int, group: ProcessGroup | None) -> TensorSlicer:
    """Give `model` (on the meta device) this rank's shapes; return the checkpoint slicer."""
    cfg = model.config
    check_divisible(cfg, tp)
    q_local, kv_local = cfg.q_size // tp, cfg.kv_size // tp
    inter_local = cfg.intermediate_size // tp
    split_head = cfg.vocab_size % tp == 0
    with torch.device("meta"):
        for block in model.layers:
            attn = block.attn
            attn.num_heads //= tp
            attn.num_kv_heads //= tp
            attn.qkv_proj = Linear(cfg.hidden_size, q_local + 2 * kv_local, bias=cfg.attention_bias)
            attn.o_proj = RowParallelLinear(q_local, cfg.hidden_size, group, rank)
            block.mlp.gate_up_proj = Linear(cfg.hidden_size, 2 * inter_local, bias=False)
            block.mlp.down_proj = RowParallelLinear(inter_local, cfg.hidden_size, group, rank)
        if split_head:
            model.lm_head = VocabParallelHead(cfg.hidden_size, cfg.vocab_size // tp, group)

    def slicer(param: str, name: str, shape: tuple[int, ...]) -> TensorSlice | None:
        def rows(size: int) -> TensorSlice:
            return (0, rank * size, (rank + 1) * size)

        if ".q_proj." in name:
            return rows(q_local)
        if ".k_proj." in name or ".v_proj." in name:
            return rows(kv_local)
        if ".o_proj." in name:
            return (1, rank * q_local, (rank + 1) * q_local)
        if ".gate_proj." in name or ".up_proj." in name:
            return rows(inter_local)
        if ".down_proj." in name:
            return (1, rank * inter_local, (rank + 1) * inter_local)
        if param == "lm_head.weight" and split_head:
            return rows(cfg.vocab_size // tp)
        return None

    return slicer


def load_sharded(path: str, dtype: torch.dtype, state: ParallelState, tp: bool,
                 progress: str | None = None) -> Transformer:
    """Load a model whole, or tensor-parallel over every rank when `tp` is set; `progress` labels
    a progress bar over its tensors (None: none)."""
    cfg = load_config(path)
    with torch.device("meta"):
        model = Transformer(cfg)
    slicer = shard_model(model, state.rank, state.world_size, state.group) if tp else None
    return load_weights(model, path, dtype, state.device, slicer, progress).eval()
