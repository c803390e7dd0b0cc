"""`easyspec serve` end to end: a real server subprocess on tiny random models,
driven by the official openai client (and raw HTTP for malformed requests)."""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

import openai
import pytest
from hf_models import make_hf_checkpoint
from server_utils import (
    API_KEY,
    CHAT_TEMPLATE,
    PROMPTS,
    SPREAD,
    WORDS,
    Server,
    complete,
    error_of,
    follower_pids,
    http,
    make_model_dirs,
    start,
    write_tokenizer,
)


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory) -> dict[str, Path]:
    return make_model_dirs(tmp_path_factory.mktemp("serve"))


@pytest.fixture(scope="module")
def spec_server(request, model_dirs) -> Server:
    """Speculative decoding, the base model drafting for itself: every greedy draft token is accepted."""
    base = str(model_dirs["base"])
    return start(request, model_dirs, "--model", base, "--draft", base, "--method", "sd", "--num-draft", "3",
                 "--max-queue", "32", "--served-model-name", "tiny", api_key=API_KEY)


@pytest.fixture(scope="module")
def queue_server(request, model_dirs) -> Server:
    """One sequence at a time, one more may wait."""
    return start(request, model_dirs, "--model", str(model_dirs["long"]), "--max-num-seqs", "1", "--max-queue", "1")


def test_health_and_models(spec_server):
    assert spec_server.get("/health").json() == {"status": "ok"}
    listing = spec_server.client().models.list()
    assert [m.id for m in listing.data] == ["tiny"]


def test_completion_returns_text_usage_and_spec_stats(spec_server):
    out = complete(spec_server.client(), PROMPTS[0], extra_body={"ignore_eos": True})
    choice = out.choices[0]
    assert out.model == "tiny" and out.object == "text_completion"
    assert choice.finish_reason == "length" and choice.text.strip()
    assert out.usage.prompt_tokens == len(PROMPTS[0].split()) and out.usage.completion_tokens == 12
    stats = out.model_extra["easyspec"]
    assert stats["generated"] == 12 and stats["drafted"] > 0 and stats["accepted"] > 0
    assert stats["mean_accepted_length"] == pytest.approx(1 + stats["accepted"] / stats["rounds"], abs=1e-3)


def test_token_id_prompt_equals_text_prompt(spec_server):
    client = spec_server.client()
    ids = [WORDS.index(w) + 7 for w in PROMPTS[1].split()]  # ids of the words in write_tokenizer's vocab
    assert complete(client, ids).choices[0].text == complete(client, PROMPTS[1]).choices[0].text


@pytest.mark.parametrize("chat", [False, True], ids=["completions", "chat"])
def test_stream_concatenates_to_the_full_answer(spec_server, chat):
    client = spec_server.client()
    kw = dict(model="tiny", max_tokens=20, temperature=0, extra_body={"ignore_eos": True})
    if chat:
        messages = [{"role": "user", "content": PROMPTS[2]}]
        full = client.chat.completions.create(messages=messages, **kw)
        chunks = list(client.chat.completions.create(messages=messages, stream=True,
                                                     stream_options={"include_usage": True}, **kw))
        streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        text = full.choices[0].message.content
        assert chunks[0].choices[0].delta.role == "assistant"
    else:
        full = client.completions.create(prompt=PROMPTS[2], **kw)
        chunks = list(client.completions.create(prompt=PROMPTS[2], stream=True,
                                                stream_options={"include_usage": True}, **kw))
        streamed = "".join(c.choices[0].text for c in chunks if c.choices)
        text = full.choices[0].text
    assert streamed == text and len(text.split()) > 3
    assert len([c for c in chunks if c.choices]) > 3  # tokens arrived as they were committed
    final = [c for c in chunks if c.choices and c.choices[0].finish_reason][-1]
    assert final.choices[0].finish_reason == full.choices[0].finish_reason == "length"
    assert final.model_extra["easyspec"]["generated"] == 20
    assert chunks[-1].choices == [] and chunks[-1].usage == full.usage


def test_stop_string_cuts_the_text(spec_server):
    client = spec_server.client()
    text = complete(client, PROMPTS[3], extra_body={"ignore_eos": True}).choices[0].text
    stop = " ".join(text.split(" ")[3:5])
    expected = text[: text.index(stop)]
    out = complete(client, PROMPTS[3], stop=[stop, "never appears"], extra_body={"ignore_eos": True})
    assert (out.choices[0].text, out.choices[0].finish_reason) == (expected, "stop")
    chunks = complete(client, PROMPTS[3], stream=True, stop=stop, extra_body={"ignore_eos": True})
    assert "".join(c.choices[0].text for c in chunks) == expected
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_chat_completion(spec_server):
    out = spec_server.client().chat.completions.create(
        model="anything", messages=[{"role": "system", "content": "be brief"}, {"role": "user", "content": "the fox"}],
        max_tokens=8, temperature=0)
    assert out.object == "chat.completion" and out.model == "tiny"
    assert out.choices[0].message.role == "assistant"
    # "system : be brief user : the fox assistant :", word by word.
    assert out.usage.prompt_tokens == 10
    assert "easyspec" in out.model_extra


def test_seeded_sampling_is_reproducible(spec_server):
    client = spec_server.client()
    texts = {complete(client, PROMPTS[4], temperature=1.0, seed=7, top_p=0.9, extra_body={"top_k": 20})
             .choices[0].text for _ in range(2)}
    assert len(texts) == 1


BAD_REQUESTS = [
    ("/v1/completions", "{not json", 400, None),
    ("/v1/completions", "[1, 2]", 400, None),
    ("/v1/completions", {"prompt": 5}, 400, "prompt"),
    ("/v1/completions", {"prompt": "the", "max_tokens": "ten"}, 400, "max_tokens"),
    ("/v1/completions", {"prompt": "the", "temperature": "hot"}, 400, "temperature"),
    ("/v1/completions", {"prompt": "the", "stream": "yes"}, 400, "stream"),
    ("/v1/completions", {"prompt": "the", "stop": [1]}, 400, "stop"),
    ("/v1/completions", {"prompt": "the", "n": 17}, 400, "n"),
    ("/v1/completions", {"prompt": "the", "max_tokens": 0}, 400, "max_tokens"),
    ("/v1/completions", {"prompt": "the", "max_tokens": 10_000}, 400, None),
    ("/v1/completions", {"prompt": [5] * 300}, 400, None),
    ("/v1/completions", {"prompt": [1, 999]}, 400, None),
    ("/v1/completions", {"prompt": "the", "logprobs": 21}, 400, "logprobs"),
    ("/v1/completions", {"prompt": "the", "presence_penalty": 2.5}, 400, "presence_penalty"),
    ("/v1/completions", {"prompt": "the", "best_of": 2}, 400, "best_of"),
    ("/v1/completions", {"prompt": "the", "logit_bias": {"5": 1}}, 400, "logit_bias"),
    ("/v1/completions", {"prompt": ["the", "fox"]}, 400, "prompt"),
    ("/v1/chat/completions", {"messages": "hi"}, 400, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "tool", "content": "x"}]}, 400, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": 3}]}, 400, "messages[0].content"),
    ("/v1/nothing", {}, 404, None),
]


@pytest.mark.parametrize("path,body,status,param", BAD_REQUESTS)
def test_bad_requests_get_openai_errors(spec_server, path, body, status, param):
    content = body if isinstance(body, str) else json.dumps(body)
    got, error = error_of(spec_server.post(path, content))
    assert (got, error["param"]) == (status, param), error


def test_errors_through_the_client_and_serving_goes_on(spec_server):
    client = spec_server.client()
    with pytest.raises(openai.BadRequestError, match="best_of > 1 is not supported"):
        client.completions.create(model="tiny", prompt="the", best_of=2)
    with pytest.raises(openai.BadRequestError, match="exceeds"):
        client.completions.create(model="tiny", prompt="the " * 300, max_tokens=8)
    with pytest.raises(openai.AuthenticationError):
        spec_server.client(api_key="wrong").completions.create(model="tiny", prompt="the")
    assert error_of(http("POST", spec_server.url + "/v1/completions", b'{"prompt": "the"}'))[0] == 401
    assert spec_server.get("/health").status == 200  # no key needed outside /v1
    assert complete(client, PROMPTS[0]).choices[0].text


def test_metrics_counters_move(spec_server):
    before = spec_server.metrics()
    complete(spec_server.client(), PROMPTS[5], extra_body={"ignore_eos": True})
    spec_server.post("/v1/completions", "{")
    after = spec_server.metrics()

    def delta(key: str) -> float:
        return after.get(key, 0) - before.get(key, 0)

    assert delta('easyspec_requests_total{endpoint="/v1/completions",status="200"}') == 1
    assert delta('easyspec_requests_total{endpoint="/v1/completions",status="400"}') == 1
    assert delta("easyspec_generation_tokens_total") == 12
    assert delta("easyspec_prompt_tokens_total") == len(PROMPTS[5].split())
    assert delta("easyspec_spec_decode_num_drafts_total") > 0
    assert delta("easyspec_spec_decode_num_draft_tokens_total") > 0
    assert delta("easyspec_spec_decode_num_accepted_tokens_total") > 0
    for name in ("time_to_first_token_seconds", "time_per_output_token_seconds", "queue_wait_seconds"):
        assert delta(f"easyspec_{name}_count") == 1
    mean = 1 + after["easyspec_spec_decode_num_accepted_tokens_total"] / after["easyspec_spec_decode_num_drafts_total"]
    assert after["easyspec_spec_decode_mean_acceptance_length"] == pytest.approx(mean)
    assert after["easyspec_num_requests_waiting"] == 0 and after["easyspec_engine_healthy"] == 1


def test_concurrent_clients_get_their_own_answers(spec_server):
    client = spec_server.client()
    expected = {p: complete(client, p).choices[0].text for p in PROMPTS}
    failures: list[str] = []

    def run(worker: int) -> None:
        for i in range(5):
            prompt = PROMPTS[(worker + 3 * i) % len(PROMPTS)]
            try:
                if (worker + i) % 2:
                    text = "".join(c.choices[0].text for c in complete(client, prompt, stream=True))
                else:
                    text = complete(client, prompt).choices[0].text
            except Exception as err:  # collected: an exception in a thread would otherwise be lost
                failures.append(f"client {worker}: {type(err).__name__}: {err}")
                continue
            if text != expected[prompt]:
                failures.append(f"client {worker}, prompt {prompt!r}: {text!r} != {expected[prompt]!r}")

    threads = [threading.Thread(target=run, args=(w,)) for w in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not failures, failures[:5]


def test_full_queue_answers_429_and_disconnects_cancel(queue_server):
    client = queue_server.client()
    long_kw = dict(model="m", prompt="the quick brown fox", max_tokens=1000, temperature=0, stream=True,
                   extra_body={"ignore_eos": True})
    before = queue_server.metrics()
    running = client.completions.create(**long_kw)
    next(iter(running))  # it has started: the engine is busy with it
    waiting = client.completions.create(**long_kw)  # headers arrive once it is queued
    assert queue_server.metrics()["easyspec_num_requests_waiting"] == 1
    with pytest.raises(openai.RateLimitError, match="queue is full"):
        client.completions.create(**long_kw)
    running.close()
    waiting.close()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        samples = queue_server.metrics()
        if samples["easyspec_num_requests_running"] == 0 and samples["easyspec_num_requests_waiting"] == 0:
            break
        time.sleep(0.05)
    assert samples['easyspec_request_finished_total{finish_reason="cancelled"}'] >= 1
    generated = samples["easyspec_generation_tokens_total"] - before.get("easyspec_generation_tokens_total", 0)
    assert generated < 1000  # neither stream ran to its end
    out = client.completions.create(model="m", prompt="the fox", max_tokens=5, temperature=0)
    assert out.usage.completion_tokens <= 5


def test_model_without_chat_template(queue_server):
    client = queue_server.client()
    with pytest.raises(openai.BadRequestError, match="no chat template"):
        client.chat.completions.create(model="m", messages=[{"role": "user", "content": "the fox"}])
    assert client.completions.create(model="m", prompt="the fox", max_tokens=3).choices[0].finish_reason


@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="finds the worker process through /proc")
def test_two_devices_cancel_then_worker_failure_exits(request, model_dirs, queue_server):
    server = start(request, model_dirs, "--model", str(model_dirs["long"]), "--devices", "2", "--timeout", "20")
    client = server.client()
    ids = [7, 8, 9, 10]
    expected = complete(queue_server.client(), ids).choices[0].text
    assert complete(client, ids).choices[0].text == expected
    stream = client.completions.create(model="m", prompt="the quick brown fox", max_tokens=1000, temperature=0,
                                       stream=True, extra_body={"ignore_eos": True})
    next(iter(stream))
    stream.close()
    # Rank 0 must take rank 1 along when it cancels: the next request is answered, not stuck in a collective.
    assert complete(client, ids).choices[0].text == expected
    assert server.metrics()['easyspec_request_finished_total{finish_reason="cancelled"}'] == 1

    followers = follower_pids(server.proc.pid)
    assert len(followers) == 1
    os.kill(followers[0], 9)
    # The server exits non-zero for its supervisor to restart it; until then it answers 503.
    assert server.wait_exit() == 3
    log = server.log.read_text()
    assert "engine failed: worker rank 1 failed" in log, log


def test_generation_config_defaults_reach_requests(request, model_dirs, tmp_path):
    """Fields a request leaves out come from the model's generation_config.json (--generation-config auto):
    do_sample false makes greedy the default, max_new_tokens bounds an absent max_tokens; a request's own win."""
    folder = tmp_path / "greedy"
    make_hf_checkpoint("llama3", folder, seed=0, **SPREAD)
    write_tokenizer(folder, CHAT_TEMPLATE)
    (folder / "generation_config.json").write_text(json.dumps({"do_sample": False, "max_new_tokens": 6}))
    client = start(request, model_dirs, "--model", str(folder)).client()

    def complete(**kw):
        return client.completions.create(model="m", prompt=PROMPTS[2], extra_body={"ignore_eos": True}, **kw)

    greedy = complete(max_tokens=6, temperature=0).choices[0].text
    defaults = [complete() for _ in range(3)]
    assert [d.choices[0].text for d in defaults] == [greedy] * 3  # no temperature sent: greedy, as the file says
    assert all(d.usage.completion_tokens == 6 for d in defaults)
    assert complete(max_tokens=9).usage.completion_tokens == 9
