"""easyspec: lossless layer-parallel speculative decoding for tensor-parallel LLM inference."""

from easyspec.engine.engine import Engine
from easyspec.engine.options import EngineOptions
from easyspec.engine.worker import Chunk, RequestFailed
from easyspec.verify.sampling import SamplingParams

__all__ = ["Chunk", "Engine", "EngineOptions", "RequestFailed", "SamplingParams"]
__version__ = "0.1.0"
