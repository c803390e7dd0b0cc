"""HTTP routes: OpenAI completions and chat (streamed or not), models, health, metrics, and vLLM's
/tokenize, /detokenize and /version.

A request for n choices runs n generations (seeds seed, seed + 1, ...), side by side when the
batch has room; streamed, each choice's chunks come as its tokens do (interleaved), with its index.

Limits (README, server section): a body may hold 1 MiB plus 256 bytes per
token of context and must arrive within --read-timeout; a text prompt may
hold MAX_CHARS_PER_TOKEN characters per token of context, checked before it is
tokenized, and tokenizing runs off the event loop. Error bodies never carry
internal exception text: an unexpected error is logged under an incident id
that the body names. Text that comes from a request is escaped before it is
logged, so a request cannot forge log lines.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import hmac
import json
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import jinja2
from aiohttp import web
from aiohttp.web_runner import GracefulExit

from easyspec import __version__
from easyspec.engine.engine import Engine
from easyspec.model.tokenizer import Tokenizer
from easyspec.options import EngineOptions, SamplingError, SamplingParams
from easyspec.server.metrics import Metrics
from easyspec.server.protocol import (
    OPENAI_DEFAULTS,
    ApiError,
    GenerationRequest,
    parse_body,
    parse_chat,
    parse_completion,
)
from easyspec.server.responses import ResponseShape, collect, stream
from easyspec.server.scheduler import Job, Scheduler
from easyspec.server.tokenization import parse_detokenize, parse_tokenize

log = logging.getLogger("easyspec.server")

# Real text averages 3 to 6 characters per token; 32 leaves room for long runs of spaces or symbols. A text
# prompt longer than this per token of context cannot fit, and is refused before it is tokenized.
MAX_CHARS_PER_TOKEN = 32
# Room for such a prompt with every character escaped in JSON (\uXXXX, 6 bytes; pairs for emoji).
BODY_BYTES_PER_TOKEN = 256
BODY_BASE_BYTES = 1 << 20


@dataclass(frozen=True)
class Limits:
    """What one request may send, set from the context length; a client that has not sent its whole
    body within read_timeout_s is answered 408 and its connection closed."""

    prompt_chars: int
    body_bytes: int
    read_timeout_s: float

    @classmethod
    def for_context(cls, max_context: int, read_timeout_s: float) -> Limits:
        return cls(max_context * MAX_CHARS_PER_TOKEN, BODY_BASE_BYTES + max_context * BODY_BYTES_PER_TOKEN,
                   read_timeout_s)


# Settings that cannot change a single generated token, left out of the system fingerprint.
NOT_FINGERPRINTED = ("progress", "profile_stages", "timeout_s")


def system_fingerprint(options: EngineOptions) -> str:
    """OpenAI's system_fingerprint: names the backend configuration (easyspec's version and every engine
    setting that can change the output of a seeded request), so a client can tell when it changed."""
    settings = {k: v for k, v in dataclasses.asdict(options).items() if k not in NOT_FINGERPRINTED}
    text = json.dumps([__version__, settings], sort_keys=True)
    return "fp_" + hashlib.sha256(text.encode()).hexdigest()[:12]


@dataclass
class ServerState:
    scheduler: Scheduler
    metrics: Metrics
    model_name: str
    api_key: str | None
    limits: Limits
    fingerprint: str  # system_fingerprint(the engine's settled options)

    @property
    def engine(self) -> Engine:
        assert self.scheduler.engine is not None, "the app is built once the engine is ready"
        return self.scheduler.engine


STATE = web.AppKey("state", ServerState)
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
CLIENT_CLOSED = 499  # nginx's "client closed request": the status counted for a client that left
# Behind the key when one is set; /health stays open for load balancers and supervisors.
PUBLIC_PATHS = ("/health",)


def loggable(text: str, limit: int = 200) -> str:
    """Request-derived text as it may appear in a log line: quoted, control characters, newlines and
    lone surrogates escaped (repr), and cut at `limit` characters."""
    return repr(text if len(text) <= limit else text[:limit] + "...")


def _authorized(request: web.Request, api_key: str) -> bool:
    # aiohttp keeps bytes that are not UTF-8 as surrogate escapes; this gets the bytes back.
    sent = request.headers.get("Authorization", "").encode("utf-8", "surrogateescape")
    return hmac.compare_digest(sent, f"Bearer {api_key}".encode())


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
        if state.api_key and request.path not in PUBLIC_PATHS and not _authorized(request, state.api_key):
            raise ApiError(401, "invalid or missing API key; send the header 'Authorization: Bearer KEY'",
                           code="invalid_api_key")
        response = await handler(request)
    except ApiError as err:
        response = _error_response(err)
        if err.status == 408:
            response.force_close()  # no keep-alive: the rest of the half-sent body may still come
    except web.HTTPRequestEntityTooLarge:
        response = _error_response(ApiError(
            413, f"the request body is larger than this server's limit of {state.limits.body_bytes} bytes "
                 "(set from the context length)", code="body_too_large"))
    except web.HTTPException as err:  # the router's 404 / 405
        message = f"{err.reason}: {request.method} {ascii(request.path)[1:-1]}"
        response = _error_response(ApiError(err.status, message, code=err.reason.lower().replace(" ", "_")))
    except asyncio.CancelledError:
        state.metrics.count_request(_endpoint(request), CLIENT_CLOSED)
        raise
    except ConnectionResetError:
        # The client left while its body was read or before the response began (the reset can also surface
        # in place of the handler's cancellation): nothing to answer, and no server error.
        response = web.Response(status=CLIENT_CLOSED)
    except Exception:  # a bug: log it, answer 500 without its text, keep serving
        incident = uuid.uuid4().hex[:12]
        log.exception("incident %s: unhandled error in %s %s", incident, request.method, loggable(request.path))
        response = _error_response(ApiError(500, f"internal error (incident {incident} in the server log)"))
    state.metrics.count_request(_endpoint(request), response.status)
    return response


async def _read_json(request: web.Request) -> dict:
    timeout_s = request.app[STATE].limits.read_timeout_s
    try:
        raw = await asyncio.wait_for(request.read(), timeout_s)
    except TimeoutError:
        raise ApiError(408, f"the request body did not arrive within {timeout_s:g} s", code="body_timeout") from None
    return parse_body(raw)


def _tokenizer(engine: Engine) -> Tokenizer:
    if engine.tokenizer is None:
        raise ApiError(400, f"the model {engine.options.model} has no tokenizer.json, so this server cannot turn "
                            "text into tokens or back; send the prompt as token ids to /v1/completions",
                       code="no_tokenizer")
    return engine.tokenizer


def _check_prompt_chars(state: ServerState, chars: int) -> None:
    """A text prompt too long to fit the context, refused before it is tokenized."""
    if chars > state.limits.prompt_chars:
        raise ApiError(400, f"the prompt has {chars} characters; this server takes at most "
                            f"{state.limits.prompt_chars} ({MAX_CHARS_PER_TOKEN} per token of its "
                            f"{state.engine.options.max_context}-token context)", code="context_length_exceeded")


def _encode(engine: Engine, prompt: str | list[int] | None, messages: list[dict] | None,
            add_special_tokens: bool | None = None, add_generation_prompt: bool = True, tools: list[dict] | None = None,
            template_kwargs: dict | None = None, continue_final_message: bool = False) -> list[int]:
    """Token ids of a prompt (text, or ids as they are) or of chat messages through the chat template, the
    one path of generation requests and /tokenize. Special tokens are added to text (the tokenizer's own,
    such as BOS) but not to a rendered chat, whose template writes them, unless `add_special_tokens` says
    otherwise. Run in a worker thread: tokenizing and templating take CPU time."""
    if isinstance(prompt, list):
        return prompt
    tok = _tokenizer(engine)
    if messages is None:
        return tok.encode(prompt or "", add_special_tokens=add_special_tokens is not False)
    if tok.chat_template is None:
        raise ApiError(400, "the model has no chat template (tokenizer_config.json 'chat_template' or "
                            "chat_template.jinja); use /v1/completions with a plain prompt, or start the server "
                            "with --chat-template FILE", code="no_chat_template")
    try:
        text = tok.render_chat(messages, add_generation_prompt, tools, continue_final_message=continue_final_message,
                               **(template_kwargs or {}))
    except jinja2.TemplateError as err:  # raise_exception() calls in the template speak to the caller
        raise ApiError(400, f"the chat template could not render these messages: {err}", param="messages",
                       code="chat_template_error") from None
    except Exception as err:  # the template choked on the messages' shape: say so, the details go to the log
        log.info("the chat template failed on a request's messages: %s", loggable(f"{type(err).__name__}: {err}"))
        raise ApiError(400, "the chat template could not render these messages; check that their fields "
                            "are what a chat template expects (role and content strings)", param="messages",
                       code="chat_template_error") from None
    return tok.encode(text, add_special_tokens=bool(add_special_tokens))


def _sampling(engine: Engine, req: GenerationRequest, prompt_ids: list[int]) -> list[SamplingParams]:
    """Each choice's settings: the request's, then the engine's defaults (--generation-config), then
    OpenAI's; an absent max_tokens is bounded by the context left. With a seed, choice i takes seed + i."""
    options = engine.options
    room = options.max_context - len(prompt_ids) - options.draft_room
    try:
        params = engine.sampling_params(len(prompt_ids), defaults=OPENAI_DEFAULTS, **req.sampling)
        engine.worker.check_request(prompt_ids, params)
    except SamplingError as err:
        raise ApiError(400, str(err), param=req.param(err.field)) from None
    except ValueError as err:  # the engine's OptionsError says what to change
        wanted = req.sampling.get("max_new_tokens", 1)  # an absent max_tokens asks for at least one
        code = "context_length_exceeded" if wanted > room else None
        raise ApiError(400, str(err), code=code) from None
    if params.seed is None:
        return [params] * req.n
    return [dataclasses.replace(params, seed=params.seed + i) for i in range(req.n)]


def _token_text(engine: Engine) -> Callable[[int], str]:
    """A token id's text in log-probabilities: its own decoding, special tokens shown."""
    tok = engine.tokenizer
    if tok is None:
        return lambda token: f"token_id:{token}"
    return lambda token: tok.decode([token], skip_special_tokens=False)


async def _generate(request: web.Request, chat: bool) -> web.StreamResponse:
    state = request.app[STATE]
    body = await _read_json(request)
    req = parse_chat(body) if chat else parse_completion(body)
    if req.ignored:
        names = ", ".join(loggable(name, 64) for name in req.ignored[:10])
        more = f" and {len(req.ignored) - 10} more" if len(req.ignored) > 10 else ""
        log.info("ignored unknown request fields: %s%s", names, more)
    if not state.scheduler.healthy:
        raise state.scheduler.down_error()
    engine = state.engine
    _check_prompt_chars(state, req.text_chars)
    prompt_ids = await asyncio.to_thread(_encode, engine, req.prompt, req.messages, None, req.add_generation_prompt,
                                         template_kwargs=req.template_kwargs,
                                         continue_final_message=req.continue_final_message)
    loop = asyncio.get_running_loop()
    jobs = [Job(prompt_ids, params, loop) for params in _sampling(engine, req, prompt_ids)]
    state.scheduler.submit(jobs)
    shape = ResponseShape(chat, state.model_name, state.fingerprint, _token_text(engine))
    try:
        if req.stream:
            return await stream(request, jobs, shape, req.include_usage)
        return await collect(jobs, shape)
    finally:
        # A no-op once finished; frees the queue slots or stops generation if the client went away.
        for job in jobs:
            state.scheduler.withdraw(job)


async def completions(request: web.Request) -> web.StreamResponse:
    return await _generate(request, chat=False)


async def chat_completions(request: web.Request) -> web.StreamResponse:
    return await _generate(request, chat=True)


async def models(request: web.Request) -> web.Response:
    state = request.app[STATE]
    card = {"id": state.model_name, "object": "model", "created": int(time.time()), "owned_by": "easyspec",
            "max_model_len": state.engine.options.max_context}
    return web.json_response({"object": "list", "data": [card]})


async def tokenize(request: web.Request) -> web.Response:
    """vLLM's /tokenize: a prompt's or a chat's token ids, as a generation request would count them."""
    state = request.app[STATE]
    req = parse_tokenize(await _read_json(request))
    _check_prompt_chars(state, req.text_chars)
    engine = state.engine
    ids = await asyncio.to_thread(_encode, engine, req.prompt, req.messages, req.add_special_tokens,
                                  req.add_generation_prompt, req.tools, req.template_kwargs, req.continue_final_message)
    strs = [_tokenizer(engine).backend.id_to_token(i) for i in ids] if req.return_token_strs else None
    return web.json_response({"count": len(ids), "max_model_len": engine.options.max_context, "tokens": ids,
                              "token_strs": strs})


async def detokenize(request: web.Request) -> web.Response:
    """vLLM's /detokenize: the text of token ids, special tokens kept."""
    tok = _tokenizer(request.app[STATE].engine)
    ids = parse_detokenize(await _read_json(request), tok.vocab_size)
    text = await asyncio.to_thread(tok.decode, ids, skip_special_tokens=False)
    return web.json_response({"prompt": text})


async def version(request: web.Request) -> web.Response:
    return web.json_response({"version": __version__})


async def health(request: web.Request) -> web.Response:
    scheduler = request.app[STATE].scheduler
    if not scheduler.healthy:
        raise scheduler.down_error()
    return web.json_response({"status": "ok"})


async def metrics(request: web.Request) -> web.Response:
    state = request.app[STATE]
    scheduler = state.scheduler
    text = state.metrics.render(scheduler.waiting, scheduler.running, scheduler.healthy)
    return web.Response(body=text.encode(), headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"})


async def _exit_on_engine_failure(app: web.Application) -> None:
    """After an engine failure the server shuts down (answering what is in flight with 503) and
    `easyspec serve` exits non-zero, so that a supervisor starts a fresh one: an engine whose
    ranks fell out of step cannot be repaired in place."""
    loop = asyncio.get_running_loop()

    def begin_exit() -> None:
        raise GracefulExit  # what aiohttp's own SIGTERM handler raises

    scheduler = app[STATE].scheduler
    scheduler.on_failure = lambda: loop.call_soon_threadsafe(begin_exit)
    if not scheduler.healthy:  # failed before the server was up
        scheduler.on_failure()


async def _shutdown(app: web.Application) -> None:
    # Blocking joins belong off the event loop, which must keep delivering the final errors.
    await asyncio.to_thread(app[STATE].scheduler.stop)


def build_app(state: ServerState) -> web.Application:
    app = web.Application(middlewares=[_guard], client_max_size=state.limits.body_bytes)
    app[STATE] = state
    app.router.add_post("/v1/completions", completions)
    app.router.add_post("/v1/chat/completions", chat_completions)
    app.router.add_get("/v1/models", models)
    app.router.add_post("/tokenize", tokenize)
    app.router.add_post("/detokenize", detokenize)
    app.router.add_get("/version", version)
    app.router.add_get("/health", health)
    app.router.add_get("/metrics", metrics)
    app.on_startup.append(_exit_on_engine_failure)
    app.on_shutdown.append(_shutdown)
    return app
