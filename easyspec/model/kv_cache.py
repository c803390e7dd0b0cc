"""A preallocated key/value cache addressed by absolute position.

Every forward writes the keys and values of its tokens at their positions and
reads the first `kv_len` slots back. Rolling back rejected draft tokens is
therefore free: the next forward simply overwrites those slots, and the
attention mask (built from positions) never lets a query see a slot beyond its
own position. No tensor is ever reallocated, which keeps step shapes static for
CUDA graphs.
"""

from __future__ import annotations

import torch
from torch import Tensor


class KVCache:
    def __init__(
        self,
        num_layers: int,
        num_kv_heads: int,
        head_dim: int,
        max_len: int,
        dtype: torch.dtype,
        device: torch.device | str,
    ) -> None:
        shape = (num_kv_heads, max_len, head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.max_len = max_len

    def write(self, layer: int, positions: Tensor, keys: Tensor, values: Tensor) -> tuple[Tensor, Tensor]:
        """Store one layer's new entries and return that layer's whole buffers.

        positions: [T] long; keys, values: [Hkv, T, hd].
        Returns the layer's key and value buffers, each [Hkv, max_len, hd].
        """
        k_buf, v_buf = self.keys[layer], self.values[layer]
        k_buf.index_copy_(1, positions, keys)
        v_buf.index_copy_(1, positions, values)
        return k_buf, v_buf

    def slots_for(self, positions: Tensor) -> Tensor:
        """Where a forward at `positions` [T] stores its entries: at those positions."""
        return positions


class SlotView:
    """The same cache, with one forward's entries stored at explicit slots.

    A plain forward stores token t at slot positions[t]. When several tokens
    share a position (alternative continuations of one prefix, each at the same
    depth) they still need slots of their own: this view stores the forward's
    t-th entry at slots[t] instead, and the caller's attention mask says which
    slots each token may read. slots: [T] long, distinct.
    """

    def __init__(self, cache: KVCache, slots: Tensor) -> None:
        self.cache, self.slots = cache, slots
        self.keys, self.values, self.max_len = cache.keys, cache.values, cache.max_len

    def write(self, layer: int, positions: Tensor, keys: Tensor, values: Tensor) -> tuple[Tensor, Tensor]:
        """As KVCache.write, but at this view's slots; the tokens' positions [T] are not used."""
        return self.cache.write(layer, self.slots, keys, values)

    def slots_for(self, positions: Tensor) -> Tensor:
        """Where a forward stores its entries: at this view's slots, whatever the positions."""
        return self.slots
