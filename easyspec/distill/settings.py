"""What a distillation run is asked to do: its options, their defaults (read by the CLI too, so each
is written once) and the checks that need no model. Nothing here imports torch, so the CLI parser
loads without it."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from easyspec.distill import TRAIN_CHAT_PROMPTS, TRAIN_CODE_PROMPTS
from easyspec.options import DTYPE_NAMES, EngineOptions, ParallelPolicy

INITS = ("base", "random")
DEFAULT_MINUTES = 5.0  # training time when neither --minutes nor --steps is given
DEFAULT_GEN_BATCH = {"cuda": 1024, "cpu": 16}  # continuations generated at once, by device type, without --gen-batch


@dataclass(frozen=True)
class DraftShape:
    """What the flags ask for; None keeps the base's value (layers: a quarter of the base's)."""

    layers: int | None = None
    hidden_size: int | None = None
    num_heads: int | None = None
    num_kv_heads: int | None = None
    intermediate_size: int | None = None
    head_dim: int | None = None


@dataclass(frozen=True)
class TrainSettings:
    steps: int | None = None
    minutes: float | None = None  # training time, data generation not counted
    batch_size: int = 64
    seq_len: int = 512
    lr: float = 5e-4
    min_lr_ratio: float = 0.1
    warmup_steps: int = 30
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    kl_weight: float = 1.0
    ntp_weight: float = 0.1
    seed: int = 0
    checkpoint_minutes: float = 5.0


@dataclass(frozen=True)
class DistillOptions:
    model: str
    out: str = ""  # the draft's folder (not needed with data_only)
    device: str = "cpu"
    shape: DraftShape = field(default_factory=DraftShape)
    init: str = "base"
    layer_parallel: tuple[int, ...] = ()  # one layer-parallel pass per size; () trains the exact forward only
    keep_first: int = EngineOptions.keep_first
    keep_last: int = EngineOptions.keep_last
    groups: str | None = None
    parallel_policy: str = ParallelPolicy.ATTENTION.value
    prompts: str = str(TRAIN_CHAT_PROMPTS)
    code_prompts: str = str(TRAIN_CODE_PROMPTS)
    samples: int = 15
    gen_tokens: int = 256
    gen_batch: int | None = None  # None: DEFAULT_GEN_BATCH of the device
    gen_minutes: float | None = None  # generation stops after this long, keeping what was written
    temperature: float = 0.8
    top_p: float = 0.95
    data: str | None = None  # generated rows: read if the file exists, else written there
    data_only: bool = False  # generate the rows into `data`, train nothing
    corpus: str | None = None
    corpus_share: float = 0.25
    corpus_only: bool = False
    corpus_max_mb: float = 32.0
    save_dtype: str = "bfloat16"
    compile: bool = False  # norms, rotary and SiLU-gating as torch.compile'd kernels
    train: TrainSettings = field(default_factory=TrainSettings)
    command: str = ""


def check_options(opts: DistillOptions) -> None:
    """Mistakes that need no model to find, each a one-line error."""
    t = opts.train
    if t.steps is None and t.minutes is None:
        raise ValueError("give --minutes or --steps")
    if t.steps is not None and t.steps < 1 or t.minutes is not None and not t.minutes > 0:
        raise ValueError("--steps and --minutes must be positive")
    if opts.device not in ("cpu", "cuda"):
        raise ValueError(f"unknown --device {opts.device!r}; choose cpu or cuda")
    if opts.data_only and (not opts.data or opts.corpus_only):
        raise ValueError("--data-only writes the base's text to --data FILE: give --data, without --corpus-only")
    if not opts.out and not opts.data_only:
        raise ValueError("give --out FOLDER for the draft")
    if opts.corpus_only and not opts.corpus:
        raise ValueError("--corpus-only needs a --corpus FILE or FOLDER")
    if not opts.corpus_only and not (opts.prompts or opts.code_prompts or opts.data and Path(opts.data).exists()):
        raise ValueError("no prompts for the base to answer: give --prompts or --code-prompts (or --corpus-only)")
    if opts.corpus_only and opts.layer_parallel:
        raise ValueError("--corpus-only trains the exact forward only; drop --layer-parallel")
    if not 0 < opts.corpus_share < 1:
        raise ValueError(f"--corpus-share must be between 0 and 1, got {opts.corpus_share}")
    if opts.samples < 0 or opts.gen_tokens < 1 or (opts.gen_batch is not None and opts.gen_batch < 1):
        raise ValueError("--samples must be >= 0, --gen-tokens and --gen-batch >= 1")
    if opts.gen_minutes is not None and not opts.gen_minutes > 0:
        raise ValueError(f"--gen-minutes must be positive, got {opts.gen_minutes}")
    if not opts.temperature > 0 or not 0 < opts.top_p <= 1:
        raise ValueError("--temperature must be > 0 and --top-p in (0, 1]")
    if any(n < 1 for n in opts.layer_parallel):
        raise ValueError("--layer-parallel sizes must be >= 1")
    if opts.groups and len(opts.layer_parallel) != 1:
        raise ValueError("--groups describes one layout: give it with exactly one --layer-parallel size")
    if opts.parallel_policy not in ParallelPolicy.names():
        raise ValueError(f"unknown --parallel-policy {opts.parallel_policy!r}; "
                         f"choose one of {', '.join(ParallelPolicy.names())}")
    if t.batch_size < 2 or t.seq_len < 16:
        raise ValueError("--batch-size must be >= 2 and --seq-len >= 16")
    if not t.lr > 0 or t.warmup_steps < 0 or not t.checkpoint_minutes > 0:
        raise ValueError("--lr and --checkpoint-minutes must be positive, --warmup-steps >= 0")
    if not (t.kl_weight >= 0 and t.ntp_weight >= 0 and t.kl_weight + t.ntp_weight > 0):
        raise ValueError("--kl-weight and --ntp-weight must be >= 0, not both 0")
    if opts.save_dtype not in DTYPE_NAMES:
        raise ValueError(f"unknown --save-dtype {opts.save_dtype!r}; choose {', '.join(DTYPE_NAMES)}")
