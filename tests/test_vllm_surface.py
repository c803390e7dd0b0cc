"""What a vLLM user reaches for: --tensor-parallel-size / --max-model-len, --speculative-config, and
stop_reason in generate --json."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from easyspec import EngineOptions
from easyspec.cli.args import options_from_args
from easyspec.cli.main import build_parser
from easyspec.options import OptionsError, speculative_options

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "easyspec" / "models" / "demo"


def _options(*flags: str, command: str = "generate") -> EngineOptions:
    return options_from_args(build_parser().parse_args([command, *flags]))


# --- command line ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("command", ["generate", "serve", "bench"])
def test_vllm_flag_names_are_aliases(command):
    args = build_parser().parse_args([command, "--tensor-parallel-size", "3", "--max-model-len", "640"])
    ours = build_parser().parse_args([command, "--devices", "3", "--max-context", "640"])
    assert (args.devices, args.max_context) == (ours.devices, ours.max_context) == (3, 640)
    assert not hasattr(args, "tensor_parallel_size") and not hasattr(args, "max_model_len")


# vLLM's speculative config, the easyspec flags it stands for, and the EngineOptions fields they set.
SPEC_CASES = [
    ({"method": "draft_model", "model": "D", "num_speculative_tokens": 3, "draft_tensor_parallel_size": 1},
     ["--method", "sd", "--draft", "D", "--num-draft", "3", "--draft-tp", "1"],
     dict(method="sd", draft="D", num_draft=3, draft_tp=1)),
    ({"model": "D"}, ["--method", "sd", "--draft", "D"], dict(method="sd", draft="D")),  # no method: draft_model
    ({"method": "ngram", "num_speculative_tokens": 5, "prompt_lookup_min": 2, "prompt_lookup_max": 3},
     ["--method", "ngram", "--num-draft", "5", "--ngram-min", "2", "--ngram-max", "3"],
     dict(method="ngram", num_draft=5, ngram_min=2, ngram_max=3)),
    ({"method": "easyspec", "model": "D", "num_speculative_tokens": 2},
     ["--method", "easyspec", "--draft", "D", "--num-draft", "2"], dict(method="easyspec", draft="D", num_draft=2)),
]


@pytest.mark.parametrize(("config", "flags", "fields"), SPEC_CASES, ids=[json.dumps(c[0]) for c in SPEC_CASES])
def test_speculative_config_maps_onto_the_flags(config, flags, fields):
    assert _options("--model", "M", "--speculative-config", json.dumps(config)) == _options("--model", "M", *flags)
    assert speculative_options(config) == fields  # the Python API: EngineOptions(model=..., **fields)


def test_speculative_config_takes_the_method_from_the_flag_when_it_names_none():
    config = json.dumps({"model": "D", "num_speculative_tokens": 2})
    assert _options("--model", "M", "--method", "easyspec", "--speculative-config", config) == \
        _options("--model", "M", "--method", "easyspec", "--draft", "D", "--num-draft", "2")
    # Flags that --speculative-config does not touch keep working beside it.
    assert _options("--model", "M", "--tree-width", "2", "--speculative-config", config).tree_width == 2


SPEC_ERRORS = [
    ("{method: ngram}", [], "--speculative-config is not JSON (Expecting property name"),
    ("[1, 2]", [], "--speculative-config must be a JSON object, got list"),
    ('{"method": "eagle3", "model": "E"}', [], "method 'eagle3' is not one easyspec runs; choose one of draft_model"),
    ('{"model": "D", "quantization": "fp8", "bogus": 1}', [], "easyspec does not take 'bogus', 'quantization'"),
    ('{"model": "D", "num_speculative_tokens": "4"}', [], "'num_speculative_tokens' must be an integer, got '4'"),
    ('{"model": "D", "num_speculative_tokens": true}', [], "'num_speculative_tokens' must be an integer"),
    ('{"model": 7}', [], "'model' must be a string, got 7"),
    ("{}", [], 'needs a "method" (draft_model, ngram, sd, easyspec) or a draft "model"'),
    ('{"method": "draft_model"}', [], "method 'draft_model' needs a draft \"model\" (or --draft)"),
    ('{"model": "D", "num_speculative_tokens": 3}', ["--num-draft", "4"],
     "sets 'num_speculative_tokens' and --num-draft is given too; keep one"),
    ('{"method": "ngram"}', ["--method", "ngram"], "sets 'method' and --method is given too"),
    ('{"model": "D"}', ["--draft", "D"], "sets 'model' and --draft is given too"),
]


@pytest.mark.parametrize(("config", "flags", "message"), SPEC_ERRORS, ids=[e[0] for e in SPEC_ERRORS])
def test_speculative_config_mistakes_get_one_line(config, flags, message):
    with pytest.raises(OptionsError, match=re.escape(message)):
        _options("--model", "M", *flags, "--speculative-config", config)


def test_cli_runs_with_vllm_flags_and_reports_stop_reason():
    """The demo pair through --speculative-config: sd speculation runs, and --json names the stop string."""
    def generate(*flags: str) -> dict:
        config = json.dumps({"method": "draft_model", "model": str(DEMO / "draft"), "num_speculative_tokens": 3})
        out = subprocess.run([sys.executable, "-m", "easyspec", "generate", "--model", str(DEMO / "base"),
                              "--speculative-config", config, "--tensor-parallel-size", "1", "--max-model-len", "64",
                              "--prompt", "def fib(n):", "--raw", "--max-new-tokens", "12", "--temperature", "0",
                              "--ignore-eos", "--json", "--no-progress", *flags],
                             capture_output=True, text=True, cwd=ROOT)
        assert out.returncode == 0, out.stderr
        return json.loads(out.stdout)

    plain = generate()
    assert plain["method"] == "sd" and plain["stats"]["drafted"] > 0
    assert plain["finish_reason"] == "length" and plain["stop_reason"] is None
    stop = plain["text"].strip()[2:5]
    cut = generate("--stop", stop)
    assert cut["finish_reason"] == "stop" and cut["stop_reason"] == stop
    assert cut["text"] == plain["text"][: plain["text"].index(stop)]

    bad = subprocess.run([sys.executable, "-m", "easyspec", "generate", "--prompt", "x", "--speculative-config",
                          '{"method": "eagle"}'], capture_output=True, text=True, cwd=ROOT)
    lines = bad.stderr.strip().splitlines()
    assert bad.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: --speculative-config: method")
