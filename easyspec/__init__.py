"""easyspec: lossless layer-parallel speculative decoding for tensor-parallel LLM inference."""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING

from easyspec.options import EngineOptions, SamplingParams

if TYPE_CHECKING:
    from easyspec.engine.decision import RequestFailed
    from easyspec.engine.engine import Engine, GenerationResult
    from easyspec.engine.request import Chunk, RequestOutput

__all__ = ["Chunk", "Engine", "EngineOptions", "GenerationResult", "RequestFailed", "RequestOutput",
           "SamplingParams"]
__version__ = "0.1.0"

# Engine, Chunk, GenerationResult, RequestOutput and RequestFailed bring torch with them: loaded on first use, so that
# `easyspec --help` and option parsing (easyspec.options) stay light.
_LAZY = {"Engine": "easyspec.engine.engine", "GenerationResult": "easyspec.engine.engine",
         "Chunk": "easyspec.engine.request", "RequestOutput": "easyspec.engine.request",
         "RequestFailed": "easyspec.engine.decision"}


def __getattr__(name: str) -> object:
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'easyspec' has no attribute {name!r}")
