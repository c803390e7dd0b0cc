"""Train one model of a pair on a packed token stream, and export it in HF format.

The stream is every file of a split as <|bos|> tokens <|eos|>, back to back.
A step draws `batch_size` windows of seq_len + 1 tokens at offsets from a
seeded CPU generator, so the data order is the same on every device. The model
is easyspec's own Transformer, called exactly as the engine calls it without a
cache, so whatever it learns is what the engine will run.

Runs are sized in steps. A time budget (`minutes`) is turned into steps first:
a few throw-away steps and one validation pass are timed, and training then
starts afresh from the seed as if that many steps had been asked for, so that
`--steps` with the number recorded in training.json repeats the run (bit for
bit on CPU; CUDA kernels such as the embedding backward are not deterministic).
"""

from __future__ import annotations

import contextlib
import json
import math
import platform
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from easyspec.model.checkpoint import save_checkpoint
from easyspec.model.config import ModelConfig
from easyspec.model.transformer import Transformer
from easyspec.zoo.bpe import BOS_ID, EOS_ID, TOKENIZER_FILES
from easyspec.zoo.pairs import ModelSpec, TrainSettings

INIT_STD = 0.02
SHARD_BYTES = 16 << 20
_PROBE_STEPS = 10  # timed throw-away steps (after two warm-up steps) that size a --minutes run
_LOG_EVERY = 50
_START_CHUNK = 512  # steps whose window offsets are drawn and copied to the device at once

Log = Callable[[str], None]


def pack_stream(token_lists: list[list[int]]) -> np.ndarray:
    """Concatenate already BOS-prefixed token lists, each followed by <|eos|>: uint16/int32 [N]."""
    total = sum(len(ids) + 1 for ids in token_lists)
    dtype = np.uint16 if max((max(ids, default=0) for ids in token_lists), default=0) < 1 << 16 else np.int32
    out = np.empty(total, dtype=dtype)
    pos = 0
    for ids in token_lists:
        out[pos:pos + len(ids)] = ids
        out[pos + len(ids)] = EOS_ID
        pos += len(ids) + 1
    return out


def build_model(cfg: ModelConfig, seed: int) -> Transformer:
    """A freshly initialised float32 model on the CPU (the same on every machine for a seed).

    Weights are N(0, 0.02); the two projections that write into the residual
    stream (o_proj, down_proj) are scaled by 1/sqrt(2 * layers) so the stream's
    variance does not grow with depth. Norm weights start at one.
    """
    torch.manual_seed(seed)
    model = Transformer(cfg)
    residual_std = INIT_STD / math.sqrt(2 * cfg.num_layers)
    for name, param in model.named_parameters():
        if name.endswith("norm.weight"):
            nn.init.ones_(param)
        elif name.endswith("bias"):
            nn.init.zeros_(param)
        else:
            std = residual_std if name.endswith(("o_proj.weight", "down_proj.weight")) else INIT_STD
            nn.init.normal_(param, mean=0.0, std=std)
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    return model


def lr_at(step: int, total: int, s: TrainSettings) -> float:
    """Linear warm-up to s.lr, then cosine decay to s.lr * s.min_lr_ratio at `total`."""
    warmup = min(s.warmup_steps, max(1, total // 10))
    if step < warmup:
        return s.lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return s.lr * (s.min_lr_ratio + (1 - s.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def _windows(stream: Tensor, starts: Tensor, seq_len: int) -> tuple[Tensor, Tensor]:
    """stream: [N] on the device; starts: [B] -> inputs, targets: [B, seq_len] long."""
    offsets = torch.arange(seq_len + 1, device=stream.device)
    chunk = stream[starts.to(stream.device)[:, None] + offsets].long()  # [B, seq_len + 1]
    return chunk[:, :-1], chunk[:, 1:]


def _val_starts(n_tokens: int, seq_len: int, max_windows: int) -> Tensor:
    """Evenly spaced, fixed window offsets over the held-out stream."""
    last = n_tokens - seq_len - 1
    if last < 0:
        raise ValueError(f"the held-out split has {n_tokens} tokens; seq_len + 1 = {seq_len + 1} needed")
    count = min(max_windows, last // seq_len + 1)
    return torch.linspace(0, last, count).long()


def _loss(model: Transformer, inputs: Tensor, targets: Tensor, positions: Tensor) -> Tensor:
    logits = model(inputs, positions)  # float32 [B, T, V]
    return F.cross_entropy(logits.flatten(0, 1), targets.flatten())


@torch.no_grad()
def evaluate(model: Transformer, stream: Tensor, starts: Tensor, s: TrainSettings,
             autocast: contextlib.AbstractContextManager) -> float:
    model.eval()
    positions = torch.arange(s.seq_len, device=stream.device)
    total = torch.zeros((), device=stream.device)
    for batch in starts.split(s.batch_size):
        inputs, targets = _windows(stream, batch, s.seq_len)
        with autocast:
            total += _loss(model, inputs, targets, positions) * len(batch)
    model.train()
    return float(total) / len(starts)


def _autocast(device: torch.device) -> contextlib.AbstractContextManager:
    # bf16 autocast on CUDA; CPU runs stay in float32 so tests can compare exactly.
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _optimizer(model: Transformer, s: TrainSettings, device: torch.device) -> torch.optim.AdamW:
    params = list({id(p): p for p in model.parameters()}.values())  # tied weights once
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": s.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},  # norms and biases
    ]
    return torch.optim.AdamW(groups, lr=s.lr, betas=(0.9, 0.95), eps=1e-8, fused=device.type == "cuda")


@dataclass
class TrainResult:
    steps: int
    tokens_seen: int
    train_loss: float  # mean over the last logging interval
    val_loss: float
    minutes: float  # wall time of the training loop, validation included
    val_history: list[tuple[int, float]]


class _Session:
    """A freshly seeded model, optimiser and data order, stepped one batch at a time."""

    def __init__(self, spec: ModelSpec, train: Tensor, val: Tensor, device: torch.device, seed: int) -> None:
        s = self.settings = spec.train
        if len(train) <= s.seq_len:
            raise ValueError(f"the train split has {len(train)} tokens; seq_len + 1 = {s.seq_len + 1} needed")
        self.model = build_model(spec.config, seed).to(device).train()
        self.opt = _optimizer(self.model, s, device)
        self.gen = torch.Generator().manual_seed(seed)
        self.autocast = _autocast(device)
        self.positions = torch.arange(s.seq_len, device=device)
        self.train, self.val = train, val
        self.val_starts = _val_starts(len(val), s.seq_len, s.eval_windows)
        self.sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
        self._starts = torch.empty(0, s.batch_size, dtype=torch.long)  # [steps, B] window offsets, on device
        self._next = 0

    def _draw_starts(self) -> Tensor:
        """The next step's [B] window offsets.

        They are drawn on the CPU (the same order on every device) for _START_CHUNK
        steps at once: copying pageable memory to a GPU waits for the GPU to go
        idle, which would stall the launch queue if done every step.
        """
        if self._next == len(self._starts):
            s = self.settings
            chunk = torch.randint(0, len(self.train) - s.seq_len, (_START_CHUNK, s.batch_size), generator=self.gen)
            self._starts, self._next = chunk.to(self.train.device), 0
        self._next += 1
        return self._starts[self._next - 1]

    def step(self, step: int, total: int) -> Tensor:
        """One optimiser step at schedule position `step` of `total`; returns the loss on the device."""
        s = self.settings
        for group in self.opt.param_groups:
            group["lr"] = lr_at(step, total, s)
        inputs, targets = _windows(self.train, self._draw_starts(), s.seq_len)
        with self.autocast:
            loss = _loss(self.model, inputs, targets, self.positions)
        loss.backward()
        nn.utils.clip_grad_norm_(self.model.parameters(), s.grad_clip)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return loss.detach()

    def validate(self) -> float:
        return evaluate(self.model, self.val, self.val_starts, self.settings, self.autocast)


def _run(spec: ModelSpec, train: Tensor, val: Tensor, device: torch.device, steps: int, seed: int,
         log: Log) -> tuple[Transformer, TrainResult]:
    run = _Session(spec, train, val, device, seed)
    every = spec.train.eval_every
    recent: list[Tensor] = []
    last_losses: list[float] = []
    history: list[tuple[int, float]] = []
    start = time.perf_counter()
    for step in range(steps):
        recent.append(run.step(step, steps))
        done = step + 1
        # Reading losses forces a device sync, so it happens only every _LOG_EVERY steps.
        if done % _LOG_EVERY == 0 or done == steps:
            last_losses, recent = torch.stack(recent).tolist(), []
            line = f"step {done}/{steps} loss {np.mean(last_losses):.4f}"
            if done % every == 0 or done == steps:
                history.append((done, run.validate()))
                line += f" val {history[-1][1]:.4f}"
            log(f"{line} lr {lr_at(step, steps, spec.train):.2e} {time.perf_counter() - start:.0f}s")
        elif done % every == 0:
            history.append((done, run.validate()))
    run.sync()
    result = TrainResult(
        steps=steps,
        tokens_seen=steps * spec.train.batch_size * spec.train.seq_len,
        train_loss=float(np.mean(last_losses)),
        val_loss=history[-1][1],
        minutes=(time.perf_counter() - start) / 60,
        val_history=history,
    )
    return run.model, result


def steps_for_budget(spec: ModelSpec, train: Tensor, val: Tensor, device: torch.device, minutes: float,
                     seed: int, log: Log) -> int:
    """How many steps fit in `minutes`, validation passes included, from timed throw-away steps."""
    s = spec.train
    probe = _Session(spec, train, val, device, seed)
    for step in range(2):  # warm-up: allocator, kernel selection
        probe.step(step, 10**9)
    probe.sync()
    t0 = time.perf_counter()
    for step in range(2, 2 + _PROBE_STEPS):
        probe.step(step, 10**9)
    probe.sync()
    step_s = (time.perf_counter() - t0) / _PROBE_STEPS
    t0 = time.perf_counter()
    probe.validate()
    probe.sync()
    eval_s = time.perf_counter() - t0
    del probe
    # budget = steps * step_s + (steps / eval_every + 1) * eval_s
    steps = max(1, int((minutes * 60 - eval_s) / (step_s + eval_s / s.eval_every)))
    log(f"{step_s * 1e3:.1f} ms/step, {s.batch_size * s.seq_len / step_s:,.0f} tokens/s, "
        f"validation {eval_s:.2f}s: {steps} steps fit in {minutes:g} min")
    return steps


def train_model(spec: ModelSpec, train: np.ndarray, val: np.ndarray, device: str, seed: int,
                log: Log, steps: int | Callable[[], int] | None = None, minutes: float | None = None,
                on_steps: Callable[[int], None] | None = None) -> tuple[Transformer, TrainResult]:
    """Train `spec` for `steps`, or for as many steps as fit in `minutes`.

    `steps` may be a function, called once the data is on the device (a step
    count that another process is still working out); `on_steps` is told the
    step count as soon as it is known, before training starts.
    """
    if (steps is None) == (minutes is None):
        raise ValueError("give exactly one of steps and minutes")
    dev = torch.device(device)
    train_t = torch.from_numpy(train.astype(np.int32)).to(dev)  # [N]
    val_t = torch.from_numpy(val.astype(np.int32)).to(dev)  # [M]
    if steps is None:
        steps = steps_for_budget(spec, train_t, val_t, dev, minutes, seed, log)
    elif callable(steps):
        steps = steps()
    if on_steps is not None:
        on_steps(steps)
    return _run(spec, train_t, val_t, dev, steps, seed, log)


def device_name(device: str) -> str:
    dev = torch.device(device)
    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def export_model(model: Transformer, folder: str | Path, tokenizer_folder: str | Path,
                 record: dict[str, Any], dtype: torch.dtype = torch.bfloat16) -> None:
    """Write an HF-format checkpoint: weights in `dtype`, tokenizer, generation config, training.json."""
    folder = Path(folder)
    model = model.to(device="cpu", dtype=dtype).eval()
    save_checkpoint(model, folder, max_shard_bytes=SHARD_BYTES)
    for shard in folder.glob("*.safetensors"):
        shard.chmod(0o644)  # safetensors writes owner-only files; a checkpoint is meant to be shared
    for name in TOKENIZER_FILES:
        shutil.copyfile(Path(tokenizer_folder) / name, folder / name)
    generation = {"bos_token_id": BOS_ID, "eos_token_id": EOS_ID, "pad_token_id": EOS_ID}
    (folder / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    (folder / "training.json").write_text(json.dumps(record, indent=2) + "\n")
