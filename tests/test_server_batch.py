"""`easyspec serve` with a batch: concurrent clients decode together (--max-num-seqs), each
getting, token for token, what it gets alone; the rest queue; a client that leaves frees its
sequence slot without disturbing the others. A real server on tiny random models.

Held streams (huge max_tokens, first chunk read, then left unread) keep sequence slots busy
for as long as a test needs: the engine keeps decoding them, unread, until they are closed."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path

import openai
import pytest
import torch
from hf_models import make_hf_checkpoint
from server_utils import PROMPTS, SPREAD, VOCAB, Server, follower_pids, make_model_dirs, start, write_tokenizer

HOLD_TOKENS = 15000  # far more than a test runs for: a held stream never ends on its own


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory) -> dict[str, Path]:
    """make_model_dirs' models; slow/: context 16384, for held streams; draft/: slow/ with its weights
    perturbed, a draft whose tokens are often but not always accepted."""
    dirs = make_model_dirs(tmp_path_factory.mktemp("serve-batch"))
    root = dirs["root"]
    slow = make_hf_checkpoint("llama3", root / "slow", seed=7, max_position_embeddings=16384, **SPREAD)
    write_tokenizer(root / "slow", None)
    generator = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for weight in slow.parameters():
            weight.add_(torch.randn(weight.shape, generator=generator) * 0.01)
    slow.save_pretrained(root / "draft", safe_serialization=True)
    return {**dirs, "slow": root / "slow", "draft": root / "draft"}


@pytest.fixture(scope="module")
def server(request, model_dirs) -> Server:
    """Four sequences at once, two more may wait; speculative decoding with a draft that is sometimes wrong."""
    return start(request, model_dirs, "--model", str(model_dirs["slow"]), "--draft", str(model_dirs["draft"]),
                 "--method", "sd", "--num-draft", "3", "--max-context", "16384", "--max-num-seqs", "4",
                 "--max-queue", "2")


def generate(client: openai.OpenAI, prompt: str, max_tokens: int, stream: bool) -> tuple[list[int], str]:
    """A greedy completion's token ids (from its log-probabilities' tokens: VOCAB is one word per id) and text."""
    kw = dict(model="m", prompt=prompt, max_tokens=max_tokens, temperature=0, logprobs=0,
              extra_body={"ignore_eos": True})
    if stream:
        chunks = [c.choices[0] for c in client.completions.create(stream=True, **kw)]
    else:
        chunks = client.completions.create(**kw).choices
    assert chunks[-1].finish_reason == "length"
    tokens = [t for c in chunks if c.logprobs for t in c.logprobs.tokens]
    return [VOCAB.index(t) for t in tokens], "".join(c.text for c in chunks)


def hold(client: openai.OpenAI, prompt: str, max_tokens: int = HOLD_TOKENS) -> openai.Stream:
    """A stream that has started decoding (its first chunk is read), left open and unread."""
    stream = client.completions.create(model="m", prompt=prompt, max_tokens=max_tokens, temperature=0, stream=True,
                                       extra_body={"ignore_eos": True})
    next(iter(stream))
    return stream


def concurrently(calls: list[Callable[[], object]]) -> list[object]:
    """Run the calls in threads released together; their results in order (an exception is a result)."""
    results: list[object] = [None] * len(calls)
    barrier = threading.Barrier(len(calls))

    def run(i: int) -> None:
        barrier.wait()
        try:
            results[i] = calls[i]()
        except Exception as err:  # an exception in a thread would otherwise be lost
            results[i] = err

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(calls))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    return results


def wait_for(server: Server, running: int, waiting: int, timeout_s: float = 60.0) -> dict[str, float]:
    """/metrics once the gauges read `running` and `waiting` (cancellations take effect at the next step)."""
    deadline = time.monotonic() + timeout_s
    while True:
        samples = server.metrics()
        got = (samples["easyspec_num_requests_running"], samples["easyspec_num_requests_waiting"])
        if got == (running, waiting):
            return samples
        if time.monotonic() > deadline:
            pytest.fail(f"running, waiting = {got}, expected {(running, waiting)}")
        time.sleep(0.05)


def delta(before: dict[str, float], after: dict[str, float], key: str) -> float:
    return after.get(key, 0) - before.get(key, 0)


CANCELLED = 'easyspec_request_finished_total{finish_reason="cancelled"}'
LENGTH = 'easyspec_request_finished_total{finish_reason="length"}'


def test_concurrent_clients_get_what_they_get_alone(server):
    """Three clients, two streaming, decode beside a held stream (so every step they take is batched)
    and each gets the token ids and text it gets alone."""
    client = server.client()
    cases = [(PROMPTS[0], 40, True), (PROMPTS[3], 25, False), (PROMPTS[6], 33, True)]
    alone = [generate(client, *case) for case in cases]
    assert len({tuple(ids) for ids, _ in alone}) == len(cases)  # each prompt its own answer
    before = server.metrics()
    held = hold(client, PROMPTS[9])
    together = concurrently([lambda case=case: generate(client, *case) for case in cases])
    held.close()
    assert together == alone
    after = wait_for(server, 0, 0)
    steps = delta(before, after, "easyspec_batch_size_count")
    assert steps - delta(before, after, 'easyspec_batch_size_bucket{le="1.0"}') > 0  # steps of 2 or more sequences
    acceptance = delta(before, after, "easyspec_request_mean_acceptance_length_count")
    assert acceptance == 4 and delta(before, after, LENGTH) == 3 and delta(before, after, CANCELLED) == 1


def test_running_gauge_queue_and_slot_reuse(server):
    """Four held streams run together; two more wait; a seventh is refused 429; closing a running one
    gives its slot to the first waiting."""
    client = server.client()
    before = server.metrics()
    running = [hold(client, PROMPTS[i]) for i in range(4)]
    assert server.metrics()["easyspec_num_requests_running"] == 4
    waiting = [client.completions.create(model="m", prompt=PROMPTS[i], max_tokens=HOLD_TOKENS, stream=True,
                                         extra_body={"ignore_eos": True}) for i in (4, 5)]
    wait_for(server, 4, 2)
    with pytest.raises(openai.RateLimitError, match="queue is full"):
        client.completions.create(model="m", prompt=PROMPTS[6], max_tokens=4)
    running.pop(0).close()
    wait_for(server, 4, 1)
    next(iter(waiting[0]))  # it decodes in the freed slot
    for stream in running + waiting:
        stream.close()
    after = wait_for(server, 0, 0)
    assert delta(before, after, CANCELLED) == 6
    assert delta(before, after, 'easyspec_requests_total{endpoint="/v1/completions",status="429"}') == 1


def test_disconnect_mid_stream_leaves_the_others_intact(server):
    """A client leaves while three others stream (one of them waiting for a slot, which it gets from
    the leaver or from another that ends): they end exactly as they do alone."""
    client = server.client()
    cases = [(PROMPTS[1], 300, True), (PROMPTS[2], 30, True), (PROMPTS[5], 20, True)]
    alone = [generate(client, *case) for case in cases]
    before = server.metrics()
    leaving, held = hold(client, PROMPTS[7]), hold(client, PROMPTS[8])
    results = concurrently([*(lambda case=case: generate(client, *case) for case in cases), leaving.close])
    assert results[:3] == alone
    held.close()
    after = wait_for(server, 0, 0)
    assert (delta(before, after, CANCELLED), delta(before, after, LENGTH)) == (2, 3)


def test_sigterm_answers_running_and_waiting_requests_then_exits_0(request, model_dirs):
    """Shutting down mid-batch: the running streams and the waiting one each get a 503 saying so, the
    engine ends its batch between steps, and the server exits 0."""
    server = start(request, model_dirs, "--model", str(model_dirs["slow"]), "--max-context", "16384",
                   "--max-num-seqs", "2", "--max-queue", "1")
    client = server.client()
    streams = [hold(client, PROMPTS[0]), hold(client, PROMPTS[1])]
    streams.append(client.completions.create(model="m", prompt=PROMPTS[2], max_tokens=HOLD_TOKENS, stream=True))
    wait_for(server, 2, 1)
    server.proc.send_signal(signal.SIGTERM)
    for stream in streams:
        with pytest.raises(openai.APIError, match="shutting down"):
            for _ in stream:
                pass
    assert server.wait_exit() == 0


@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="finds the worker process through /proc")
def test_two_devices_concurrent_clients_then_worker_failure(request, model_dirs):
    """Two ranks over gloo: concurrent clients (beside a held stream, which then leaves) get what they
    get alone; when a worker dies, every running and waiting request gets 503 and the server exits 3."""
    server = start(request, model_dirs, "--model", str(model_dirs["slow"]), "--max-context", "16384", "--devices", "2",
                   "--method", "ngram", "--max-num-seqs", "3", "--max-queue", "2", "--timeout", "20")
    client = server.client()
    cases = [(PROMPTS[4], 30, True), (PROMPTS[5], 24, False), (PROMPTS[8], 20, True)]
    alone = [generate(client, *case) for case in cases]
    held = hold(client, PROMPTS[9])
    assert concurrently([lambda case=case: generate(client, *case) for case in cases[:2]]) == alone[:2]
    held.close()
    # The ranks stay in step through the abort: the next request gets its answer, and both ranks finish it.
    assert generate(client, *cases[2]) == alone[2]

    streams = [hold(client, PROMPTS[i]) for i in range(3)]
    streams.append(client.completions.create(model="m", prompt=PROMPTS[3], max_tokens=HOLD_TOKENS, stream=True))
    wait_for(server, 3, 1)
    (follower,) = follower_pids(server.proc.pid)
    os.kill(follower, 9)
    for stream in streams:
        with pytest.raises(openai.APIError, match="engine is down"):
            for _ in stream:
                pass
    assert server.wait_exit() == 3
