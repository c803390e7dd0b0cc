"""easyspec distill and easyspec acceptance: data, the layer-parallel training forward, training,
resuming, the exported draft, and acceptance measured on one device against the engine's own."""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from engine_cases import run
from gguf_files import CHAT_TOKENS, write_gguf
from hf_models import make_hf_checkpoint

from easyspec import Engine, EngineOptions, SamplingParams
from easyspec.distill import HELD_OUT_PROMPTS, TRAIN_CHAT_PROMPTS, TRAIN_CODE_PROMPTS, data
from easyspec.distill.data import Batches, Rows
from easyspec.distill.evaluate import continue_prompts, measure_cases
from easyspec.distill.forward import DraftForward, distill_loss, teacher_log_probs
from easyspec.distill.generate import generate, generate_batch
from easyspec.distill.run import distill
from easyspec.distill.settings import DistillOptions, DraftShape, TrainSettings
from easyspec.distill.shape import ShapeError, draft_config, init_draft, spaced_layers
from easyspec.distill.train import Stopped, Trainer
from easyspec.model import loader
from easyspec.model.checkpoint import load_config, load_model
from easyspec.model.loader import eos_ids, load_tokenizer
from easyspec.model.tokenizer import Tokenizer
from easyspec.parallel.layer_parallel import LayerLayout, LocalLayerParallelForward
from easyspec.zoo.evaluate import greedy_continuation
from easyspec.zoo.prompts import Prompt, read_prompts

DEMO = Path(__file__).resolve().parent.parent / "easyspec" / "models" / "demo"
CHAT_TEMPLATE = ("{% for m in messages %}{{ bos_token }}# {{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}# assistant:{% endif %}")


@pytest.fixture(scope="module")
def chat_base(tmp_path_factory) -> Path:
    """A tiny random Llama with the demo tokenizer, a chat template, and small prompt files beside it."""
    root = tmp_path_factory.mktemp("distill")
    base = root / "base"
    make_hf_checkpoint("llama2", base, seed=5, vocab_size=4096, num_hidden_layers=4, initializer_range=0.1)
    shutil.copyfile(DEMO / "base" / "tokenizer.json", base / "tokenizer.json")
    config = json.loads((DEMO / "base" / "tokenizer_config.json").read_text())
    (base / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": CHAT_TEMPLATE}))
    chat = ["Write a poem about rain.", "What is a prime number?", "Summarize: the cat sat on the mat."]
    code = ["def add(a, b):\n    \"\"\"Return a + b.\"\"\"", "class Point:\n    def __init__(self, x, y):"]
    for name, texts in (("chat.jsonl", chat), ("code.jsonl", code)):
        (root / name).write_text("".join(json.dumps({"question_id": i, "category": "test", "turns": [t]}) + "\n"
                                         for i, t in enumerate(texts, start=1)))
    return root


def options(root: Path, out: Path, **changes) -> DistillOptions:
    train = TrainSettings(steps=changes.pop("steps", 4), batch_size=4, seq_len=64, warmup_steps=2, lr=3e-3)
    return DistillOptions(model=str(root / "base"), out=str(out), shape=DraftShape(layers=2),
                          prompts=str(root / "chat.jsonl"), code_prompts=str(root / "code.jsonl"), samples=1,
                          gen_tokens=8, gen_batch=8, data=str(root / "data.pt"), train=train, **changes)


def test_prompt_sets_are_well_formed_and_disjoint():
    held_out = read_prompts(HELD_OUT_PROMPTS)
    train = read_prompts(TRAIN_CHAT_PROMPTS) + read_prompts(TRAIN_CODE_PROMPTS)
    counts = {c: sum(p.category == c for p in held_out) for c in {p.category for p in held_out}}
    assert set(counts) == {"writing", "qa", "reasoning", "summarization", "coding"}
    assert all(15 <= n <= 20 for n in counts.values()), counts
    assert len({p.question_id for p in held_out}) == len(held_out)
    assert len(train) >= 300 and {p.category for p in read_prompts(TRAIN_CHAT_PROMPTS)} == set(counts)

    def words(text: str) -> list[str]:
        return re.findall(r"[a-z0-9]+", text.lower())

    def shingles(text: str, n: int = 10) -> set[tuple[str, ...]]:
        w = words(text)
        return {tuple(w[i:i + n]) for i in range(len(w) - n + 1)}

    seen = {" ".join(words(p.turns[0])) for p in train}
    assert not [p for p in held_out if " ".join(words(p.turns[0])) in seen]
    train_shingles = set().union(*(shingles(p.turns[0]) for p in train))
    shared = [p.question_id for p in held_out if shingles(p.turns[0]) & train_shingles]
    assert not shared, f"held-out prompts {shared} share ten words in a row with a training prompt"


def test_training_forward_is_drafting_after_an_exact_prefix(pair_dir):
    """The layer-parallel pass at position t equals one layer-parallel drafting step at t over the exact
    KV of positions < t; the exact pass equals the model's own forward."""
    model = load_model(pair_dir / "deep")
    tokens = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(0))
    layouts = [LayerLayout.build(8, 2, 1, 1), LayerLayout.parse("0,1-4,5-7", 8, 4)]
    with torch.no_grad():
        exact, *parallel = DraftForward(model, layouts, "attention")(tokens)
        torch.testing.assert_close(model.logits(exact), model(tokens, torch.arange(9)), atol=1e-5, rtol=1e-5)
        for layout, passed in zip(layouts, parallel, strict=True):
            step = LocalLayerParallelForward(model, layout)
            for t in range(9):
                cache = model.allocate_cache(16)
                if t:
                    model(tokens[1, :t], torch.arange(t), cache, 16)
                drafted = step(tokens[1, t:t + 1], torch.tensor([t]), cache, 16)  # [1, V]
                torch.testing.assert_close(model.logits(passed[1, t]), drafted[0], atol=1e-4, rtol=1e-4)
            assert not torch.allclose(model.logits(passed), model.logits(exact), atol=1e-3)


def test_batched_generation_equals_one_sequence_at_a_time(pair_dir):
    model = load_model(pair_dir / "base")
    prompts = [[1, 2, 3], [5, 9, 4, 4, 7, 1, 2], [100, 3]]
    got = generate(model, prompts, 12, SamplingParams(), batch_size=8, stop_ids=[2])
    assert got == [greedy_continuation(model, p, 12, [2]) for p in prompts]
    sampled = SamplingParams(temperature=1.0, top_p=0.9)
    first = generate(model, prompts, 12, sampled, batch_size=2, seed=3)
    assert first == generate(model, prompts, 12, sampled, batch_size=2, seed=3)
    assert first != generate(model, prompts, 12, sampled, batch_size=2, seed=4)
    # Past the deadline a batch in progress ends at its next check (every 16 tokens) and no batch starts.
    cut = generate_batch(model, prompts, 40, SamplingParams(), deadline=time.monotonic())
    assert cut == [greedy_continuation(model, p, 16, []) for p in prompts]
    assert generate(model, prompts, 40, SamplingParams(), batch_size=2, deadline=time.monotonic()) == [None] * 3


def test_draft_starts_from_spaced_base_layers(pair_dir):
    base = load_model(pair_dir / "deep")
    assert spaced_layers(30, 7) == [0, 5, 10, 14, 19, 24, 29]
    draft, taken = init_draft(base, draft_config(base.config, DraftShape(layers=3)), "base", seed=0)
    assert taken == [0, 4, 7]
    for mine, theirs in enumerate(taken):
        for a, b in zip(draft.layers[mine].parameters(), base.layers[theirs].parameters(), strict=True):
            assert torch.equal(a, b)
    assert torch.equal(draft.embed_tokens.weight, base.embed_tokens.weight)
    with pytest.raises(ShapeError, match="--init random"):
        init_draft(base, draft_config(base.config, DraftShape(layers=2, hidden_size=32)), "base", seed=0)


def test_batches_mix_sources_and_mask_the_prompt(tmp_path):
    generated = Rows.from_lists([[1, 2, 3, 4, 5], [6, 7, 8]], starts=[3, 1])
    corpus = Rows.from_lists([[9] * 9, [10] * 9], starts=[1, 1])
    batches = Batches(generated, corpus, batch_size=4, corpus_share=0.5, seq_len=8, seed=0)
    inputs, targets, select = batches.batch(0)
    assert inputs.shape == (4, 8) and select.shape == (4, 8)
    rows = {tuple(r[:3].tolist()): s for r, s in zip(inputs, select, strict=True)}
    assert rows[(1, 2, 3)].tolist() == [False, False, True, True] + [False] * 4  # targets 4 and 5 only
    assert rows[(9, 9, 9)].all()
    assert torch.equal(batches.batch(5)[0], Batches(generated, corpus, 4, 0.5, 8, 0).batch(5)[0])


def test_training_lowers_the_kl_to_the_base(chat_base, tmp_path):
    base = load_model(chat_base / "base")
    tokenizer = Tokenizer.from_folder(chat_base / "base")
    chat, code = read_prompts(chat_base / "chat.jsonl"), read_prompts(chat_base / "code.jsonl")
    rows, _ = data.generate_rows(base, tokenizer, chat, code, 1, 8, 0.8, 0.95, 8, 0, lambda _: None)
    cfg = draft_config(base.config, DraftShape(layers=2))
    draft, _ = init_draft(base, cfg, "base", 0)
    batches = Batches(rows, None, 4, 0.25, 64, 0)
    layouts = [LayerLayout.build(2, 2, 0, 0)]

    def kl() -> list[float]:
        inputs, targets, select = batches.batch(0)
        with torch.no_grad():
            teacher = teacher_log_probs(base, inputs, select)
            return [distill_loss(draft, h[select], targets[select], teacher, 1.0, 0.0)[1]["kl"].item()
                    for h in DraftForward(draft, layouts)(inputs)]

    before = kl()
    settings = TrainSettings(steps=25, batch_size=4, seq_len=64, warmup_steps=2, lr=3e-3)
    Trainer(draft, base, batches, settings, [("N=2", layouts[0])], "attention", tmp_path / "ckpt",
            lambda _: None).run()
    after = kl()
    assert all(a < 0.8 * b for a, b in zip(after, before, strict=True)), (before, after)


def test_a_time_budget_shorter_than_the_probe_steps_is_kept(chat_base, tmp_path):
    """Steps slower than the whole budget: training stops after the first step or two rather than
    finishing the steps that time it."""
    base = load_model(chat_base / "base")
    draft, _ = init_draft(base, draft_config(base.config, DraftShape(layers=2)), "base", 0)
    batches = Batches(Rows.from_lists([[1, 2, 3, 4, 5, 6]] * 4, [1] * 4), None, 2, 0.25, 16, 0)
    settings = TrainSettings(minutes=0.002, batch_size=2, seq_len=16, warmup_steps=1)
    trainer = Trainer(draft, base, batches, settings, [], "attention", tmp_path / "ckpt", lambda _: None)
    record = trainer.run(on_step=lambda _: time.sleep(0.1))  # each step >= 0.1 s of the 0.12 s budget
    assert 1 <= record["steps"] <= 2 and record["planned_steps"] == record["steps"]


def test_exported_draft_loads_in_easyspec_and_transformers(chat_base, tmp_path):
    import transformers

    record = distill(options(chat_base, tmp_path / "draft", save_dtype="float32"))
    out = tmp_path / "draft"
    assert not (out / "checkpoint").exists() and record["steps"] == 4
    assert record["non_embedding_ratio"] == pytest.approx(0.5, abs=0.01)  # 2 of the base's 4 layers
    ours = load_model(out)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ids = Tokenizer.from_folder(out).encode_chat([{"role": "user", "content": "What is a prime number?"}])
    with torch.no_grad():
        torch.testing.assert_close(ours(torch.tensor(ids), torch.arange(len(ids))),
                                   theirs(torch.tensor([ids])).logits[0], atol=1e-4, rtol=1e-4)
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    text = hf_tokenizer.apply_chat_template([{"role": "user", "content": "What is a prime number?"}],
                                            tokenize=False, add_generation_prompt=True)
    assert hf_tokenizer(text, add_special_tokens=False)["input_ids"] == ids
    # The draft stops where the engine stops the base: its config's EOS ids and its tokenizer's EOS token.
    stops = eos_ids(load_config(chat_base / "base"), Tokenizer.from_folder(chat_base / "base"))
    assert list(load_config(out).eos_token_ids) == stops


def test_a_stopped_run_resumes_to_the_uninterrupted_result(chat_base, tmp_path):
    straight = tmp_path / "straight"
    distill(options(chat_base, straight, steps=6, save_dtype="float32", layer_parallel=(2,), keep_first=0,
                    keep_last=0))

    def stop_after_three(step: int) -> None:
        if step == 3:
            raise KeyboardInterrupt

    resumed = tmp_path / "resumed"
    opts = options(chat_base, resumed, steps=6, save_dtype="float32", layer_parallel=(2,), keep_first=0,
                   keep_last=0)
    with pytest.raises(Stopped) as stop:
        distill(opts, on_step=stop_after_three)
    assert stop.value.step == 3 and (resumed / "checkpoint" / "state.pt").exists()
    with pytest.raises(ValueError, match="other settings"):
        distill(options(chat_base, resumed, steps=6))  # the same folder, another layout
    distill(opts)
    a, b = load_model(straight), load_model(resumed)
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert torch.equal(x, y), name
    with pytest.raises(ValueError, match="already holds a finished draft"):
        distill(opts)


def test_acceptance_on_one_device_equals_the_engine(pair_dir):
    """Rounds, accepted tokens and output of sd (1 process), ngram, and layer-parallel drafting
    emulated on one device, against the engine itself (layer-parallel on 2 processes)."""
    base = load_model(pair_dir / "base")
    prompts = [[5, 9, 4, 4, 7, 1, 2], [100, 3, 27, 27, 27, 8]]
    cases = continue_prompts(base, [Prompt(i, "test", ("",)) for i in range(len(prompts))], prompts, 4, 24, 8)
    stops = list(base.config.eos_token_ids)
    rows = measure_cases(cases, stops, 128, [("near", str(pair_dir / "near"))], k=4, sizes=(2,), ngram=True,
                         max_new=24)
    params = SamplingParams(max_new_tokens=24)
    engines = {"near sd": dict(method="sd", draft=str(pair_dir / "near")),
               "near easyspec N=2 (emulated)": dict(method="easyspec", draft=str(pair_dir / "near"), devices=2,
                                                    layer_parallel=2),
               "ngram": dict(method="ngram")}
    assert [r.label for r in rows] == list(engines)
    for row in rows:
        with Engine(EngineOptions(model=str(pair_dir / "base"), **engines[row.label])) as engine:
            for case, record in zip(cases, row.per_prompt, strict=True):
                ids, chunk = run(engine, case.ids, params)
                assert ids == case.continuation[:len(ids)]
                got = {"rounds": chunk.stats.rounds, "accepted": chunk.stats.accepted, "generated": len(ids)}
                assert got == {k: record[k] for k in got}, row.label
    assert rows[0].stats.accepted > 0


def test_cli_mistakes_are_one_line(chat_base, tmp_path):
    cmd = [sys.executable, "-m", "easyspec", "distill", "--model", str(chat_base / "base"), "--out",
           str(tmp_path / "x"), "--corpus-only", "--steps", "1"]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=Path(__file__).resolve().parent.parent)
    assert proc.returncode == 2
    assert proc.stderr.strip() == "error: --corpus-only needs a --corpus FILE or FOLDER"


def test_tokenizer_save_round_trip(chat_base, tmp_path):
    import transformers

    tok = Tokenizer.from_folder(chat_base / "base")
    tok.save(tmp_path)
    again = Tokenizer.from_folder(tmp_path)
    messages = [{"role": "user", "content": "def f(x): return x"}]
    assert again.encode_chat(messages) == tok.encode_chat(messages)
    assert again.eos_token == tok.eos_token and again.chat_template == tok.chat_template
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path)
    text = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == tok.render_chat(messages)
    assert hf(text, add_special_tokens=False)["input_ids"] == tok.encode_chat(messages)


def test_a_gguf_base_gets_a_draft_with_its_tokenizer_that_drafts_losslessly(chat_base, tmp_path):
    """--model FILE.gguf: text, weights and tokenizer come from the file; the draft carries the file's
    tokenizer (as `easyspec convert` writes it) and drafts for the file: sd and easyspec (N=2) give
    plain greedy decoding's tokens."""
    hf = make_hf_checkpoint("llama2", tmp_path / "hf", seed=5, vocab_size=4096 + len(CHAT_TOKENS),
                            num_hidden_layers=4, initializer_range=0.1)
    base = write_gguf(tmp_path / "base.gguf", hf, DEMO / "base" / "tokenizer.json")
    draft = tmp_path / "draft"
    distill(dataclasses.replace(options(chat_base, draft, save_dtype="float32"), model=str(base),
                                shape=DraftShape(layers=3), data=None))
    theirs, ours = load_tokenizer(draft), load_tokenizer(base)
    assert theirs.chat_template == ours.chat_template and theirs.eos_token == ours.eos_token
    for text in ("What is a prime number?", "def f(x):\n    return x  # <|im_end|>"):
        assert theirs.encode_prompt(text) == ours.encode_prompt(text)
        assert theirs.encode_prompt(text, raw=True) == ours.encode_prompt(text, raw=True)
    assert loader.load_config(draft).eos_token_ids == loader.load_config(base).eos_token_ids
    prompt = ours.encode_prompt("Write a poem about rain.")
    params = SamplingParams(max_new_tokens=16, ignore_eos=True)
    with Engine(EngineOptions(model=str(base))) as engine:
        expected, _ = run(engine, prompt, params)
    for method, extra in (("sd", {}), ("easyspec", {"devices": 2, "layer_parallel": 2, "keep_last": 0})):
        with Engine(EngineOptions(model=str(base), draft=str(draft), method=method, **extra)) as engine:
            assert run(engine, prompt, params)[0] == expected, method
