"""Chat templates render byte for byte as transformers' apply_chat_template renders them, with the
same tokenizer: tool schemas and calls through tojson, raise_exception, strftime_now, namespace,
loop controls, {% generation %}, chat_template_kwargs; and --chat-template FILE replaces a model's."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path

import jinja2
import pytest
from chat_templates import CONVERSATIONS, TEMPLATES, WEATHER_TOOL

from easyspec import Engine, EngineOptions
from easyspec.model.tokenizer import Tokenizer

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "easyspec" / "models" / "demo" / "base"


def _folder(tmp_path: Path, name: str, template: str) -> Path:
    """The demo tokenizer with `template` and Llama-style special tokens, as a tokenizer folder."""
    folder = tmp_path / name
    folder.mkdir()
    shutil.copy(DEMO / "tokenizer.json", folder / "tokenizer.json")
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|bos|>", "eos_token": "<|eos|>",
              "pad_token": "<|eos|>", "clean_up_tokenization_spaces": False, "chat_template": template}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder


CASES = [(family, conversation, tools, kwargs)
         for family in TEMPLATES
         for conversation in CONVERSATIONS
         for tools in (None, [WEATHER_TOOL])
         for kwargs in ({}, {"enable_thinking": False})
         if (tools is None or conversation == "tools") and (not kwargs or family == "qwen3")]


@pytest.mark.parametrize(("family", "conversation", "tools", "kwargs"), CASES)
def test_renders_as_transformers(tmp_path, family, conversation, tools, kwargs):
    from transformers import AutoTokenizer

    folder = _folder(tmp_path, family, TEMPLATES[family])
    theirs = AutoTokenizer.from_pretrained(folder)
    ours = Tokenizer.from_folder(folder)
    messages = CONVERSATIONS[conversation]
    for add_generation_prompt in (True, False):
        expected = theirs.apply_chat_template(messages, tools=tools, tokenize=False,
                                              add_generation_prompt=add_generation_prompt, **kwargs)
        text = ours.render_chat(messages, add_generation_prompt=add_generation_prompt, tools=tools, **kwargs)
        assert text == expected
        ids = theirs.apply_chat_template(messages, tools=tools, add_generation_prompt=add_generation_prompt,
                                         **kwargs)
        ids = ids["input_ids"] if isinstance(ids, Mapping) else ids
        assert ours.encode_chat(messages, add_generation_prompt=add_generation_prompt, tools=tools, **kwargs) == ids
    if tools:  # the tool schema went through tojson: non-ASCII and HTML characters kept as they are
        assert "Zürich" in text and "<default> & more" in text


def test_template_features(tmp_path):
    tok = Tokenizer.from_folder(_folder(tmp_path, "m", TEMPLATES["mistral"]))
    with pytest.raises(jinja2.TemplateError, match="roles must alternate"):
        tok.render_chat([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}])
    # enable_thinking reaches the template only as a keyword (chat_template_kwargs).
    qwen3 = Tokenizer.from_folder(_folder(tmp_path, "q", TEMPLATES["qwen3"]))
    hello = [{"role": "user", "content": "hi"}]
    assert qwen3.render_chat(hello).endswith("<|im_start|>assistant\n")
    assert qwen3.render_chat(hello, enable_thinking=False).endswith("<think>\n\n</think>\n\n")
    # A namespace refuses underscore attributes, as in transformers' sandbox.
    sneaky = Tokenizer.from_folder(_folder(tmp_path, "s", "{% set ns = namespace(_x=1) %}{{ ns._x }}"))
    with pytest.raises(jinja2.exceptions.SecurityError):
        sneaky.render_chat(hello)


def test_chat_template_flag(tmp_path):
    """--chat-template FILE gives the demo model (which has none) a template: generate, serve and bench take it."""
    template = tmp_path / "chat.jinja"
    template.write_text(TEMPLATES["qwen25"])
    with Engine(EngineOptions(chat_template=str(template))) as engine:
        ids = engine.encode_prompt("def f():")
        assert engine.tokenizer.decode(ids, skip_special_tokens=False).startswith("<|im_start|>system\n")
    out = subprocess.run([sys.executable, "-m", "easyspec", "generate", "--prompt", "def f():", "--max-new-tokens",
                          "2", "--json", "--chat-template", str(template)], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["prompt_tokens"] == len(ids)
    missing = subprocess.run([sys.executable, "-m", "easyspec", "generate", "--prompt", "x", "--chat-template",
                              str(tmp_path / "nope.jinja")], capture_output=True, text=True, cwd=ROOT)
    assert missing.returncode == 2 and "--chat-template" in missing.stderr.strip().splitlines()[-1]
    broken = tmp_path / "broken.jinja"
    broken.write_text("{% for m in messages %}{{ m.content }}")
    out = subprocess.run([sys.executable, "-m", "easyspec", "generate", "--prompt", "x", "--chat-template",
                          str(broken)], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode != 0 and "Traceback" not in out.stderr
    assert f"{broken}: the chat template does not parse (line 1" in out.stderr.strip().splitlines()[-1]
    from hf_models import make_hf_checkpoint

    from easyspec.cli.main import build_parser
    from easyspec.options import OptionsError

    make_hf_checkpoint("llama2", tmp_path / "no-tokenizer")
    with pytest.raises(OptionsError, match="--chat-template needs a tokenizer"):
        Engine(EngineOptions(model=str(tmp_path / "no-tokenizer"), chat_template=str(template)))

    for command in ("generate", "serve", "bench"):
        args = build_parser().parse_args([command, "--chat-template", str(template)])
        assert args.chat_template == str(template)


@pytest.mark.parametrize("family", list(TEMPLATES))
def test_continue_final_message_as_transformers(tmp_path, family):
    """The last message left open for the model to continue: cut where its content ends, its trailing
    space kept only where the template keeps it, as transformers cuts it."""
    from transformers import AutoTokenizer

    folder = _folder(tmp_path, family, TEMPLATES[family])
    theirs, ours = AutoTokenizer.from_pretrained(folder), Tokenizer.from_folder(folder)
    for conversation in ("plain", "reasoning"):
        for partial in ("Lyon est", "Lyon est ", "  Une ville\n"):
            messages = [*CONVERSATIONS[conversation], {"role": "assistant", "content": partial}]
            expected = theirs.apply_chat_template(messages, tokenize=False, add_generation_prompt=False,
                                                  continue_final_message=True)
            text = ours.render_chat(messages, add_generation_prompt=False, continue_final_message=True)
            assert text == expected and text.rstrip().endswith(partial.strip())
    with pytest.raises(ValueError, match="set add_generation_prompt to False"):
        ours.render_chat(messages, continue_final_message=True)
    dropped = "{% for m in messages %}{{ m['role'] }}{% endfor %}"  # shows no content at all
    with pytest.raises(jinja2.TemplateError, match="does not show the final message's content"):
        Tokenizer.from_folder(_folder(tmp_path, "x", dropped)).render_chat(
            messages, add_generation_prompt=False, continue_final_message=True)
