"""An OpenAI-compatible HTTP server over the engine (`easyspec serve`).

Why aiohttp: it is already installed on the GPU image, while
FastAPI + uvicorn (+ starlette, pydantic) would have to be carried there as
wheels. The server needs only a few routes, JSON bodies and server-sent events,
which aiohttp does directly; request validation is a few small functions
(protocol.py) rather than a schema library.

Layout:
- cli.py: the `serve` command and its flags (registered by easyspec.cli.main).
- app.py: routes, authentication, OpenAI-shaped errors, streaming.
- protocol.py: request parsing and the response shapes; the field policy.
- scheduler.py: the single engine thread, its bounded queue, cancellation and
  stop strings.
- metrics.py: Prometheus text for /metrics.
"""
