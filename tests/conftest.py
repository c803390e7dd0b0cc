"""Shared fixtures: tiny random checkpoints written by HF transformers itself."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

if "PYTEST_XDIST_WORKER_COUNT" in os.environ:
    # `pytest -n W` runs W test processes, and many tests start 2-4 more (gloo ranks, servers): with
    # torch's default of one thread per core each, they fight over the cores and small matmuls slow
    # down tenfold. Each process gets its share instead; the children inherit it through the variable.
    _threads = str(max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])))
    os.environ.setdefault("OMP_NUM_THREADS", _threads)
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

sys.path.insert(0, str(Path(__file__).parent))

if not torch.cuda.is_available():
    # Without a GPU the Triton kernels run in Triton's CPU interpreter (tests/test_kernels.py). Triton
    # reads this when a kernel is defined, so it must be set before anything imports easyspec. Only
    # tests that switch the fused kernels on use them: CPU engines keep the reference formulas.
    os.environ.setdefault("TRITON_INTERPRET", "1")

from hf_models import make_hf_checkpoint  # noqa: E402

# A larger init spread than HF's default makes greedy continuations of random
# models vary from token to token, so equality tests compare something real.
SPREAD = dict(initializer_range=0.3)


@pytest.fixture(scope="session")
def pair_dir(tmp_path_factory) -> Path:
    """base/ (llama3 family, 4 layers), near/ (base plus noise: mostly accepted),
    far/ (unrelated 4-layer draft: mostly rejected), deep/ (8-layer draft for layer groups)."""
    root = tmp_path_factory.mktemp("pair")
    base = make_hf_checkpoint("llama3", root / "base", seed=0, num_hidden_layers=4, **SPREAD)
    make_hf_checkpoint("llama3", root / "far", seed=1, num_hidden_layers=4, **SPREAD)
    make_hf_checkpoint("llama3", root / "deep", seed=2, num_hidden_layers=8, **SPREAD)
    import torch

    with torch.no_grad():
        for p in base.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    base.save_pretrained(root / "near", safe_serialization=True)
    return root
