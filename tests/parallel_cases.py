"""Per-rank bodies for the multi-process tests (module level so spawn can import them)."""

from __future__ import annotations

import torch

from easyspec.engine.worker import load_sharded
from easyspec.model.checkpoint import load_model
from easyspec.parallel.layer_parallel import LayerLayout, LayerParallelForward


def tp_logits(state, folder: str, tokens: list[int]):
    model = load_sharded(folder, torch.float32, state, tp=True)
    t = torch.tensor(tokens)
    with torch.no_grad():
        full = model(t, torch.arange(len(t)))
        cache = model.allocate_cache(64)
        model(t[:-3], torch.arange(len(t) - 3), cache, kv_len=64)
        tail = model(t[-3:], torch.arange(len(t) - 3, len(t)), cache, kv_len=64)
    return full, tail


def reference_fuzzy(model, layout: LayerLayout, tokens, positions, cache, kv_len):
    """The formulas of method.md, written out serially: attention of a group's layers
    all read the group's entry state h0; their outputs are added in layer order,
    each followed by that layer's MLP."""
    x = model.embed_tokens(tokens[None])
    step = model.step_inputs(positions, cache, kv_len)
    for group in layout.groups:
        h0 = x
        updates = [model.layers[i].attention(h0, step) for i in group]
        x = h0
        for i, update in zip(group, updates, strict=True):
            x = x + update
            x = x + model.layers[i].feed_forward(x)
    return model.logits(x)[0]


def layer_parallel_vs_reference(state, folder: str, groups: str, policy: str):
    model = load_model(folder)
    layout = LayerLayout.parse(groups, model.config.num_layers, state.world_size)
    fuzzy = LayerParallelForward(model, layout, state.rank, state.world_size, state.group, policy)
    prompt = torch.tensor([3, 1, 4, 1, 5, 9, 2, 6])
    steps = torch.tensor([5, 3, 5])
    with torch.no_grad():
        ours_cache, ref_cache = model.allocate_cache(64), model.allocate_cache(64)
        model(prompt, torch.arange(8), ours_cache, 64)
        model(prompt, torch.arange(8), ref_cache, 64)
        ours, ref = [], []
        for i, tok in enumerate(steps):
            pos = torch.tensor([8 + i])
            ours.append(fuzzy(tok.view(1), pos, ours_cache, 64))
            ref.append(reference_fuzzy(model, layout, tok.view(1), pos, ref_cache, 64))
        fuzzy_keys = [k[:, :11].clone() for k in ours_cache.keys]
        # Calibration: one exact forward over the same positions rewrites every layer's KV.
        model(steps, torch.arange(8, 11), ours_cache, 64)
        exact_cache = model.allocate_cache(64)
        model(torch.cat((prompt, steps)), torch.arange(11), exact_cache, 64)
    return {
        "ours": torch.cat(ours),
        "ref": torch.cat(ref),
        "fuzzy_keys": fuzzy_keys,
        "ref_keys": [k[:, :11] for k in ref_cache.keys],
        "calibrated_keys": [k[:, :11] for k in ours_cache.keys],
        "exact_keys": [k[:, :11] for k in exact_cache.keys],
    }
