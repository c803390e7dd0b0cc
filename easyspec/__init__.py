"""easyspec: lossless layer-parallel speculative decoding for tensor-parallel LLM inference."""

from easyspec.engine.engine import Engine
from easyspec.engine.worker import Chunk
from easyspec.options import EngineOptions
from easyspec.verify.sampling import SamplingParams

__all__ = ["Chunk", "Engine", "EngineOptions", "SamplingParams"]
__version__ = "0.1.0"
