"""Distillation data: text the base generates from prompt sets, optionally mixed with a corpus.

Generated rows: every chat prompt goes through the base's chat template (raw
when it has none) and every code prompt is used as raw text; each gets one
greedy continuation and `samples` sampled ones. A row is prompt + continuation;
the loss covers the continuation only (what a draft is asked to predict).
Corpus rows: windows of `seq_len` tokens cut from text files, the loss on
every position. Rows are stored as one flat int32 tensor with offsets, in a
file that later runs can reuse (--data), so two drafts can learn from the
same text without generating it twice.

Batches are a pure function of the step number: each source is read in a
seeded permutation, epoch after epoch, so a resumed run sees exactly the rows
an uninterrupted one would have.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from easyspec.distill.generate import generate
from easyspec.model.config import ModelConfig
from easyspec.model.loader import eos_ids
from easyspec.model.tokenizer import Tokenizer
from easyspec.model.transformer import Transformer
from easyspec.options import SamplingParams
from easyspec.zoo.prompts import Prompt, read_prompts

FORMAT_VERSION = 1
_TEXT_SUFFIXES_SKIPPED = {".pyc", ".so", ".png", ".jpg", ".gz", ".zip", ".whl", ".pdf", ".bin", ".safetensors"}


class DataError(ValueError):
    """Training data cannot be built or reused; the message says why and what to do."""


@dataclass
class Rows:
    """Token rows back to back: row i is tokens[offsets[i]:offsets[i+1]]; loss from position starts[i]."""

    tokens: Tensor  # int32 [total]
    offsets: Tensor  # long [N + 1]
    starts: Tensor  # long [N]: the first target position of the loss (the continuation's first token)

    @classmethod
    def from_lists(cls, rows: Sequence[Sequence[int]], starts: Sequence[int]) -> Rows:
        lengths = torch.tensor([len(r) for r in rows], dtype=torch.long)
        offsets = torch.zeros(len(rows) + 1, dtype=torch.long)
        offsets[1:] = lengths.cumsum(0)
        flat = torch.tensor([t for r in rows for t in r], dtype=torch.int32)
        return cls(flat, offsets, torch.tensor(list(starts), dtype=torch.long))

    def __len__(self) -> int:
        return len(self.starts)

    def row(self, i: int) -> Tensor:
        return self.tokens[self.offsets[i]:self.offsets[i + 1]]

    @property
    def num_tokens(self) -> int:
        return int(self.offsets[-1])


def read_prompt_set(path: str | Path) -> list[Prompt]:
    try:
        prompts = read_prompts(path)
    except ValueError as err:
        raise DataError(str(err)) from None
    if not prompts:
        raise DataError(f"{path}: no prompts in the file")
    return prompts


def generate_rows(base: Transformer, tokenizer: Tokenizer, chat: Sequence[Prompt], code: Sequence[Prompt],
                  samples: int, max_new: int, temperature: float, top_p: float, batch_size: int, seed: int,
                  log: Callable[[str], None], deadline: float | None = None) -> tuple[Rows, dict[str, Any]]:
    """One greedy and `samples` sampled continuations of every prompt (first turn), stopping at EOS.

    Past `deadline` (time.monotonic()) generation ends and keeps what it has: the greedy continuations
    come first, so a short budget still covers every prompt once."""
    prompts = [tokenizer.encode_prompt(p.turns[0]) for p in chat]
    prompts += [tokenizer.encode_prompt(p.turns[0], raw=True) for p in code]
    stops = eos_ids(base.config, tokenizer)
    total = len(prompts) * (1 + samples)
    rows: list[list[int]] = []
    starts: list[int] = []
    done = 0
    begin = time.perf_counter()

    def progress(count: int) -> None:
        nonlocal done
        done += count
        elapsed = time.perf_counter() - begin
        log(f"generated {done}/{total} continuations, {elapsed:.0f}s")

    passes = [SamplingParams(max_new_tokens=max_new)]
    if samples:
        passes.append(SamplingParams(temperature=temperature, top_p=top_p, max_new_tokens=max_new))
    for params in passes:
        batch = prompts if params.greedy else [p for p in prompts for _ in range(samples)]
        outs = generate(base, batch, max_new, params, batch_size, stops, seed, on_batch=progress, deadline=deadline)
        for prompt, out in zip(batch, outs, strict=True):
            if out:  # None: never started before the deadline; []: cut before its first token
                rows.append(prompt + out)
                starts.append(len(prompt))
    if not rows:
        raise DataError("the generation time budget ended before the base wrote any text; raise --gen-minutes")
    if len(rows) < total:
        log(f"the generation time budget ended: kept {len(rows)} of {total} continuations")
    data = Rows.from_lists(rows, starts)
    generated = data.num_tokens - sum(starts)
    seconds = time.perf_counter() - begin
    summary = {"chat_prompts": len(chat), "code_prompts": len(code), "samples_per_prompt": samples,
               "rows": len(data), "rows_asked": total, "generated_tokens": generated, "max_new_tokens": max_new,
               "temperature": temperature, "top_p": top_p, "seconds": round(seconds, 1),
               "generated_tokens_per_s": round(generated / max(seconds, 1e-9))}
    return data, summary


def save_rows(rows: Rows, path: Path, base_config: ModelConfig, summary: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save({"format": FORMAT_VERSION, "base": base_config.to_hf(), "summary": summary, "tokens": rows.tokens,
                "offsets": rows.offsets, "starts": rows.starts}, tmp)
    tmp.replace(path)


def load_rows(path: Path, base_config: ModelConfig) -> tuple[Rows, dict[str, Any]]:
    """Generated rows from an earlier run; they must come from a base of the same shape and vocabulary."""
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several unrelated types for a damaged file
        raise DataError(f"{path}: cannot be read as distillation data ({err}); delete it to generate anew") from None
    if not isinstance(saved, dict) or saved.get("format") != FORMAT_VERSION:
        raise DataError(f"{path}: not a distillation data file of this version; delete it to generate anew")
    if saved["base"] != base_config.to_hf():
        raise DataError(f"{path}: generated by another base model; pass another --data file")
    return Rows(saved["tokens"], saved["offsets"], saved["starts"]), saved["summary"]


def corpus_files(path: Path) -> list[Path]:
    """A text file, or every file under a folder (sorted; hidden and cache folders skipped)."""
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise DataError(f"--corpus {path}: no such file or folder")
    found = []
    for file in sorted(path.rglob("*")):
        parts = file.relative_to(path).parts
        if any(p.startswith(".") or p == "__pycache__" for p in parts) or not file.is_file():
            continue
        if file.suffix.lower() not in _TEXT_SUFFIXES_SKIPPED:
            found.append(file)
    return found


def corpus_rows(path: str | Path, tokenizer: Tokenizer, eos_id: int, seq_len: int, max_bytes: int) -> tuple[Rows,
                                                                                                           dict]:
    """Windows of seq_len + 1 tokens over the corpus's UTF-8 text files, each file followed by EOS."""
    texts, size = [], 0
    for file in corpus_files(Path(path)):
        try:
            data = file.read_bytes()
        except OSError:
            continue
        if b"\0" in data[:4096]:
            continue  # binary
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            continue
        texts.append(text)
        size += len(data)
        if size >= max_bytes:
            break
    if not texts:
        raise DataError(f"--corpus {path}: no UTF-8 text files found")
    stream: list[int] = []
    for ids in tokenizer.encode_batch(texts, add_special_tokens=False):
        stream += ids + [eos_id]
    window = seq_len + 1
    count = len(stream) // window
    if count == 0:
        raise DataError(f"--corpus {path}: {len(stream)} tokens, fewer than one window of {window}")
    rows = [stream[i * window:(i + 1) * window] for i in range(count)]
    summary = {"path": str(path), "files": len(texts), "bytes": size, "tokens": len(stream), "windows": count}
    return Rows.from_lists(rows, [1] * count), summary


class Batches:
    """The rows of training step s: `generated_rows` from the generated set, the rest from the corpus."""

    def __init__(self, generated: Rows | None, corpus: Rows | None, batch_size: int, corpus_share: float,
                 seq_len: int, seed: int) -> None:
        if corpus is None:
            from_corpus = 0
        elif generated is None:
            from_corpus = batch_size
        else:
            from_corpus = min(batch_size - 1, max(1, round(batch_size * corpus_share)))
        # (rows, the rows usable at seq_len, rows per step, seed of the source's permutations)
        self.sources = []
        for k, (rows, count) in enumerate(((generated, batch_size - from_corpus), (corpus, from_corpus))):
            if rows is None or not count:
                continue
            usable = (rows.starts <= seq_len).nonzero().flatten()  # a row cut at seq_len + 1 keeps a target
            if not len(usable):
                raise DataError(f"every prompt is longer than --seq-len {seq_len} tokens; raise --seq-len")
            self.sources.append((rows, usable, count, seed + 7919 * k))
        if not self.sources:
            raise DataError("no training rows: give a corpus (--corpus) or let the base generate text")
        self.seq_len = seq_len
        self._perms: dict[tuple[int, int], Tensor] = {}

    def _index(self, source: int, usable: Tensor, seed: int, i: int) -> int:
        epoch, within = divmod(i, len(usable))
        key = (source, epoch)
        if key not in self._perms:
            self._perms = {k: v for k, v in self._perms.items() if k[0] != source}  # one epoch kept per source
            order = torch.randperm(len(usable), generator=torch.Generator().manual_seed(seed + epoch))
            self._perms[key] = usable[order]
        return int(self._perms[key][within])

    def batch(self, step: int) -> tuple[Tensor, Tensor, Tensor]:
        """inputs, targets: [B, T] long (T <= seq_len, padded with 0); select: [B, T] bool, the loss positions."""
        picked: list[tuple[Tensor, int]] = []
        for source, (rows, usable, count, seed) in enumerate(self.sources):
            for j in range(step * count, (step + 1) * count):
                index = self._index(source, usable, seed, j)
                picked.append((rows.row(index)[:self.seq_len + 1], int(rows.starts[index])))
        width = max(len(r) for r, _ in picked) - 1
        inputs = torch.zeros(len(picked), width, dtype=torch.long)
        targets = torch.zeros(len(picked), width, dtype=torch.long)
        select = torch.zeros(len(picked), width, dtype=torch.bool)
        for b, (row, start) in enumerate(picked):
            n = len(row) - 1
            inputs[b, :n] = row[:-1]
            targets[b, :n] = row[1:]
            select[b, max(start - 1, 0):n] = True  # position t predicts token t + 1
        return inputs, targets, select
