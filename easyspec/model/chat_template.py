"""Chat templates rendered as transformers' `apply_chat_template` renders them.

Hub templates are written against transformers' Jinja environment, so the same
template must see the same environment here or a tool call, a date or a
whitespace rule comes out differently. That environment is:
- a sandbox (ImmutableSandboxedEnvironment) with trim_blocks and lstrip_blocks,
  `break` / `continue` (jinja2.ext.loopcontrols) and the `{% generation %}` block
  (which marks assistant text for training masks; here it renders its body);
- `tojson` as json.dumps: non-ASCII and HTML characters kept as they are (Jinja's
  own filter escapes <, >, & and '), with indent, separators and sort_keys;
- globals `raise_exception(message)`, `strftime_now(format)`, `dict` and a
  `namespace` that refuses underscore-prefixed attributes;
- the variables messages, tools, documents, add_generation_prompt, the
  tokenizer's named special tokens (bos_token, eos_token, ... when set) and any
  extra keyword arguments (`chat_template_kwargs`, e.g. Qwen3's enable_thinking),
  which win over the special tokens.
Messages are passed with None-valued keys dropped, and a reasoning text under
`thinking` or `reasoning` is also given as `reasoning_content` (and the reverse),
as transformers does.

`continue_final_message` renders without a generation prompt and ends the text
right where the final message's content ends (its end-of-turn markup dropped),
so the model continues that message. As transformers does, a marker is appended
to the content (its last text part) before rendering and the text is cut at the
marker's last appearance; when the template trimmed the space the marker ends
with, the whitespace before the cut goes too.
"""

from __future__ import annotations

import json
from datetime import datetime
from functools import lru_cache
from typing import Any

import jinja2
from jinja2.ext import Extension
from jinja2.sandbox import ImmutableSandboxedEnvironment

# Names a message's reasoning text goes by; templates read the first.
REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")
# Appended to the final message's content to find where it ends once rendered (continue_final_message).
CONTINUE_MARKER = "EASYSPEC_CONTINUE_FINAL_MESSAGE "


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


class _Dict:
    """`dict(...)` in a template, without exposing the type itself."""

    def __call__(self, *args: Any, **kwargs: Any) -> dict:
        return dict(*args, **kwargs)

    def fromkeys(self, *args: Any, **kwargs: Any) -> dict:
        return dict.fromkeys(*args, **kwargs)


class _Namespace(jinja2.utils.Namespace):
    """Jinja's namespace, refusing attributes that start with an underscore (sandbox hygiene)."""

    def __init__(*args: Any, **kwargs: Any) -> None:  # noqa: N805  (Jinja's signature: self may be a kwarg)
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _Namespace._check(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name: str, value: Any) -> None:
        _Namespace._check(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check(name: object) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"a chat template cannot set the attribute {name!r} on a namespace")


class _GenerationBlock(Extension):
    """`{% generation %}...{% endgeneration %}`: renders its body."""

    tags = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

    def _render(self, caller: Any) -> str:
        return caller()


@lru_cache(maxsize=16)
def compile_template(source: str) -> jinja2.Template:
    """The template compiled in transformers' environment (cached: servers render one template often)."""
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[_GenerationBlock, "jinja2.ext.loopcontrols"])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals["dict"] = _Dict()
    env.globals["namespace"] = _Namespace
    return env.from_string(source)


def _message(message: dict) -> dict:
    """A message as the template sees it: None-valued keys dropped, reasoning under every name."""
    out = {key: value for key, value in message.items() if value is not None}
    reasoning = next((out[key] for key in REASONING_FIELDS if key in out), None)
    if reasoning is not None:
        out = {"thinking": reasoning, **out, "reasoning_content": reasoning}
    return out


def render(source: str, messages: list[dict], special_tokens: dict[str, str], add_generation_prompt: bool = True,
           tools: list[dict] | None = None, documents: list[dict] | None = None, continue_final_message: bool = False,
           **kwargs: Any) -> str:
    """The text of `messages` under the template `source`; `kwargs` are extra template variables
    (chat_template_kwargs), which take precedence over the special tokens."""
    if continue_final_message and add_generation_prompt:
        raise ValueError("continue_final_message continues the last message, add_generation_prompt starts a new "
                         "one: set add_generation_prompt to False")
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise TypeError(f"messages[{i}] must be a dict with 'role' and 'content', got {type(message).__name__}")
    if tools is not None and not all(isinstance(tool, dict) for tool in tools):
        raise TypeError("tools must be JSON schemas (dicts)")
    messages = [_message(m) for m in messages]
    if continue_final_message and messages:
        messages[-1] = _mark_final(messages[-1])
    text = compile_template(source).render(
        messages=messages,
        tools=tools,
        documents=documents,
        add_generation_prompt=add_generation_prompt,
        **{**special_tokens, **kwargs},
    )
    if not continue_final_message:
        return text
    cut = text.rfind(CONTINUE_MARKER.strip())
    if cut < 0:
        raise jinja2.exceptions.TemplateError("continue_final_message: the chat template does not show the final "
                                              "message's content, so there is nothing to continue")
    return text[:cut] if text.startswith(CONTINUE_MARKER, cut) else text[:cut].rstrip()


def _mark_final(message: dict) -> dict:
    """The final message with CONTINUE_MARKER after its content (the last text part of a list)."""
    content = message.get("content")
    if isinstance(content, str):
        return {**message, "content": content + CONTINUE_MARKER}
    if isinstance(content, list):
        for i in reversed(range(len(content))):
            part = content[i]
            if isinstance(part, dict) and isinstance(part.get("text"), str):
                parts = [*content[:i], {**part, "text": part["text"] + CONTINUE_MARKER}, *content[i + 1 :]]
                return {**message, "content": parts}
    raise jinja2.exceptions.TemplateError("continue_final_message needs text in the final message to continue")
