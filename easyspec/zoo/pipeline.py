"""Train a whole pair: corpus, tokenizer and prompts once, then the base and the draft.

Output folder layout:
  tokenizer/      tokenizer.json, tokenizer_config.json (also copied into base/ and draft/)
  base/, draft/   HF-format checkpoints with generation_config.json and training.json
  prompts.jsonl   code-completion prompts from held-out files (Spec-Bench format)
  pair.json       what was trained, on which data, and both models' losses

With two devices the two models train at the same time, one spawned process
each (naming the same device twice is allowed, but then they share it); with
one device they train one after the other in this process. A time budget
(--minutes) applies to each model, except in a pair whose draft follows its
base: the base's budget is turned into a step count, and the draft trains for
that many steps on the same batches (in parallel, it waits for the count).
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from multiprocessing.connection import wait
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.multiprocessing

from easyspec.zoo.bpe import load_tokenizer, save_tokenizer, train_bpe
from easyspec.zoo.corpus import build_corpus, stable_hash
from easyspec.zoo.pairs import ModelSpec, PairSpec
from easyspec.zoo.prompts import make_prompts, write_prompts
from easyspec.zoo.train import device_name, export_model, pack_stream, train_model

DEFAULT_PROMPTS = 48


class PairError(ValueError):
    """A user mistake in the pair's arguments; the message says how to fix it."""


def log(prefix: str, message: str) -> None:
    print(f"[{prefix}] {message}", file=sys.stderr, flush=True)


@dataclass(frozen=True)
class Job:
    """Everything one training process needs (picklable for spawn)."""

    spec: ModelSpec
    pair: str
    device: str
    seed: int
    steps: int | None
    minutes: float | None
    data_dir: str  # holds train.npy and val.npy
    tokenizer_dir: str
    out_dir: str
    threads: int | None  # CPU threads for this process when two share the CPU
    record: dict[str, Any]  # command, corpus summary: copied into training.json


def run_job(job: Job, step_count: Any = None) -> dict[str, Any]:
    """Train and export one model; returns its training.json record.

    step_count: a queue shared by the two processes of a pair whose draft
    follows its base; the base puts its step count there, the draft takes it.
    """
    name = f"{job.spec.role} {job.device}"
    if job.threads:
        torch.set_num_threads(job.threads)
    if job.device.startswith("cuda"):
        torch.cuda.set_device(torch.device(job.device))
    train = np.load(Path(job.data_dir) / "train.npy")
    val = np.load(Path(job.data_dir) / "val.npy")
    cfg = job.spec.config
    log(name, f"{cfg.num_parameters() / 1e6:.2f}M parameters, {len(train):,} train tokens, "
        f"{len(val):,} held-out tokens")
    steps, minutes, on_steps = job.steps, job.minutes, None
    if step_count is not None and job.spec.role == "base":
        on_steps = step_count.put
    elif step_count is not None:
        log(name, "waiting for the base's step count")
        steps, minutes = step_count.get, None
    model, result = train_model(job.spec, train, val, job.device, job.seed, lambda m: log(name, m),
                                steps=steps, minutes=minutes, on_steps=on_steps)
    record = {
        **job.record,
        "pair": job.pair,
        "role": job.spec.role,
        "seed": job.seed,
        "steps": result.steps,
        "tokens_seen": result.tokens_seen,
        "final_train_loss": result.train_loss,
        "final_val_loss": result.val_loss,
        "val_history": result.val_history,
        "minutes": round(result.minutes, 3),
        "device": device_name(job.device),
        "torch": torch.__version__,
        "parameters": cfg.num_parameters(),
        "settings": dataclasses.asdict(job.spec.train),
    }
    export_model(model, job.out_dir, job.tokenizer_dir, record)
    log(name, f"done: {result.steps} steps, val loss {result.val_loss:.4f}, wrote {job.out_dir}")
    return record


def parse_devices(text: str) -> list[str]:
    """'cpu', 'cuda', 'cuda:0,cuda:1' ... -> at most two checked device names."""
    devices = [d.strip() for d in text.split(",") if d.strip()]
    if not 1 <= len(devices) <= 2:
        raise PairError(f"--devices takes one or two devices (base first), got {text!r}")
    for dev in devices:
        try:
            parsed = torch.device(dev)
        except RuntimeError:
            raise PairError(f"--devices: {dev!r} is not a device name (try cpu, cuda:0)") from None
        if parsed.type not in ("cpu", "cuda"):
            raise PairError(f"--devices: {dev!r} is neither cpu nor cuda")
        if parsed.type == "cuda":
            count = torch.cuda.device_count()
            if (parsed.index or 0) >= count:
                raise PairError(f"--devices: {dev} asked for, but {count} CUDA device(s) are visible")
    return devices


def default_devices() -> str:
    count = torch.cuda.device_count()
    return "cpu" if count == 0 else "cuda:0" if count == 1 else "cuda:0,cuda:1"


def prepare_data(pair: PairSpec, out: Path, data_dir: Path, site_packages: bool, seed: int,
                 n_prompts: int = DEFAULT_PROMPTS) -> dict[str, Any]:
    """Corpus, tokenizer (out/tokenizer), prompts (out/prompts.jsonl) and packed token streams."""
    t0 = time.perf_counter()
    corpus = build_corpus(site_packages=site_packages, max_bytes=pair.corpus_max_bytes)
    summary = corpus.summary()
    if not corpus.val or not corpus.train:
        raise PairError("the corpus has no held-out or no train files; is the Python standard library there?")
    log("data", f"{summary['train_files']} train files ({summary['train_chars'] / 1e6:.1f}M chars), "
        f"{summary['val_files']} held out, {time.perf_counter() - t0:.1f}s")
    # Hash order, so that a capped tokenizer sample covers every package, not the alphabetically first.
    sample = (f.text for f in sorted(corpus.train, key=lambda f: stable_hash(f.path)))
    tok = train_bpe(sample, pair.vocab_size, pair.tokenizer_max_chars)
    context = max(pair.base.train.seq_len, pair.draft.train.seq_len)
    save_tokenizer(tok, out / "tokenizer", model_max_length=context)
    write_prompts(make_prompts(corpus.val, n_prompts, seed), out / "prompts.jsonl")
    tok = load_tokenizer(out / "tokenizer")  # encode exactly as a reader of the saved files would
    for split, files in (("train", corpus.train), ("val", corpus.val)):
        encodings = tok.encode_batch([f.text for f in files], add_special_tokens=True)
        stream = pack_stream([e.ids for e in encodings])
        np.save(data_dir / f"{split}.npy", stream)
        summary[f"{split}_tokens"] = len(stream)
    log("data", f"tokenizer ({pair.vocab_size} tokens) and streams ready: {summary['train_tokens']:,} "
        f"train tokens, {time.perf_counter() - t0:.1f}s")
    return summary


def train_pair(pair: PairSpec, out: str | Path, devices: list[str], seed: int = 0,
               steps: int | None = None, minutes: float | None = None, site_packages: bool = False,
               command: str = "") -> dict[str, Any]:
    """Build the data, train both models, write out/pair.json; returns its contents."""
    out = Path(out)
    for role in ("base", "draft"):
        folder = out / role
        if folder.exists() and any(folder.iterdir()):
            raise PairError(f"{folder} already exists and is not empty; choose a new --out or remove it")
    if steps is None and minutes is None:
        minutes = pair.default_minutes
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(dir=out, prefix=".data-") as data_dir:
        corpus = prepare_data(pair, out, Path(data_dir), site_packages, seed)
        record = {"command": command, "corpus": corpus, "tokenizer_vocab_size": pair.vocab_size}
        parallel = len(devices) == 2
        threads = max(1, (os.cpu_count() or 2) // 2) if parallel and "cpu" in devices else None
        jobs = [
            Job(spec, pair.name, device, seed, steps, minutes, data_dir, str(out / "tokenizer"),
                str(out / spec.role), threads, record)
            for spec, device in ((pair.base, devices[0]), (pair.draft, devices[-1]))
        ]
        follow = pair.draft_follows_base and steps is None
        if parallel:
            _run_parallel(jobs, follow)
        else:
            base_record = run_job(jobs[0])
            draft = jobs[1]
            run_job(dataclasses.replace(draft, steps=base_record["steps"], minutes=None) if follow else draft)
    records = {role: json.loads((out / role / "training.json").read_text()) for role in ("base", "draft")}
    summary = {
        "pair": pair.name,
        "command": command,
        "seed": seed,
        "devices": devices,
        "draft_steps": "the base's" if follow else "its own budget",
        "total_minutes": round((time.perf_counter() - started) / 60, 3),
        "corpus": corpus,
        **{role: {key: rec[key] for key in ("parameters", "steps", "tokens_seen", "final_train_loss",
                                            "final_val_loss", "minutes", "device")}
           for role, rec in records.items()},
    }
    (out / "pair.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def _run_parallel(jobs: list[Job], follow: bool) -> None:
    ctx = torch.multiprocessing.get_context("spawn")  # CUDA cannot be used in a forked child
    step_count = ctx.SimpleQueue() if follow else None
    procs = [ctx.Process(target=run_job, args=(job, step_count), name=job.spec.role) for job in jobs]
    for proc in procs:
        proc.start()
    running = list(procs)
    while running:
        for sentinel in wait([p.sentinel for p in running]):
            proc = next(p for p in running if p.sentinel == sentinel)
            proc.join()
            running.remove(proc)
            if proc.exitcode != 0:
                # The pair is useless without both models: stop the other one now.
                for other in running:
                    other.terminate()
                    other.join()
                raise RuntimeError(f"{proc.name} training failed (exit code {proc.exitcode}); "
                                   "see the log above")
