"""Helpers for the server tests: tiny models with a word-level tokenizer, `easyspec serve` in a
subprocess, raw HTTP for requests the openai client would not send."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import openai
import pytest
from hf_models import make_hf_checkpoint
from tokenizers import Tokenizer, models, pre_tokenizers

from easyspec.parallel.launch import free_port

REPO = Path(__file__).resolve().parent.parent
API_KEY = "test-key"
SPREAD = dict(initializer_range=0.3)  # peaked logits: greedy continuations vary token to token
WORDS = "the quick brown fox jumps over a lazy dog and runs far away into green hills where birds sing".split()
CHAT_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('unknown role ' + m['role']) }}{% endif %}"
    "{{ m['role'] }} : {{ m['content'] }} {% endfor %}{% if add_generation_prompt %}assistant :{% endif %}"
)
PROMPTS = [" ".join(WORDS[i : i + 3 + i % 4]) for i in range(10)]
SPECIALS = ["<unk>", "<s>", "</s>"]  # </s> is id 2, the models' EOS
# write_tokenizer's words, indexed by token id: all 128 ids of the tiny models, so every id decodes to a word.
VOCAB = SPECIALS + ["user", "assistant", "system", ":"] + WORDS
VOCAB += [f"w{i}" for i in range(128 - len(VOCAB))]


def write_tokenizer(folder: Path, chat_template: str | None) -> None:
    """A word-level tokenizer over VOCAB."""
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(VOCAB)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens(SPECIALS)
    tok.save(str(folder / "tokenizer.json"))
    config = {"bos_token": "<s>", "eos_token": "</s>"}
    if chat_template:
        config["chat_template"] = chat_template
    (folder / "tokenizer_config.json").write_text(json.dumps(config))


def make_model_dirs(root: Path) -> dict[str, Path]:
    """base/: chat template, context 256; long/: no chat template, context 1024."""
    make_hf_checkpoint("llama3", root / "base", seed=0, **SPREAD)
    write_tokenizer(root / "base", CHAT_TEMPLATE)
    make_hf_checkpoint("llama3", root / "long", seed=5, max_position_embeddings=1024, **SPREAD)
    write_tokenizer(root / "long", None)
    return {"base": root / "base", "long": root / "long", "root": root}


@dataclass
class Reply:
    status: int
    body: bytes

    def json(self):
        return json.loads(self.body)


def http(method: str, url: str, body: bytes | None = None, headers: dict | None = None,
         timeout_s: float = 30.0) -> Reply:
    """Raw HTTP through the standard library, for requests the openai client would not send."""
    req = urllib.request.Request(url, data=body, headers=headers or {}, method=method)
    try:
        with urllib.request.urlopen(req, timeout=timeout_s) as response:
            return Reply(response.status, response.read())
    except urllib.error.HTTPError as err:
        return Reply(err.code, err.read())


class Server:
    """`python -m easyspec serve` in a subprocess, its output in a log file."""

    def __init__(self, log_dir: Path, *args: str, api_key: str | None = None, env: dict | None = None) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.api_key = api_key or (env or {}).get("EASYSPEC_API_KEY")
        self.log = log_dir / f"server-{self.port}.log"
        cmd = [sys.executable, "-m", "easyspec", "serve", "--port", str(self.port), *args]
        if api_key:
            cmd += ["--api-key", api_key]
        # One thread per process: the models are tiny, and --devices 2 must not oversubscribe the CPU.
        env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", **(env or {}))
        with open(self.log, "w") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=REPO, env=env)

    def wait_ready(self, timeout_s: float = 90.0) -> Server:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"server exited with {self.proc.returncode}:\n{self.log.read_text()}")
            try:
                if http("GET", self.url + "/health", timeout_s=1.0).status == 200:
                    return self
            except OSError:  # not listening yet
                pass
            time.sleep(0.1)
        pytest.fail(f"server not ready after {timeout_s} s:\n{self.log.read_text()}")

    def wait_exit(self, timeout_s: float = 60.0) -> int:
        try:
            return self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            pytest.fail(f"server still running after {timeout_s} s:\n{self.log.read_text()}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)

    def client(self, api_key: str | None = None) -> openai.OpenAI:
        # No retries: a 429 or 503 must reach the test as it was answered.
        return openai.OpenAI(base_url=self.url + "/v1", api_key=api_key or self.api_key or "none",
                             max_retries=0, timeout=60.0)

    def post(self, path: str, content: str | bytes, api_key: str | None = None, **headers: str | bytes) -> Reply:
        headers = {"Authorization": f"Bearer {api_key or self.api_key}", "Content-Type": "application/json",
                   **headers}
        return http("POST", self.url + path, content.encode() if isinstance(content, str) else content, headers)

    def get(self, path: str) -> Reply:
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        return http("GET", self.url + path, headers=headers)

    def metrics(self) -> dict[str, float]:
        """Every sample of /metrics, keyed by name and labels as written."""
        text = self.get("/metrics").body.decode()
        samples = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                key, value = line.rsplit(" ", 1)
                samples[key] = float(value)
        return samples


def start(request, model_dirs, *args: str, api_key: str | None = None, env: dict | None = None) -> Server:
    server = Server(model_dirs["root"], *args, api_key=api_key, env=env)
    request.addfinalizer(server.stop)  # registered before waiting, so a failed start is cleaned up too
    return server.wait_ready()


def complete(client: openai.OpenAI, prompt: str | list[int], stream: bool = False, **kw):
    kw = {"model": "tiny", "prompt": prompt, "max_tokens": 12, "temperature": 0, **kw}
    if not stream:
        return client.completions.create(**kw)
    return list(client.completions.create(stream=True, **kw))



def error_of(response: Reply) -> tuple[int, dict]:
    body = response.json()["error"]
    assert set(body) == {"message", "type", "param", "code"} and body["message"]
    return response.status, body


def follower_pids(pid: int) -> list[int]:
    # Children are listed under the thread that started them: the engine thread, not the main one.
    children = [c for task in Path(f"/proc/{pid}/task").iterdir() for c in (task / "children").read_text().split()]
    return [int(c) for c in children
            if b"resource_tracker" not in Path(f"/proc/{c}/cmdline").read_bytes()]
