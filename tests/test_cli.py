"""What a user meets first: --help, flag defaults, and the defaults the engine settles by itself
(dtype, context length, sampling defaults from generation_config.json, devices under torchrun)."""

from __future__ import annotations

import argparse
import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest
from gguf_files import CHAT_TOKENS, Q, write_gguf
from hf_models import make_hf_checkpoint

from easyspec import Engine, EngineOptions, SamplingParams
from easyspec.cli.args import options_from_args, sampling_from_args
from easyspec.cli.main import build_parser
from easyspec.engine.capacity import Capacity, kv_bytes_per_token, settle_context
from easyspec.engine.preflight import preflight
from easyspec.model.config import ModelConfig
from easyspec.model.loader import load_config, stored_dtype
from easyspec.options import (
    CPU_KV_CACHE_BYTES,
    DEFAULT_MAX_NEW_TOKENS,
    DEFAULT_MAX_NUM_SEQS,
    OptionsError,
    auto_dtype,
)
from easyspec.zoo import cli as zoo_cli

ROOT = Path(__file__).resolve().parent.parent
DEMO_TOKENIZER = ROOT / "easyspec" / "models" / "demo" / "base" / "tokenizer.json"


def _subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(sub.choices)


def test_every_flag_has_help_and_shows_its_default(monkeypatch):
    monkeypatch.setenv("COLUMNS", "100000")  # no wrapping: argparse breaks lines at hyphens too
    # `easyspec zoo` is a pointer to the zoo's own parser: its subcommands are checked instead.
    commands = {name: parser for name, parser in _subcommands(build_parser()).items() if name != "zoo"}
    commands |= {f"zoo {name}": parser for name, parser in _subcommands(zoo_cli.build_parser()).items()}
    for name, parser in commands.items():
        text = parser.format_help()
        for action in parser._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            assert action.help, f"easyspec {name} {action.option_strings or action.dest}: no help text"
            # `is`: a default of 0 or 0.0 equals False and is still shown.
            unstated = action.default is None or action.default is False
            if not (unstated or action.default in ([], (), argparse.SUPPRESS)):
                assert f"(default: {action.default})" in text, f"easyspec {name} {action.option_strings}"


def test_bench_has_no_method_flag_and_generate_has():
    commands = _subcommands(build_parser())
    flags = {name: {s for a in p._actions for s in a.option_strings} for name, p in commands.items()}
    assert "--method" in flags["generate"] and "--method" in flags["serve"]
    assert "--method" not in flags["bench"]  # each bench row names its own method (--methods)
    assert "--generation-config" not in flags["bench"]  # bench requests set every sampling field


def test_top_level_help_speaks_to_users():
    out = subprocess.run([sys.executable, "-m", "easyspec", "--help"], capture_output=True, text=True, cwd=ROOT,
                         check=True).stdout
    assert "speculative decoding" in out and "examples:" in out and "easyspec[serve]" in out


def test_devices_default_to_torchrun_world_size(monkeypatch):
    parse = build_parser().parse_args
    assert options_from_args(parse(["generate", "--prompt", "x"])).devices == 1
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "test")
    monkeypatch.setenv("WORLD_SIZE", "3")
    assert options_from_args(parse(["generate", "--prompt", "x"])).devices == 3
    assert options_from_args(parse(["generate", "--prompt", "x"])).layer_parallel == 3
    assert options_from_args(parse(["generate", "--prompt", "x", "--devices", "2"])).devices == 2


def test_dtype_auto_rule(tmp_path):
    assert auto_dtype("cpu", "bfloat16") == "float32"
    assert auto_dtype("cuda", "bfloat16") == "bfloat16"
    assert auto_dtype("cuda", "float16") == "float16"
    assert auto_dtype("cuda", "float32") == "float32"
    assert auto_dtype("cuda", None) == "float32"
    hf = make_hf_checkpoint("llama2", tmp_path / "hf", vocab_size=4096 + len(CHAT_TOKENS))
    assert stored_dtype(tmp_path / "hf") == "float32"
    assert stored_dtype(ROOT / "easyspec" / "models" / "demo" / "base") == "bfloat16"
    assert stored_dtype(write_gguf(tmp_path / "f32.gguf", hf, DEMO_TOKENIZER)) == "float32"
    assert stored_dtype(write_gguf(tmp_path / "q8.gguf", hf, DEMO_TOKENIZER, types=lambda n: Q.Q8_0)) == "bfloat16"
    # On the CPU a 16-bit checkpoint still runs in float32.
    options, _ = preflight(EngineOptions())
    assert options.dtype == "float32"


def _config(max_positions: int, layers: int = 2) -> ModelConfig:
    return ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=layers, num_heads=4,
                       num_kv_heads=2, head_dim=8, max_position_embeddings=max_positions)


def test_context_defaults_to_the_models_length_capped_by_memory():
    options = EngineOptions(dtype="float32")
    base, draft = _config(4096), _config(2048, layers=1)
    context, rows, line = settle_context(options.replace(method="sd", draft="d"), base, draft)
    assert context == 2048 and "the draft's max_position_embeddings" in line and "KV cache" in line
    assert rows == DEFAULT_MAX_NUM_SEQS and f"{rows} sequences at once" in line
    assert settle_context(options, base, None)[:2] == (4096, DEFAULT_MAX_NUM_SEQS)
    # A model far longer than the CPU cap: the cache is cut to fit CPU_KV_CACHE_BYTES, one sequence.
    huge = _config(1 << 30)
    context, rows, line = settle_context(options, huge, None)
    assert Capacity.of(options, huge, None).cache_bytes(context) <= CPU_KV_CACHE_BYTES and rows == 1
    assert context > CPU_KV_CACHE_BYTES // kv_bytes_per_token(huge, "float32") - 100
    assert "capped" in line
    # --max-num-seqs shares the memory: each sequence gets its part of it.
    context, rows, _ = settle_context(options.replace(max_num_seqs=4), huge, None)
    assert rows == 4 and Capacity.of(options, huge, None).cache_bytes(context, 4) <= CPU_KV_CACHE_BYTES
    # A shorter context leaves room for more sequences, up to the default's cap.
    per_sequence = Capacity.of(options, huge, None).cache_bytes(1 << 20)
    rows = settle_context(options.replace(max_context=1 << 20), huge, None)[1]
    assert rows == min(DEFAULT_MAX_NUM_SEQS, CPU_KV_CACHE_BYTES // per_sequence)
    # An explicit --max-context is taken when the models reach it, refused with one line when not.
    assert settle_context(options.replace(max_context=100), base, None)[0] == 100
    with pytest.raises(OptionsError, match="exceeds the base model's max_position_embeddings"):
        settle_context(options.replace(max_context=5000), base, None)


def test_engine_logs_its_context_and_refuses_long_prompts(pair_dir, caplog):
    caplog.set_level(logging.INFO, logger="easyspec")
    with Engine(EngineOptions(model=str(pair_dir / "base"))) as engine:
        assert engine.options.max_context == load_config(pair_dir / "base").max_position_embeddings
        assert any("context 256 tokens" in r.getMessage() and "KV cache" in r.getMessage() for r in caplog.records)
        with pytest.raises(OptionsError, match="exceeds --max-context 256"):
            engine.generate([5] * 250, SamplingParams(max_new_tokens=20))


def _with_generation_config(folder: Path, **config) -> Path:
    folder.mkdir(exist_ok=True)
    path = folder / "generation_config.json"
    path.write_text(json.dumps({"eos_token_id": 127, **config}))
    return folder


def test_generation_config_sampling_defaults(tmp_path):
    folder = tmp_path / "m"
    make_hf_checkpoint("llama2", folder, max_position_embeddings=128)
    _with_generation_config(folder, do_sample=True, temperature=0.6, top_p=0.9, top_k=20, max_new_tokens=7,
                            repetition_penalty=1.05, min_p=0.02)
    with Engine(EngineOptions(model=str(folder))) as engine:
        params = engine.sampling_params()
        assert (params.temperature, params.top_p, params.top_k, params.max_new_tokens) == (0.6, 0.9, 20, 7)
        assert (params.repetition_penalty, params.min_p) == (1.05, 0.02)
        # A request's own settings win; an absent max_new_tokens is bounded by the context left.
        assert engine.sampling_params(temperature=0).temperature == 0
        assert engine.sampling_params(prompt_len=120).max_new_tokens == 128 - 120 - engine.options.draft_room
        # generate() without params takes the defaults: 7 tokens at most.
        assert sum(len(c.token_ids) for c in engine.generate([1, 2, 3])) <= 7

    def defaults(mode: str) -> SamplingParams:
        with Engine(EngineOptions(model=str(folder), generation_config=mode)) as engine:
            return engine.sampling_params()

    assert defaults("none") == SamplingParams()
    vllm = defaults("vllm")
    assert (vllm.temperature, vllm.max_new_tokens) == (1.0, 16)
    # A folder of its own: do_sample false means greedy whatever its temperature says (as transformers),
    # where repetition_penalty still applies.
    other = _with_generation_config(tmp_path / "other", do_sample=False, temperature=0.7, repetition_penalty=1.2)
    assert defaults(str(other)) == SamplingParams(temperature=0.0, repetition_penalty=1.2)
    with pytest.raises(OptionsError, match="--generation-config 'sometimes' is neither"):
        Engine(EngineOptions(model=str(folder), generation_config="sometimes"))
    assert SamplingParams().max_new_tokens == DEFAULT_MAX_NEW_TOKENS


def test_cli_sampling_flags_override_generation_config(tmp_path):
    folder = tmp_path / "m"
    make_hf_checkpoint("llama2", folder, max_position_embeddings=256)
    _with_generation_config(folder, max_new_tokens=5)

    def generated(*flags: str) -> int:
        out = subprocess.run([sys.executable, "-m", "easyspec", "generate", "--model", str(folder), "--prompt-ids",
                              "1,2,3", "--ignore-eos", "--json", *flags], capture_output=True, text=True, cwd=ROOT)
        assert out.returncode == 0, out.stderr
        return len(json.loads(out.stdout)["token_ids"])

    assert generated() == 5
    assert generated("--max-new-tokens", "9") == 9
    assert generated("--generation-config", "none") == DEFAULT_MAX_NEW_TOKENS


def test_sampling_flags_reach_sampling_params():
    parser = build_parser()

    def given(*flags: str) -> dict:
        return sampling_from_args(parser.parse_args(["generate", "--prompt", "x", *flags]))

    assert given() == {}  # nothing given: the engine's defaults (generation_config.json) apply
    flags = ["--json", "--min-p", "0.1", "--repetition-penalty", "1.2", "--presence-penalty", "0.5",
             "--frequency-penalty", "-0.5", "--min-tokens", "3", "--stop-token-ids", "5, 7",
             "--no-skip-special-tokens", "--logprobs", "2", "--temperature", "0"]
    assert SamplingParams(**given(*flags)) == SamplingParams(
        min_p=0.1, repetition_penalty=1.2, presence_penalty=0.5, frequency_penalty=-0.5, min_tokens=3,
        stop_token_ids=(5, 7), skip_special_tokens=False, logprobs=2)
    with pytest.raises(ValueError, match="--logprobs are printed in the --json output; add --json"):
        given("--logprobs", "2")
    with pytest.raises(ValueError, match="--stop-token-ids must be comma-separated integers"):
        given("--stop-token-ids", "5,x")
    with pytest.raises(ValueError, match="repetition_penalty must be > 0"):
        given("--repetition-penalty", "0")


def test_cli_prints_logprobs_in_json(tmp_path):
    folder = tmp_path / "m"
    make_hf_checkpoint("llama2", folder, max_position_embeddings=256)
    out = subprocess.run([sys.executable, "-m", "easyspec", "generate", "--model", str(folder), "--prompt-ids",
                          "1,2,3", "--ignore-eos", "--max-new-tokens", "4", "--json", "--logprobs", "2",
                          "--stop-token-ids", "127"], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    logprobs = result["logprobs"]
    assert [entry["token_id"] for entry in logprobs] == result["token_ids"]
    for entry in logprobs:  # greedy: the chosen token is the most likely one
        assert len(entry["top"]) == 2 and entry["top"][0] == {"token_id": entry["token_id"],
                                                                "logprob": entry["logprob"]}
