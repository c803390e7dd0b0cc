"""The CUDA-graph bookkeeping of the step runner, exercised on the CPU.

A captured graph is replaced by a stand-in that, on replay, re-runs the captured
function over the same input buffers and writes into the same output tensor. That
keeps what the runner itself is responsible for -- which inputs are copied into
which buffers, what the warm-up runs write, one graph per key reused across calls
and requests, output buffers overwritten by the next replay -- and the engine's
outputs in graph mode must equal its eager outputs token for token.
"""

from __future__ import annotations

import pytest
import torch
from engine_cases import PROMPTS, options, run

from easyspec import Engine, EngineOptions
from easyspec.model.checkpoint import load_model
from easyspec.runtime import runner


class ReplayingGraph:
    def __init__(self, fn, out) -> None:
        self.fn, self.out = fn, out

    def replay(self) -> None:
        result = self.fn()
        if self.out is not None:
            self.out.copy_(result)


@pytest.fixture
def fake_graphs(monkeypatch):
    captured = []

    def capture(fn, pool=None):
        for _ in range(2):  # the warm-up runs of capture_graph
            fn()
        out = fn()  # a real capture runs nothing; this run repeats the warm-up's writes
        captured.append(out)
        return ReplayingGraph(fn, out), out

    monkeypatch.setattr(runner, "graphs_supported", lambda device: True)
    monkeypatch.setattr(runner, "new_graph_pool", lambda: None)
    monkeypatch.setattr(runner, "capture_graph", capture)
    return captured


def test_prefill_and_decode_in_graph_mode_match_the_full_forward(pair_dir, fake_graphs):
    """Two prompts and decode steps that cross a span boundary (256 slots), so one piece or step
    length runs with two cache spans: a graph keyed without its span would read too few slots."""
    model = load_model(pair_dir / "base")
    tokens = torch.randint(0, 128, (320,), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        full = model(tokens, torch.arange(320))  # [320, V]
    steps = runner.ModelRunner(model, max_len=600, use_graphs=True)
    assert steps.use_graphs
    for _ in range(2):  # the second pass replays the graphs the first captured
        # 250 = 128 + 64 + 32 + 16 + 8 + 2, all reading 256 slots; then two tokens a step across 256.
        torch.testing.assert_close(steps.prefill(tokens[:250]), full[249], atol=1e-4, rtol=1e-5)
        for pos in range(250, 262, 2):
            torch.testing.assert_close(steps.forward(tokens[pos : pos + 2], pos), full[pos : pos + 2],
                                       atol=1e-4, rtol=1e-5)
        # 300 = 256 + 32 + 8 + 4: the 32-token piece now reads 512 slots.
        torch.testing.assert_close(steps.prefill(tokens[:300]), full[299], atol=1e-4, rtol=1e-5)
    assert {key[:2] for key in steps._graphs if key[2] > 256} == {("exact", 2), ("prefill", 32), ("prefill", 8),
                                                                  ("prefill", 4)}
    assert len(fake_graphs) == len(steps._graphs)


CONFIGS = [
    dict(method="vanilla"),
    dict(method="sd", draft="near", num_draft=3),
    dict(method="sd", draft="far", num_draft=4, tree_width=2, tree_depth=3),
    dict(method="easyspec", draft="deep", layer_parallel=1),
]


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: "-".join(f"{v}" for v in c.values()))
def test_engine_in_graph_mode_equals_eager_plain_decoding(pair_dir, fake_graphs, config):
    with Engine(EngineOptions(model=str(pair_dir / "base"), cuda_graphs=False)) as engine:
        expected = [run(engine, p)[0] for p in PROMPTS]
    with Engine(options(pair_dir, **config)) as engine:
        assert engine.worker.base.use_graphs
        for _ in range(2):  # once capturing, once replaying
            assert [run(engine, p)[0] for p in PROMPTS] == expected
    assert fake_graphs


def test_each_capture_is_logged_on_the_driver(pair_dir, fake_graphs, caplog):
    """A line per captured graph (the first requests are slower: this says why), none without progress."""
    caplog.set_level("INFO", logger="easyspec")
    logged = {}
    for progress in (True, False):
        caplog.clear()
        fake_graphs.clear()
        with Engine(options(pair_dir, draft="near", method="sd", progress=progress)) as engine:
            run(engine, PROMPTS[0])
        logged[progress] = [r.getMessage() for r in caplog.records
                            if r.getMessage().startswith("captured a CUDA graph")]
        assert len(logged[progress]) == (len(fake_graphs) if progress else 0) and fake_graphs
    # The 3-token prompt, padded to a power of two.
    assert any(line.startswith("captured a CUDA graph: base prefill step, 4 tokens, 256 cache slots (")
               for line in logged[True])
    assert any(line.startswith("captured a CUDA graph: draft ") for line in logged[True])
