"""Edges of batched decoding (issue 22) that the main batch tests do not reach: a tree near the end
of a row whose context is not a multiple of the KV bucket, a request cancelled while its prompt is
still being read, a follower that dies between steps, and the engine's bookkeeping when generate()
iterators (closed, collected, interrupted) and step() callers share it."""

from __future__ import annotations

import gc
import os
import signal

import pytest
from conftest import SPREAD
from engine_cases import options, run
from hf_models import make_hf_checkpoint

import easyspec.engine.worker as worker_module
from easyspec import Engine, SamplingParams
from easyspec.engine.engine import WorkerFailure

GREEDY = SamplingParams(max_new_tokens=8, ignore_eos=True)


@pytest.fixture(scope="module")
def long_pair(tmp_path_factory):
    """base/ and near/ (base plus noise) reaching 1024 positions: room for contexts past one KV bucket and
    prompts longer than a prefill chunk."""
    import torch

    root = tmp_path_factory.mktemp("long-pair")
    base = make_hf_checkpoint("llama3", root / "base", seed=0, num_hidden_layers=2, max_position_embeddings=1024,
                              **SPREAD)
    with torch.no_grad():
        for p in base.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    base.save_pretrained(root / "near", safe_serialization=True)
    return root


def test_tree_near_the_end_of_a_later_row(long_pair):
    """--max-context 300: a tree past slot 256 has a row-local mask 512 wide (rounded up to the KV
    bucket), which runs past the cache for the last row. The request in row 1 still gets, token for
    token, what it gets alone in row 0."""
    long_prompt = [(7 * i) % 120 + 1 for i in range(250)]
    with Engine(options(long_pair, method="sd", draft="near", tree_width=2, tree_depth=3, draft_token_budget=64,
                        max_num_seqs=2, max_context=300)) as engine:
        alone = run(engine, long_prompt, GREEDY)[0]
        results = engine.generate_many([[1, 2, 3], long_prompt], GREEDY, progress=False)
    assert results[1].token_ids == alone
    assert results[1].stats.rounds > 0 and results[1].stats.drafted > 0  # it went through tree rounds


def test_closing_a_generator_after_its_last_chunk(pair_dir):
    """Stopping at the chunk that says finished, then closing (or dropping) the generator, is the end of
    it: nothing raises, and a request another caller added runs on, its outputs left for step()."""
    with Engine(options(pair_dir, method="vanilla", max_num_seqs=2)) as engine:
        expected = run(engine, [5, 6, 7], SamplingParams(max_new_tokens=30, ignore_eos=True))[0]
        other = engine.add_request([5, 6, 7], SamplingParams(max_new_tokens=30, ignore_eos=True))
        generation = engine.generate([1, 2, 3], GREEDY)
        for chunk in generation:
            if chunk.finished:
                break
        generation.close()
        tokens = []
        while engine.has_unfinished():
            for out in engine.step():
                assert out.request_id == other
                tokens += out.chunk.token_ids
        assert tokens == expected


def test_outputs_a_generator_stepped_past_count_as_unfinished(pair_dir):
    """A request added with add_request that a generate() ran to its end: has_unfinished() stays True
    until step() has handed out its outputs, the last one finished."""
    with Engine(options(pair_dir, method="vanilla", max_num_seqs=2)) as engine:
        other = engine.add_request([5, 6, 7], SamplingParams(max_new_tokens=3, ignore_eos=True))
        run(engine, [1, 2, 3], SamplingParams(max_new_tokens=10, ignore_eos=True))
        assert engine.num_running == engine.num_waiting == 0
        assert engine.has_unfinished()
        outputs = []
        while engine.has_unfinished():
            outputs += engine.step()
        assert [out.request_id for out in outputs] == [other] * 3
        assert outputs[-1].chunk.finished and len([t for o in outputs for t in o.chunk.token_ids]) == 3


def _cancel_while_reading(engine: Engine, long_prompt: list[int]) -> None:
    """A request decodes; a long prompt joins and reads its first chunk; it is aborted, and a third
    request comes: the next step ends the long one ("cancelled", no tokens), reading no more of it,
    and reads the third's prompt instead."""
    params = SamplingParams(max_new_tokens=12, ignore_eos=True)
    running = engine.add_request([1, 2, 3], params)
    engine.step()
    reader = engine.add_request(long_prompt, params)
    assert {out.request_id for out in engine.step()} == {running}  # the first chunk of the long prompt
    engine.abort(reader)
    third = engine.add_request([4, 5, 6, 7], params)
    outs = {out.request_id: out for out in engine.step()}
    assert outs[reader].chunk.finished and outs[reader].chunk.finish_reason == "cancelled"
    assert outs[reader].chunk.token_ids == []
    assert outs[third].chunk.token_ids  # its prompt was read, and its first token came, in that same step
    while engine.has_unfinished():
        engine.step()


def test_cancel_while_the_prompt_is_read_in_chunks(pair_dir, monkeypatch):
    """With 8-token chunks, a cancelled 40-token prompt is not read to its end before it ends; the
    others are untouched."""
    monkeypatch.setattr(worker_module, "PREFILL_CHUNK", 8)
    long_prompt = [(7 * i) % 120 + 1 for i in range(40)]
    params = SamplingParams(max_new_tokens=12, ignore_eos=True)
    with Engine(options(pair_dir, method="sd", draft="near", max_num_seqs=3)) as engine:
        expected = run(engine, [4, 5, 6, 7], params)[0]
        _cancel_while_reading(engine, long_prompt)
        assert run(engine, [4, 5, 6, 7], params)[0] == expected


def test_cancel_while_reading_on_two_processes(long_pair):
    """The same with the real chunk (PREFILL_CHUNK tokens) on 2 processes: rank 1 learns of the
    cancel too, so both ranks drop the prompt at the same step and stay in step afterwards."""
    long_prompt = [(7 * i) % 120 + 1 for i in range(worker_module.PREFILL_CHUNK + 100)]
    params = SamplingParams(max_new_tokens=12, ignore_eos=True)
    with Engine(options(long_pair, method="sd", draft="near", draft_tp=2, devices=2, max_num_seqs=3,
                        max_context=1024, timeout_s=60)) as engine:
        expected = run(engine, [4, 5, 6, 7], params)[0]
        _cancel_while_reading(engine, long_prompt)
        assert run(engine, [4, 5, 6, 7], params)[0] == expected


def test_a_follower_killed_between_steps_is_a_worker_failure(pair_dir):
    """The pipe to the followers is written at every step: after a follower dies, the next step raises
    WorkerFailure naming it, not the pipe's BrokenPipeError."""
    failures: list[str] = []
    engine = Engine(options(pair_dir, method="sd", draft="near", devices=2, max_num_seqs=2, timeout_s=30),
                    on_worker_failure=failures.append)
    try:
        params = SamplingParams(max_new_tokens=50, ignore_eos=True)
        engine.add_request([1, 2, 3], params)
        engine.add_request([4, 5], params)
        engine.step()
        follower = engine.followers.procs[0]
        os.kill(follower.pid, signal.SIGKILL)
        follower.join(10)
        with pytest.raises(WorkerFailure, match="worker rank 1 failed"):
            engine.step()
    finally:
        engine.close()


def test_a_generator_the_garbage_collector_closes_inside_a_step(pair_dir, monkeypatch):
    """A started generate() that only a reference cycle holds is closed whenever the collector runs,
    which may be inside a step: its request is cancelled there without a step starting inside the
    step, and no step() caller ever gets one of its outputs; the other request is untouched."""
    params = SamplingParams(max_new_tokens=12, ignore_eos=True)
    with Engine(options(pair_dir, method="sd", draft="near", max_num_seqs=2)) as engine:
        expected = run(engine, [4, 5], params)[0]

        class Holder:
            pass

        holder = Holder()
        holder.cycle, holder.generation = holder, engine.generate([1, 2, 3], params)
        next(holder.generation)  # queued, admitted, its first token out
        del holder
        other = engine.add_request([4, 5], params)
        real_step, depth = engine.worker.step, []

        def step_with_a_collection():  # the collector runs at some allocation inside the step
            assert not depth, "a step started inside a step"
            depth.append(1)
            try:
                gc.collect()
                return real_step()
            finally:
                depth.pop()

        monkeypatch.setattr(engine.worker, "step", step_with_a_collection)
        outputs = []
        while engine.has_unfinished():
            outputs += engine.step()
        assert {out.request_id for out in outputs} == {other}
        assert [t for out in outputs for t in out.chunk.token_ids] == expected
        assert engine.num_running == engine.num_waiting == 0


def test_an_interrupted_generate_many_leaves_nothing_running(pair_dir, monkeypatch):
    """Ctrl-C in the middle of generate_many: its requests are cancelled (those running end at their
    next decision), none of their outputs reaches a later step() caller, and the engine serves on."""
    params = SamplingParams(max_new_tokens=30, ignore_eos=True)
    with Engine(options(pair_dir, method="sd", draft="near", max_num_seqs=2)) as engine:
        expected = run(engine, [4, 5], params)[0]
        real_step, calls = engine.worker.step, []

        def interrupted_step():
            calls.append(1)
            if len(calls) == 3:
                raise KeyboardInterrupt
            return real_step()

        monkeypatch.setattr(engine.worker, "step", interrupted_step)
        with pytest.raises(KeyboardInterrupt):
            engine.generate_many([[1, 2, 3], [5, 9, 4], [7, 7, 7]], params, progress=False)
        outputs = []
        while engine.has_unfinished():
            outputs += engine.step()
        assert outputs == [] and engine.num_running == engine.num_waiting == 0
        assert run(engine, [4, 5], params)[0] == expected
