"""EasySpec layer-parallel draft forward (the paper's "fuzzy" speculation).

The draft is replicated on the N drafting ranks. Its layers are cut into
consecutive groups; a group of one layer runs as usual on every drafting rank
(no communication), and a group of n <= N layers g[0..n-1] with entry state h0
runs as follows on drafting rank r:

  attention: rank r < n computes a_r = Attn_{g[r]}(h0) and writes that layer's
  KV; ONE all-gather shares every a_j together with the new KV entries, so every
  rank's cache stays identical; then every rank runs, in layer order,
      h = h0; for j: h = h + a_j; h = h + MLP_{g[j]}(h)
  layer: rank r computes the whole layer g[r] from h0, d_r = a_r + MLP(h0 + a_r);
      h = h0 + d_0 + ... + d_{n-1} (ablation: the paper found it loses accuracy)
  attention+tp-mlp: attention as above; each MLP of the group is then split
      over the N ranks (rows of gate/up, columns of down) with one all-reduce per
      MLP, so the ranks share the MLP bytes instead of all reading all of them;
      the LM head is split by vocabulary the same way (one all-gather).

Every rank ends a group with the same h, so no broadcast is needed. The policy
names are easyspec.options.ParallelPolicy.

`run_groups` is the same function on one device: every member of a group
computed in turn from h0, then combined exactly as above (`combine_group`,
which the multi-rank forward uses too). attention+tp-mlp computes the attention
policy's function (its MLP and LM-head shards add up to the whole), so on one
device the two are one. `LocalLayerParallelForward` wraps it with the call
signature of `LayerParallelForward`, so that training (easyspec.distill) and
acceptance measurement run what N drafting ranks compute, on a single device.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.distributed import ProcessGroup

from easyspec.model import kernels
from easyspec.model.kv_cache import KVCache, SlotView
from easyspec.model.transformer import Block, StepInputs, Transformer
from easyspec.options import ParallelPolicy
from easyspec.parallel import comm
from easyspec.parallel.tp import VocabParallelHead


class LayoutError(ValueError):
    """A layer grouping is invalid; the message says how to fix it."""


@dataclass(frozen=True)
class LayerLayout:
    groups: tuple[tuple[int, ...], ...]

    @property
    def max_size(self) -> int:
        """Layers in the largest group: the drafting ranks this layout needs."""
        return max(len(g) for g in self.groups)

    def __str__(self) -> str:
        return ",".join(str(g[0]) if len(g) == 1 else f"{g[0]}-{g[-1]}" for g in self.groups)

    @classmethod
    def build(cls, num_layers: int, size: int, keep_first: int, keep_last: int) -> LayerLayout:
        """First/last layers sequential, the middle cut into consecutive groups of `size`."""
        if size < 1:
            raise LayoutError(f"--layer-parallel must be >= 1, got {size}")
        if keep_first < 0 or keep_last < 0 or keep_first + keep_last > num_layers:
            raise LayoutError(
                f"--keep-first {keep_first} and --keep-last {keep_last} must be >= 0 and "
                f"together at most the draft's {num_layers} layers"
            )
        groups = [(i,) for i in range(keep_first)]
        middle = list(range(keep_first, num_layers - keep_last))
        groups += [tuple(middle[i : i + size]) for i in range(0, len(middle), size)]
        groups += [(i,) for i in range(num_layers - keep_last, num_layers)]
        return cls(tuple(groups))

    @classmethod
    def choose(cls, groups: str | None, num_layers: int, size: int, keep_first: int, keep_last: int) -> LayerLayout:
        """The explicit grouping when one is given (--groups), else the built one."""
        if groups:
            return cls.parse(groups, num_layers, size)
        return cls.build(num_layers, size, keep_first, keep_last)

    @classmethod
    def parse(cls, spec: str, num_layers: int, size: int) -> LayerLayout:
        """An explicit grouping such as "0,1,2-3,4-5,6-7,8,9"."""
        groups = []
        for item in spec.split(","):
            item = item.strip()
            try:
                if "-" in item:
                    lo, hi = (int(v) for v in item.split("-"))
                    groups.append(tuple(range(lo, hi + 1)))
                else:
                    groups.append((int(item),))
            except ValueError:
                raise LayoutError(f"--groups: cannot read {item!r}; write layers like 0,1,2-3,4-5") from None
        layout = cls(tuple(groups))
        layout.validate(num_layers, size)
        return layout

    def validate(self, num_layers: int, size: int) -> None:
        flat = [layer for g in self.groups for layer in g]
        if flat != list(range(num_layers)):
            raise LayoutError(
                f"--groups must cover the draft's layers 0..{num_layers - 1} once each, in order; got {self}"
            )
        too_big = [g for g in self.groups if len(g) > size]
        if too_big:
            raise LayoutError(f"--groups: group {too_big[0]} has more layers than --layer-parallel {size}")


# attend(layer, x, residual) -> that layer's attention update for input x [B, T, D], plus
# `residual` when one is given (as Block.attention adds it)
Attend = Callable[[int, Tensor, Tensor | None], Tensor]


def combine_group(layers: nn.ModuleList, group: Sequence[int], h0: Tensor, updates: Sequence[Tensor], policy: str,
                  mlp: Callable[[int, Tensor], Tensor] | None = None) -> Tensor:
    """h after a group from its entry state h0 [B, T, D] and each member's update, in layer order.

    updates[j]: the attention update of layer group[j] from h0 (policy "layer": the whole layer's,
    attention plus MLP). `mlp(layer, x)` stands in for the layer's own MLP sub-block (a sharded one).
    """
    x = h0
    for layer, update in zip(group, updates, strict=True):
        x = x + update
        if policy != ParallelPolicy.LAYER:
            x = x + (mlp(layer, x) if mlp is not None else layers[layer].feed_forward(x))
    return x


def run_groups(layers: nn.ModuleList, groups: Sequence[Sequence[int]], x: Tensor, attend: Attend,
               policy: str = ParallelPolicy.ATTENTION) -> Tensor:
    """The layer-parallel function on one device: x [B, T, D] through `groups` in order.

    Every member of a group reads the group's input; a group of one is an ordinary layer
    (for every policy, with Block.forward's arithmetic). `attend` computes attention sub-blocks,
    so a caller chooses where their keys and values come from (the KV cache, or an exact
    pass during training).
    """
    for group in groups:
        if len(group) == 1:
            x = attend(group[0], x, x)
            x = layers[group[0]].feed_forward(x, residual=x)
            continue
        h0 = x
        updates = []
        for layer in group:
            update = attend(layer, h0, None)
            if policy == ParallelPolicy.LAYER:
                update = update + layers[layer].feed_forward(h0 + update)
            updates.append(update)
        x = combine_group(layers, group, h0, updates, policy)
    return x


class LocalLayerParallelForward:
    """The layer-parallel forward of LayerParallelForward with every group member on this one device.

    It computes what `layout.max_size` drafting ranks compute together (the CPU tests check
    equality with 2 and 4 processes), so acceptance measured with it is that of real
    layer-parallel drafting; its timings are not.
    """

    def __init__(self, model: Transformer, layout: LayerLayout, policy: str = ParallelPolicy.ATTENTION) -> None:
        if policy not in ParallelPolicy.names():
            raise LayoutError(f"unknown parallel policy {policy!r}; choose one of {', '.join(ParallelPolicy.names())}")
        layout.validate(model.config.num_layers, layout.max_size)
        self.model, self.layout, self.policy = model, layout, policy

    def __call__(self, tokens: Tensor, positions: Tensor, cache: KVCache | SlotView, kv_len: int,
                 mask: Tensor | None = None) -> Tensor:
        """tokens, positions: [T]; mask: [T, L] bool or None for causal -> logits [T, V]."""
        model = self.model
        layers = model.layers
        step: StepInputs = model.step_inputs(positions, cache, kv_len, mask)

        def attend(i: int, h: Tensor, residual: Tensor | None) -> Tensor:
            return layers[i].attention(h, step, residual)

        x = run_groups(layers, self.layout.groups, model.embed_tokens(tokens[None]), attend, self.policy)  # [1, T, D]
        return model.logits(x)[0]


class ShardedMLP(nn.Module):
    """This rank's 1/n of one draft MLP (rows of gate and up, columns of down)."""

    def __init__(self, block: Block, rank: int, n: int) -> None:
        super().__init__()
        gate, up = block.mlp.gate_up_proj.weight.chunk(2, dim=0)
        part = gate.shape[0] // n
        rows = slice(rank * part, (rank + 1) * part)
        self.norm = block.post_attention_norm
        self.gate_up = torch.cat((gate[rows], up[rows])).contiguous()  # [2I/n, D]
        self.down = block.mlp.down_proj.weight[:, rows].contiguous()  # [D, I/n]

    def forward(self, x: Tensor, group: ProcessGroup | None) -> Tensor:
        hidden = kernels.silu_mul(F.linear(self.norm(x), self.gate_up))  # [B, T, I/n]
        return comm.all_reduce(F.linear(hidden, self.down), group)


class LayerParallelForward:
    """The layer-parallel forward of a replicated draft: fn(tokens, positions, cache, kv_len) -> logits."""

    def __init__(
        self,
        model: Transformer,
        layout: LayerLayout,
        rank: int,
        size: int,
        group: ProcessGroup | None,
        policy: str = ParallelPolicy.ATTENTION,
    ) -> None:
        if policy not in ParallelPolicy.names():
            raise LayoutError(f"unknown parallel policy {policy!r}; choose one of {', '.join(ParallelPolicy.names())}")
        layout.validate(model.config.num_layers, size)
        if policy == ParallelPolicy.ATTENTION_TP_MLP and model.config.intermediate_size % size:
            raise LayoutError(
                f"policy attention+tp-mlp needs the draft's intermediate_size "
                f"({model.config.intermediate_size}) divisible by --layer-parallel {size}"
            )
        self.model, self.layout, self.rank, self.size = model, layout, rank, size
        self.group, self.policy = group, policy
        self.sharded_mlps: dict[int, ShardedMLP] = {}
        if policy == ParallelPolicy.ATTENTION_TP_MLP:
            for g in layout.groups:
                if len(g) > 1:
                    self.sharded_mlps.update({i: ShardedMLP(model.layers[i], rank, size) for i in g})
        # tp-mlp also splits the LM head (the largest single read of a small draft) by vocabulary.
        self.head: VocabParallelHead | None = None
        vocab = model.config.vocab_size
        if policy == ParallelPolicy.ATTENTION_TP_MLP and size > 1 and vocab % size == 0:
            part = vocab // size
            with torch.device("meta"):
                self.head = VocabParallelHead(model.config.hidden_size, part, group)
            self.head.weight = nn.Parameter(model.lm_head.weight[rank * part : (rank + 1) * part], requires_grad=False)

    def __call__(self, tokens: Tensor, positions: Tensor, cache: KVCache | SlotView, kv_len: int,
                 mask: Tensor | None = None) -> Tensor:
        """tokens, positions: [T]; mask: [T, L] bool or None for causal -> logits [T, V]."""
        model = self.model
        x = model.embed_tokens(tokens[None])  # [1, T, D]
        step = model.step_inputs(positions, cache, kv_len, mask)
        # Where this forward's KV entries land: at their positions, or at a view's own slots.
        slots = cache.slots if isinstance(cache, SlotView) else positions
        for g in self.layout.groups:
            if len(g) == 1:
                x = model.layers[g[0]](x, step)
            else:
                x = self._group(x, g, step, cache, slots)
        if self.head is None:
            return model.logits(x)[0]
        return self.head(model.norm(x))[0].float()

    def _group(self, h0: Tensor, g: tuple[int, ...], step, cache: KVCache | SlotView, slots: Tensor) -> Tensor:
        layers = self.model.layers
        seq, dim = h0.shape[1], h0.shape[2]
        kv = cache.keys[0].shape[0] * cache.keys[0].shape[2]  # Hkv * hd
        mine = g[self.rank] if self.rank < len(g) else None
        # This rank's contribution: its residual update and its layer's new KV entries.
        payload = h0.new_zeros(seq, dim + 2 * kv)  # [T, D + 2 * Hkv * hd]
        if mine is not None:
            block = layers[mine]
            update = block.attention(h0, step)
            if self.policy == ParallelPolicy.LAYER:
                update = update + block.feed_forward(h0 + update)
            keys = cache.keys[mine].index_select(1, slots).transpose(0, 1).reshape(seq, kv)
            values = cache.values[mine].index_select(1, slots).transpose(0, 1).reshape(seq, kv)
            payload = torch.cat((update[0], keys, values), dim=-1)
        gathered = comm.all_gather(payload, self.group)  # [N, T, D + 2kv]
        updates = []
        for j, layer in enumerate(g):
            update, keys, values = gathered[j].split([dim, kv, kv], dim=-1)
            updates.append(update[None])
            if layer != mine:
                shape = (seq, cache.keys[layer].shape[0], -1)
                cache.write(layer, slots, keys.reshape(shape).transpose(0, 1),
                            values.reshape(shape).transpose(0, 1))
        mlp = (lambda layer, x: self.sharded_mlps[layer](x, self.group)) if self.sharded_mlps else None
        return combine_group(layers, g, h0, updates, self.policy, mlp)
