"""A request as the engine carries it: entering the batch (Join), running in it (Running), what
each step commits for it (Chunk, RequestOutput), and its whole generation (GenerationResult)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from easyspec.draft.base import Drafter
from easyspec.engine.stop import StopText
from easyspec.options import SamplingParams
from easyspec.runtime.stats import SpecStats
from easyspec.verify.logprobs import TokenLogprob
from easyspec.verify.penalties import TokenHistory


@dataclass
class Chunk:
    """Tokens committed by one step of generation, as they are yielded."""

    token_ids: list[int]
    text: str = ""
    finished: bool = False
    finish_reason: str | None = None  # "stop" (EOS, stop token or stop string), "length", "cancelled", "error"
    # What ended the request with "stop", as vLLM's stop_reason: the stop string, or the token of
    # stop_token_ids; None for EOS and every other reason.
    stop_reason: str | int | None = None
    stats: SpecStats = field(default_factory=SpecStats)
    logprobs: list[TokenLogprob] | None = None  # one per token of token_ids when SamplingParams.logprobs is set


@dataclass
class RequestOutput:
    """What one step committed for one request (rank 0)."""

    request_id: int
    chunk: Chunk
    error: str | None = None  # finish_reason "error": what failed, in one line; the other requests go on


@dataclass
class Join:
    """A request entering the batch, as every rank receives it."""

    request_id: int
    prompt_ids: list[int]
    params: SamplingParams
    seed: int


@dataclass
class Running:
    """One request in the batch: what its rounds share."""

    request_id: int
    row: int  # its row of the base's and the draft's KV caches
    prompt_ids: list[int]
    params: SamplingParams
    generator: torch.Generator | None  # rank 0's, for the tokens it samples from the base
    stats: SpecStats
    text: StopText | None  # rank 0's stop-string watcher and detokenizer
    history: TokenHistory  # the committed tokens, as penalties and min_tokens read them
    drafter: Drafter | None  # None: plain decoding, or a rank that does not draft
    num_draft: int  # draft tokens along one path in its next round
    begin: float
    prefilled: int = 0  # prompt tokens read so far
    started: bool = False  # the prompt is read and its first token committed
    position: int = 0  # where the newest committed token sits
    last: int = 0  # the newest committed token
    cancel: bool = False  # rank 0: end it at its next decision
    failure: Exception | None = None  # what a step of rank 0's raised for it
    logprobs: list[TokenLogprob] | None = None  # rank 0: the candidates' of the last step, when asked for
    finished: bool = False


@dataclass
class GenerationResult:
    """One prompt's whole generation (Engine.generate_many)."""

    prompt_ids: list[int]
    token_ids: list[int]
    text: str
    finish_reason: str | None
    stop_reason: str | int | None  # the stop string or stop token that ended it (vLLM's stop_reason); else None
    stats: SpecStats
    logprobs: list[TokenLogprob] | None = None  # one per token when SamplingParams.logprobs is set
