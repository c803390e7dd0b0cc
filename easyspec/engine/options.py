"""Everything an Engine is built from, checked once with one-line errors."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from easyspec.parallel.layer_parallel import POLICIES

METHODS = ("vanilla", "sd", "easyspec", "ngram")
CALIBRATION_POLICIES = ("every-round", "on-mismatch", "never")
TREE_SAMPLING = ("without-replacement", "with-replacement")
MAX_TREE_NODES = 256
DEFAULT_CONTEXT = 2048
MIN_CONTEXT = 16
DEFAULT_MODEL_DIR = Path(__file__).resolve().parent.parent / "models" / "demo"


class OptionsError(ValueError):
    """Engine options are inconsistent; the message says what to change."""


@dataclass(frozen=True)
class EngineOptions:
    model: str = str(DEFAULT_MODEL_DIR / "base")
    draft: str | None = None
    method: str = "vanilla"
    devices: int = 1
    device: str = "cpu"
    dtype: str = "float32"
    num_draft: int = 4
    adaptive_draft: bool = False  # raise k after full acceptance, lower it after rejections
    max_draft: int = 8  # upper bound of the adaptive schedule
    tree_width: int = 1  # nodes per tree level; 1 drafts a chain
    tree_depth: int | None = None  # draft tokens along a path; None: num_draft
    tree_sampling: str = "without-replacement"  # how a node's children are drawn from q when sampling
    draft_tp: int = 1  # sd only: 1 = draft on rank 0, N = sharded like the base
    layer_parallel: int = 2  # easyspec only: drafting ranks
    keep_first: int = 1
    keep_last: int = 1
    groups: str | None = None
    parallel_policy: str = "attention"
    calibrate: str = "every-round"
    ngram_min: int = 1
    ngram_max: int = 4
    max_context: int | None = None  # None: the smaller of 2048 and what the models support
    cuda_graphs: bool = True
    fused_kernels: bool = True  # CUDA: norms, rotary and SiLU-gating as compiled single kernels
    p2p_collectives: bool = True  # CUDA: small all-reduces/all-gathers over symmetric memory, not NCCL
    profile_stages: bool = True  # synchronise the device at stage boundaries for exact stage times
    timeout_s: float = 120.0

    def replace(self, **changes: object) -> EngineOptions:
        return dataclasses.replace(self, **changes)

    @property
    def depth(self) -> int:
        """Draft tokens along one path: the chain's length, or the tree's depth."""
        return self.num_draft if self.tree_depth is None else self.tree_depth

    @property
    def tree(self) -> bool:
        return self.tree_width > 1

    @property
    def k_max(self) -> int:
        """The most draft tokens one round can accept."""
        return max(self.depth, self.max_draft) if self.adaptive_draft else self.depth

    @property
    def draft_room(self) -> int:
        """Cache slots a round needs past the committed tokens: every draft token plus the bonus."""
        return (self.tree_width * self.depth if self.tree else self.k_max) + 1

    def validate(self) -> None:
        def fail(msg: str) -> None:
            raise OptionsError(msg)

        if self.method not in METHODS:
            fail(f"unknown --method {self.method!r}; choose one of {', '.join(METHODS)}")
        if self.device not in ("cpu", "cuda"):
            fail(f"unknown --device {self.device!r}; choose cpu or cuda")
        if self.dtype not in ("float32", "bfloat16", "float16"):
            fail(f"unknown --dtype {self.dtype!r}; choose float32, bfloat16 or float16")
        if self.devices < 1:
            fail(f"--devices must be >= 1, got {self.devices}")
        if self.method in ("sd", "easyspec") and not self.draft:
            fail(f"--method {self.method} needs a draft model: pass --draft DIR")
        if self.method in ("vanilla", "ngram") and self.draft:
            fail(f"--method {self.method} uses no draft model; drop --draft or use --method sd/easyspec")
        if not 1 <= self.num_draft <= 32:
            fail(f"--num-draft must be between 1 and 32, got {self.num_draft}")
        if self.adaptive_draft and not self.num_draft <= self.max_draft <= 32:
            fail(f"--max-draft must be between --num-draft ({self.num_draft}) and 32, got {self.max_draft}")
        self._validate_tree(fail)
        if self.draft_tp not in (1, self.devices):
            fail(f"--draft-tp must be 1 or the number of devices ({self.devices}), got {self.draft_tp}")
        if self.method == "easyspec" and not 1 <= self.layer_parallel <= self.devices:
            fail(f"--layer-parallel must be between 1 and --devices ({self.devices}), got {self.layer_parallel}")
        if self.parallel_policy not in POLICIES:
            fail(f"unknown --parallel-policy {self.parallel_policy!r}; choose one of {', '.join(POLICIES)}")
        if self.calibrate not in CALIBRATION_POLICIES:
            fail(f"unknown --calibrate {self.calibrate!r}; choose one of {', '.join(CALIBRATION_POLICIES)}")
        if not 1 <= self.ngram_min <= self.ngram_max:
            fail(f"need 1 <= --ngram-min <= --ngram-max, got {self.ngram_min}, {self.ngram_max}")
        if self.max_context is not None and self.max_context < MIN_CONTEXT:
            fail(f"--max-context must be at least {MIN_CONTEXT}, got {self.max_context}")
        if not 0 < self.timeout_s < float("inf"):  # written so that NaN fails too
            fail(f"--timeout must be a positive number of seconds, got {self.timeout_s}")

    def _validate_tree(self, fail: Callable[[str], None]) -> None:
        if not 1 <= self.tree_width <= 64:
            fail(f"--tree-width must be between 1 and 64, got {self.tree_width}")
        if self.tree_depth is not None and not 1 <= self.tree_depth <= 32:
            fail(f"--tree-depth must be between 1 and 32, got {self.tree_depth}")
        if self.tree_sampling not in TREE_SAMPLING:
            fail(f"unknown --tree-sampling {self.tree_sampling!r}; choose one of {', '.join(TREE_SAMPLING)}")
        if not self.tree:
            return
        if self.method not in ("sd", "easyspec"):
            fail(f"--tree-width {self.tree_width} needs a draft model (--method sd or easyspec); "
                 f"--method {self.method} drafts chains only")
        if self.adaptive_draft:
            fail("--adaptive-draft changes the draft length every round, a tree's shape is fixed; "
                 "drop one of --adaptive-draft and --tree-width")
        if self.method == "easyspec" and self.calibrate != "every-round":
            fail(f"--calibrate {self.calibrate} applies to chains; tree drafting re-feeds the accepted path "
                 "exactly every round, so use --calibrate every-round or --tree-width 1")
        if self.tree_width * self.depth > MAX_TREE_NODES:
            fail(f"a tree of --tree-width {self.tree_width} x depth {self.depth} has more than "
                 f"{MAX_TREE_NODES} nodes; make it narrower or shallower")
