"""Tensor parallelism and layer-parallel drafting on 2 (and 3) CPU processes over gloo."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from dist_utils import run_ranks
from hf_models import make_hf_checkpoint
from parallel_cases import layer_parallel_vs_reference, local_vs_ranks, tp_logits

from easyspec import Engine, EngineOptions
from easyspec.model.checkpoint import load_model
from easyspec.parallel.layer_parallel import LayerLayout, LayoutError
from easyspec.parallel.tp import TPError

TOKENS = [7, 3, 99, 12, 12, 5, 64, 1, 8, 40]


@pytest.mark.parametrize("family", ["llama3", "qwen2", "qwen3"])
def test_tp2_logits_equal_one_process(tmp_path, family):
    make_hf_checkpoint(family, tmp_path, seed=11, initializer_range=0.3)
    model = load_model(tmp_path)
    with torch.no_grad():
        expected = model(torch.tensor(TOKENS), torch.arange(len(TOKENS)))
    for full, tail in run_ranks(tp_logits, 2, str(tmp_path), TOKENS):
        torch.testing.assert_close(full, expected, atol=1e-4, rtol=1e-5)
        torch.testing.assert_close(tail, expected[-3:], atol=1e-4, rtol=1e-5)


def test_tp_heads_not_divisible_is_a_clear_error(pair_dir):
    with pytest.raises(TPError, match=r"num_attention_heads \(4\) is not divisible by 3 devices"):
        Engine(EngineOptions(model=str(pair_dir / "base"), devices=3))


@pytest.mark.parametrize("policy", ["attention", "attention+tp-mlp"])
def test_layer_parallel_matches_formulas_and_calibration_is_exact(pair_dir, policy):
    results = run_ranks(layer_parallel_vs_reference, 2, str(pair_dir / "deep"), "0,1-2,3-4,5,6-7", policy)
    for r in results:
        torch.testing.assert_close(r["ours"], r["ref"], atol=1e-4, rtol=1e-5)
        for ours, ref in zip(r["parallel_keys"], r["ref_keys"], strict=True):
            torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)
        for ours, exact in zip(r["calibrated_keys"], r["exact_keys"], strict=True):
            torch.testing.assert_close(ours, exact, atol=1e-5, rtol=1e-5)
    # Both ranks hold the same layer-parallel KV (the all-gather shares each layer's new entries).
    for a, b in zip(results[0]["parallel_keys"], results[1]["parallel_keys"], strict=True):
        assert torch.equal(a, b)
    # Layer-parallel drafting really is an approximation: its KV differs from exact KV somewhere.
    assert any(not torch.allclose(f, e, atol=1e-4) for f, e in zip(results[0]["parallel_keys"],
                                                                    results[0]["exact_keys"], strict=True))


@pytest.mark.parametrize("world,groups", [(2, "0,1-2,3-4,5,6-7"), (4, "0,1-4,5-7")])
def test_one_device_layer_parallel_equals_the_ranks(pair_dir, world, groups):
    """LocalLayerParallelForward (every group member on one device) computes what N ranks compute."""
    for result in run_ranks(local_vs_ranks, world, str(pair_dir / "deep"), groups):
        for policy in ("attention", "layer", "attention+tp-mlp"):
            (ranks, ranks_keys), (local, local_keys) = result[policy, "ranks"], result[policy, "local"]
            torch.testing.assert_close(local, ranks, atol=1e-5, rtol=1e-5)
            for a, b in zip(local_keys, ranks_keys, strict=True):
                torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_three_processes_layer_parallel_3(pair_dir):
    prompt = [5, 9, 4, 4, 7, 1, 2]
    # Three-way tensor parallelism needs head counts that divide by 3.
    folder = Path(pair_dir) / "base6"
    if not folder.exists():
        make_hf_checkpoint("llama2", folder, seed=12, num_attention_heads=6, num_key_value_heads=3,
                           hidden_size=96, intermediate_size=96, num_hidden_layers=2, initializer_range=0.3)
    with Engine(EngineOptions(model=str(folder))) as engine:
        expected = [t for c in engine.generate(prompt) for t in c.token_ids]
    opts = EngineOptions(model=str(folder), draft=str(folder), method="easyspec", devices=3, layer_parallel=3,
                         keep_first=0, keep_last=0)
    with Engine(opts) as engine:
        assert [t for c in engine.generate(prompt) for t in c.token_ids] == expected


def test_layouts():
    assert str(LayerLayout.build(10, 2, 1, 1)) == "0,1-2,3-4,5-6,7-8,9"
    assert str(LayerLayout.build(8, 3, 2, 1)) == "0,1,2-4,5-6,7"
    assert str(LayerLayout.parse("0,1,2-3,4-5,6-7,8,9", 10, 2)) == "0,1,2-3,4-5,6-7,8,9"
    with pytest.raises(LayoutError, match="cover the draft's layers 0..9 once each"):
        LayerLayout.parse("0,2-3,4-9", 10, 8)
    with pytest.raises(LayoutError, match="more layers than --layer-parallel 2"):
        LayerLayout.parse("0-2,3-9", 10, 2)
    with pytest.raises(LayoutError, match="cannot read 'x'"):
        LayerLayout.parse("0,x", 10, 2)


def _children(pid: int) -> list[int]:
    """Spawned worker processes of pid (not the resource tracker, nor a child that has not exec'd yet)."""
    kids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes().decode(errors="replace")
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        if ppid == pid and "spawn_main" in cmdline:
            kids.append(int(entry.name))
    return kids


def test_killed_worker_ends_run_with_error(tmp_path):
    make_hf_checkpoint("llama2", tmp_path, seed=13, max_position_embeddings=8192)
    cmd = [sys.executable, "-m", "easyspec", "generate", "--model", str(tmp_path), "--devices", "2",
           "--prompt-ids", "1,2,3", "--max-new-tokens", "8000", "--ignore-eos", "--max-context", "8192",
           "--json", "--timeout", "30"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not _children(proc.pid):
        time.sleep(0.2)
    kids = _children(proc.pid)
    if not kids:
        proc.kill()
    assert kids, "the follower process did not start"
    time.sleep(3)  # let it get into the token loop
    os.kill(kids[0], signal.SIGKILL)
    start = time.monotonic()
    try:
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
        for kid in _children(proc.pid):
            os.kill(kid, signal.SIGKILL)
    assert time.monotonic() - start < 30
    assert proc.returncode != 0
    # The context line the engine prints at start is information; the failure is one error line.
    lines = [line for line in err.strip().splitlines() if not line.startswith("context ")]
    assert len(lines) == 1 and re.search(r"rank 1 .*(exited|failed)", lines[0]), err
    assert not _children(proc.pid)


def test_four_processes_tp4_and_layer_parallel_3_and_4(pair_dir):
    """The paper's setting has more than two GPUs: base TP=4 with drafts at TP=4 and layer-parallel N=3 and 4."""
    folder = Path(pair_dir) / "base8"
    draft = Path(pair_dir) / "draft8"
    if not folder.exists():
        make_hf_checkpoint("llama3", folder, seed=13, num_attention_heads=8, num_key_value_heads=4,
                           num_hidden_layers=2, initializer_range=0.3)
        make_hf_checkpoint("llama3", draft, seed=14, num_attention_heads=8, num_key_value_heads=4,
                           num_hidden_layers=6, initializer_range=0.3)
    prompt = [5, 9, 4, 4, 7, 1, 2]
    with Engine(EngineOptions(model=str(folder))) as engine:
        expected = [t for c in engine.generate(prompt) for t in c.token_ids]
    for changes in (
        dict(method="sd", draft_tp=4, tree_width=2, tree_depth=3),
        dict(method="easyspec", layer_parallel=4, parallel_policy="attention+tp-mlp"),
        dict(method="easyspec", layer_parallel=3, calibrate="on-mismatch"),
    ):
        opts = EngineOptions(model=str(folder), draft=str(draft), devices=4, **changes)
        with Engine(opts) as engine:
            assert [t for c in engine.generate(prompt) for t in c.token_ids] == expected, changes
