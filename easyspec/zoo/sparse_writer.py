"""Safetensors shards written sparsely: only the bytes that are not zero.

An inflated checkpoint is mostly zeros (padding, added layers). A safetensors file is an
8-byte header length, a JSON header and one flat byte buffer; this writer sizes the file with
truncate, which on every common filesystem leaves unwritten ranges as holes that read back as
zeros without being stored, and then writes each tensor's non-zero block through a memory
map. An 8B-shape checkpoint inflated from a small model thus costs about the small model's
bytes of disk writes, and the file is an ordinary safetensors file to every reader.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

_SAFETENSORS_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}
# numpy has no bfloat16: every dtype is written through an integer view of the same width.
_RAW = {torch.float32: (torch.int32, np.int32), torch.bfloat16: (torch.int16, np.int16),
        torch.float16: (torch.int16, np.int16)}


@dataclass
class Placed:
    """A tensor of `shape` that is zero except `values` (float32) at `index` (as in out[index] =
    values: per dim a slice or a 1-D long tensor, at most one of them a tensor); `values` None
    for an all-zero tensor."""

    name: str
    shape: tuple[int, ...]
    index: tuple = ()
    values: Tensor | None = None

    def block(self, dtype: torch.dtype) -> Tensor | None:
        """The smallest leading block [:r, :c] holding every non-zero value, in `dtype`."""
        if self.values is None:
            return None
        ends = tuple(_end(i, n) for i, n in zip(self.index, self.shape, strict=True))
        out = torch.zeros(ends, dtype=dtype)
        out[self.index] = self.values.to(dtype)
        return out


def _end(index: slice | Tensor, size: int) -> int:
    if isinstance(index, slice):
        return size if index.stop is None else index.stop
    return int(index.max()) + 1


class SparseShardWriter:
    """Groups tensors into shards of at most `max_bytes` each (a larger tensor gets its own),
    writes each shard when it is full, and on `close` names them as Hugging Face does and writes
    the index when there is more than one."""

    def __init__(self, folder: Path, dtype: torch.dtype, max_bytes: int) -> None:
        self.folder, self.dtype, self.max_bytes = folder, dtype, max_bytes
        self.itemsize = torch.empty((), dtype=dtype).element_size()
        self.pending: list[Placed] = []
        self.pending_bytes = 0
        self.files: list[tuple[Path, list[str]]] = []
        self.total = 0

    def add(self, tensor: Placed) -> None:
        nbytes = int(np.prod(tensor.shape)) * self.itemsize
        if self.pending and self.pending_bytes + nbytes > self.max_bytes:
            self._flush()
        self.pending.append(tensor)
        self.pending_bytes += nbytes
        self.total += nbytes

    def _flush(self) -> None:
        path = self.folder / f"shard-{len(self.files):05d}.tmp"
        header: dict = {"__metadata__": {"format": "pt"}}
        offset = 0
        for t in self.pending:
            size = int(np.prod(t.shape)) * self.itemsize
            header[t.name] = {"dtype": _SAFETENSORS_DTYPES[self.dtype], "shape": list(t.shape),
                              "data_offsets": [offset, offset + size]}
            offset += size
        text = json.dumps(header, separators=(",", ":")).encode()
        text += b" " * (-len(text) % 8)  # the buffer starts 8-byte aligned
        start = 8 + len(text)
        with open(path, "wb") as f:
            f.write(struct.pack("<Q", len(text)) + text)
            f.truncate(start + offset)  # the buffer: a hole until written
        if offset:
            self._write_blocks(path, start, header)
        self.files.append((path, [t.name for t in self.pending]))
        self.pending, self.pending_bytes = [], 0

    def _write_blocks(self, path: Path, start: int, header: dict) -> None:
        torch_raw, numpy_raw = _RAW[self.dtype]
        buffer = np.memmap(path, dtype=np.uint8, mode="r+", offset=start)
        for t in self.pending:
            block = t.block(self.dtype)
            if block is None:
                continue
            begin, end = header[t.name]["data_offsets"]
            full = buffer[begin:end].view(numpy_raw).reshape(t.shape)
            full[tuple(slice(0, n) for n in block.shape)] = block.view(torch_raw).numpy()
        buffer.flush()
        del buffer

    def close(self) -> int:
        """Write what is pending, name the files; returns the checkpoint's size in bytes."""
        if self.pending or not self.files:
            self._flush()
        if len(self.files) == 1:
            self.files[0][0].rename(self.folder / "model.safetensors")
            return self.total
        weight_map = {}
        for i, (path, names) in enumerate(self.files, start=1):
            final = f"model-{i:05d}-of-{len(self.files):05d}.safetensors"
            path.rename(self.folder / final)
            weight_map.update(dict.fromkeys(names, final))
        index = {"metadata": {"total_size": self.total}, "weight_map": weight_map}
        (self.folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        return self.total
