"""Where each piece of a trained model goes in a larger shape that computes the same function.

`plan_inflation` checks that a target shape can hold a trained model and decides the layout
that easyspec.zoo.inflate writes. Notation: D, I, L, H, Hkv, hd are the trained model's
width, MLP width, layers, query heads, KV heads and head dim; D', I', ... the target's.

- Width: the trained features are the first D of D' dimensions; everything that writes the
  residual stream has zero rows elsewhere, so the extra dimensions stay exactly 0. RMSNorm
  then averages the same sum of squares over D' instead of D:
      x / sqrt(S/D' + eps') = sqrt(D'/D) * x / sqrt(S/D + eps)   with eps' = eps * D/D',
  so rms_norm_eps becomes eps * D/D' and every norm weight is multiplied by sqrt(D/D').
- Heads: trained KV head k fills `copies` = ceil(g/g') target KV heads (g = H/Hkv, g' = H'/Hkv'),
  and trained query head h = k*g + r goes to member r % g' of copy r // g', so each query head
  reads its own KV head; the other target heads are all zero.
- Rotary pairs (rotate-half layout: dims i and i + hd/2 turn together at theta^(-2i/hd)): trained
  pair i goes to target pair m*i with m = floor(hd'/hd), which turns at theta'^(-2mi/hd'). With
  theta' = theta^(hd'/(m*hd)) both are the same frequency; when hd' = m*hd that is theta itself
  and the frequencies are bit-identical. Llama-3 frequency scaling is a function of each
  frequency's value, so it carries over unchanged. The other target pairs are zero.
- Softmax scale: attention divides by sqrt(hd') instead of sqrt(hd), so q is multiplied by
  sqrt(hd'/hd).
- q/k norms (Qwen3): an RMSNorm over hd' dims with zeros outside the trained ones, sharing eps'
  with the width norms. Multiplying the q and k projections by s = sqrt(D*hd'/(D'*hd)) makes the
  eps term exact; the normed q and k then come out sqrt(hd'/hd) times the trained ones, which
  is the softmax compensation for q, and k_norm's weight takes sqrt(hd/hd') to undo it for k.
- MLP: the extra units have zero gate, up and down weights: silu(0) * 0 = 0.
- Layers: a base may gain layers, all zero, after its own (a zero attention and MLP add 0 to
  the residual stream). A draft never gains layers: layer-parallel drafting relies on the
  similarity of its trained consecutive layers, so a draft is only widened.
- Vocabulary, tied embeddings, context length, RoPE scaling and token ids stay the trained
  model's; the target shape's vocabulary is not used.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from easyspec.model.config import PRESETS, ConfigError, ModelConfig

# --shape keys -> ModelConfig fields.
SHAPE_KEYS = {
    "hidden": "hidden_size",
    "intermediate": "intermediate_size",
    "layers": "num_layers",
    "heads": "num_heads",
    "kv_heads": "num_kv_heads",
    "head_dim": "head_dim",
}


class InflateError(ValueError):
    """The model cannot be inflated as asked; the message says why and what to change."""


@dataclass(frozen=True)
class Shape:
    """A target shape: a preset's dimensions, with any key=value overrides applied."""

    spec: str  # as the user wrote it
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    layers_given: bool  # layers= was written out (not taken from a preset)


def parse_shape(text: str) -> Shape:
    """'llama-3.1-8b', 'llama-3.2-1b,layers=8' or 'hidden=96,intermediate=160,layers=4,heads=8,
    kv_heads=2,head_dim=32' (a preset name first, then overrides; without a preset, every key)."""
    items = [t.strip() for t in text.split(",") if t.strip()]
    values: dict[str, int] = {}
    if items and "=" not in items[0]:
        name = items.pop(0)
        if name not in PRESETS:
            raise InflateError(f"--shape: unknown preset {name!r}; choose one of {', '.join(PRESETS)} "
                               f"or write {','.join(k + '=N' for k in SHAPE_KEYS)}")
        values = {key: getattr(PRESETS[name], field) for key, field in SHAPE_KEYS.items()}
    given = set()
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or key not in SHAPE_KEYS:
            raise InflateError(f"--shape: {item!r} is not key=value with a key among {', '.join(SHAPE_KEYS)}")
        try:
            number = int(value)
        except ValueError:
            raise InflateError(f"--shape: {key}={value!r} is not a whole number") from None
        if number <= 0:
            raise InflateError(f"--shape: {key} must be positive, got {number}")
        values[key] = number
        given.add(key)
    missing = [k for k in SHAPE_KEYS if k not in values]
    if missing:
        raise InflateError(f"--shape {text!r}: missing {', '.join(missing)} (or start with a preset name)")
    return Shape(text, **{SHAPE_KEYS[k]: v for k, v in values.items()}, layers_given="layers" in given)


@dataclass(frozen=True)
class Plan:
    """Where the trained model's pieces go in the target, and the factors that keep its function."""

    source: ModelConfig
    target: ModelConfig
    q_heads: tuple[int, ...]  # trained query head -> target query head
    kv_heads: tuple[tuple[int, ...], ...]  # trained KV head -> the target KV heads holding a copy
    rope_stride: int  # trained rotary pair i -> target pair rope_stride * i
    notes: tuple[str, ...]  # one line per decision the user did not spell out

    @property
    def copies(self) -> int:
        return len(self.kv_heads[0])

    @property
    def norm_scale(self) -> float:
        """Width-norm weights are multiplied by this: sqrt(D/D')."""
        return math.sqrt(self.source.hidden_size / self.target.hidden_size)

    @property
    def q_scale(self) -> float:
        """The q projection (and bias) factor; see the module docstring for q/k norms."""
        if self.source.qk_norm:
            return self.qk_input_scale
        return math.sqrt(self.target.head_dim / self.source.head_dim)

    @property
    def k_scale(self) -> float:
        return self.qk_input_scale if self.source.qk_norm else 1.0

    @property
    def qk_input_scale(self) -> float:
        """s = sqrt(D*hd'/(D'*hd)): makes the q/k norms' shared eps' exact."""
        src, dst = self.source, self.target
        return math.sqrt(src.hidden_size * dst.head_dim / (dst.hidden_size * src.head_dim))

    @property
    def k_norm_scale(self) -> float:
        return math.sqrt(self.source.head_dim / self.target.head_dim)

    def head_dims(self) -> Tensor:
        """[hd] long: the target dim of each trained dim within a head (rotary pairs kept together)."""
        half, half_target = self.source.head_dim // 2, self.target.head_dim // 2
        pair = torch.arange(half) * self.rope_stride
        return torch.cat((pair, pair + half_target))

    def q_rows(self) -> Tensor:
        """[H*hd] long: the target row of each trained q_proj row (also o_proj's columns)."""
        hd_target = self.target.head_dim
        return torch.cat([h * hd_target + self.head_dims() for h in self.q_heads])

    def kv_rows(self, copy: int) -> Tensor:
        """[Hkv*hd] long: the target k_proj/v_proj row of each trained row, for one copy."""
        hd_target = self.target.head_dim
        return torch.cat([heads[copy] * hd_target + self.head_dims() for heads in self.kv_heads])


def plan_inflation(source: ModelConfig, shape: Shape, draft: bool) -> Plan:
    """The layout of `source` in `shape`, or an InflateError naming what does not fit."""
    where = f"--shape {shape.spec}"
    for field, what in (("hidden_size", "hidden size"), ("intermediate_size", "MLP width"),
                        ("num_heads", "query heads"), ("head_dim", "head dim")):
        have, need = getattr(shape, field), getattr(source, field)
        if have < need:
            raise InflateError(f"{where}: {what} {have} is smaller than the model's {need}; inflating only grows "
                               "a model, choose a shape at least as large")
    if shape.head_dim % 2:
        raise InflateError(f"{where}: head dim {shape.head_dim} is odd; rotary embeddings need an even one")
    if shape.num_heads % shape.num_kv_heads:
        raise InflateError(f"{where}: {shape.num_heads} query heads do not divide into {shape.num_kv_heads} "
                           "KV heads")
    notes = []
    layers = shape.num_layers
    if draft:
        if shape.layers_given and layers != source.num_layers:
            raise InflateError(f"{where}: a draft keeps its own {source.num_layers} layers (layer-parallel drafting "
                               "relies on its trained layer-to-layer similarity); drop layers= from --shape")
        if layers != source.num_layers:
            notes.append(f"draft: keeps its {source.num_layers} layers ({shape.spec} has {layers}); "
                         "a draft is widened, never given layers")
        layers = source.num_layers
    elif layers < source.num_layers:
        raise InflateError(f"{where}: {layers} layers are fewer than the model's {source.num_layers}; a base can "
                           "gain all-zero layers but never lose one")
    group, group_target = source.num_heads // source.num_kv_heads, shape.num_heads // shape.num_kv_heads
    copies = -(-group // group_target)
    if source.num_kv_heads * copies > shape.num_kv_heads:
        raise InflateError(f"{where}: {shape.num_kv_heads} KV heads of {group_target} query heads each cannot "
                           f"hold the model's {source.num_kv_heads} KV heads of {group} query heads "
                           f"(needs {source.num_kv_heads * copies} KV heads)")
    kv_heads = tuple(tuple(k * copies + c for c in range(copies)) for k in range(source.num_kv_heads))
    q_heads = tuple((k * copies + r // group_target) * group_target + r % group_target
                    for k in range(source.num_kv_heads) for r in range(group))
    stride = shape.head_dim // source.head_dim
    theta = source.rope_theta
    if shape.head_dim != stride * source.head_dim:
        theta = source.rope_theta ** (shape.head_dim / (stride * source.head_dim))
        notes.append(f"rope_theta {source.rope_theta:g} -> {theta:.6g}: head dim {source.head_dim} -> "
                     f"{shape.head_dim} is not a multiple, so rotary pair i goes to pair {stride}*i at its own "
                     "frequency")
    try:
        target = source.replace(hidden_size=shape.hidden_size, intermediate_size=shape.intermediate_size,
                                num_layers=layers, num_heads=shape.num_heads, num_kv_heads=shape.num_kv_heads,
                                head_dim=shape.head_dim, rope_theta=theta,
                                rms_norm_eps=source.rms_norm_eps * source.hidden_size / shape.hidden_size)
    except ConfigError as err:
        raise InflateError(f"{where}: {err}") from None
    return Plan(source, target, q_heads, kv_heads, stride, tuple(notes))
