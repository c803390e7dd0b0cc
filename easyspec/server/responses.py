"""OpenAI-shaped responses: completions and chat, whole (`collect`) or streamed (`stream`), with
their choices' log-probabilities.

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

import asyncio
import json
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from aiohttp import web

from easyspec.runtime.stats import SpecStats
from easyspec.server.protocol import ApiError
from easyspec.server.scheduler import Delta, Job
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


async def collect(jobs: list[Job], shape: ResponseShape) -> web.Response:
    """The whole response once every choice's job has finished."""
    choices, stats, generated = [], [], 0
    for job in jobs:
        pieces, logprobs = [], []
        while True:
            event = await job.events.get()
            if isinstance(event, ApiError):
                raise event
            pieces.append(event.text)
            logprobs += event.logprobs or ()
            if event.finish_reason is not None:
                break
        asked = job.params.logprobs is not None
        choices.append(Choice("".join(pieces), event.finish_reason, event.stop_reason, logprobs if asked else None))
        stats.append(event.stats)
        generated += event.completion_tokens
    usage = shape.usage(len(jobs[0].prompt_ids), generated)
    return web.json_response(shape.full(choices, usage, SpecStats.merged(stats).to_dict()))


async def stream(request: web.Request, jobs: list[Job], shape: ResponseShape,
                 include_usage: bool) -> web.StreamResponse:
    """Server-sent events: the choices' chunks as their tokens come (choices decode side by side, so their
    chunks interleave, each with its index), then [DONE]."""
    # Headers go out once the jobs are queued, so a client sees 200 while it waits its turn.
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
    await response.prepare(request)
    # With include_usage every chunk carries "usage": null and a last chunk carries the totals, as OpenAI does.
    extra = {"usage": None} if include_usage else {}

    async def send(payload: dict) -> None:
        await response.write(b"data: " + json.dumps(payload).encode() + b"\n\n")

    try:
        if shape.chat:
            for index in range(len(jobs)):
                await send({**shape.chunk(index, "", role=True), **extra})
        finals = await _stream_choices(jobs, shape, send, extra)
        if finals is not None and include_usage:
            generated = sum(final.completion_tokens for final in finals)
            await send(shape.usage_chunk(shape.usage(len(jobs[0].prompt_ids), generated)))
        await response.write(b"data: [DONE]\n\n")
    except ConnectionResetError:
        pass  # the client left; the caller cancels the jobs
    return response


async def _stream_choices(jobs: list[Job], shape: ResponseShape, send: Callable[[dict], Awaitable[None]],
                          extra: dict) -> list[Delta] | None:
    """Send every choice's chunks as its events arrive; returns the final Deltas in choice order, or None
    after sending an error (which ends the whole response)."""
    pending = {asyncio.ensure_future(job.events.get()): index for index, job in enumerate(jobs)}
    finals: dict[int, Delta] = {}
    try:
        while pending:
            done, _ = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for getter in sorted(done, key=pending.__getitem__):
                index = pending.pop(getter)
                event: Delta | ApiError = getter.result()
                if isinstance(event, ApiError):
                    await send(event.body())
                    return None
                if event.finish_reason is None:
                    await send({**shape.chunk(index, event.text, logprobs=event.logprobs), **extra})
                    pending[asyncio.ensure_future(jobs[index].events.get())] = index
                    continue
                if event.text or event.logprobs:
                    await send({**shape.chunk(index, event.text, logprobs=event.logprobs), **extra})
                await send({**shape.chunk(index, None, event.finish_reason, event.stop_reason), **extra,
                            "easyspec": event.stats.to_dict()})
                finals[index] = event
    finally:
        for getter in pending:
            getter.cancel()
    return [finals[index] for index in range(len(jobs))]
