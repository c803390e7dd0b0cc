"""`easyspec serve`: the engine flags of `generate`, plus where and how to listen."""

from __future__ import annotations

import argparse
import logging
import os
import socket
from pathlib import Path

from easyspec.cli.args import HelpFormatter, add_engine_args, options_from_args
from easyspec.options import EngineOptions

log = logging.getLogger("easyspec.server")
API_KEY_ENV = "EASYSPEC_API_KEY"
# Exit status after an engine failure, for a supervisor to restart the server on.
ENGINE_FAILED_EXIT = 3


class EscapingFormatter(logging.Formatter):
    """Log lines whose message has its control characters (newlines too) and lone surrogates escaped:
    text that came from a request (a field name, a path, the access log's User-Agent) can neither
    forge a line of its own nor restyle a terminal. Tracebacks, added after the message, keep their lines."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        if not record.message.isprintable():
            record.message = "".join(c if c.isprintable() else ascii(c)[1:-1] for c in record.message)
        return super().formatMessage(record)


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the `serve` command; called by easyspec.cli.main while it builds the parser."""
    p = subparsers.add_parser("serve", help="serve an OpenAI-compatible HTTP API (streaming) over the engine",
                              description="Loads the model (and draft) and answers /v1/completions, "
                                          "/v1/chat/completions, /v1/models, /health, /metrics, and vLLM's "
                                          "/tokenize, /detokenize and /version; needs the "
                                          "[serve] extra (aiohttp): pip install 'easyspec[serve]'.",
                              formatter_class=HelpFormatter)
    add_engine_args(p)
    g = p.add_argument_group("server")
    g.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    g.add_argument("--port", type=int, default=8000, help="TCP port to listen on")
    g.add_argument("--api-key", default=os.environ.get(API_KEY_ENV),
                   help=f"require 'Authorization: Bearer KEY' on every path but /health (default: ${API_KEY_ENV}, "
                        f"which is preferred: a flag is visible to every user in `ps`)")
    g.add_argument("--max-queue", type=int, default=16,
                   help="requests that may wait while --max-num-seqs run; more get 429")
    g.add_argument("--read-timeout", type=float, default=30.0,
                   help="seconds a client has to send a request body; a slower one gets 408")
    g.add_argument("--served-model-name",
                   help="model name in responses and /v1/models (default: the folder or file name)")
    p.set_defaults(func=cmd_serve)


def _bind(host: str, port: int) -> socket.socket:
    """Claim the address before the (slow) engine load, so a busy port fails at once. The socket
    only listens once the engine is ready: until then connections are refused, not left hanging."""
    if not 0 <= port < 65536:
        raise ValueError(f"--port must be between 0 and 65535, got {port}")
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
    except OSError as err:
        reason = err.strerror or str(err)
        raise ValueError(f"cannot listen on {host}:{port} ({reason}); pick another --port or --host") from None
    return sock


def cmd_serve(args: argparse.Namespace) -> int:
    from easyspec.parallel.launch import torchrun_rank

    handler = logging.StreamHandler()
    handler.setFormatter(EscapingFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=logging.INFO, handlers=[handler])
    if torchrun_rank():
        raise ValueError("easyspec serve starts its own worker processes; run it without torchrun, "
                         "with --devices N")
    if args.max_queue < 1:
        raise ValueError(f"--max-queue must be at least 1, got {args.max_queue}")
    if not 0 < args.read_timeout < float("inf"):
        raise ValueError(f"--read-timeout must be a positive number of seconds, got {args.read_timeout}")
    try:
        import aiohttp  # noqa: F401  (checked here for a clear message; used by easyspec.server.app)
    except ImportError:
        raise ValueError("easyspec serve needs aiohttp: pip install 'easyspec[serve]'") from None
    _check_api_key(args.api_key)
    options = options_from_args(args)
    name = args.served_model_name or Path(options.model).resolve().name
    sock = _bind(args.host, args.port)
    if args.api_key is None and not _loopback(sock):
        log.warning("listening on %s without an API key: anyone who reaches the port can use it; set %s",
                    args.host, API_KEY_ENV)
    return serve(options, sock, args.api_key, args.max_queue, name, args.read_timeout)


def _check_api_key(key: str | None) -> None:
    if key is None:
        return
    if not key:
        raise ValueError(f"the API key is empty (--api-key or ${API_KEY_ENV}); set a key, or unset both to serve "
                         "without one")
    if not all("!" <= c <= "~" for c in key):
        raise ValueError("the API key must be printable ASCII without spaces, as it travels in an HTTP header")


def _loopback(sock: socket.socket) -> bool:
    host = sock.getsockname()[0]
    return host in ("::1", "localhost") or host.startswith("127.")


def serve(options: EngineOptions, sock: socket.socket, api_key: str | None, max_queue: int, model_name: str,
          read_timeout_s: float) -> int:
    """Load the engine, then answer HTTP on `sock` until SIGINT / SIGTERM (exit status 0) or an engine
    failure (ENGINE_FAILED_EXIT, for a supervisor to restart the server on)."""
    from aiohttp import web

    from easyspec.engine.engine import Engine
    from easyspec.server.app import Limits, ServerState, build_app, system_fingerprint
    from easyspec.server.metrics import Metrics
    from easyspec.server.scheduler import Scheduler

    metrics = Metrics(model_name)
    scheduler = Scheduler(lambda on_failure: Engine(options, on_worker_failure=on_failure), max_queue, metrics)
    engine = scheduler.start()
    limits = Limits.for_context(engine.options.max_context, read_timeout_s)
    app = build_app(ServerState(scheduler, metrics, model_name, api_key, limits, system_fingerprint(engine.options)))
    host, port = sock.getsockname()[:2]
    log.info("serving %s (method %s, %d device%s, context %d, %d sequences at once) on http://%s:%d; limits: %d "
             "prompt characters, %d body bytes", model_name, options.method, options.devices,
             "" if options.devices == 1 else "s", engine.options.max_context, engine.options.max_num_seqs, host,
             port, limits.prompt_chars, limits.body_bytes)
    web.run_app(app, sock=sock, print=None, handler_cancellation=True, shutdown_timeout=5.0)
    return ENGINE_FAILED_EXIT if scheduler.failure else 0
