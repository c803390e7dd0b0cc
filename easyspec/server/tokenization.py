"""vLLM's /tokenize and /detokenize request bodies (easyspec.server.app answers them).

/tokenize takes a `prompt` (text: tokenized as /v1/completions tokenizes it) or
`messages` (through the chat template as /v1/chat/completions renders them), so
its count is the prompt_tokens a generation request with the same input reports.
Fields, as vLLM names them: add_special_tokens (default true for a prompt, false
for messages: the template writes any BOS itself), add_generation_prompt and
continue_final_message (as chat requests take them), chat_template_kwargs, tools
(rendered by the template), return_token_strs. A request-supplied chat_template
is refused with a 400 naming the field. /detokenize takes `tokens` and gives the text with special
tokens kept, as vLLM does.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from easyspec.server.protocol import ApiError, chat_template_kwargs, get_field, parse_messages, turn_options

TOKENIZE_FIELDS = {"model", "prompt", "messages", "add_special_tokens", "add_generation_prompt",
                   "chat_template_kwargs", "tools", "return_token_strs", "continue_final_message", "chat_template"}
DETOKENIZE_FIELDS = {"model", "tokens"}


@dataclass(frozen=True)
class TokenizeRequest:
    prompt: str | None  # text, tokenized as a completion prompt
    messages: list[dict] | None  # chat messages, rendered by the chat template
    add_special_tokens: bool
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    template_kwargs: dict = field(default_factory=dict)  # chat_template_kwargs
    tools: list[dict] | None = None
    return_token_strs: bool = False

    @property
    def text_chars(self) -> int:
        """Characters of text to tokenize, checked against the server's prompt limit first."""
        if self.messages is not None:
            return sum(len(m["content"]) for m in self.messages)
        return len(self.prompt or "")


def parse_tokenize(body: dict) -> TokenizeRequest:
    get_field(body, "model", (str,), "a string")
    if get_field(body, "chat_template", (str,), "a string") is not None:
        raise ApiError(400, "a request's own chat_template is not accepted; start the server with "
                            "--chat-template FILE", param="chat_template", code="unsupported")
    return_token_strs = get_field(body, "return_token_strs", (bool,), "a boolean", False)
    if ("prompt" in body) == ("messages" in body):
        raise ApiError(400, "send exactly one of 'prompt' (text) or 'messages' (a chat)", param="prompt")
    if "prompt" in body:
        prompt = body["prompt"]
        if not isinstance(prompt, str):
            raise ApiError(400, "'prompt' must be a string", param="prompt", code="invalid_type")
        return TokenizeRequest(prompt, None, get_field(body, "add_special_tokens", (bool,), "a boolean", True),
                               return_token_strs=return_token_strs)
    tools = get_field(body, "tools", (list,), "an array")
    if tools is not None and not all(isinstance(tool, dict) for tool in tools):
        raise ApiError(400, "'tools' must be an array of objects (JSON schemas)", param="tools", code="invalid_type")
    return TokenizeRequest(
        None,
        parse_messages(body),
        get_field(body, "add_special_tokens", (bool,), "a boolean", False),
        **turn_options(body),
        template_kwargs=chat_template_kwargs(body),
        tools=tools,
        return_token_strs=return_token_strs,
    )


def parse_detokenize(body: dict, vocab_size: int) -> list[int]:
    """The token ids to decode; each must be an id of the tokenizer's vocabulary."""
    get_field(body, "model", (str,), "a string")
    tokens = body.get("tokens")
    if not isinstance(tokens, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in tokens):
        raise ApiError(400, "'tokens' must be an array of token ids (integers)", param="tokens", code="invalid_type")
    bad = next((t for t in tokens if not 0 <= t < vocab_size), None)
    if bad is not None:
        raise ApiError(400, f"token id {bad} is outside the vocabulary [0, {vocab_size})", param="tokens")
    return tokens
