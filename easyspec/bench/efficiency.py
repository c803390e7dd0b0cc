"""Where a bench row's time goes: its ideal speedup, and the weight bytes it reads per token.

Ideal speedup: the speedup the row would have if it and vanilla spent no time outside their
timed decoding stages (no prefill, no host time between stages):

    ideal = vanilla's (draft + calibrate + verify) ms per token / the row's

Per token, a speculative row's stages already carry its acceptance (a round's draft, calibrate
and verify time is shared by the tokens it commits) and the real cost of drafting and of
verifying several tokens at once. So the three numbers of a row read as a chain:

- mean accepted length: the speedup if drafting were free and verifying k + 1 tokens cost one
  decoding step;
- ideal: lower by what drafting, calibration and wider verification cost (the ms/tok columns
  say which);
- measured: lower than ideal by the row's prefill and host time, relative to vanilla's
  ("other" ms/tok); measured / ideal is the share of the ideal that the run kept.

Weight bytes per token: the model bytes the decoding steps stream per generated token: the
base's weights once per verification round and the draft's once per draft forward (a chain of
k draft tokens is k draft forwards, the round's opening exact forward and k - 1 steps; a tree
of depth D is D). Each weight counts once per forward, whether tensor parallelism splits it or
layer-parallel drafting has several devices read it. The embedding table is not counted (a
lookup reads one row) but a tied LM head is; KV-cache reads come on top. An inflated
checkpoint streams its zeros too, so this is the traffic of the real shape with the trained
vocabulary.
"""

from __future__ import annotations

from easyspec.model.checkpoint import parse_dtype
from easyspec.model.config import ModelConfig
from easyspec.model.loader import load_config

LEGEND = ("ideal: the speedup with no time outside the timed stages, vanilla's (draft + calibrate + verify) ms/tok "
          "over the row's; of ideal: measured speedup / ideal (the rest is prefill and host time, 'other'). "
          "weight MB/tok: model bytes streamed per generated token (base weights per round, draft weights per "
          "draft forward).")
DRAFTING_METHODS = ("sd", "easyspec")


def decode_weight_bytes(cfg: ModelConfig, dtype: str) -> int:
    """Bytes of weights one forward reads: all but the embedding table (a tied LM head counts)."""
    embeddings = cfg.vocab_size * cfg.hidden_size
    return (cfg.num_parameters() - (0 if cfg.tie_word_embeddings else embeddings)) * parse_dtype(dtype).itemsize


def weight_mb_per_token(options: dict, stats: list[dict]) -> float | None:
    """Weight megabytes streamed per generated token over a row's prompts; None for a row without
    round counts (the HF baseline) or without a model path."""
    if options.get("method") not in (*DRAFTING_METHODS, "vanilla", "ngram") or not options.get("model"):
        return None
    if not stats or any("rounds" not in s for s in stats):
        return None
    generated = sum(s["generated"] for s in stats)
    if not generated:
        return None
    total = decode_weight_bytes(load_config(options["model"]), options["dtype"]) * sum(s["rounds"] for s in stats)
    if options["method"] in DRAFTING_METHODS and options.get("draft"):
        total += decode_weight_bytes(load_config(options["draft"]), options["dtype"]) * sum(s["drafted"] for s in stats)
    return total / generated / 1e6
