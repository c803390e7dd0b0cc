"""What a vLLM user reaches for: --tensor-parallel-size / --max-model-len, --speculative-config,
/tokenize, /detokenize, /version, system_fingerprint and stop_reason, and the metrics' vLLM names.
Server tests run a real `easyspec serve` started with vLLM's flags (tests/server_utils.py)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from hf_models import make_hf_checkpoint
from server_utils import API_KEY, CHAT_TEMPLATE, PROMPTS, SPREAD, WORDS, Server, complete, error_of, start
from server_utils import write_tokenizer as write_word_tokenizer
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import processors

from easyspec import EngineOptions, __version__
from easyspec.cli.args import options_from_args
from easyspec.cli.main import build_parser
from easyspec.options import OptionsError, speculative_options
from easyspec.server.app import system_fingerprint
from easyspec.server.metrics import PREFIX, VLLM_NAMES, Metrics

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "easyspec" / "models" / "demo"
BOS = 1  # "<s>" in the word tokenizer
# The word-level chat template, plus a template variable (chat_template_kwargs) and the tools' names.
TEMPLATE = ("{% if greeting is defined %}{{ greeting }} {% endif %}"
            "{% for tool in tools or [] %}{{ tool['function']['name'] }} {% endfor %}" + CHAT_TEMPLATE)
CONTEXT = 128  # --max-model-len


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


# --- server ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory) -> dict[str, Path]:
    """A tiny model whose word tokenizer adds <s> to text (so add_special_tokens shows), with TEMPLATE."""
    root = tmp_path_factory.mktemp("vllm")
    folder = root / "model"
    make_hf_checkpoint("llama3", folder, seed=0, **SPREAD)
    write_word_tokenizer(folder, TEMPLATE)
    tok = HFTokenizer.from_file(str(folder / "tokenizer.json"))
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", BOS)])
    tok.save(str(folder / "tokenizer.json"))
    return {"model": folder, "root": root}


@pytest.fixture(scope="module")
def server(request, model_dirs) -> Server:
    """Started as a vLLM user would: the model drafting for itself through --speculative-config."""
    model = str(model_dirs["model"])
    config = json.dumps({"method": "draft_model", "model": model, "num_speculative_tokens": 3})
    return start(request, model_dirs, "--model", model, "--speculative-config", config, "--tensor-parallel-size", "1",
                 "--max-model-len", str(CONTEXT), "--served-model-name", "tiny", api_key=API_KEY)


def _post(server: Server, path: str, body: dict) -> dict:
    reply = server.post(path, json.dumps(body))
    assert reply.status == 200, reply.body
    return reply.json()


def _word_ids(text: str) -> list[int]:
    vocab = ["<unk>", "<s>", "</s>", "user", "assistant", "system", ":", *WORDS]  # as write_tokenizer numbers them
    return [vocab.index(w) for w in text.split()]


def test_vllm_flags_reach_the_engine(server):
    assert server.get("/v1/models").json()["data"][0]["max_model_len"] == CONTEXT
    stats = complete(server.client(), PROMPTS[0], extra_body={"ignore_eos": True}).model_extra["easyspec"]
    assert stats["drafted"] > 0 and stats["accepted"] > 0  # the model drafts for itself


def test_version(server):
    assert server.get("/version").json() == {"version": __version__}
    status, error = error_of(server.post("/tokenize", '{"prompt": "the"}', api_key="wrong"))
    assert status == 401 and error["code"] == "invalid_api_key"


def test_tokenize_a_prompt_as_completions_count_it(server):
    prompt = PROMPTS[3]
    out = _post(server, "/tokenize", {"model": "tiny", "prompt": prompt})
    assert out == {"count": len(out["tokens"]), "max_model_len": CONTEXT, "tokens": [BOS, *_word_ids(prompt)],
                   "token_strs": None}
    usage = complete(server.client(), prompt, max_tokens=1).usage
    assert usage.prompt_tokens == out["count"]
    bare = _post(server, "/tokenize", {"prompt": prompt, "add_special_tokens": False, "return_token_strs": True})
    assert bare["tokens"] == _word_ids(prompt) and bare["token_strs"] == prompt.split()


def test_tokenize_messages_as_chat_renders_them(server):
    client = server.client()
    messages = [{"role": "system", "content": "far away"}, {"role": "user", "content": PROMPTS[1]}]
    chat = _post(server, "/tokenize", {"messages": messages, "return_token_strs": True})
    rendered = f"system : far away user : {PROMPTS[1]} assistant :"
    assert chat["tokens"] == _word_ids(rendered) and chat["token_strs"] == rendered.split()
    usage = client.chat.completions.create(model="tiny", messages=messages, max_tokens=1).usage
    assert usage.prompt_tokens == chat["count"]

    no_prompt = _post(server, "/tokenize", {"messages": messages, "add_generation_prompt": False})
    assert no_prompt["tokens"] == chat["tokens"][:-2]  # without "assistant :"
    assert _post(server, "/tokenize", {"messages": messages, "add_special_tokens": True})["tokens"] == \
        [BOS, *chat["tokens"]]
    # chat_template_kwargs reach the template, on /tokenize and on chat requests alike.
    kwargs = {"greeting": "hills"}
    greeted = _post(server, "/tokenize", {"messages": messages, "chat_template_kwargs": kwargs})
    assert greeted["tokens"] == _word_ids("hills") + chat["tokens"]
    usage = client.chat.completions.create(model="tiny", messages=messages, max_tokens=1,
                                           extra_body={"chat_template_kwargs": kwargs}).usage
    assert usage.prompt_tokens == greeted["count"]
    tools = [{"type": "function", "function": {"name": "fox", "parameters": {"type": "object"}}}]
    assert _post(server, "/tokenize", {"messages": messages, "tools": tools})["tokens"] == \
        _word_ids("fox") + chat["tokens"]
    # continue_final_message: the last message left open, as chat requests render it.
    open_turn = [*messages, {"role": "assistant", "content": "the lazy"}]
    kept_open = _post(server, "/tokenize", {"messages": open_turn, "continue_final_message": True})
    assert kept_open["tokens"] == chat["tokens"] + _word_ids("the lazy")
    usage = client.chat.completions.create(model="tiny", messages=open_turn, max_tokens=1,
                                           extra_body={"continue_final_message": True}).usage
    assert usage.prompt_tokens == kept_open["count"]


REFUSED = [
    ("/tokenize", {"prompt": "the", "messages": [{"role": "user", "content": "the"}]}, "prompt"),
    ("/tokenize", {"model": "tiny"}, "prompt"),
    ("/tokenize", {"prompt": ["the"]}, "prompt"),
    ("/tokenize", {"prompt": "the", "add_special_tokens": "yes"}, "add_special_tokens"),
    ("/tokenize", {"messages": [{"role": "user", "content": "the"}], "chat_template": "{{ messages }}"},
     "chat_template"),
    ("/tokenize", {"messages": [{"role": "user", "content": "the"}], "continue_final_message": True,
                   "add_generation_prompt": True}, "continue_final_message"),
    ("/tokenize", {"messages": [{"role": "user", "content": "the"}],
                   "chat_template_kwargs": {"continue_final_message": True}}, "chat_template_kwargs"),
    ("/tokenize", {"messages": [{"role": "user", "content": "the"}], "tools": ["fox"]}, "tools"),
    ("/tokenize", {"messages": [{"role": "user", "content": "the"}], "chat_template_kwargs": {"messages": []}},
     "chat_template_kwargs"),
    ("/tokenize", {"messages": "the"}, "messages"),
    ("/tokenize", {"prompt": "the " * 1100}, None),  # over the 32 characters per token of context, not tokenized
    ("/detokenize", {"tokens": [3, 128]}, "tokens"),
    ("/detokenize", {"tokens": [3, -1]}, "tokens"),
    ("/detokenize", {"tokens": [3, 4.0]}, "tokens"),
    ("/detokenize", {"tokens": [True]}, "tokens"),
    ("/detokenize", {"prompt": "the"}, "tokens"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "the"}], "chat_template_kwargs": []},
     "chat_template_kwargs"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "the"}],
                              "chat_template_kwargs": {"add_generation_prompt": False}}, "chat_template_kwargs"),
]


@pytest.mark.parametrize(("path", "body", "param"), REFUSED, ids=[f"{p}-{json.dumps(b)[:40]}" for p, b, _ in REFUSED])
def test_refused_with_a_400_naming_the_field(server, path, body, param):
    status, error = error_of(server.post(path, json.dumps(body)))
    assert status == 400 and error["param"] == param, error
    if param is None:
        assert error["code"] == "context_length_exceeded"


def test_without_a_tokenizer_text_is_refused_and_ids_work(request, model_dirs):
    folder = model_dirs["root"] / "no-tokenizer"
    make_hf_checkpoint("llama3", folder, seed=1)
    bare = start(request, model_dirs, "--model", str(folder), "--max-model-len", "64")
    for path, body in (("/tokenize", {"prompt": "the"}), ("/detokenize", {"tokens": [3, 4]})):
        status, error = error_of(bare.post(path, json.dumps(body)))
        assert status == 400 and error["code"] == "no_tokenizer" and "tokenizer.json" in error["message"]
    out = complete(bare.client(), [3, 4, 5], max_tokens=4, extra_body={"ignore_eos": True})
    assert out.usage.completion_tokens == 4 and out.choices[0].model_extra["stop_reason"] is None


def test_detokenize_keeps_special_tokens(server):
    ids = _post(server, "/tokenize", {"prompt": PROMPTS[2]})["tokens"] + [2]
    assert _post(server, "/detokenize", {"model": "tiny", "tokens": ids}) == {"prompt": f"<s> {PROMPTS[2]} </s>"}
    assert _post(server, "/detokenize", {"tokens": []}) == {"prompt": ""}


def test_responses_carry_system_fingerprint_and_stop_reason(server):
    client = server.client()
    plain = complete(client, PROMPTS[2], extra_body={"ignore_eos": True})
    fingerprint = plain.system_fingerprint
    assert re.fullmatch(r"fp_[0-9a-f]{12}", fingerprint)
    assert plain.choices[0].finish_reason == "length" and plain.choices[0].model_extra["stop_reason"] is None
    stop = plain.choices[0].text.split()[3]
    cut = complete(client, PROMPTS[2], stop=["never here", stop], extra_body={"ignore_eos": True})
    assert cut.system_fingerprint == fingerprint
    assert cut.choices[0].finish_reason == "stop" and cut.choices[0].model_extra["stop_reason"] == stop
    assert cut.choices[0].text == plain.choices[0].text[: plain.choices[0].text.index(stop)]

    messages = [{"role": "user", "content": PROMPTS[2]}]
    whole = client.chat.completions.create(model="tiny", messages=messages, max_tokens=12, temperature=0,
                                           extra_body={"ignore_eos": True})
    stop = whole.choices[0].message.content.split()[2]
    chunks = list(client.chat.completions.create(model="tiny", messages=messages, max_tokens=12, temperature=0,
                                                 stop=stop, stream=True, extra_body={"ignore_eos": True}))
    assert whole.system_fingerprint == fingerprint and {c.system_fingerprint for c in chunks} == {fingerprint}
    assert [c.choices[0].model_extra["stop_reason"] for c in chunks] == [None] * (len(chunks) - 1) + [stop]
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_system_fingerprint_follows_settings_that_change_outputs():
    base = EngineOptions(model="M", draft="D", method="sd", dtype="float32", max_context=256)
    assert system_fingerprint(base) == system_fingerprint(EngineOptions(**vars(base)))
    for change in (dict(num_draft=5), dict(method="easyspec"), dict(dtype="bfloat16"), dict(model="N"),
                   dict(max_context=512), dict(tree_width=2), dict(generation_config="none")):
        assert system_fingerprint(base.replace(**change)) != system_fingerprint(base), change
    for change in (dict(timeout_s=30.0), dict(progress=False), dict(profile_stages=False)):
        assert system_fingerprint(base.replace(**change)) == system_fingerprint(base), change


# --- metrics --------------------------------------------------------------------------------------------------


def test_every_metric_names_its_vllm_equivalent_in_help_and_readme():
    text = Metrics("m").render(0, 0, True)
    families = re.findall(rf"^# TYPE {PREFIX}(\w+) ", text, re.M)
    assert families == list(VLLM_NAMES)  # every family has an entry, in order, and no entry is stale
    readme = (ROOT / "README.md").read_text()
    rows = dict(re.findall(rf"^\| `{PREFIX}(\w+)(?:\{{[^}}]*\}})?` \| (.+) \|$", readme, re.M))
    assert list(rows) == families
    for name, vllm in VLLM_NAMES.items():
        help_line = next(line for line in text.splitlines() if line.startswith(f"# HELP {PREFIX}{name} "))
        if vllm is None:
            assert "vLLM:" not in help_line and rows[name].startswith("none")
        else:
            assert help_line.endswith(f" vLLM: {vllm}.") and rows[name].startswith(f"`{vllm}")
