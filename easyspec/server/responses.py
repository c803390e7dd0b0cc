"""OpenAI-shaped response bodies: completions and chat, whole or streamed, with their choices'
log-probabilities.

Log-probabilities (SamplingParams.logprobs; easyspec.verify.logprobs says of which distribution)
come in OpenAI's two shapes. Completions: {"tokens", "token_logprobs", "top_logprobs" (a dict per
token of the most likely tokens' log-probabilities, the chosen token's included, so up to
logprobs + 1 entries), "text_offset"}. Chat: {"content": [{"token", "logprob", "bytes",
"top_logprobs": [{"token", "logprob", "bytes"}, ...]}]}. A token's text is its own decoding, special
tokens shown ("token_id:N" for a model without a tokenizer, as vLLM writes it), "bytes" that
text's UTF-8 and text_offset the sum of the token texts before it in the choice, as vLLM
reports them. -inf (a token the sampling settings dropped) is written as -9999.0.

Every response and chunk carries system_fingerprint, and every choice vLLM's stop_reason: the
stop string or the stop token id that ended it (null until the last chunk, and for EOS or length).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass

from easyspec.verify.logprobs import TokenLogprob, json_logprob


@dataclass
class Choice:
    """One choice of a whole (not streamed) response."""

    text: str
    finish_reason: str | None
    stop_reason: str | int | None
    logprobs: list[TokenLogprob] | None


class ResponseShape:
    """Builds the JSON bodies of one completion or chat response, streamed or not; `token_text`
    gives a token id's text for log-probabilities."""

    def __init__(self, chat: bool, model: str, fingerprint: str, token_text: Callable[[int], str]) -> None:
        self.chat = chat
        self.model = model
        self.fingerprint = fingerprint  # system_fingerprint: the server's configuration (app.system_fingerprint)
        self.token_text = token_text
        self.id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        self.created = int(time.time())
        self._offsets: dict[int, int] = {}  # completions: each choice's text_offset so far

    def _envelope(self, chunk: bool) -> dict:
        if self.chat:
            kind = "chat.completion.chunk" if chunk else "chat.completion"
        else:
            kind = "text_completion"
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model,
                "system_fingerprint": self.fingerprint}

    @staticmethod
    def usage(prompt_tokens: int, completion_tokens: int) -> dict:
        return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens}

    def full(self, choices: list[Choice], usage: dict, stats: dict) -> dict:
        out = []
        for index, choice in enumerate(choices):
            logprobs = self.logprobs(index, choice.logprobs)
            if self.chat:
                body = {"index": index, "message": {"role": "assistant", "content": choice.text}, "logprobs": logprobs}
            else:
                body = {"index": index, "text": choice.text, "logprobs": logprobs}
            out.append({**body, "finish_reason": choice.finish_reason, "stop_reason": choice.stop_reason})
        return {**self._envelope(False), "choices": out, "usage": usage, "easyspec": stats}

    def chunk(self, index: int, text: str | None, finish_reason: str | None = None,
              stop_reason: str | int | None = None, role: bool = False,
              logprobs: list[TokenLogprob] | None = None) -> dict:
        """A streamed chunk of choice `index`; chat deltas carry the role on a choice's first chunk only."""
        if self.chat:
            delta: dict = {"role": "assistant"} if role else {}
            if text is not None:
                delta["content"] = text
            choice = {"index": index, "delta": delta}
        else:
            choice = {"index": index, "text": text or ""}
        choice.update(logprobs=self.logprobs(index, logprobs), finish_reason=finish_reason, stop_reason=stop_reason)
        return {**self._envelope(True), "choices": [choice]}

    def usage_chunk(self, usage: dict) -> dict:
        return {**self._envelope(True), "choices": [], "usage": usage}

    def logprobs(self, index: int, entries: list[TokenLogprob] | None) -> dict | None:
        """The log-probabilities of choice `index`'s next tokens, in the endpoint's shape (None: not asked for)."""
        if entries is None:
            return None
        if self.chat:
            return {"content": [{**self._token(e.token, e.logprob),
                                 "top_logprobs": [self._token(token, value) for token, value in e.top]}
                                for e in entries]}
        tokens, offsets = [], []
        offset = self._offsets.get(index, 0)
        for entry in entries:
            text = self.token_text(entry.token)
            tokens.append(text)
            offsets.append(offset)
            offset += len(text)
        self._offsets[index] = offset
        tops = [{self.token_text(token): json_logprob(value) for token, value in ((e.token, e.logprob), *e.top)}
                for e in entries]
        return {"tokens": tokens, "token_logprobs": [json_logprob(e.logprob) for e in entries], "top_logprobs": tops,
                "text_offset": offsets}

    def _token(self, token: int, logprob: float) -> dict:
        text = self.token_text(token)
        return {"token": text, "logprob": json_logprob(logprob), "bytes": list(text.encode("utf-8"))}
