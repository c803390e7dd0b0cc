"""HTTP routes: OpenAI completions and chat (streamed or not), models, health, metrics."""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from aiohttp import web

from easyspec.engine.engine import Engine
from easyspec.options import SamplingParams
from easyspec.server.metrics import Metrics
from easyspec.server.protocol import (
    OPENAI_DEFAULTS,
    ApiError,
    GenerationRequest,
    ResponseShape,
    parse_chat,
    parse_completion,
)
from easyspec.server.scheduler import Delta, Job, Scheduler

log = logging.getLogger("easyspec.server")

# Long prompts sent as token-id arrays run to megabytes of JSON.
MAX_BODY_BYTES = 64 * 1024 * 1024


@dataclass
class ServerState:
    scheduler: Scheduler
    metrics: Metrics
    model_name: str
    api_key: str | None

    @property
    def engine(self) -> Engine:
        assert self.scheduler.engine is not None, "the app is built once the engine is ready"
        return self.scheduler.engine


STATE = web.AppKey("state", ServerState)
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _error_response(err: ApiError) -> web.Response:
    return web.json_response(err.body(), status=err.status)


def _endpoint(request: web.Request) -> str:
    # Unmatched paths share one label so that probing clients cannot grow the metrics without bound.
    resource = request.match_info.route.resource
    return resource.canonical if resource is not None else "unmatched"


@web.middleware
async def _guard(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Authentication, OpenAI-shaped errors for everything that fails, and request counting."""
    state = request.app[STATE]
    try:
        if state.api_key and request.path.startswith("/v1/"):
            sent = request.headers.get("Authorization", "").encode()
            if not hmac.compare_digest(sent, f"Bearer {state.api_key}".encode()):
                raise ApiError(401, "invalid or missing API key; send the header 'Authorization: Bearer KEY'",
                               code="invalid_api_key")
        response = await handler(request)
    except ApiError as err:
        response = _error_response(err)
    except web.HTTPException as err:  # the router's 404 / 405, or a body over the size limit
        message = f"{err.reason}: {request.method} {request.path}"
        response = _error_response(ApiError(err.status, message, code=err.reason.lower().replace(" ", "_")))
    except asyncio.CancelledError:
        state.metrics.count_request(_endpoint(request), 499)  # nginx's "client closed request"
        raise
    except Exception as err:  # a bug: answer 500 and keep serving
        log.exception("unhandled error in %s %s", request.method, request.path)
        response = _error_response(ApiError(500, f"internal error: {type(err).__name__}: {err}"))
    state.metrics.count_request(_endpoint(request), response.status)
    return response


async def _read_json(request: web.Request) -> dict:
    try:
        body = json.loads(await request.read())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        detail = f"{err.msg} at line {err.lineno} column {err.colno}" if isinstance(err, json.JSONDecodeError) \
            else "it is not UTF-8"
        raise ApiError(400, f"the request body is not valid JSON: {detail}", code="invalid_json") from None
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object", code="invalid_json")
    return body


def _prompt_ids(engine: Engine, req: GenerationRequest) -> list[int]:
    tok = engine.tokenizer
    if isinstance(req.prompt, list):
        return req.prompt
    if tok is None:
        raise ApiError(400, f"the model {engine.options.model} has no tokenizer.json; send the prompt as token ids "
                            "to /v1/completions", code="no_tokenizer")
    if req.messages is None:
        return tok.encode(req.prompt or "")
    if tok.chat_template is None:
        raise ApiError(400, "the model has no chat template (tokenizer_config.json 'chat_template' or "
                            "chat_template.jinja); use /v1/completions with a plain prompt", code="no_chat_template")
    try:
        return tok.encode_chat(req.messages)
    except Exception as err:  # jinja errors and raise_exception() calls in the template are the caller's input
        raise ApiError(400, f"the chat template could not render these messages: {err}", param="messages",
                       code="chat_template_error") from None


def _sampling(engine: Engine, req: GenerationRequest, prompt_ids: list[int]) -> SamplingParams:
    """The request's settings, then the engine's defaults (--generation-config), then OpenAI's; an
    absent max_tokens is bounded by the context left."""
    options = engine.options
    room = options.max_context - len(prompt_ids) - options.draft_room
    given = {"temperature": req.temperature, "top_p": req.top_p, "top_k": req.top_k, "max_new_tokens": req.max_tokens}
    given = {name: value for name, value in given.items() if value is not None}
    try:
        params = engine.sampling_params(len(prompt_ids), defaults=OPENAI_DEFAULTS, seed=req.seed, stop=req.stop,
                                        ignore_eos=req.ignore_eos, **given)
        engine.worker.check_request(prompt_ids, params)
    except ValueError as err:  # SamplingParams' checks and the engine's OptionsError both say what to change
        wanted = req.max_tokens if req.max_tokens is not None else 1  # an absent max_tokens asks for at least one
        code = "context_length_exceeded" if wanted > room else None
        raise ApiError(400, str(err), code=code) from None
    return params


async def _generate(request: web.Request, chat: bool) -> web.StreamResponse:
    state = request.app[STATE]
    body = await _read_json(request)
    req = parse_chat(body) if chat else parse_completion(body)
    if req.ignored:
        log.info("ignored unknown request fields: %s", ", ".join(req.ignored))
    if not state.scheduler.healthy:
        raise ApiError(503, f"the engine is down: {state.scheduler.failure}", code="engine_down")
    engine = state.engine
    prompt_ids = _prompt_ids(engine, req)
    params = _sampling(engine, req, prompt_ids)
    job = Job(prompt_ids, params, asyncio.get_running_loop())
    state.scheduler.submit(job)
    shape = ResponseShape(chat, state.model_name)
    try:
        if req.stream:
            return await _stream(request, job, shape, req.include_usage)
        return await _collect(job, shape)
    finally:
        job.cancel()  # a no-op once finished; stops generation if the client went away


async def _collect(job: Job, shape: ResponseShape) -> web.Response:
    pieces = []
    while True:
        event = await job.events.get()
        if isinstance(event, ApiError):
            raise event
        pieces.append(event.text)
        if event.finish_reason is not None:
            usage = shape.usage(len(job.prompt_ids), event.completion_tokens)
            return web.json_response(shape.full("".join(pieces), event.finish_reason, usage, event.stats))


async def _stream(request: web.Request, job: Job, shape: ResponseShape, include_usage: bool) -> web.StreamResponse:
    # Headers go out once the job is queued, so a client sees 200 while it waits its turn.
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
    await response.prepare(request)
    # With include_usage every chunk carries "usage": null and a last chunk carries the totals, as OpenAI does.
    extra = {"usage": None} if include_usage else {}

    async def send(payload: dict) -> None:
        await response.write(b"data: " + json.dumps(payload).encode() + b"\n\n")

    try:
        if shape.chat:
            await send({**shape.chunk("", role=True), **extra})
        while True:
            event: Delta | ApiError = await job.events.get()
            if isinstance(event, ApiError):
                await send(event.body())
                break
            if event.text:
                await send({**shape.chunk(event.text), **extra})
            if event.finish_reason is not None:
                await send({**shape.chunk(None, event.finish_reason), **extra, "easyspec": event.stats})
                if include_usage:
                    await send(shape.usage_chunk(shape.usage(len(job.prompt_ids), event.completion_tokens)))
                break
        await response.write(b"data: [DONE]\n\n")
    except ConnectionResetError:
        pass  # the client left; the caller cancels the job
    return response


async def completions(request: web.Request) -> web.StreamResponse:
    return await _generate(request, chat=False)


async def chat_completions(request: web.Request) -> web.StreamResponse:
    return await _generate(request, chat=True)


async def models(request: web.Request) -> web.Response:
    state = request.app[STATE]
    card = {"id": state.model_name, "object": "model", "created": int(time.time()), "owned_by": "easyspec",
            "max_model_len": state.engine.options.max_context}
    return web.json_response({"object": "list", "data": [card]})


async def health(request: web.Request) -> web.Response:
    scheduler = request.app[STATE].scheduler
    if not scheduler.healthy:
        raise ApiError(503, f"the engine is down: {scheduler.failure}", code="engine_down")
    return web.json_response({"status": "ok"})


async def metrics(request: web.Request) -> web.Response:
    state = request.app[STATE]
    scheduler = state.scheduler
    text = state.metrics.render(scheduler.waiting, int(scheduler.current is not None), scheduler.healthy)
    return web.Response(body=text.encode(), headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"})


async def _shutdown(app: web.Application) -> None:
    # Blocking joins belong off the event loop, which must keep delivering the final errors.
    await asyncio.to_thread(app[STATE].scheduler.stop)


def build_app(state: ServerState) -> web.Application:
    app = web.Application(middlewares=[_guard], client_max_size=MAX_BODY_BYTES)
    app[STATE] = state
    app.router.add_post("/v1/completions", completions)
    app.router.add_post("/v1/chat/completions", chat_completions)
    app.router.add_get("/v1/models", models)
    app.router.add_get("/health", health)
    app.router.add_get("/metrics", metrics)
    app.on_shutdown.append(_shutdown)
    return app
