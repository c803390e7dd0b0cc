"""`easyspec zoo inflate`: a trained model at a larger shape computes the same function.

Every family (Llama 2/3 with RoPE scaling, Mistral, Qwen2 with q/k/v biases, Qwen3 with q/k
norms) is inflated to two shapes: one with head dim 2x (rotary pair i -> 2i, theta kept) and
added layers, one with duplicated KV heads and a head dim that is not a multiple (theta moved).
Logits are compared for every step kind the engine runs, at TP=1 and TP=2, and a pair's
speculative outputs and acceptance are compared end to end.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from dist_utils import run_ranks
from engine_cases import PROMPTS, run
from hf_models import FAMILIES, make_hf_checkpoint
from inflate_cases import runner_steps, runner_steps_tp

from easyspec import Engine, EngineOptions
from easyspec.model.checkpoint import load_config, load_model
from easyspec.model.config import PRESETS
from easyspec.zoo.inflate import inflate
from easyspec.zoo.shape import InflateError, parse_shape, plan_inflation

SHAPES = {
    "stride2": "hidden=96,intermediate=160,layers=5,heads=8,kv_heads=2,head_dim=32",
    "copies": "hidden=80,intermediate=100,layers=3,heads=8,kv_heads=8,head_dim=40",
}
TOKENS = [7, 3, 99, 12, 12, 5, 64, 1, 8, 40, 17, 3, 2, 120, 45, 45, 9]
DEMO = Path(__file__).resolve().parent.parent / "easyspec" / "models" / "demo"


def _close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    # Float32: the wider matmuls only sum in another order.
    torch.testing.assert_close(actual, expected, atol=2e-4, rtol=1e-4)


@pytest.fixture(scope="module")
def inflated(tmp_path_factory) -> dict[tuple[str, str], tuple[Path, Path]]:
    """(family, shape name) -> (trained folder, inflated float32 folder)."""
    root = tmp_path_factory.mktemp("inflate")
    out = {}
    for family in FAMILIES:
        make_hf_checkpoint(family, root / family, seed=5, initializer_range=0.3)
        for name, spec in SHAPES.items():
            inflate(root / family, parse_shape(spec), root / f"{family}-{name}", dtype="float32")
            out[family, name] = (root / family, root / f"{family}-{name}")
    return out


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("family", FAMILIES)
def test_inflated_logits_equal_for_every_step_kind(inflated, family, shape):
    trained, big = inflated[family, shape]
    original, wide = load_model(trained), load_model(big)
    cfg, spec = wide.config, parse_shape(SHAPES[shape])
    assert (cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.num_layers) == (
        spec.hidden_size, spec.num_heads, spec.num_kv_heads, spec.head_dim, spec.num_layers)
    assert cfg.vocab_size == original.config.vocab_size
    assert cfg.tie_word_embeddings == original.config.tie_word_embeddings
    assert cfg.rope_scaling == original.config.rope_scaling
    with torch.no_grad():
        positions = torch.arange(len(TOKENS))
        _close(wide(torch.tensor(TOKENS), positions), original(torch.tensor(TOKENS), positions))
    expected, actual = runner_steps(original), runner_steps(wide)
    for step in ("prefill", "decode", "verify", "tree"):
        _close(actual[step], expected[step])


@pytest.mark.parametrize("family", FAMILIES)
def test_transformers_reads_the_inflated_folder_as_the_same_model(inflated, family):
    import transformers as tf

    trained, big = inflated[family, "copies"]
    ids = torch.tensor([TOKENS])
    with torch.no_grad():
        expected = tf.AutoModelForCausalLM.from_pretrained(trained, dtype=torch.float32)(ids).logits
        actual = tf.AutoModelForCausalLM.from_pretrained(big, dtype=torch.float32)(ids).logits
    _close(actual, expected)


def test_inflated_logits_equal_at_tp2(inflated):
    cases = [(family, shape) for family in FAMILIES for shape in SHAPES]
    ranks = run_ranks(runner_steps_tp, 2, [str(inflated[c][1]) for c in cases], timeout_s=300)
    for case, steps in zip(cases, ranks[0], strict=True):
        expected = runner_steps(load_model(inflated[case][0]))
        for step in ("prefill", "decode", "verify", "tree"):
            _close(steps[step], expected[step])


@pytest.fixture(scope="module")
def inflated_pair(pair_dir, tmp_path_factory) -> Path:
    """The test pair's base with 2 zero layers added and its near draft widened, in float32."""
    root = tmp_path_factory.mktemp("inflated-pair")
    inflate(pair_dir / "base", parse_shape("hidden=96,intermediate=160,layers=6,heads=8,kv_heads=4,head_dim=32"),
            root / "base", dtype="float32")
    inflate(pair_dir / "near", parse_shape("hidden=80,intermediate=128,layers=4,heads=4,kv_heads=2,head_dim=24"),
            root / "near", draft=True, dtype="float32")
    return root


@pytest.mark.parametrize("config", [dict(method="vanilla"), dict(method="sd", num_draft=4),
                                    dict(method="sd", tree_width=3, tree_depth=3),
                                    dict(method="easyspec", devices=2, calibrate="on-mismatch")],
                         ids=["vanilla", "sd", "sd-tree", "easyspec-2"])
def test_inflated_pair_decodes_and_accepts_as_the_original(pair_dir, inflated_pair, config):
    results = []
    for root in (pair_dir, inflated_pair):
        draft = None if config["method"] == "vanilla" else str(root / "near")
        with Engine(EngineOptions(model=str(root / "base"), draft=draft, **config)) as engine:
            results.append([run(engine, prompt) for prompt in PROMPTS[1:]])
    for (ids, chunk), (inflated_ids, inflated_chunk) in zip(*results, strict=True):
        assert inflated_ids == ids
        assert (inflated_chunk.stats.rounds, inflated_chunk.stats.accepted) == (chunk.stats.rounds,
                                                                                chunk.stats.accepted)


def test_bfloat16_storage_shards_and_side_files(tmp_path):
    """The bundled demo draft (stored in bfloat16) widened to a 1B-like width in bfloat16: several
    shards, tokenizer and generation config copied, embeddings still tied, greedy tokens unchanged."""
    summary = inflate(DEMO / "draft", parse_shape("llama-3.2-1b,hidden=320,intermediate=640"), tmp_path / "d",
                      draft=True, max_shard_bytes=8 << 20)
    files = {p.name for p in (tmp_path / "d").iterdir()}
    assert {"tokenizer.json", "tokenizer_config.json", "generation_config.json", "inflate.json",
            "model.safetensors.index.json"} <= files
    assert len([f for f in files if f.endswith(".safetensors")]) > 1
    assert summary["added_layers"] == 0 and any("keeps its 8 layers" in n for n in summary["notes"])
    cfg, source = load_config(tmp_path / "d"), load_config(DEMO / "draft")
    assert cfg.tie_word_embeddings and cfg.num_layers == source.num_layers and cfg.num_heads == 32
    assert cfg.eos_token_ids == source.eos_token_ids and cfg.vocab_size == source.vocab_size
    weights = json.loads((tmp_path / "d" / "model.safetensors.index.json").read_text())["weight_map"]
    assert "lm_head.weight" not in weights
    ids = torch.tensor([5, 80, 1200, 33, 7, 7, 901, 64, 12, 3000])
    with torch.no_grad():
        expected = load_model(DEMO / "draft")(ids, torch.arange(len(ids)))
        actual = load_model(tmp_path / "d")(ids, torch.arange(len(ids)))
    assert torch.equal(actual.argmax(-1), expected.argmax(-1))
    torch.testing.assert_close(actual, expected, atol=0.1, rtol=0.05)  # rescaled weights rounded to bfloat16


@pytest.mark.parametrize("spec, draft, message", [
    ("hidden=32,intermediate=160,layers=5,heads=8,kv_heads=2,head_dim=32", False, "hidden size 32 is smaller"),
    ("hidden=96,intermediate=64,layers=5,heads=8,kv_heads=2,head_dim=32", False, "MLP width 64 is smaller"),
    ("hidden=96,intermediate=160,layers=5,heads=2,kv_heads=2,head_dim=32", False, "query heads 2 is smaller"),
    ("hidden=96,intermediate=160,layers=5,heads=8,kv_heads=2,head_dim=8", False, "head dim 8 is smaller"),
    ("hidden=96,intermediate=160,layers=5,heads=8,kv_heads=2,head_dim=33", False, "head dim 33 is odd"),
    ("hidden=96,intermediate=160,layers=5,heads=8,kv_heads=3,head_dim=32", False, "do not divide into 3"),
    ("hidden=96,intermediate=160,layers=2,heads=8,kv_heads=2,head_dim=32", False, "2 layers are fewer than"),
    ("hidden=96,intermediate=160,layers=5,heads=8,kv_heads=2,head_dim=32", True, "a draft keeps its own 3 layers"),
    # The model's 2 KV heads (2 query heads each) need 2 target KV heads.
    ("hidden=96,intermediate=160,layers=5,heads=8,kv_heads=1,head_dim=32", False, "needs 2 KV heads"),
])
def test_shapes_that_cannot_hold_the_model_are_refused(spec, draft, message):
    trained = PRESETS["tiny"].replace(hidden_size=64, intermediate_size=96, num_layers=3, num_heads=4,
                                      num_kv_heads=2, head_dim=16)
    with pytest.raises(InflateError, match=message):
        plan_inflation(trained, parse_shape(spec), draft)


@pytest.mark.parametrize("spec, message", [
    ("llama-9b", "unknown preset 'llama-9b'"),
    ("llama-3.1-8b,width=5", "'width=5' is not key=value with a key among"),
    ("llama-3.1-8b,layers=x", "layers='x' is not a whole number"),
    ("llama-3.1-8b,layers=0", "layers must be positive"),
    ("hidden=96,layers=4", "missing intermediate, heads, kv_heads, head_dim"),
])
def test_shape_specs(spec, message):
    with pytest.raises(InflateError, match=message):
        parse_shape(spec)


def test_a_missing_model_is_one_line(tmp_path):
    with pytest.raises(InflateError, match="no such checkpoint folder or file"):
        inflate(tmp_path / "nothing", parse_shape("llama-3.2-1b"), tmp_path / "out")


def test_a_preset_and_its_overrides():
    shape = parse_shape("llama-3.1-8b, layers=40")
    assert (shape.hidden_size, shape.num_heads, shape.num_kv_heads, shape.head_dim, shape.num_layers) == (
        4096, 32, 8, 128, 40)
    assert shape.layers_given and not parse_shape("llama-3.1-8b").layers_given


def test_cli_inflates_and_reports_mistakes_in_one_line(tmp_path):
    def zoo(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "easyspec", "zoo", "inflate", *args], capture_output=True,
                              text=True, timeout=120)

    ok = zoo("--model", str(DEMO / "base"), "--shape", "llama-3.2-1b,hidden=400,intermediate=800,layers=10",
             "--out", str(tmp_path / "b"))
    assert ok.returncode == 0, ok.stderr
    assert "2 zero layers added" in ok.stderr and load_config(tmp_path / "b").num_layers == 10
    for args, message in [
        (("--model", str(DEMO / "base"), "--shape", "llama-3.2-1b", "--out", str(tmp_path / "b")),
         "is not empty; choose a new --out or pass --overwrite"),
        (("--model", str(DEMO / "draft"), "--shape", "llama-3.2-1b,layers=12", "--draft", "--out",
          str(tmp_path / "c")), "a draft keeps its own 8 layers"),
    ]:
        bad = zoo(*args)
        assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1 and message in bad.stderr
