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


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the `serve` command; called by easyspec.cli.main while it builds the parser."""
    p = subparsers.add_parser("serve", help="serve an OpenAI-compatible HTTP API (streaming) over the engine",
                              description="Loads the model (and draft) and answers /v1/completions, "
                                          "/v1/chat/completions, /v1/models, /health and /metrics; needs the "
                                          "[serve] extra (aiohttp): pip install 'easyspec[serve]'.",
                              formatter_class=HelpFormatter)
    add_engine_args(p)
    g = p.add_argument_group("server")
    g.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    g.add_argument("--port", type=int, default=8000, help="TCP port to listen on")
    g.add_argument("--api-key", default=os.environ.get("EASYSPEC_API_KEY"),
                   help="require 'Authorization: Bearer KEY' on /v1/* (default: $EASYSPEC_API_KEY, else none)")
    g.add_argument("--max-queue", type=int, default=16,
                   help="requests that may wait behind the running one; more get 429")
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

    if torchrun_rank():
        raise ValueError("easyspec serve starts its own worker processes; run it without torchrun, "
                         "with --devices N")
    if args.max_queue < 1:
        raise ValueError(f"--max-queue must be at least 1, got {args.max_queue}")
    try:
        import aiohttp  # noqa: F401  (checked here for a clear message; used by easyspec.server.app)
    except ImportError:
        raise ValueError("easyspec serve needs aiohttp: pip install 'easyspec[serve]'") from None
    options = options_from_args(args)
    name = args.served_model_name or Path(options.model).resolve().name
    sock = _bind(args.host, args.port)
    return serve(options, sock, args.api_key, args.max_queue, name)


def serve(options: EngineOptions, sock: socket.socket, api_key: str | None, max_queue: int, model_name: str) -> int:
    """Load the engine, then answer HTTP on `sock` until SIGINT / SIGTERM."""
    from aiohttp import web

    from easyspec.engine.engine import Engine
    from easyspec.server.app import ServerState, build_app
    from easyspec.server.metrics import Metrics
    from easyspec.server.scheduler import Scheduler

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    metrics = Metrics(model_name)
    scheduler = Scheduler(lambda on_failure: Engine(options, on_worker_failure=on_failure), max_queue, metrics)
    engine = scheduler.start()
    app = build_app(ServerState(scheduler, metrics, model_name, api_key))
    host, port = sock.getsockname()[:2]
    log.info("serving %s (method %s, %d device%s, context %d) on http://%s:%d", model_name, options.method,
             options.devices, "" if options.devices == 1 else "s", engine.options.max_context, host, port)
    web.run_app(app, sock=sock, print=None, handler_cancellation=True, shutdown_timeout=5.0)
    return 0
