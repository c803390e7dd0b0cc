"""`easyspec serve` under abuse: malformed and oversized requests, clients that leave, log
injection, a request failing inside the engine, a frozen worker, authentication defaults."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

import openai
import pytest
from hf_models import make_hf_checkpoint
from server_utils import (
    PROMPTS,
    REPO,
    SPREAD,
    Server,
    complete,
    error_of,
    follower_pids,
    make_model_dirs,
    start,
    write_tokenizer,
)

from easyspec import Engine, EngineOptions, SamplingParams
from easyspec.server.metrics import Metrics
from easyspec.server.protocol import ApiError
from easyspec.server.scheduler import Job, Scheduler

KEY = "env-key"
CONTEXT = 256  # the base model's max_position_embeddings
INTERNAL = re.compile(r"\b[A-Z][A-Za-z]*(Error|Exception)\b|Traceback")


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory) -> dict[str, Path]:
    """make_model_dirs' models, and slow/: context 16384, for requests that run long enough to queue behind."""
    dirs = make_model_dirs(tmp_path_factory.mktemp("serve-limits"))
    make_hf_checkpoint("llama3", dirs["root"] / "slow", seed=7, max_position_embeddings=16384, **SPREAD)
    write_tokenizer(dirs["root"] / "slow", None)
    return {**dirs, "slow": dirs["root"] / "slow"}


@pytest.fixture(scope="module")
def server(request, model_dirs) -> Server:
    """The base model drafting for itself (every greedy draft token accepted), its key from the environment."""
    base = str(model_dirs["base"])
    return start(request, model_dirs, "--model", base, "--draft", base, "--method", "sd", "--num-draft", "3",
                 "--read-timeout", "2", "--served-model-name", "tiny", env={"EASYSPEC_API_KEY": KEY})


def _assert_client_error(reply, status: int, param: str | None = None, code: str | None = None) -> str:
    got, error = error_of(reply)
    assert got == status and error["param"] == param, error
    assert code is None or error["code"] == code, error
    assert not INTERNAL.search(error["message"]), error["message"]
    return error["message"]


BAD_BODIES = [
    ("lone surrogate prompt", '{"prompt": "the \\ud800 fox", "max_tokens": 2}', "prompt", "invalid_unicode"),
    ("lone surrogate in a message", '{"messages": [{"role": "user", "content": "\\udfff"}]}', "messages[0].content",
     "invalid_unicode"),
    ("lone surrogate in a key", '{"prompt": "the", "x\\ud800": 1}', "x\\ud800", "invalid_unicode"),
    ("50k-deep array", "[" * 50_000 + "]" * 50_000, None, "invalid_json"),
    ("100-deep unknown field", '{"prompt": "the", "extra": ' + "[" * 100 + "]" * 100 + "}", None, "invalid_json"),
    ("NaN literal", '{"prompt": "the", "temperature": NaN}', None, "invalid_json"),
    ("Infinity literal", '{"prompt": "the", "top_p": -Infinity}', None, "invalid_json"),
    ("number too long", '{"prompt": "the", "max_tokens": ' + "9" * 5000 + "}", None, "invalid_json"),
    ("not UTF-8", b'{"prompt": "the \xff"}', None, "invalid_json"),
    ("temperature 1e999", '{"prompt": "the", "temperature": 1e999}', "temperature", None),
    ("top_p 1e999", '{"prompt": "the", "top_p": 1e999}', "top_p", None),
    ("huge integer temperature", '{"prompt": "the", "temperature": ' + "9" * 400 + "}", "temperature", None),
    ("seed 2**63", '{"prompt": "the", "temperature": 1, "seed": 9223372036854775808}', "seed", None),
    ("seed below -2**63", '{"prompt": "the", "seed": -9223372036854775809}', "seed", None),
    ("best_of 0", '{"prompt": "the", "best_of": 0}', "best_of", None),
    ("n 0", '{"prompt": "the", "n": 0}', "n", None),
    ("17 stop strings", json.dumps({"prompt": "the", "stop": [f"s{i}" for i in range(17)]}), "stop", None),
    ("a 300-character stop string", json.dumps({"prompt": "the", "stop": "x" * 300}), "stop", None),
    ("257 stop token ids", json.dumps({"prompt": "the", "stop_token_ids": list(range(257))}), "stop_token_ids", None),
    ("n 2 past the largest seed", '{"prompt": "the", "n": 2, "seed": 9223372036854775807}', "seed", None),
]


@pytest.mark.parametrize("case,body,param,code", BAD_BODIES, ids=[c[0] for c in BAD_BODIES])
def test_client_mistakes_are_400_without_internal_text(server, case, body, param, code):
    path = "/v1/chat/completions" if "message" in case else "/v1/completions"
    _assert_client_error(server.post(path, body), 400, param, code)


def test_bad_authorization_bytes_are_401(server):
    reply = server.post("/v1/completions", '{"prompt": "the"}', Authorization=b"Bearer \xff\xfe" + KEY.encode())
    _assert_client_error(reply, 401, code="invalid_api_key")
    assert server.get("/health").status == 200


def test_seed_range_ends_work(server):
    client = server.client()
    for seed in (2**63 - 1, -(2**63)):
        assert complete(client, PROMPTS[0], temperature=1.0, seed=seed).choices[0].finish_reason


def test_prompt_limits_follow_the_context(server):
    """8192 characters (32 per token of the 256-token context) are refused before tokenizing; a body
    over 1 MiB + 256 bytes per token of context is a 413; a prompt under the character limit is still
    refused by its token count."""
    message = _assert_client_error(server.post("/v1/completions", json.dumps({"prompt": "a" * (32 * CONTEXT + 1)})),
                                   400, code="context_length_exceeded")
    assert f"{32 * CONTEXT + 1} characters" in message and f"at most {32 * CONTEXT}" in message
    chat = {"messages": [{"role": "user", "content": "the " * (8 * CONTEXT) + "fox"}]}
    _assert_client_error(server.post("/v1/chat/completions", json.dumps(chat)), 400, code="context_length_exceeded")
    limit = (1 << 20) + 256 * CONTEXT
    big = json.dumps({"prompt": [5] * (limit // 3)}).encode()
    assert f"limit of {limit} bytes" in _assert_client_error(server.post("/v1/completions", big), 413)
    message = _assert_client_error(server.post("/v1/completions", json.dumps({"prompt": "the " * 1000})), 400,
                                   code="context_length_exceeded")
    assert "exceeds --max-context 256" in message


def test_tiny_temperature_equals_greedy(server):
    client = server.client()
    greedy = complete(client, PROMPTS[6], extra_body={"ignore_eos": True}).choices[0].text
    tiny = complete(client, PROMPTS[6], temperature=1e-40, seed=1, extra_body={"ignore_eos": True}).choices[0].text
    assert tiny == greedy and len(set(greedy.split())) > 2


def test_accepted_counts_only_emitted_draft_tokens(server):
    """Three draft tokens are accepted, but max_tokens 2 emits the prefill's token and one draft token."""
    before = server.metrics()
    stats = complete(server.client(), PROMPTS[7], max_tokens=2, extra_body={"ignore_eos": True}).model_extra["easyspec"]
    after = server.metrics()
    assert (stats["rounds"], stats["drafted"], stats["accepted"], stats["mean_accepted_length"]) == (1, 3, 1, 2.0)
    for name, expected in (("accepted_tokens", 1), ("draft_tokens", 3), ("drafts", 1)):
        key = f"easyspec_spec_decode_num_{name}_total"
        assert after[key] - before[key] == expected


def test_log_lines_escape_request_text(server):
    forged = "evil\nERROR easyspec.server: forged line"
    reply = server.post("/v1/completions", json.dumps({"prompt": "the", "max_tokens": 1, forged: 1}),
                        **{"User-Agent": b"agent\xff"})
    assert reply.status == 200
    # aiohttp writes the access line once the response has gone out, so it may trail the reply.
    deadline = time.monotonic() + 30
    while "agent" not in (log := server.log.read_text()) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert "ignored unknown request fields: 'evil\\nERROR easyspec.server: forged line'" in log
    assert not any(line.startswith("ERROR easyspec.server: forged") for line in log.splitlines())
    assert "agent\\udcff" in log  # not UTF-8: escaped, rather than a logging error with a traceback
    assert "Logging error" not in log


def test_half_sent_body_times_out(server):
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + KEY.encode()
                     + b"\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n{\"prompt\": ")
        reply = b""
        while chunk := sock.recv(65536):  # the server answers, then closes
            reply += chunk
    head, body = reply.split(b"\r\n\r\n", 1)
    assert head.startswith(b"HTTP/1.1 408") and b"did not arrive within 2 s" in body


def test_clients_that_leave_early_are_499_not_server_errors(server):
    """A client that resets its connection while its body is read, or right after sending a whole
    streaming request, left: counted 499 (nginx's "client closed request") or, when its stream had
    begun, 200; never a 500 with an "unhandled error" traceback in the log."""
    body = json.dumps({"prompt": "the", "max_tokens": 50, "stream": True}).encode()
    head = (f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n").encode()
    before = server.metrics()
    sends = [head + body[:10], head + body] * 3
    for sent in sends:
        sock = socket.create_connection(("127.0.0.1", server.port), timeout=30)
        sock.sendall(sent)
        time.sleep(0.05)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # close with a reset
        sock.close()

    def counted(status: int) -> float:
        key = f'easyspec_requests_total{{endpoint="/v1/completions",status="{status}"}}'
        return server.metrics().get(key, 0) - before.get(key, 0)

    deadline = time.monotonic() + 30
    while sum(counted(status) for status in (200, 499, 500)) < len(sends) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert (counted(500), counted(200) + counted(499)) == (0, len(sends))
    assert "unhandled error" not in server.log.read_text()


def test_metrics_need_the_key_and_health_does_not(server):
    assert server.get("/metrics").status == 200
    bare = Server.__new__(Server)  # the same server, asked without a key
    bare.url, bare.api_key = server.url, None
    _assert_client_error(bare.get("/metrics"), 401, code="invalid_api_key")
    assert bare.get("/health").status == 200


@pytest.mark.parametrize("how", ["flag", "environment"])
def test_empty_api_key_is_refused(model_dirs, how):
    args, env = (["--api-key", ""], {}) if how == "flag" else ([], {"EASYSPEC_API_KEY": ""})
    out = subprocess.run([sys.executable, "-m", "easyspec", "serve", "--model", str(model_dirs["base"]), *args],
                         capture_output=True, text=True, timeout=60, cwd=REPO,
                         env=dict(os.environ, PYTHONPATH=str(REPO), **env))
    lines = out.stderr.strip().splitlines()
    assert out.returncode == 2 and lines[-1].startswith("error: the API key is empty"), out.stderr


def test_client_leaving_the_queue_frees_its_slot(request, model_dirs):
    slow = start(request, model_dirs, "--model", str(model_dirs["slow"]), "--max-context", "16384",
                 "--max-num-seqs", "1", "--max-queue", "1")
    client = slow.client()
    long_kw = dict(model="m", prompt="the quick brown fox", max_tokens=16000, temperature=0, stream=True,
                   extra_body={"ignore_eos": True})
    running = client.completions.create(**long_kw)
    next(iter(running))  # the engine is busy with it for a long while
    waiting = client.completions.create(**long_kw)  # headers arrive once it is queued
    with pytest.raises(openai.RateLimitError):
        client.completions.create(**long_kw)
    waiting.close()
    deadline = time.monotonic() + 30
    while (samples := slow.metrics())["easyspec_num_requests_waiting"] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert (samples["easyspec_num_requests_waiting"], samples["easyspec_num_requests_running"]) == (0, 1)
    assert samples['easyspec_request_finished_total{finish_reason="cancelled"}'] == 1
    client.completions.create(**long_kw).close()  # the slot is free again: queued, not a 429
    running.close()


def _tampered(params: SamplingParams, **values: object) -> SamplingParams:
    """Params holding a value validation refuses, set behind the frozen dataclass's back."""
    for name, value in values.items():
        object.__setattr__(params, name, value)
    return params


def test_request_failing_in_the_engine_is_counted_and_answered_without_detail(model_dirs):
    """Requests that fail on their own, refused as the engine takes them (a seed past 64 bits) or failing
    in a step of the batch (a temperature that is not a number), are answered 500 without detail; the
    request decoding beside them ends as it does alone."""
    metrics = Metrics("m")
    engine_options = EngineOptions(model=str(model_dirs["base"]), max_num_seqs=3)
    scheduler = Scheduler(lambda on_failure: Engine(engine_options), 4, metrics)
    scheduler.start()
    loop = asyncio.new_event_loop()

    def events(job: Job) -> list:
        got = [loop.run_until_complete(asyncio.wait_for(job.events.get(), 60))]
        while not isinstance(got[-1], ApiError) and got[-1].finish_reason is None:
            got.append(loop.run_until_complete(asyncio.wait_for(job.events.get(), 60)))
        return got

    try:
        working = SamplingParams(max_new_tokens=8, ignore_eos=True)
        alone = Job([5, 6, 7], working, loop)
        scheduler.submit([alone])
        expected = "".join(event.text for event in events(alone))
        failing = [Job([5, 6, 7], _tampered(SamplingParams(seed=1), seed=2**70), loop),
                   Job([5, 6, 7], _tampered(SamplingParams(temperature=1.0, max_new_tokens=8), temperature="hot"),
                       loop)]
        beside = Job([5, 6, 7], working, loop)
        scheduler.submit([failing[0], failing[1], beside])
        for job in failing:
            (error,) = events(job)
            assert isinstance(error, ApiError) and error.status == 500 and "incident" in error.message
            assert not INTERNAL.search(error.message) and "Overflow" not in error.message
        got = events(beside)
        assert got[-1].finish_reason == "length" and "".join(event.text for event in got) == expected
        assert scheduler.healthy
        assert (metrics.finished["error"], metrics.finished["length"]) == (2, 2)
    finally:
        scheduler.stop()
        loop.close()


@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="finds the worker process through /proc")
def test_two_devices_refuse_bad_seeds_then_a_frozen_worker_is_named(request, model_dirs):
    """A seed of 2**63 took a 2-device server down for good (the worker's int64 overflowed): now it is a
    400 and serving goes on. A worker stopped with SIGSTOP fails the request in flight after --timeout
    with a 503 naming its rank, and the server exits 3 for its supervisor to restart it."""
    server = start(request, model_dirs, "--model", str(model_dirs["base"]), "--devices", "2", "--timeout", "20",
                   env={"EASYSPEC_API_KEY": KEY})
    body = {"prompt": "the fox", "max_tokens": 4, "temperature": 1}
    for seed in (2**63, 2**64 + 5, -(2**63) - 1):
        _assert_client_error(server.post("/v1/completions", json.dumps({**body, "seed": seed})), 400, "seed")
    assert server.post("/v1/completions", json.dumps({**body, "seed": 2**63 - 1})).status == 200
    assert server.get("/health").status == 200

    (follower,) = follower_pids(server.proc.pid)
    request.addfinalizer(lambda: _kill(follower))
    os.kill(follower, signal.SIGSTOP)
    got, error = error_of(server.post("/v1/completions", json.dumps(body)))
    assert got == 503 and "worker rank 1 is stopped" in error["message"], error
    assert server.wait_exit() == 3
    assert "engine failed: worker rank 1 is stopped" in server.log.read_text()


def _kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
