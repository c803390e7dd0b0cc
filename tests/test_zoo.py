"""Tests for easyspec.zoo: corpus split, tokenizer, prompts, training, export and the pair pipeline.

Everything runs on the CPU with tiny shapes; the real pairs' shapes are only
checked against their size budgets.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from easyspec.model.checkpoint import load_model
from easyspec.model.config import ModelConfig
from easyspec.model.tokenizer import Tokenizer
from easyspec.zoo import cli
from easyspec.zoo.bpe import BOS_ID, EOS_ID, save_tokenizer, train_bpe
from easyspec.zoo.corpus import SourceFile, build_corpus, is_held_out
from easyspec.zoo.evaluate import evaluate_pair, simulate_rounds
from easyspec.zoo.pairs import PAIRS, ModelSpec, PairSpec, TrainSettings
from easyspec.zoo.pipeline import train_pair
from easyspec.zoo.prompts import Prompt, make_prompts, read_prompts, write_prompts
from easyspec.zoo.train import build_model, export_model, lr_at, pack_stream, train_model

SAMPLE = '''"""Module docstring with unicode: caf\u00e9, \u03bb, \u2603."""
import os\r\n
class Point:
    """A point."""

    def __init__(self, x: int, y: int) -> None:
\tself.x = x   \n        self.y = y


def test_point():
    p = Point(1, 2)
    assert p.x == 1
'''


def _tiny_config(vocab: int) -> ModelConfig:
    return ModelConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                       num_kv_heads=2, head_dim=8, tie_word_embeddings=True, max_position_embeddings=64,
                       bos_token_id=BOS_ID, eos_token_ids=(EOS_ID,))


def _tiny_spec(role: str, vocab: int, lr: float = 3e-3) -> ModelSpec:
    return ModelSpec(role, _tiny_config(vocab), TrainSettings(seq_len=32, batch_size=8, lr=lr, warmup_steps=5,
                                                              eval_every=10, eval_windows=8))


@pytest.fixture(scope="module")
def stdlib_corpus():
    return build_corpus(max_bytes=3 << 20)


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory, stdlib_corpus) -> Path:
    folder = tmp_path_factory.mktemp("tok")
    tok = train_bpe((f.text for f in stdlib_corpus.train), vocab_size=512, max_chars=1_000_000)
    save_tokenizer(tok, folder, model_max_length=64)
    return folder


def test_tokenizer_round_trips_source_exactly(tokenizer_dir, stdlib_corpus) -> None:
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    ours = Tokenizer.from_folder(tokenizer_dir)
    assert ours is not None and ours.vocab_size == 512
    assert (ours.token_id("<|bos|>"), ours.token_id("<|eos|>")) == (BOS_ID, EOS_ID)
    assert (ours.bos_token, ours.eos_token, ours.chat_template) == ("<|bos|>", "<|eos|>", None)
    hf_auto = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    hf_file = PreTrainedTokenizerFast(tokenizer_file=str(tokenizer_dir / "tokenizer.json"))
    texts = [SAMPLE, " leading space", "trailing \t\n\n", "", *(f.text for f in stdlib_corpus.val[:3])]
    for text in texts:
        ids = ours.encode(text)
        assert ids[0] == BOS_ID and BOS_ID not in ids[1:]
        assert ours.decode(ids) == text
        assert hf_auto.encode(text) == ids
        assert hf_auto.decode(ids, skip_special_tokens=True) == text
        assert hf_file.decode(hf_file.encode(text), skip_special_tokens=True) == text


def test_bpe_training_is_deterministic(stdlib_corpus) -> None:
    texts = [f.text for f in stdlib_corpus.train[:40]]
    first, second = (train_bpe(texts, vocab_size=400).to_str() for _ in range(2))
    assert first == second


def _write_tree(root: Path) -> None:
    for i in range(120):
        (root / f"pkg{i % 7}").mkdir(exist_ok=True)
        (root / f"pkg{i % 7}" / f"mod{i}.py").write_text(f"def f{i}():\n    return {i}\n" * (1 + i % 5))
    (root / "pkg0" / "zcopy.py").write_text("def f0():\n    return 0\n")  # duplicate of mod0.py
    (root / "pkg0" / "latin1.py").write_bytes(b"x = '\xe9'\n")  # not UTF-8
    (root / "pkg0" / "empty.py").write_text("")
    (root / "pkg0" / "big.py").write_text("x = 1\n" * 1000)
    (root / "__pycache__").mkdir()
    (root / "__pycache__" / "cached.py").write_text("y = 2\n")
    (root / "notes.txt").write_text("not python\n")


def test_corpus_split_is_deterministic_and_disjoint_by_file(tmp_path) -> None:
    _write_tree(tmp_path)
    roots = [("lib", tmp_path)]
    one = build_corpus(roots=roots, val_fraction=0.2, max_file_bytes=4096)
    two = build_corpus(roots=roots, val_fraction=0.2, max_file_bytes=4096)
    assert one.train == two.train and one.val == two.val and one.summary() == two.summary()
    train_paths, val_paths = {f.path for f in one.train}, {f.path for f in one.val}
    assert train_paths.isdisjoint(val_paths) and one.train and one.val
    assert all(is_held_out(p, 0.2) for p in val_paths) and not any(is_held_out(p, 0.2) for p in train_paths)
    every = train_paths | val_paths
    assert len(every) == 120  # the duplicate, undecodable, empty, oversized and cached files are gone
    assert "lib/pkg0/mod0.py" in every and "lib/pkg0/zcopy.py" not in every
    assert [f.path for f in one.train] == sorted(train_paths)
    # A cap keeps whole files and changes no file's side.
    capped = build_corpus(roots=roots, val_fraction=0.2, max_bytes=2000)
    assert 0 < sum(len(f.text) for f in capped.train + capped.val) <= 2000
    assert {f.path for f in capped.val} <= val_paths and {f.path for f in capped.train} <= train_paths


def test_prompts_cover_categories_and_round_trip(tmp_path) -> None:
    body = "\n".join(f"    x{i} = {i}" for i in range(6))
    text = "".join(
        f'def func{i}(a, b):\n    """Add."""\n{body}\n\n'
        f'class Thing{i}:\n    """A thing."""\n{body}\n\n'
        f'def test_thing{i}():\n{body}\n\n'
        for i in range(4)
    )
    files = [SourceFile("lib/a.py", text), SourceFile("lib/bad.py", "def broken(:\n")]
    prompts = make_prompts(files, 9, seed=3)
    assert [p.question_id for p in prompts] == list(range(1, 10))
    assert [p.category for p in prompts] == ["function"] * 3 + ["class"] * 3 + ["test"] * 3
    assert make_prompts(files, 9, seed=3) == prompts
    for p in prompts:
        (turn,) = p.turns
        assert turn in text and not turn.endswith("\n")
        assert turn.startswith({"function": "def func", "class": "class Thing", "test": "def test_"}[p.category])
    path = tmp_path / "prompts.jsonl"
    write_prompts(prompts, path)
    back = read_prompts(path)
    assert [(p.question_id, p.category, p.turns) for p in back] == [
        (p.question_id, p.category, p.turns) for p in prompts]
    # Spec-Bench files carry extra keys and several turns.
    path.write_text('{"question_id": 81, "category": "writing", "turns": ["a", "b"], "reference": []}\n\n')
    assert read_prompts(path) == [Prompt(81, "writing", ("a", "b"), f"{path}:1")]


@pytest.mark.parametrize("line, fault", [
    ("{not json", "invalid JSON"),
    ("[1, 2]", "expected a JSON object"),
    ('{"question_id": "7", "category": "x", "turns": ["a"]}', "'question_id' must be an integer"),
    ('{"question_id": 7, "turns": ["a"]}', "'category' must be a string"),
    ('{"question_id": 7, "category": "x", "turns": []}', "'turns' must be a non-empty list"),
    ('{"question_id": 7, "category": "x", "turns": [3]}', "'turns' must be a non-empty list"),
])
def test_read_prompts_names_the_malformed_line(tmp_path, line: str, fault: str) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text('{"question_id": 1, "category": "x", "turns": ["ok"]}\n' + line + "\n")
    with pytest.raises(ValueError) as err:
        read_prompts(path)
    assert str(err.value).startswith(f"{path}:2: ") and fault in str(err.value)
    assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match="not found"):
        read_prompts(tmp_path / "missing.jsonl")


def test_lr_schedule_warms_up_then_decays() -> None:
    s = TrainSettings(seq_len=8, batch_size=1, lr=1.0, warmup_steps=10, min_lr_ratio=0.1)
    lrs = [lr_at(step, 200, s) for step in range(200)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:], strict=False)) and lrs[-1] == pytest.approx(0.1, abs=1e-3)
    assert lr_at(0, 20, s) == pytest.approx(0.5)  # warm-up shrinks to a tenth of a short run


def _streams(tokenizer_dir: Path, corpus) -> tuple[np.ndarray, np.ndarray]:
    tok = Tokenizer.from_folder(tokenizer_dir)
    train = pack_stream([tok.encode(f.text) for f in corpus.train[:30]])
    val = pack_stream([tok.encode(f.text) for f in corpus.val])
    return train, val


def test_training_lowers_the_loss_and_is_deterministic(tokenizer_dir, stdlib_corpus) -> None:
    train, val = _streams(tokenizer_dir, stdlib_corpus)
    assert train[0] == BOS_ID and train[-1] == EOS_ID and train.dtype == np.uint16
    spec = _tiny_spec("base", 512)
    logs: list[str] = []
    model, result = train_model(spec, train, val, "cpu", seed=1, log=logs.append, steps=30)
    first_val, last_val = result.val_history[0][1], result.val_history[-1][1]
    assert result.steps == 30 and result.tokens_seen == 30 * 8 * 32
    assert last_val < first_val < np.log(512)
    assert result.train_loss < np.log(512) and logs
    again, _ = train_model(spec, train, val, "cpu", seed=1, log=logs.append, steps=30)
    for (name, a), b in zip(model.state_dict().items(), again.state_dict().values(), strict=False):
        assert torch.equal(a, b), name
    timed, timed_result = train_model(spec, train, val, "cpu", seed=1, log=logs.append, minutes=0.02)
    assert timed_result.steps >= 1 and "steps fit in" in "\n".join(logs)


def test_export_loads_in_ours_and_hf_with_equal_logits(tmp_path, tokenizer_dir) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = build_model(_tiny_config(512), seed=0)
    export_model(model, tmp_path, tokenizer_dir, {"note": "test"}, dtype=torch.float32)
    names = {p.name for p in tmp_path.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
            "generation_config.json", "training.json"} <= names
    ours = load_model(tmp_path, torch.float32, "cpu")
    hf = AutoModelForCausalLM.from_pretrained(str(tmp_path), dtype=torch.float32).eval()
    ids = AutoTokenizer.from_pretrained(str(tmp_path))(SAMPLE, return_tensors="pt").input_ids[:, :48]
    with torch.no_grad():
        expected = model(ids, torch.arange(ids.shape[1]))
        got_ours = ours(ids, torch.arange(ids.shape[1]))
        got_hf = hf(ids).logits
    torch.testing.assert_close(got_ours, expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(got_hf, expected, atol=1e-5, rtol=0)
    assert ours.lm_head.weight.data_ptr() == ours.embed_tokens.weight.data_ptr()
    assert json.loads((tmp_path / "generation_config.json").read_text())["eos_token_id"] == EOS_ID


def test_simulate_rounds_counts_accepted_runs() -> None:
    assert simulate_rounds([True] * 10, k=4) == (2, 8)  # 4 + bonus, 4 + bonus
    assert simulate_rounds([False] * 3, k=4) == (3, 0)
    assert simulate_rounds([True, False, True, True, True, True, True], k=4) == (2, 5)


def test_train_pair_end_to_end(tmp_path, monkeypatch) -> None:
    tiny = PairSpec(name="tiny", vocab_size=384, corpus_max_bytes=3 << 20, tokenizer_max_chars=500_000,
                    default_minutes=0.1, base=_tiny_spec("base", 384), draft=_tiny_spec("draft", 384))
    summary = train_pair(tiny, tmp_path, ["cpu"], seed=0, steps=3, command="test")
    assert summary["base"]["steps"] == 3 and summary["draft"]["steps"] == 3
    for role in ("base", "draft"):
        record = json.loads((tmp_path / role / "training.json").read_text())
        assert {"command", "seed", "steps", "tokens_seen", "final_train_loss", "final_val_loss", "minutes",
                "device", "corpus"} <= set(record)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".data")]
    prompts = read_prompts(tmp_path / "prompts.jsonl")
    assert prompts
    # A draft identical to its base is accepted everywhere: k + 1 tokens per round.
    result = evaluate_pair(tmp_path / "base", tmp_path / "base", prompts[:2], k=3, max_new_tokens=9)
    assert result["top1_agreement"] == 1.0 and result["mean_accepted_length"] > 3
    # Refuses to overwrite a finished pair.
    with pytest.raises(ValueError, match="already exists"):
        train_pair(tiny, tmp_path, ["cpu"], steps=1)
    monkeypatch.setitem(PAIRS, "tiny", tiny)
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["train-pair", "--pair", "tiny", "--out", str(tmp_path), "--steps", "1", "--devices", "cpu"])
    assert exit_info.value.code == 2


def test_a_draft_that_follows_its_base_trains_the_base_step_count(tmp_path) -> None:
    """A time budget sizes the base; the draft, trained at the same time in its own process,
    takes the base's step count (and so its batches) rather than a budget of its own."""
    tiny = PairSpec(name="tiny", vocab_size=384, corpus_max_bytes=3 << 20, tokenizer_max_chars=500_000,
                    default_minutes=0.01, base=_tiny_spec("base", 384), draft=_tiny_spec("draft", 384),
                    draft_follows_base=True)
    summary = train_pair(tiny, tmp_path, ["cpu", "cpu"], seed=0, minutes=0.01)
    assert summary["draft_steps"] == "the base's"
    assert summary["draft"]["steps"] == summary["base"]["steps"] >= 1
    other_batch = ModelSpec("draft", tiny.draft.config, dataclasses.replace(tiny.draft.train, batch_size=4))
    with pytest.raises(ValueError, match="batch_size and seq_len"):
        dataclasses.replace(tiny, draft=other_batch)


def test_cli_reports_user_mistakes_in_one_line(capsys) -> None:
    for argv in (["train-pair", "--pair", "nope", "--out", "x"],
                 ["train-pair", "--pair", "demo", "--out", "x", "--steps", "0"],
                 ["train-pair", "--pair", "demo", "--out", "x", "--devices", "cuda:7"],
                 ["train-pair", "--pair", "demo", "--out", "x", "--devices", "cpu,cpu,cpu"],
                 ["eval-pair", "/nonexistent"]):
        with pytest.raises(SystemExit) as exit_info:
            cli.main(argv)
        assert exit_info.value.code == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1, err


def _bf16_bytes(cfg: ModelConfig) -> int:
    return cfg.num_parameters() * 2


def test_pair_shapes_fit_their_budgets() -> None:
    demo, bench = PAIRS["demo"], PAIRS["bench"]
    # Both demo checkpoints plus two copies of the tokenizer files stay under 24 MiB.
    assert _bf16_bytes(demo.base.config) + _bf16_bytes(demo.draft.config) + 2 * (512 << 10) < 24 << 20
    for pair in (demo, bench):
        assert pair.draft.config.num_layers >= 8
        assert pair.base.config.num_parameters() > 2 * pair.draft.config.num_parameters()
        for spec in (pair.base, pair.draft):
            cfg = spec.config
            assert cfg.vocab_size == pair.vocab_size and cfg.tie_word_embeddings
            assert cfg.num_heads % 4 == 0 and cfg.num_kv_heads % 2 == 0  # splittable for TP=2 (and 4)
            assert spec.train.seq_len <= cfg.max_position_embeddings
    assert 2e8 < bench.base.config.num_parameters() < 5e8
