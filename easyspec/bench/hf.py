"""The HF transformers baseline row: AutoModelForCausalLM with eager attention and its own
`generate`, on the same checkpoint (folder or GGUF file), in one process on one device (never tensor-parallel).

transformers is an optional dependency: without it the row is skipped with one line.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from importlib.util import find_spec
from pathlib import Path

import torch

from easyspec.model.checkpoint import parse_dtype
from easyspec.model.loader import is_gguf
from easyspec.options import EngineOptions, SamplingParams

LABEL = "hf transformers (1 device)"


def transformers_missing() -> str | None:
    """Why the row cannot run, or None. Looked up without importing transformers (seconds of imports)."""
    if find_spec("transformers") is None:
        return "transformers is not installed (pip install transformers)"
    return None


def hf_generate(base: EngineOptions, params: SamplingParams) -> Callable[[list[int]], tuple[list[int], float, dict]]:
    """Load the base folder into HF transformers and return run(prompt ids) -> (output ids, seconds,
    stats), the shape the bench's timing loop takes. HF gives no per-stage times, so the stats hold
    no stage keys and the table shows '-' there."""
    import transformers as tf

    tf.utils.logging.set_verbosity_error()
    tf.utils.logging.disable_progress_bar()  # its loading bar would break our one-line progress bar
    device = torch.device("cuda:0" if base.device == "cuda" else "cpu")
    major, minor = (int(v) for v in tf.__version__.split(".")[:2])
    dtype_key = "dtype" if (major, minor) >= (4, 56) else "torch_dtype"  # renamed in 4.56
    path = Path(base.model)
    # transformers opens a GGUF file as its folder plus gguf_file=its name (and dequantizes it).
    folder, gguf = (path.parent, {"gguf_file": path.name}) if is_gguf(path) else (path, {})
    model = tf.AutoModelForCausalLM.from_pretrained(
        folder, **gguf, attn_implementation="eager", **{dtype_key: parse_dtype(base.dtype)}).to(device).eval()
    # The bench ignores EOS (every method generates max_new_tokens); with no eos id HF never stops early.
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    sample = params.temperature > 0
    gen_kw = dict(max_new_tokens=params.max_new_tokens, do_sample=sample)
    if sample:
        gen_kw.update(temperature=params.temperature, top_k=0, top_p=1.0)

    def run(ids: list[int]) -> tuple[list[int], float, dict]:
        x = torch.tensor([ids], device=device)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(x, attention_mask=torch.ones_like(x), **gen_kw)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        elapsed = time.perf_counter() - start
        output = out[0, len(ids):].tolist()
        n = len(output)
        return output, elapsed, {"rounds": n, "drafted": 0, "accepted": 0, "generated": n,
                                 "mean_accepted_length": 1.0, "acceptance_rate": 0.0, "total_s": elapsed,
                                 "tokens_per_s": n / elapsed}

    return run
