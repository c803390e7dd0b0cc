"""Per-rank bodies for the multi-process tests (module level so spawn can import them)."""

from __future__ import annotations

import torch

from easyspec.model.checkpoint import load_model
from easyspec.model.kv_cache import SlotView
from easyspec.parallel.layer_parallel import LayerLayout, LayerParallelForward
from easyspec.parallel.tp import load_sharded


def tp_logits(state, folder: str, tokens: list[int]):
    model = load_sharded(folder, torch.float32, state, tp=True)
    t = torch.tensor(tokens)
    with torch.no_grad():
        full = model(t, torch.arange(len(t)))
        cache = model.allocate_cache(64)
        model(t[:-3], torch.arange(len(t) - 3), cache, kv_len=64)
        tail = model(t[-3:], torch.arange(len(t) - 3, len(t)), cache, kv_len=64)
    return full, tail


def reference_layer_parallel(model, layout: LayerLayout, tokens, positions, cache, kv_len, mask=None):
    """The formulas of easyspec.parallel.layer_parallel, written out serially: attention of a
    group's layers all read the group's entry state h0; their outputs are added in layer order,
    each followed by that layer's MLP."""
    x = model.embed_tokens(tokens[None])
    step = model.step_inputs(positions, cache, kv_len, mask)
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
    forward = LayerParallelForward(model, layout, state.rank, state.world_size, state.group, policy)
    prompt = torch.tensor([3, 1, 4, 1, 5, 9, 2, 6])
    steps = torch.tensor([5, 3, 5])
    with torch.no_grad():
        ours_cache, ref_cache = model.allocate_cache(64), model.allocate_cache(64)
        model(prompt, torch.arange(8), ours_cache, 64)
        model(prompt, torch.arange(8), ref_cache, 64)
        ours, ref = [], []
        for i, tok in enumerate(steps):
            pos = torch.tensor([8 + i])
            ours.append(forward(tok.view(1), pos, ours_cache, 64))
            ref.append(reference_layer_parallel(model, layout, tok.view(1), pos, ref_cache, 64))
        parallel_keys = [k[:, :11].clone() for k in ours_cache.keys]
        # Calibration: one exact forward over the same positions rewrites every layer's KV.
        model(steps, torch.arange(8, 11), ours_cache, 64)
        exact_cache = model.allocate_cache(64)
        model(torch.cat((prompt, steps)), torch.arange(11), exact_cache, 64)
    return {
        "ours": torch.cat(ours),
        "ref": torch.cat(ref),
        "parallel_keys": parallel_keys,
        "ref_keys": [k[:, :11] for k in ref_cache.keys],
        "calibrated_keys": [k[:, :11] for k in ours_cache.keys],
        "exact_keys": [k[:, :11] for k in exact_cache.keys],
    }


def tree_levels_layer_parallel_vs_reference(state, folder: str, groups: str):
    """Two tree levels through the layer-parallel forward (slots apart from positions, a tree
    mask) and through the serial formulas. The root sits at slot 7; level 1 holds two children
    at position 8 in slots 8 and 9, level 2 one child of each at position 9 in slots 10 and 11."""
    model = load_model(folder)
    layout = LayerLayout.parse(groups, model.config.num_layers, state.world_size)
    forward = LayerParallelForward(model, layout, state.rank, state.world_size, state.group)
    prompt = torch.tensor([3, 1, 4, 1, 5, 9, 2, 6])
    levels = [  # tokens, positions, slots, the tree slots each query sees
        ([5, 3], [8, 8], [8, 9], [[7, 8], [7, 9]]),
        ([2, 7], [9, 9], [10, 11], [[7, 9, 10], [7, 8, 11]]),
    ]
    with torch.no_grad():
        ours_cache, ref_cache = model.allocate_cache(64), model.allocate_cache(64)
        for cache in (ours_cache, ref_cache):
            model(prompt[:7], torch.arange(7), cache, 64)
            model(prompt[7:], torch.tensor([7]), cache, 64)
        ours, ref = [], []
        for tokens, positions, slots, seen in levels:
            mask = torch.zeros(2, 64, dtype=torch.bool)  # [T, L]
            mask[:, :7] = True
            for row, visible in enumerate(seen):
                mask[row, visible] = True
            tokens, positions, slots = torch.tensor(tokens), torch.tensor(positions), torch.tensor(slots)
            ours.append(forward(tokens, positions, SlotView(ours_cache, slots), 64, mask))
            ref.append(reference_layer_parallel(model, layout, tokens, positions, SlotView(ref_cache, slots), 64, mask))
    return {
        "ours": torch.cat(ours),
        "ref": torch.cat(ref),
        "ours_keys": [k[:, :12] for k in ours_cache.keys],
        "ref_keys": [k[:, :12] for k in ref_cache.keys],
    }


def local_vs_ranks(state, folder: str, groups: str):
    """LocalLayerParallelForward on every rank against the ranks' LayerParallelForward, for every
    policy: three layer-parallel steps after an exact prefill, logits and every layer's KV after them."""
    from easyspec.options import ParallelPolicy
    from easyspec.parallel.layer_parallel import LocalLayerParallelForward

    model = load_model(folder)
    layout = LayerLayout.parse(groups, model.config.num_layers, state.world_size)
    prompt, steps = torch.tensor([3, 1, 4, 1, 5, 9, 2, 6]), torch.tensor([5, 3, 5])
    out = {}
    with torch.no_grad():
        for policy in ParallelPolicy.names():
            forwards = {"ranks": LayerParallelForward(model, layout, state.rank, state.world_size, state.group,
                                                      policy),
                        "local": LocalLayerParallelForward(model, layout, policy)}
            for name, forward in forwards.items():
                cache = model.allocate_cache(64)
                model(prompt, torch.arange(8), cache, 64)
                logits = [forward(tok.view(1), torch.tensor([8 + i]), cache, 64) for i, tok in enumerate(steps)]
                logits.append(forward(steps, torch.arange(11, 14), cache, 64))  # several tokens in one step
                out[policy, name] = (torch.cat(logits), [k[:, :14].clone() for k in cache.keys])
    return out
