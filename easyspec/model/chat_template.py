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
           tools: list[dict] | None = None, documents: list[dict] | None = None, **kwargs: Any) -> str:
    """The text of `messages` under the template `source`; `kwargs` are extra template variables
    (chat_template_kwargs), which take precedence over the special tokens."""
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise TypeError(f"messages[{i}] must be a dict with 'role' and 'content', got {type(message).__name__}")
    if tools is not None and not all(isinstance(tool, dict) for tool in tools):
        raise TypeError("tools must be JSON schemas (dicts)")
    return compile_template(source).render(
        messages=[_message(m) for m in messages],
        tools=tools,
        documents=documents,
        add_generation_prompt=add_generation_prompt,
        **{**special_tokens, **kwargs},
    )
