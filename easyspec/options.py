"""Every setting an Engine or a request is built from: the names users type, their defaults
(each written here once, read by the CLI, the server and the Python API) and their checks.

Nothing here imports torch or any implementation: the implementations import these names
(the method, the layer-parallel policy, calibration, tree sampling) and the predicates on
them, never the reverse, so the CLI can parse its flags before loading anything heavy.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

MAX_TREE_NODES = 256
DTYPE_NAMES = ("float32", "bfloat16", "float16")  # the weight/activation dtypes a model runs in
AUTO_DTYPE = "auto"  # --dtype auto: the rule of `auto_dtype`
# The most tokens a request generates when neither it nor the model's generation_config.json
# says: the Python API, `generate` and the server's requests all read this one constant.
DEFAULT_MAX_NEW_TOKENS = 128
# The context length defaults to the models' max_position_embeddings, capped so that the KV
# caches fit: on CUDA, weights + caches + ACTIVATION_RESERVE_BYTES within --gpu-memory-utilization
# of the GPU's memory; on the CPU, caches of at most CPU_KV_CACHE_BYTES.
DEFAULT_GPU_MEMORY_UTILIZATION = 0.9
ACTIVATION_RESERVE_BYTES = 2 << 30  # CUDA: activations, captured graphs' pools, the CUDA context
CPU_KV_CACHE_BYTES = 4 << 30
MIN_CONTEXT = 16  # the shortest KV cache an engine runs with (--max-context, or what the models support)
# Sequences decoded together when --max-num-seqs is not given: as many as the KV cache memory holds at
# the context length, at most this.
DEFAULT_MAX_NUM_SEQS = 16
MAX_NUM_SEQS = 256
# Draft tokens per round across the batch (--draft-token-budget): each running sequence drafts at most
# budget // running tokens, so a batch of 8 keeps 4 draft tokens each and one of 16 two; with less than
# one each, a round is plain decoding. Verification then carries at most budget + running tokens per
# base forward, which keeps it in the regime where the step costs about as much as one token's (weights
# streamed once). A budget below one request's whole draft counts as that draft: a request alone always
# drafts in full.
DEFAULT_DRAFT_TOKEN_BUDGET = 32
DEFAULT_TIMEOUT_S = 120.0  # a collective that has not finished by then means a peer is dead or stuck
DEFAULT_MODEL_DIR = Path(__file__).resolve().parent / "models" / "demo"
# Seeds are signed 64-bit integers, as in vLLM: they travel between ranks as int64 tensors.
SEED_RANGE = (-(2**63), 2**63 - 1)
PENALTY_LIMIT = 2.0  # presence_penalty and frequency_penalty lie in [-2, 2], as in OpenAI's API and vLLM
MAX_LOGPROBS = 20  # the most top log-probabilities a token may come with (vLLM's default max_logprobs)


class Name(str, Enum):
    """A name users type; compares equal to, prints as and serialises as its string."""

    def __str__(self) -> str:
        return self.value

    @classmethod
    def names(cls) -> tuple[str, ...]:
        return tuple(member.value for member in cls)


class Method(Name):
    VANILLA = "vanilla"  # plain decoding
    SD = "sd"  # speculative decoding with a draft model run layer after layer
    EASYSPEC = "easyspec"  # the draft's middle layers run layer-parallel over several ranks
    NGRAM = "ngram"  # prompt lookup: no draft model

    @property
    def speculates(self) -> bool:
        return self is not Method.VANILLA

    @property
    def uses_draft_model(self) -> bool:
        return self in (Method.SD, Method.EASYSPEC)

    @property
    def is_layer_parallel(self) -> bool:
        return self is Method.EASYSPEC


class ParallelPolicy(Name):
    """What the ranks of a layer-parallel group compute in parallel (easyspec.parallel.layer_parallel)."""

    ATTENTION = "attention"
    LAYER = "layer"
    ATTENTION_TP_MLP = "attention+tp-mlp"


class Calibration(Name):
    """When a layer-parallel drafter rewrites its approximate KV with one exact forward."""

    EVERY_ROUND = "every-round"
    ON_MISMATCH = "on-mismatch"
    NEVER = "never"


class TreeSampling(Name):
    """How a tree node's children are drawn from the draft distribution when sampling."""

    WITHOUT_REPLACEMENT = "without-replacement"
    WITH_REPLACEMENT = "with-replacement"


class GenerationConfig(Name):
    """Where a request's sampling defaults come from (--generation-config; also a folder holding a
    generation_config.json). A request's own settings always win."""

    AUTO = "auto"  # the model's generation_config.json over easyspec's defaults
    VLLM = "vllm"  # vLLM's defaults (VLLM_SAMPLING_DEFAULTS); no file read
    NONE = "none"  # easyspec's defaults (SamplingParams()); no file read


# What vLLM's SamplingParams() gives a request that sets nothing (--generation-config vllm).
VLLM_SAMPLING_DEFAULTS = {"temperature": 1.0, "top_p": 1.0, "top_k": 0, "max_new_tokens": 16}
# The sampling fields a generation_config.json may set that are read as request defaults (vLLM reads
# the same ones).
GENERATION_CONFIG_FIELDS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty", "max_new_tokens")


def auto_dtype(device: str, stored: str | None) -> str:
    """--dtype auto: float32 on the CPU; on CUDA the checkpoint's own dtype when it is 16-bit
    (bfloat16 or float16; a GGUF file of quantized or 16-bit tensors counts as bfloat16), else
    float32 (a float32 checkpoint, or one that does not say)."""
    if device == "cuda" and stored in ("bfloat16", "float16"):
        return stored
    return "float32"


class OptionsError(ValueError):
    """Engine options are inconsistent; the message says what to change."""


@dataclass(frozen=True)
class EngineOptions:
    """One engine's settings, named after the CLI flags (`num_draft` is --num-draft)."""

    model: str = str(DEFAULT_MODEL_DIR / "base")
    draft: str | None = None
    method: str = Method.VANILLA.value
    devices: int = 1
    device: str = "cpu"
    dtype: str = AUTO_DTYPE  # settled by the engine's preflight (auto_dtype)
    num_draft: int = 4  # draft tokens along one path per round (a tree's depth unless tree_depth is set)
    adaptive_draft: bool = False  # raise num_draft after full acceptance, lower it after rejections
    max_draft: int = 8  # upper bound of the adaptive schedule
    tree_width: int = 1  # nodes per tree level; 1 drafts a chain
    tree_depth: int | None = None  # a tree's num_draft; None: num_draft
    tree_sampling: str = TreeSampling.WITHOUT_REPLACEMENT.value
    draft_tp: int = 1  # sd only: 1 = draft on rank 0, N = sharded like the base
    layer_parallel: int = 2  # easyspec only: drafting ranks
    keep_first: int = 1  # easyspec: leading draft layers kept sequential
    keep_last: int = 1  # easyspec: trailing draft layers kept sequential
    groups: str | None = None  # easyspec: explicit layer groups, e.g. "0,1,2-3,4-5,6-7,8,9"
    parallel_policy: str = ParallelPolicy.ATTENTION.value
    calibrate: str = Calibration.EVERY_ROUND.value
    ngram_min: int = 1
    ngram_max: int = 4
    max_context: int | None = None  # None: the models' max_position_embeddings, capped by memory (see above)
    max_num_seqs: int | None = None  # sequences decoded together; None: what the memory holds, at most 16
    draft_token_budget: int = DEFAULT_DRAFT_TOKEN_BUDGET  # draft tokens per round across the batch
    gpu_memory_utilization: float = DEFAULT_GPU_MEMORY_UTILIZATION  # CUDA: share of each GPU easyspec may use
    generation_config: str = GenerationConfig.AUTO.value  # or a folder holding a generation_config.json
    chat_template: str | None = None  # a Jinja file that replaces the tokenizer's chat template
    progress: bool = True  # progress bars (a line each in logs) while loading weights and capturing graphs
    cuda_graphs: bool = True
    fused_kernels: bool = True  # CUDA: a decoder layer as a few fused Triton kernels (easyspec.model.kernels)
    p2p_collectives: bool = True  # CUDA: small all-reduces/all-gathers over symmetric memory, not NCCL
    profile_stages: bool = True  # synchronise the device at stage boundaries for exact stage times
    timeout_s: float = DEFAULT_TIMEOUT_S

    def replace(self, **changes: object) -> EngineOptions:
        return dataclasses.replace(self, **changes)

    # Predicates on the method (valid once `validate` has passed).
    @property
    def speculates(self) -> bool:
        return Method(self.method).speculates

    @property
    def uses_draft_model(self) -> bool:
        return Method(self.method).uses_draft_model

    @property
    def is_layer_parallel(self) -> bool:
        return Method(self.method).is_layer_parallel

    @property
    def tree(self) -> bool:
        return self.tree_width > 1

    @property
    def initial_num_draft(self) -> int:
        """num_draft of a request's first round: --tree-depth for a tree, else --num-draft."""
        return self.num_draft if self.tree_depth is None else self.tree_depth

    @property
    def max_num_draft(self) -> int:
        """The most draft tokens along one path (so the most one round can accept)."""
        return max(self.initial_num_draft, self.max_draft) if self.adaptive_draft else self.initial_num_draft

    @property
    def draft_room(self) -> int:
        """Cache slots a round needs past the committed tokens: every draft token plus the bonus."""
        return (self.tree_width * self.initial_num_draft if self.tree else self.max_num_draft) + 1

    def validate(self) -> None:
        def fail(msg: str) -> None:
            raise OptionsError(msg)

        if self.method not in Method.names():
            fail(f"unknown --method {self.method!r}; choose one of {', '.join(Method.names())}")
        if self.device not in ("cpu", "cuda"):
            fail(f"unknown --device {self.device!r}; choose cpu or cuda")
        if self.dtype not in (AUTO_DTYPE, *DTYPE_NAMES):
            fail(f"unknown --dtype {self.dtype!r}; choose {', '.join((AUTO_DTYPE, *DTYPE_NAMES))}")
        if self.devices < 1:
            fail(f"--devices must be >= 1, got {self.devices}")
        if self.uses_draft_model and not self.draft:
            fail(f"--method {self.method} needs a draft model: pass --draft DIR")
        if not self.uses_draft_model and self.draft:
            fail(f"--method {self.method} uses no draft model; drop --draft or use --method sd/easyspec")
        if not 1 <= self.num_draft <= 32:
            fail(f"--num-draft must be between 1 and 32, got {self.num_draft}")
        if self.adaptive_draft and not self.num_draft <= self.max_draft <= 32:
            fail(f"--max-draft must be between --num-draft ({self.num_draft}) and 32, got {self.max_draft}")
        self._validate_tree(fail)
        if self.draft_tp not in (1, self.devices):
            fail(f"--draft-tp must be 1 or the number of devices ({self.devices}), got {self.draft_tp}")
        if self.is_layer_parallel and not 1 <= self.layer_parallel <= self.devices:
            fail(f"--layer-parallel must be between 1 and --devices ({self.devices}), got {self.layer_parallel}")
        if self.parallel_policy not in ParallelPolicy.names():
            fail(f"unknown --parallel-policy {self.parallel_policy!r}; "
                 f"choose one of {', '.join(ParallelPolicy.names())}")
        if self.calibrate not in Calibration.names():
            fail(f"unknown --calibrate {self.calibrate!r}; choose one of {', '.join(Calibration.names())}")
        if not 1 <= self.ngram_min <= self.ngram_max:
            fail(f"need 1 <= --ngram-min <= --ngram-max, got {self.ngram_min}, {self.ngram_max}")
        if self.max_context is not None and self.max_context < MIN_CONTEXT:
            fail(f"--max-context must be at least {MIN_CONTEXT}, got {self.max_context}")
        if self.max_num_seqs is not None and not 1 <= self.max_num_seqs <= MAX_NUM_SEQS:
            fail(f"--max-num-seqs must be between 1 and {MAX_NUM_SEQS}, got {self.max_num_seqs}")
        if self.draft_token_budget < 0:
            fail(f"--draft-token-budget must be 0 or more, got {self.draft_token_budget}")
        if not 0 < self.gpu_memory_utilization <= 1:  # NaN fails too
            fail(f"--gpu-memory-utilization must be in (0, 1], got {self.gpu_memory_utilization}")
        if self.generation_config not in GenerationConfig.names() and not Path(self.generation_config).is_dir():
            fail(f"--generation-config {self.generation_config!r} is neither {', '.join(GenerationConfig.names())} "
                 "nor a folder; pass a folder holding a generation_config.json or one of those names")
        if self.chat_template is not None and not Path(self.chat_template).is_file():
            fail(f"--chat-template {self.chat_template}: no such file; pass a Jinja template file")
        if not 0 < self.timeout_s < float("inf"):  # written so that NaN fails too
            fail(f"--timeout must be a positive number of seconds, got {self.timeout_s}")

    def _validate_tree(self, fail: Callable[[str], None]) -> None:
        if not 1 <= self.tree_width <= 64:
            fail(f"--tree-width must be between 1 and 64, got {self.tree_width}")
        if self.tree_depth is not None and not 1 <= self.tree_depth <= 32:
            fail(f"--tree-depth must be between 1 and 32, got {self.tree_depth}")
        if self.tree_sampling not in TreeSampling.names():
            fail(f"unknown --tree-sampling {self.tree_sampling!r}; "
                 f"choose one of {', '.join(TreeSampling.names())}")
        if not self.tree:
            return
        if not self.uses_draft_model:
            fail(f"--tree-width {self.tree_width} needs a draft model (--method sd or easyspec); "
                 f"--method {self.method} drafts chains only")
        if self.adaptive_draft:
            fail("--adaptive-draft changes the draft length every round, a tree's shape is fixed; "
                 "drop one of --adaptive-draft and --tree-width")
        if self.is_layer_parallel and self.calibrate != Calibration.EVERY_ROUND:
            fail(f"--calibrate {self.calibrate} applies to chains; tree drafting re-feeds the accepted path "
                 "exactly every round, so use --calibrate every-round or --tree-width 1")
        if self.tree_width * self.initial_num_draft > MAX_TREE_NODES:
            fail(f"a tree of --tree-width {self.tree_width} x depth {self.initial_num_draft} has more than "
                 f"{MAX_TREE_NODES} nodes; make it narrower or shallower")


# vLLM's --speculative-config (and LLM(speculative_config=...)): each key it may hold here, and
# the EngineOptions field (the flag) it sets.
SPECULATIVE_CONFIG_KEYS = {
    "method": "method",
    "model": "draft",
    "num_speculative_tokens": "num_draft",
    "draft_tensor_parallel_size": "draft_tp",
    "prompt_lookup_min": "ngram_min",
    "prompt_lookup_max": "ngram_max",
}
# Its "method": vLLM's names of the methods easyspec has, and easyspec's own names of speculative methods.
SPECULATIVE_METHODS = {"draft_model": Method.SD, "ngram": Method.NGRAM,
                       **{m.value: m for m in Method if m.speculates}}


def parse_speculative_config(text: str) -> dict:
    """--speculative-config's JSON text as a dict; OptionsError saying what is wrong otherwise."""
    try:
        config = json.loads(text)
    except json.JSONDecodeError as err:
        raise OptionsError(f"--speculative-config is not JSON ({err.msg} at column {err.colno}); write it as "
                           '\'{"method": "draft_model", "model": "DIR", "num_speculative_tokens": 4}\'') from None
    if not isinstance(config, dict):
        raise OptionsError(f"--speculative-config must be a JSON object, got {type(config).__name__}")
    return config


def speculative_options(config: dict, method: str | None = None) -> dict[str, object]:
    """A vLLM speculative config as EngineOptions fields, e.g. {"method": "draft_model", "model": "DIR",
    "num_speculative_tokens": 4} -> {"method": "sd", "draft": "DIR", "num_draft": 4}. `method` is the one
    to use when the config names none (the CLI's --method); without either, a "model" means
    draft_model, as in vLLM. Keys easyspec does not take and values of the wrong type raise OptionsError."""
    where = "--speculative-config"
    unknown = sorted(set(config) - set(SPECULATIVE_CONFIG_KEYS))
    if unknown:
        raise OptionsError(f"{where}: easyspec does not take {', '.join(map(repr, unknown))}; it takes "
                           f"{', '.join(SPECULATIVE_CONFIG_KEYS)}")
    for key, value in config.items():
        kind = str if key in ("method", "model") else int
        if isinstance(value, bool) or not isinstance(value, kind):
            raise OptionsError(f"{where}: {key!r} must be {'a string' if kind is str else 'an integer'}, "
                               f"got {value!r}")
    name = config.get("method") or method or ("draft_model" if "model" in config else None)
    if name is None:
        raise OptionsError(f'{where} needs a "method" ({", ".join(SPECULATIVE_METHODS)}) or a draft "model"')
    if name not in SPECULATIVE_METHODS:
        raise OptionsError(f"{where}: method {name!r} is not one easyspec runs; choose one of "
                           f"{', '.join(SPECULATIVE_METHODS)}")
    return {**{SPECULATIVE_CONFIG_KEYS[key]: value for key, value in config.items()},
            "method": SPECULATIVE_METHODS[name].value}


class SamplingError(ValueError):
    """A SamplingParams field is out of range or of the wrong type; `field` names it."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


@dataclass(frozen=True)
class SamplingParams:
    """Per-request decoding settings; ``temperature == 0`` means greedy.

    The base model's logits go through, in order (as in HF transformers and vLLM): the
    history-dependent settings (repetition_penalty over the prompt and the generated tokens,
    frequency_penalty and presence_penalty over the generated tokens, and min_tokens, which
    masks the tokens that would end the request: EOS unless ignore_eos, and stop_token_ids),
    then temperature, top_k, top_p and min_p (easyspec.verify.penalties and .sampling).
    Greedy decoding takes the argmax after the history-dependent settings.
    """

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0  # drop tokens less likely than min_p times the most likely one (0 = off)
    repetition_penalty: float = 1.0  # > 1 discourages tokens of the prompt and the output (1 = off)
    presence_penalty: float = 0.0  # subtracted from the logit of every token the output holds (0 = off)
    frequency_penalty: float = 0.0  # subtracted once per occurrence in the output (0 = off)
    seed: int | None = None
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    min_tokens: int = 0  # no EOS, stop token or stop string ends the request before this many tokens
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()  # tokens that end the request as EOS does (their text is not shown)
    ignore_eos: bool = False
    skip_special_tokens: bool = True  # leave special tokens out of the text
    logprobs: int | None = None  # None: none; N: each token's log-probability and the N most likely tokens'

    def __post_init__(self) -> None:
        # As vLLM's SamplingParams takes them: one stop string alone, lists for either field, None for none.
        for name in ("stop", "stop_token_ids"):
            value = getattr(self, name)
            if value is None or isinstance(value, (str, list)):
                object.__setattr__(self, name, () if value is None else (value,) if isinstance(value, str)
                                   else tuple(value))
        # NaN fails every comparison, so each check is written to reject it.
        for name in ("temperature", "top_p", "min_p", "repetition_penalty", "presence_penalty",
                     "frequency_penalty"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise SamplingError(name, f"{name} must be a finite number, got {value!r}")
        if self.temperature < 0:
            raise SamplingError("temperature", f"temperature must be >= 0, got {self.temperature}")
        if not (0 < self.top_p <= 1):
            raise SamplingError("top_p", f"top_p must be in (0, 1], got {self.top_p}")
        if not _is_int(self.top_k) or self.top_k < 0:
            raise SamplingError("top_k", f"top_k must be an int >= 0, got {self.top_k!r}")
        if not 0 <= self.min_p <= 1:
            raise SamplingError("min_p", f"min_p must be in [0, 1], got {self.min_p}")
        if self.repetition_penalty <= 0:
            raise SamplingError("repetition_penalty", f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -PENALTY_LIMIT <= getattr(self, name) <= PENALTY_LIMIT:
                raise SamplingError(name, f"{name} must be in [-{PENALTY_LIMIT:g}, {PENALTY_LIMIT:g}], "
                                          f"got {getattr(self, name)}")
        if self.seed is not None and not (_is_int(self.seed) and SEED_RANGE[0] <= self.seed <= SEED_RANGE[1]):
            raise SamplingError("seed", "seed must be None or a 64-bit signed integer (-2**63 to 2**63 - 1), "
                                        f"got {self.seed!r}")
        if not _is_int(self.max_new_tokens) or self.max_new_tokens < 1:
            raise SamplingError("max_new_tokens", f"max_new_tokens must be an int >= 1, got {self.max_new_tokens!r}")
        if not _is_int(self.min_tokens) or not 0 <= self.min_tokens <= self.max_new_tokens:
            raise SamplingError("min_tokens", f"min_tokens must be an int from 0 to max_new_tokens "
                                              f"({self.max_new_tokens}), got {self.min_tokens!r}")
        if not isinstance(self.stop, tuple) or not all(isinstance(s, str) for s in self.stop):
            raise SamplingError("stop", f"stop must be a str or a list or tuple of str, got {self.stop!r}")
        if not isinstance(self.stop_token_ids, tuple) or not all(_is_int(t) and t >= 0 for t in self.stop_token_ids):
            raise SamplingError("stop_token_ids", "stop_token_ids must be a list or tuple of token ids (ints >= 0), "
                                                  f"got {self.stop_token_ids!r}")
        for name in ("ignore_eos", "skip_special_tokens"):
            if not isinstance(getattr(self, name), bool):
                raise SamplingError(name, f"{name} must be True or False, got {getattr(self, name)!r}")
        if self.logprobs is not None and not (_is_int(self.logprobs) and 0 <= self.logprobs <= MAX_LOGPROBS):
            raise SamplingError("logprobs", f"logprobs must be None or an int from 0 to {MAX_LOGPROBS}, "
                                            f"got {self.logprobs!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def penalized(self) -> bool:
        """Whether a penalty changes the logits (each needs the counts of the tokens so far)."""
        return self.repetition_penalty != 1 or self.presence_penalty != 0 or self.frequency_penalty != 0

    @property
    def uses_history(self) -> bool:
        """Whether a token's distribution depends on the tokens before it beyond the model's own
        logits: a penalty, or min_tokens holding back the tokens that end the request."""
        return self.penalized or self.min_tokens > 0


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
