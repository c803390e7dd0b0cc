"""OpenAI request bodies in, OpenAI-shaped responses and errors out.

Field policy (documented in the README):
- Unknown fields are accepted and ignored (logged), as OpenAI and vLLM do, so
  clients that send newer fields keep working.
- Known fields are type-checked: a wrong JSON type is a 400 naming the field.
- Sampling fields, OpenAI's and vLLM's extensions alike, map onto SamplingParams
  (easyspec.options), whose checks give a 400 naming the field: temperature,
  top_p, top_k (-1 or 0 = off), min_p, repetition_penalty, presence_penalty,
  frequency_penalty, seed, max_tokens (chat: max_completion_tokens too),
  min_tokens, stop, stop_token_ids, ignore_eos, skip_special_tokens, logprobs
  (completions: a count; chat: logprobs true with top_logprobs).
- n: that many choices, each an independent sample, decoded side by side as the batch has room;
  with a seed, choice i uses seed + i (vLLM's rule).
- Chat: chat_template_kwargs (extra template variables), add_generation_prompt
  and continue_final_message, as vLLM takes them.
- Responses carry system_fingerprint and, on each choice, vLLM's stop_reason.
- Known fields the engine cannot honour are a 400 when set to anything but
  their neutral value, rather than silently ignored, because ignoring them
  would change the output without telling: best_of > 1, echo, suffix,
  logit_bias, tools, and a response_format other than text. `user` is ignored.
- `model` may be any string: one model is served, and the response names it.
- Numbers are range-checked before anything reaches the engine: a non-finite
  number (1e999, NaN, Infinity), a seed outside the signed 64-bit range or a
  count below its minimum is a 400 naming the field.
- The body must be valid JSON text: no NaN / Infinity constants, no lone
  UTF-16 surrogates in any string, nesting at most MAX_JSON_DEPTH deep.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

from easyspec.options import MAX_LOGPROBS, SEED_RANGE

MAX_JSON_DEPTH = 64
MAX_STOP_STRINGS = 16
MAX_STOP_CHARS = 256
MAX_STOP_TOKEN_IDS = 256
MAX_CHOICES = 16  # n: the choices of one request, each a sequence of the engine's batch
# Variables a chat template gets from the request itself, which chat_template_kwargs cannot replace.
TEMPLATE_ARGUMENTS = ("messages", "tools", "documents", "add_generation_prompt", "continue_final_message")

ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    405: "invalid_request_error",
    408: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    500: "internal_error",
    503: "service_unavailable",
}


# What a request that sets neither the field nor has it set by the model's generation_config.json
# gets (OpenAI's API reference); other fields default to SamplingParams'.
OPENAI_DEFAULTS = {"temperature": 1.0}


class ApiError(Exception):
    """An error answered as {"error": {message, type, param, code}} with an HTTP status."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": ERROR_TYPES.get(self.status, "error"),
                          "param": self.param, "code": self.code}}


_JSON_NAMES = {dict: "an object", list: "an array", str: "a string", bool: "a boolean", int: "an integer",
               float: "a number", type(None): "null"}


def _json_type(value: object) -> str:
    return _JSON_NAMES.get(type(value), type(value).__name__)


def get_field(body: dict, name: str, types: tuple[type, ...], expected: str, default: Any = None,
         param: str | None = None) -> Any:
    """body[name] if it has one of `types` (null counts as absent); a 400 naming the field (as `param`,
    when it is nested) otherwise."""
    value = body.get(name)
    if value is None:
        return default
    # JSON true/false arrive as bool, which Python also counts as int.
    if (isinstance(value, bool) and bool not in types) or not isinstance(value, types):
        param = param or name
        raise ApiError(400, f"'{param}' must be {expected}, got {_json_type(value)}", param=param,
                       code="invalid_type")
    return value


def _number(body: dict, name: str) -> float | None:
    value = get_field(body, name, (int, float), "a number")
    if value is None:
        return None
    # JSON has no inf, but 1e999 parses to it; an int too large for a float fails to convert.
    number = float(value) if isinstance(value, float) or abs(value) < 2**1000 else math.inf
    if not math.isfinite(number):
        raise ApiError(400, f"'{name}' must be a finite number", param=name)
    return number


def _count(body: dict, name: str, default: int, minimum: int) -> int:
    """An integer field that counts something, at least `minimum`."""
    value = get_field(body, name, (int,), "an integer", default)
    if value < minimum:
        raise ApiError(400, f"'{name}' must be at least {minimum}, got {value}", param=name)
    return value


def parse_body(raw: bytes) -> dict:
    """The request body as a JSON object; a 400 saying what is wrong with it otherwise."""

    def no_constant(name: str) -> None:
        raise ApiError(400, f"the request body is not valid JSON: {name} is not a JSON value; send a number "
                            "or null", code="invalid_json")

    try:
        body = json.loads(raw, parse_constant=no_constant)
    except json.JSONDecodeError as err:
        raise ApiError(400, f"the request body is not valid JSON: {err.msg} at line {err.lineno} column {err.colno}",
                       code="invalid_json") from None
    except UnicodeDecodeError:
        raise ApiError(400, "the request body is not valid JSON: it is not UTF-8", code="invalid_json") from None
    except RecursionError:
        raise ApiError(400, f"the request body is nested too deeply (at most {MAX_JSON_DEPTH} levels)",
                       code="invalid_json") from None
    except ValueError:  # an integer literal longer than Python converts (4300 digits)
        raise ApiError(400, "the request body holds a number too long to read", code="invalid_json") from None
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object", code="invalid_json")
    _check_tree(body)
    return body


def _check_tree(body: dict) -> None:
    """Every string in the body is valid Unicode and the nesting is at most MAX_JSON_DEPTH deep."""
    stack: list[tuple[object, str, int]] = [(body, "", 1)]
    while stack:
        value, path, depth = stack.pop()
        if depth > MAX_JSON_DEPTH:
            raise ApiError(400, f"the request body is nested too deeply (at most {MAX_JSON_DEPTH} levels)",
                           code="invalid_json")
        if isinstance(value, dict):
            for key, item in value.items():
                name = f"{path}.{key}" if path else key
                _check_text(key, name)
                stack.append((item, name, depth + 1))
        elif isinstance(value, list):
            stack.extend((item, f"{path}[{i}]", depth + 1) for i, item in enumerate(value)
                         if isinstance(item, (dict, list, str)))
        elif isinstance(value, str):
            _check_text(value, path)


def _check_text(text: str, param: str) -> None:
    if text.isascii():
        return
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        bad = ascii(text[err.start])
        shown = ascii(param)[1:-1]
        raise ApiError(400, f"'{shown}' holds a lone UTF-16 surrogate ({bad} at character {err.start}), which is "
                            "not Unicode text; send the character's full surrogate pair or drop it",
                       param=shown, code="invalid_unicode") from None


def unsupported(name: str, what: str) -> ApiError:
    return ApiError(400, f"{what} is not supported by this server", param=name, code="unsupported")


@dataclass(frozen=True)
class GenerationRequest:
    """The fields of a completion or chat request that shape generation."""

    prompt: str | list[int] | None  # completions: text or token ids
    messages: list[dict] | None  # chat: messages for the chat template
    # The SamplingParams fields the request sets, by SamplingParams' names; the others take the engine's
    # defaults (--generation-config), then OPENAI_DEFAULTS. An absent max_new_tokens is bounded by the context.
    sampling: dict[str, Any]
    n: int  # choices, each an independent sample
    stream: bool
    include_usage: bool
    ignored: tuple[str, ...]  # unknown fields, reported in the log
    aliases: dict[str, str] = field(default_factory=dict)  # SamplingParams name -> the request's, where they differ
    template_kwargs: dict = field(default_factory=dict)  # chat: chat_template_kwargs, extra template variables
    add_generation_prompt: bool = True  # chat: open the assistant's turn after the messages
    continue_final_message: bool = False  # chat: leave the last message open for the model to continue

    @property
    def text_chars(self) -> int:
        """Characters of prompt text to tokenize (messages: their contents); 0 for token ids."""
        if self.messages is not None:
            return sum(len(m["content"]) for m in self.messages)
        return len(self.prompt) if isinstance(self.prompt, str) else 0

    def param(self, name: str) -> str:
        """The request's name for a SamplingParams field (for the `param` of a 400)."""
        return self.aliases.get(name, name)


_COMMON_FIELDS = {"model", "max_tokens", "temperature", "top_p", "top_k", "min_p", "repetition_penalty", "seed",
                  "stop", "stop_token_ids", "n", "stream", "stream_options", "user", "presence_penalty",
                  "frequency_penalty", "logit_bias", "logprobs", "ignore_eos", "min_tokens", "skip_special_tokens"}
COMPLETION_FIELDS = _COMMON_FIELDS | {"prompt", "best_of", "echo", "suffix"}
CHAT_FIELDS = _COMMON_FIELDS | {"messages", "max_completion_tokens", "top_logprobs", "tools", "tool_choice",
                                "parallel_tool_calls", "response_format", "chat_template_kwargs",
                                "add_generation_prompt", "continue_final_message"}


def _common(body: dict, known: set[str], max_tokens_field: str) -> dict:
    """The fields completions and chat share, as GenerationRequest's."""
    get_field(body, "model", (str,), "a string")
    get_field(body, "user", (str,), "a string")
    if get_field(body, "logit_bias", (dict,), "an object"):
        raise unsupported("logit_bias", "logit_bias")
    sampling: dict[str, Any] = {name: _number(body, name) for name in
                                ("temperature", "top_p", "min_p", "repetition_penalty", "presence_penalty",
                                 "frequency_penalty")}
    max_tokens = sampling["max_new_tokens"] = get_field(body, max_tokens_field, (int,), "an integer")
    if max_tokens is not None and max_tokens < 1:
        raise ApiError(400, f"'{max_tokens_field}' must be at least 1, got {max_tokens}", param=max_tokens_field)
    sampling["min_tokens"] = get_field(body, "min_tokens", (int,), "an integer")
    top_k = get_field(body, "top_k", (int,), "an integer")
    if top_k is not None and top_k < -1:
        raise ApiError(400, f"'top_k' must be -1 or 0 (off) or a positive integer, got {top_k}", param="top_k")
    sampling["top_k"] = None if top_k is None else max(top_k, 0)
    sampling["stop"] = _stops(body)
    sampling["stop_token_ids"] = _stop_token_ids(body)
    seed = sampling["seed"] = get_field(body, "seed", (int,), "an integer")
    n = _count(body, "n", 1, 1)
    if n > MAX_CHOICES:
        raise ApiError(400, f"'n' must be at most {MAX_CHOICES}, got {n}", param="n")
    if seed is not None and not SEED_RANGE[0] <= seed <= SEED_RANGE[1] - (n - 1):
        raise ApiError(400, f"'seed' must be a signed 64-bit integer (-2**63 to 2**63 - 1) that stays one when the "
                            f"n - 1 = {n - 1} choices after the first add their index, got {seed}", param="seed")
    for name in ("ignore_eos", "skip_special_tokens"):
        sampling[name] = get_field(body, name, (bool,), "a boolean")
    stream = get_field(body, "stream", (bool,), "a boolean", False)
    options = get_field(body, "stream_options", (dict,), "an object", {})
    include_usage = get_field(options, "include_usage", (bool,), "a boolean", False, "stream_options.include_usage")
    return dict(
        sampling={name: value for name, value in sampling.items() if value is not None},
        n=n,
        stream=stream,
        include_usage=stream and include_usage,
        ignored=tuple(sorted(set(body) - known)),
        aliases={"max_new_tokens": max_tokens_field},
    )


def _stops(body: dict) -> tuple[str, ...] | None:
    stop = get_field(body, "stop", (str, list), "a string or an array of strings")
    if stop is None:
        return None
    stops = [stop] if isinstance(stop, str) else stop
    if not all(isinstance(s, str) and s for s in stops):
        raise ApiError(400, "'stop' must be a string or an array of non-empty strings", param="stop",
                       code="invalid_type")
    # Every stop string is looked for after every token, on the engine's one thread.
    if len(stops) > MAX_STOP_STRINGS or any(len(s) > MAX_STOP_CHARS for s in stops):
        raise ApiError(400, f"'stop' takes at most {MAX_STOP_STRINGS} strings of at most {MAX_STOP_CHARS} "
                            "characters each", param="stop")
    return tuple(stops)


def _stop_token_ids(body: dict) -> tuple[int, ...] | None:
    ids = get_field(body, "stop_token_ids", (list,), "an array of token ids")
    if ids is None:
        return None
    if not all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in ids):
        raise ApiError(400, "'stop_token_ids' must be an array of token ids (integers >= 0)", param="stop_token_ids",
                       code="invalid_type")
    if len(ids) > MAX_STOP_TOKEN_IDS:
        raise ApiError(400, f"'stop_token_ids' takes at most {MAX_STOP_TOKEN_IDS} ids", param="stop_token_ids")
    return tuple(ids)


def _logprobs_count(body: dict, name: str) -> int | None:
    """A count of top log-probabilities, 0 to MAX_LOGPROBS."""
    value = get_field(body, name, (int,), "an integer")
    if value is not None and not 0 <= value <= MAX_LOGPROBS:
        raise ApiError(400, f"'{name}' must be from 0 to {MAX_LOGPROBS}, got {value}", param=name)
    return value


def _parse_prompt(body: dict) -> str | list[int]:
    if "prompt" not in body:
        raise ApiError(400, "'prompt' is required", param="prompt")
    prompt = body["prompt"]
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # a batch of one
    elif isinstance(prompt, list) and prompt and all(isinstance(p, (str, list)) for p in prompt):
        raise ApiError(400, "batched prompts are not supported; send one prompt per request", param="prompt",
                       code="unsupported")
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        return prompt
    raise ApiError(400, "'prompt' must be a string or a non-empty array of token ids", param="prompt",
                   code="invalid_type")


def parse_completion(body: dict) -> GenerationRequest:
    if _count(body, "best_of", 1, 1) > 1:
        raise unsupported("best_of", "best_of > 1")
    if get_field(body, "echo", (bool,), "a boolean", False):
        raise unsupported("echo", "echo")
    if get_field(body, "suffix", (str,), "a string"):
        raise unsupported("suffix", "suffix")
    fields = _common(body, COMPLETION_FIELDS, "max_tokens")
    logprobs = _logprobs_count(body, "logprobs")
    if logprobs is not None:
        fields["sampling"]["logprobs"] = logprobs
    return GenerationRequest(prompt=_parse_prompt(body), messages=None, **fields)


def parse_messages(body: dict) -> list[dict]:
    messages = get_field(body, "messages", (list,), "an array")
    if not messages:
        raise ApiError(400, "'messages' must be a non-empty array", param="messages")
    out = []
    for i, message in enumerate(messages):
        param = f"messages[{i}]"
        if not isinstance(message, dict):
            raise ApiError(400, f"{param} must be an object, got {_json_type(message)}", param=param,
                           code="invalid_type")
        if not isinstance(message.get("role"), str):
            raise ApiError(400, f"{param}.role must be a string", param=f"{param}.role", code="invalid_type")
        content = message.get("content")
        if isinstance(content, list):  # content parts: only text can reach a text-only model
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                       for p in content):
                raise ApiError(400, f"{param}.content: only text parts are supported", param=f"{param}.content",
                               code="unsupported")
            content = "".join(p["text"] for p in content)
        elif content is None:
            content = ""
        elif not isinstance(content, str):
            raise ApiError(400, f"{param}.content must be a string or an array of text parts",
                           param=f"{param}.content", code="invalid_type")
        out.append({**message, "content": content})
    return out


def chat_template_kwargs(body: dict) -> dict:
    """chat_template_kwargs: extra variables for the chat template (e.g. Qwen3's enable_thinking)."""
    kwargs = get_field(body, "chat_template_kwargs", (dict,), "an object", {})
    taken = next((name for name in TEMPLATE_ARGUMENTS if name in kwargs), None)
    if taken is not None:
        raise ApiError(400, f"'chat_template_kwargs' cannot set {taken!r}, which the request itself gives the "
                            "template", param="chat_template_kwargs")
    return kwargs


def turn_options(body: dict) -> dict[str, bool]:
    """add_generation_prompt and continue_final_message. As in vLLM, add_generation_prompt is on unless
    set; here an absent one is off when continue_final_message is on."""
    keep_open = get_field(body, "continue_final_message", (bool,), "a boolean", False)
    new_turn = get_field(body, "add_generation_prompt", (bool,), "a boolean", not keep_open)
    if keep_open and new_turn:
        raise ApiError(400, "'continue_final_message' continues the last message and 'add_generation_prompt' starts "
                            "a new one: set add_generation_prompt to false", param="continue_final_message")
    return {"add_generation_prompt": new_turn, "continue_final_message": keep_open}


def parse_chat(body: dict) -> GenerationRequest:
    logprobs = get_field(body, "logprobs", (bool,), "a boolean", False)
    top_logprobs = _logprobs_count(body, "top_logprobs")
    if top_logprobs and not logprobs:
        raise ApiError(400, "'top_logprobs' needs 'logprobs': true", param="top_logprobs")
    if get_field(body, "tools", (list,), "an array"):
        raise unsupported("tools", "tool calling")
    response_format = get_field(body, "response_format", (dict,), "an object", {})
    if response_format.get("type", "text") != "text":
        raise unsupported("response_format", f"response_format {response_format.get('type')!r}")
    # The newer name wins when a client sends both.
    max_tokens_field = "max_tokens" if body.get("max_completion_tokens") is None else "max_completion_tokens"
    fields = _common(body, CHAT_FIELDS, max_tokens_field)
    if logprobs:
        fields["sampling"]["logprobs"] = top_logprobs or 0
        fields["aliases"]["logprobs"] = "top_logprobs"
    return GenerationRequest(prompt=None, messages=parse_messages(body), template_kwargs=chat_template_kwargs(body),
                             **turn_options(body), **fields)
