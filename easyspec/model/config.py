"""One configuration dataclass for every supported Llama-family checkpoint.

Hugging Face config.json files differ per family (Qwen2 always has a q/k/v bias,
Qwen3 normalises q and k per head, Llama 3 scales RoPE frequencies); this module
maps each of them onto one `ModelConfig` so the transformer needs no family
switches beyond the flags stored here.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")


class ConfigError(ValueError):
    """A checkpoint's config.json cannot be used; the message says why."""


@dataclass(frozen=True)
class RopeScaling:
    """Llama-3 style frequency scaling ("rope_type": "llama3")."""

    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_position_embeddings: int


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    model_type: str = "llama"
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    rms_norm_eps: float = 1e-5
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # bias on q/k/v projections (Qwen2)
    qk_norm: bool = False  # RMSNorm over each head of q and k (Qwen3)
    max_position_embeddings: int = 4096
    sliding_window: int | None = None  # Mistral: a query sees the last sliding_window positions (itself included)
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        if self.model_type not in SUPPORTED_MODEL_TYPES:
            raise ConfigError(
                f"unsupported model_type {self.model_type!r}; "
                f"easyspec supports {', '.join(SUPPORTED_MODEL_TYPES)}"
            )
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers",
                     "num_heads", "num_kv_heads", "head_dim", "max_position_embeddings"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        for name in ("rms_norm_eps", "rope_theta"):
            value = getattr(self, name)
            # Written so that NaN fails too: eps <= 0 divides by zero on a zero row, theta <= 0 breaks RoPE.
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
                raise ConfigError(f"{name} must be a positive finite number, got {value!r}")
        for name, ids in (("bos_token_id", () if self.bos_token_id is None else (self.bos_token_id,)),
                          ("eos_token_id", self.eos_token_ids)):
            bad = [t for t in ids if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < self.vocab_size]
            if bad:
                raise ConfigError(f"{name} {bad[0]!r} is not a token id of the vocabulary [0, {self.vocab_size})")
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(
                f"num_attention_heads ({self.num_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_kv_heads})"
            )
        if self.head_dim % 2:
            raise ConfigError(f"head_dim must be even for rotary embeddings, got {self.head_dim}")
        if self.sliding_window is not None and self.sliding_window < 1:
            raise ConfigError(f"sliding_window must be positive, got {self.sliding_window}")

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    def num_parameters(self) -> int:
        per_layer = (
            self.hidden_size * (self.q_size + 2 * self.kv_size)
            + self.q_size * self.hidden_size
            + 3 * self.hidden_size * self.intermediate_size
            + 2 * self.hidden_size
        )
        embeddings = self.vocab_size * self.hidden_size
        head = 0 if self.tie_word_embeddings else embeddings
        return self.num_layers * per_layer + embeddings + head + self.hidden_size

    def replace(self, **changes: Any) -> ModelConfig:
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_hf(cls, hf: dict[str, Any], source: str = "config.json") -> ModelConfig:
        """Build from a Hugging Face config.json dict; `source` names the file in errors."""
        model_type = hf.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            archs = hf.get("architectures") or []
            raise ConfigError(
                f"{source}: unsupported model_type {model_type!r} (architectures {archs}); "
                f"easyspec supports {', '.join(SUPPORTED_MODEL_TYPES)}"
            )
        try:
            hidden = _integer(hf, "hidden_size")
            heads = _integer(hf, "num_attention_heads")
            cfg = cls(
                model_type=model_type,
                vocab_size=_integer(hf, "vocab_size"),
                hidden_size=hidden,
                intermediate_size=_integer(hf, "intermediate_size"),
                num_layers=_integer(hf, "num_hidden_layers"),
                num_heads=heads,
                num_kv_heads=_integer(hf, "num_key_value_heads", heads),
                head_dim=_integer(hf, "head_dim", hidden // heads if heads > 0 else 0),
                rope_theta=_number(hf if hf.get("rope_theta") is not None else _rope_parameters(hf), "rope_theta",
                                   10000.0),
                rope_scaling=_parse_rope_scaling(hf, source),
                rms_norm_eps=_number(hf, "rms_norm_eps", 1e-6),
                tie_word_embeddings=_flag(hf, "tie_word_embeddings"),
                # Qwen2 checkpoints always carry a q/k/v bias; others say so explicitly.
                attention_bias=model_type == "qwen2" or _flag(hf, "attention_bias"),
                qk_norm=model_type == "qwen3",
                max_position_embeddings=_integer(hf, "max_position_embeddings", 4096),
                sliding_window=_sliding_window(hf, model_type, source),
                bos_token_id=hf.get("bos_token_id"),
                eos_token_ids=as_id_tuple(hf.get("eos_token_id")),
            )
        except KeyError as missing:
            raise ConfigError(f"{source}: missing required key {missing}") from None
        except (TypeError, ValueError) as bad:
            if isinstance(bad, ConfigError):
                raise ConfigError(f"{source}: {bad}") from None
            raise ConfigError(f"{source}: malformed value ({bad})") from None
        if _flag(hf, "mlp_bias"):
            raise ConfigError(f"{source}: mlp_bias=true is not supported")
        if hf.get("hidden_act", "silu") != "silu":
            raise ConfigError(f"{source}: hidden_act {hf['hidden_act']!r} is not supported (only silu)")
        return cfg

    def to_hf(self, dtype: str = "bfloat16") -> dict[str, Any]:
        """The config.json dict that HF transformers loads as the same model; `dtype` names
        the dtype the weights are stored in."""
        arch = {
            "llama": "LlamaForCausalLM",
            "mistral": "MistralForCausalLM",
            "qwen2": "Qwen2ForCausalLM",
            "qwen3": "Qwen3ForCausalLM",
        }[self.model_type]
        out: dict[str, Any] = {
            "architectures": [arch],
            "model_type": self.model_type,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "rope_theta": self.rope_theta,
            "rms_norm_eps": self.rms_norm_eps,
            "tie_word_embeddings": self.tie_word_embeddings,
            "max_position_embeddings": self.max_position_embeddings,
            "torch_dtype": dtype,
        }
        if self.model_type in ("llama", "qwen3"):
            out["attention_bias"] = self.attention_bias
        if self.model_type == "mistral":
            out["sliding_window"] = self.sliding_window
        if self.rope_scaling is not None:
            out["rope_scaling"] = {"rope_type": "llama3", **dataclasses.asdict(self.rope_scaling)}
        if self.bos_token_id is not None:
            out["bos_token_id"] = self.bos_token_id
        if self.eos_token_ids:
            out["eos_token_id"] = list(self.eos_token_ids)
        return out


def _sliding_window(hf: dict[str, Any], model_type: str, source: str) -> int | None:
    """Mistral's window (every layer); Qwen2/3 windows, which differ from layer to layer, are refused."""
    if model_type == "mistral":
        return _integer(hf, "sliding_window", None)
    if hf.get("use_sliding_window"):
        raise ConfigError(f"{source}: use_sliding_window=true (a window on some layers only) is not supported; "
                          "use the checkpoint with use_sliding_window=false, as it is published")
    return None


def _rope_parameters(hf: dict[str, Any]) -> dict[str, Any]:
    # Newer transformers releases write rope settings under "rope_parameters".
    params = hf.get("rope_parameters")
    return params if isinstance(params, dict) else {}


def _parse_rope_scaling(hf: dict[str, Any], source: str) -> RopeScaling | None:
    scaling = hf.get("rope_scaling") or _rope_parameters(hf)
    if not scaling:
        return None
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "default":
        return None
    if kind != "llama3":
        raise ConfigError(f"{source}: rope_scaling type {kind!r} is not supported (only 'llama3')")
    try:
        factors = [_number(scaling, name) for name in ("factor", "low_freq_factor", "high_freq_factor")]
        return RopeScaling(*factors, _integer(scaling, "original_max_position_embeddings"))
    except KeyError as missing:
        raise ConfigError(f"{source}: rope_scaling is missing {missing}") from None
    except ConfigError as bad:
        raise ConfigError(f"{source}: rope_scaling: {bad}") from None


_REQUIRED = object()


def _integer(hf: dict[str, Any], key: str, default: Any = _REQUIRED) -> int:
    """hf[key] as a positive integer (null or absent: `default`); 64.5 or "64" is an error, not 64."""
    value = hf.get(key)
    if value is None:
        if default is _REQUIRED:
            raise KeyError(key)
        return default
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ConfigError(f"{key} must be a positive integer, got {value!r}")
    return value


def _number(hf: dict[str, Any], key: str, default: Any = _REQUIRED) -> float:
    """hf[key] as a positive finite number (null or absent: `default`)."""
    value = hf.get(key)
    if value is None:
        if default is _REQUIRED:
            raise KeyError(key)
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
        raise ConfigError(f"{key} must be a positive finite number, got {value!r}")
    return float(value)


def _flag(hf: dict[str, Any], key: str) -> bool:
    """hf[key] as true/false (absent or null: false); the string "false" is an error, not true."""
    value = hf.get(key)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise ConfigError(f"{key} must be true or false, got {value!r}")
    return value


def as_id_tuple(value: Any) -> tuple[int, ...]:
    """A token id or a list of them (null: none), as a tuple; the range is checked by ModelConfig."""
    if value is None:
        return ()
    ids = value if isinstance(value, list) else [value]
    bad = [t for t in ids if isinstance(t, bool) or not isinstance(t, int)]
    if bad:
        raise ConfigError(f"token ids must be integers, got {bad[0]!r}")
    return tuple(ids)


_LLAMA3_ROPE = RopeScaling(8.0, 1.0, 4.0, 8192)

# Real shapes for timing with random weights (no download needed).
PRESETS: dict[str, ModelConfig] = {
    "tiny": ModelConfig(
        vocab_size=256, hidden_size=64, intermediate_size=128, num_layers=4,
        num_heads=4, num_kv_heads=2, head_dim=16, max_position_embeddings=1024,
    ),
    "llama-3.2-1b": ModelConfig(
        vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_layers=16,
        num_heads=32, num_kv_heads=8, head_dim=64, rope_theta=500000.0,
        rope_scaling=RopeScaling(32.0, 1.0, 4.0, 8192), tie_word_embeddings=True,
        max_position_embeddings=131072,
    ),
    "llama-3.2-3b": ModelConfig(
        vocab_size=128256, hidden_size=3072, intermediate_size=8192, num_layers=28,
        num_heads=24, num_kv_heads=8, head_dim=128, rope_theta=500000.0,
        rope_scaling=RopeScaling(32.0, 1.0, 4.0, 8192), tie_word_embeddings=True,
        max_position_embeddings=131072,
    ),
    "llama-3.1-8b": ModelConfig(
        vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_layers=32,
        num_heads=32, num_kv_heads=8, head_dim=128, rope_theta=500000.0,
        rope_scaling=_LLAMA3_ROPE, max_position_embeddings=131072,
    ),
    "qwen2.5-0.5b": ModelConfig(
        model_type="qwen2", vocab_size=151936, hidden_size=896, intermediate_size=4864,
        num_layers=24, num_heads=14, num_kv_heads=2, head_dim=64, rope_theta=1000000.0,
        rms_norm_eps=1e-6, tie_word_embeddings=True, attention_bias=True,
        max_position_embeddings=32768,
    ),
    "qwen2.5-1.5b": ModelConfig(
        model_type="qwen2", vocab_size=151936, hidden_size=1536, intermediate_size=8960,
        num_layers=28, num_heads=12, num_kv_heads=2, head_dim=128, rope_theta=1000000.0,
        rms_norm_eps=1e-6, tie_word_embeddings=True, attention_bias=True,
        max_position_embeddings=32768,
    ),
    "qwen2.5-32b": ModelConfig(
        model_type="qwen2", vocab_size=152064, hidden_size=5120, intermediate_size=27648,
        num_layers=64, num_heads=40, num_kv_heads=8, head_dim=128, rope_theta=1000000.0,
        rms_norm_eps=1e-6, attention_bias=True, max_position_embeddings=32768,
    ),
}
