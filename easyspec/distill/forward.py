"""The draft's training forwards: the exact one, and the layer-parallel one as drafting meets it.

EasySpec drafting runs the draft two ways. Each round opens with an exact,
sequential forward over the tokens committed last round (calibration): it
gives the first draft token and leaves exact keys and values in the cache.
The remaining draft tokens come from layer-parallel steps, which attend to
those exact keys and values of every earlier position, plus their own. So a
draft trained for layer-parallel drafting must be good at both:

  exact pass:           the ordinary forward, every position (what sd runs);
  layer-parallel pass:  at every position t, the layer-parallel step that drafting
                        would run at t after an exact prefix: groups as in
                        easyspec.parallel.layer_parallel.run_groups, each attention
                        reading the exact pass's keys and values at positions < t
                        and its own at t.

The layer-parallel pass is exact for the first layer-parallel step of a round;
later steps of the same round also see the one or two layer-parallel entries
written before them in that round, which it approximates by exact ones. Layers
before the first multi-layer group compute the same thing in both passes, so
the layer-parallel pass starts from the exact pass's state there.

Shapes: B rows, T tokens, D width, H heads, Hkv KV heads, G = H / Hkv, hd head dim.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from easyspec.model.transformer import Transformer
from easyspec.options import ParallelPolicy
from easyspec.parallel.layer_parallel import LayerLayout, run_groups


def exact_prefix_attention(q: Tensor, k: Tensor, v: Tensor, prefix_k: Tensor, prefix_v: Tensor) -> Tensor:
    """Each query t over prefix keys/values at positions < t and its own key/value at t.

    q: [B, T, H, hd]; k, v, prefix_k, prefix_v: [B, T, Hkv, hd] -> [B, T, H * hd].
    """
    rows, seq, heads, hd = q.shape
    group = heads // k.shape[2]
    keys = torch.cat((prefix_k, k), dim=1).transpose(1, 2).repeat_interleave(group, dim=1)  # [B, H, 2T, hd]
    values = torch.cat((prefix_v, v), dim=1).transpose(1, 2).repeat_interleave(group, dim=1)
    earlier = torch.ones(seq, seq, dtype=torch.bool, device=q.device).tril(-1)
    own = torch.eye(seq, dtype=torch.bool, device=q.device)
    mask = torch.cat((earlier, own), dim=1)  # [T, 2T]: prefix keys before t, then the query's own key
    out = F.scaled_dot_product_attention(q.transpose(1, 2), keys, values, attn_mask=mask)  # [B, H, T, hd]
    return out.transpose(1, 2).reshape(rows, seq, heads * hd)


class DraftForward:
    """Hidden states [B, T, D] of the exact pass, then of one layer-parallel pass per layout."""

    def __init__(self, model: Transformer, layouts: Sequence[LayerLayout] = (),
                 policy: str = ParallelPolicy.ATTENTION) -> None:
        for layout in layouts:
            layout.validate(model.config.num_layers, layout.max_size)
        self.model, self.layouts, self.policy = model, list(layouts), policy

    def __call__(self, tokens: Tensor) -> list[Tensor]:
        """tokens: [B, T] long, every row starting at position 0."""
        model = self.model
        positions = torch.arange(tokens.shape[1], device=tokens.device)
        step = model.step_inputs(positions, None)
        x = model.embed_tokens(tokens)  # [B, T, D]
        layer_inputs = []
        for block in model.layers:
            layer_inputs.append(x)
            x = block(x, step)
        passes = [x]
        # Per layout, the first group of several layers: the passes agree up to it.
        starts = [next((n for n, g in enumerate(layout.groups) if len(g) > 1), None) for layout in self.layouts]
        first = min((layout.groups[n][0] for layout, n in zip(self.layouts, starts, strict=True) if n is not None),
                    default=len(model.layers))
        cos, sin = step.cos[:, None, :], step.sin[:, None, :]  # [T, 1, hd]
        prefix = {}  # layer -> the exact pass's keys and values, each [B, T, Hkv, hd]
        for i in range(first, len(model.layers)):
            block = model.layers[i]
            _, keys, values = block.attn.qkv(layer_inputs[i], block.input_norm, cos, sin)
            prefix[i] = (keys, values)

        def attend(i: int, h: Tensor, residual: Tensor | None) -> Tensor:
            block = model.layers[i]
            q, k, v = block.attn.qkv(h, block.input_norm, cos, sin)
            return block.attn.o_proj(exact_prefix_attention(q, k, v, *prefix[i]), residual=residual)

        for layout, start in zip(self.layouts, starts, strict=True):
            if start is None:
                passes.append(x)  # a layout without groups is the exact forward
                continue
            h = layer_inputs[layout.groups[start][0]]
            passes.append(run_groups(model.layers, layout.groups[start:], h, attend, self.policy))
        return passes


def distill_loss(model: Transformer, hidden: Tensor, targets: Tensor, teacher_logp: Tensor | None,
                 kl_weight: float, ntp_weight: float) -> tuple[Tensor, dict[str, Tensor]]:
    """Loss on the selected positions.

    hidden: [N, D] draft states; targets: [N] next tokens; teacher_logp: [N, V] the base's
    log-probabilities, or None: then the next-token loss alone (the weights mix it with the KL).
    Returns the loss and its parts.
    """
    logq = F.log_softmax(model.logits(hidden), dim=-1)  # [N, V] float32
    parts = {"ntp": F.nll_loss(logq, targets)}
    if teacher_logp is None:
        return parts["ntp"], parts
    # KL(base || draft), summed over the vocabulary, averaged over positions.
    parts["kl"] = F.kl_div(logq, teacher_logp, log_target=True, reduction="batchmean")
    return kl_weight * parts["kl"] + ntp_weight * parts["ntp"], parts


@torch.no_grad()
def teacher_log_probs(base: Transformer, tokens: Tensor, select: Tensor) -> Tensor:
    """The base's log-probabilities at the selected positions: tokens [B, T], select [B, T] bool -> [N, V]."""
    positions = torch.arange(tokens.shape[1], device=tokens.device)
    step = base.step_inputs(positions, None)
    x = base.embed_tokens(tokens)
    for block in base.layers:
        x = block(x, step)
    return F.log_softmax(base.logits(x[select]), dim=-1)
