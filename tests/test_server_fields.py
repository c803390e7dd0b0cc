"""The sampling and chat fields vLLM users send, through a real `easyspec serve` (speculative
decoding) and the official openai client: each reaches the engine (the server's answer equals the
Python API's), n choices, log-probabilities in OpenAI's shapes (streamed too), stop_token_ids,
skip_special_tokens, chat_template_kwargs, add_generation_prompt and continue_final_message, and
a 400 naming the field for each value out of range."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from server_utils import WORDS, Server, error_of, make_model_dirs, start

from easyspec import Engine, EngineOptions, SamplingParams

# The test server's chat template: `style` (a chat_template_kwargs variable) is said before the messages.
TEMPLATE = ("{% if style %}system : {{ style }} {% endif %}{% for m in messages %}{{ m['role'] }} : "
            "{{ m['content'] }} {% endfor %}{% if add_generation_prompt %}assistant :{% endif %}")
PROMPT = "the quick brown fox"


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory) -> dict[str, Path]:
    dirs = make_model_dirs(tmp_path_factory.mktemp("fields"))
    (dirs["root"] / "template.jinja").write_text(TEMPLATE)
    return dirs


@pytest.fixture(scope="module")
def server(request, model_dirs) -> Server:
    base = str(model_dirs["base"])
    return start(request, model_dirs, "--model", base, "--draft", base, "--method", "sd", "--num-draft", "3",
                 "--chat-template", str(model_dirs["root"] / "template.jinja"), "--served-model-name", "tiny")


@pytest.fixture(scope="module")
def engine(model_dirs):
    """The server's engine in this process: seeded samples come out the same."""
    base = str(model_dirs["base"])
    with Engine(EngineOptions(model=base, draft=base, method="sd", num_draft=3)) as engine:
        yield engine


def _text(engine: Engine, prompt: str, **settings) -> str:
    params = SamplingParams(max_new_tokens=12, ignore_eos=True, **settings)
    return "".join(c.text for c in engine.generate(engine.tokenizer.encode(prompt), params))


def _complete(server: Server, **kw):
    body = {"model": "tiny", "prompt": PROMPT, "max_tokens": 12, "temperature": 0, "extra_body": {"ignore_eos": True}}
    for name, value in kw.items():
        if name in ("extra_body",):
            body["extra_body"] = {**body["extra_body"], **value}
        else:
            body[name] = value
    return server.client().completions.create(**body)


SETTINGS = [
    dict(repetition_penalty=1.8),
    dict(presence_penalty=1.5, frequency_penalty=0.5),
    dict(temperature=1.0, seed=4, min_p=0.2),
    dict(temperature=1.0, seed=4, top_k=5, repetition_penalty=0.7),
    dict(min_tokens=12),
]


@pytest.mark.parametrize("settings", SETTINGS, ids=lambda s: "-".join(s))
def test_sampling_fields_reach_the_engine(server, engine, settings):
    """The server's speculative answer equals the Python API's plain one for the same settings."""
    openai_fields = {k: v for k, v in settings.items() if k in ("temperature", "seed", "presence_penalty",
                                                                "frequency_penalty")}
    extra = {k: v for k, v in settings.items() if k not in openai_fields}
    out = _complete(server, extra_body=extra, **openai_fields)
    assert out.choices[0].text == _text(engine, PROMPT, **settings)


def test_penalties_change_the_answer(server):
    penalized = _complete(server, extra_body={"repetition_penalty": 1.8})
    assert _complete(server).choices[0].text != penalized.choices[0].text


def test_n_choices_are_seeded_samples(server):
    """n choices: choice i is the answer to the same request with seed + i (vLLM's rule)."""
    kw = dict(temperature=1.0, seed=11, extra_body={"top_k": 20})
    out = _complete(server, n=3, **kw)
    assert [c.index for c in out.choices] == [0, 1, 2]
    alone = [_complete(server, **{**kw, "seed": 11 + i}).choices[0].text for i in range(3)]
    assert [c.text for c in out.choices] == alone and len(set(alone)) > 1
    assert out.usage.completion_tokens == 36 and out.model_extra["easyspec"]["generated"] == 36
    chunks = list(_complete(server, n=2, stream=True, stream_options={"include_usage": True}, **kw))
    for index in (0, 1):
        assert "".join(c.choices[0].text for c in chunks if c.choices and c.choices[0].index == index) == alone[index]
    assert chunks[-1].usage.completion_tokens == 24
    finals = [c.choices[0] for c in chunks if c.choices and c.choices[0].finish_reason]
    assert sorted((f.index, f.finish_reason) for f in finals) == [(0, "length"), (1, "length")]
    assert chunks[-2].choices[0].finish_reason  # choices may interleave, but the last one ends before the usage


def test_completion_logprobs(server):
    out = _complete(server, logprobs=3)
    logprobs = out.choices[0].logprobs
    n = out.usage.completion_tokens
    assert len(logprobs.tokens) == len(logprobs.token_logprobs) == len(logprobs.top_logprobs) == n
    assert all(token and " " not in token for token in logprobs.tokens)  # each token's own text
    assert logprobs.text_offset == [sum(len(t) for t in logprobs.tokens[:i]) for i in range(n)]
    for token, value, top in zip(logprobs.tokens, logprobs.token_logprobs, logprobs.top_logprobs, strict=True):
        # Greedy: the chosen token is the most likely; the dict holds the top 3 and the chosen token.
        assert 3 <= len(top) <= 4 and top[token] == value == max(top.values()) and value <= 0
    streamed = list(_complete(server, logprobs=3, stream=True))
    assert [t for c in streamed for t in (c.choices[0].logprobs.tokens if c.choices[0].logprobs else [])] \
        == logprobs.tokens
    offsets = [o for c in streamed for o in (c.choices[0].logprobs.text_offset if c.choices[0].logprobs else [])]
    assert offsets == logprobs.text_offset
    assert _complete(server).choices[0].logprobs is None


def test_chat_logprobs(server):
    client = server.client()
    kw = dict(model="tiny", messages=[{"role": "user", "content": PROMPT}], max_tokens=8, temperature=0.8, seed=2,
              logprobs=True, top_logprobs=2, extra_body={"ignore_eos": True})
    out = client.chat.completions.create(**kw)
    content = out.choices[0].logprobs.content
    assert len(content) == out.usage.completion_tokens
    for entry in content:
        assert entry.logprob <= 0 and bytes(entry.bytes).decode() == entry.token and len(entry.top_logprobs) == 2
        assert entry.top_logprobs[0].logprob >= entry.top_logprobs[1].logprob >= -9999.0
        assert entry.logprob <= entry.top_logprobs[0].logprob
    chunks = list(client.chat.completions.create(stream=True, **kw))
    streamed = [e for c in chunks if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    assert [(e.token, e.logprob) for e in streamed] == [(e.token, e.logprob) for e in content]
    plain = client.chat.completions.create(**{**kw, "logprobs": False, "top_logprobs": None})
    assert plain.choices[0].logprobs is None


def test_stop_token_ids_end_with_their_id(server, engine):
    words = _complete(server).choices[0].text.split()
    at = words.index(words[2])  # where the word first comes
    stop = engine.tokenizer.token_id(words[2])
    out = _complete(server, extra_body={"stop_token_ids": [stop]})
    choice = out.choices[0]
    assert (choice.finish_reason, choice.model_extra["stop_reason"]) == ("stop", stop)
    assert choice.text.split() == words[:at]  # the stop token's own text is not shown
    assert out.usage.completion_tokens == at + 1


def test_skip_special_tokens(server, engine):
    """A prompt whose greedy answer holds a special token (<unk>, <s> or </s>): shown only when asked."""
    specials = {"<unk>", "<s>", "</s>"}
    prompt = next(p for p in (" ".join(WORDS[i : i + 2] + WORDS[j : j + 1]) for i in range(16) for j in range(20))
                  if specials & set(_text(engine, p, skip_special_tokens=False).split()))
    hidden = _complete(server, prompt=prompt).choices[0].text
    shown = _complete(server, prompt=prompt, extra_body={"skip_special_tokens": False}).choices[0].text
    assert not specials & set(hidden.split()) and specials & set(shown.split())
    assert [w for w in shown.split() if w not in specials] == hidden.split()


def test_chat_template_fields(server):
    client = server.client()

    def prompt_tokens(messages: list[dict], **extra) -> int:
        out = client.chat.completions.create(model="tiny", messages=messages, max_tokens=1, temperature=0,
                                             extra_body=extra)
        return out.usage.prompt_tokens

    user = [{"role": "user", "content": "the fox"}]
    base = prompt_tokens(user)  # "user : the fox assistant :"
    assert base == 6
    assert prompt_tokens(user, chat_template_kwargs={"style": "brief"}) == base + 3  # "system : brief"
    assert prompt_tokens(user, add_generation_prompt=False) == base - 2
    # The open assistant message is continued: "... assistant : the quick", no new turn.
    open_turn = [*user, {"role": "assistant", "content": "the quick"}]
    assert prompt_tokens(open_turn, continue_final_message=True) == base + 2
    assert prompt_tokens(open_turn, continue_final_message=True, add_generation_prompt=False) == base + 2


BAD_FIELDS = [
    ("/v1/completions", {"min_p": 1.5}, "min_p"),
    ("/v1/completions", {"min_p": "low"}, "min_p"),
    ("/v1/completions", {"repetition_penalty": 0}, "repetition_penalty"),
    ("/v1/completions", {"frequency_penalty": -2.5}, "frequency_penalty"),
    ("/v1/completions", {"min_tokens": 20, "max_tokens": 10}, "min_tokens"),
    ("/v1/completions", {"min_tokens": -1}, "min_tokens"),
    ("/v1/completions", {"stop_token_ids": [1, "2"]}, "stop_token_ids"),
    ("/v1/completions", {"stop_token_ids": 5}, "stop_token_ids"),
    ("/v1/completions", {"skip_special_tokens": "no"}, "skip_special_tokens"),
    ("/v1/completions", {"logprobs": True}, "logprobs"),
    ("/v1/completions", {"n": 17}, "n"),
    ("/v1/chat/completions", {"top_logprobs": 3}, "top_logprobs"),
    ("/v1/chat/completions", {"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ("/v1/chat/completions", {"chat_template_kwargs": {"add_generation_prompt": False}}, "chat_template_kwargs"),
    ("/v1/chat/completions", {"chat_template_kwargs": [1]}, "chat_template_kwargs"),
    ("/v1/chat/completions", {"continue_final_message": True, "add_generation_prompt": True},
     "continue_final_message"),
]


@pytest.mark.parametrize(("path", "fields", "param"), BAD_FIELDS, ids=[f"{p[4:]}-{json.dumps(f)}" for p, f, _ in
                                                                         BAD_FIELDS])
def test_fields_out_of_range_are_400_naming_them(server, path, fields, param):
    body = {"prompt": "the"} if path == "/v1/completions" else {"messages": [{"role": "user", "content": "the"}]}
    status, error = error_of(server.post(path, json.dumps({**body, **fields})))
    assert (status, error["param"]) == (400, param), error


def test_stop_token_outside_the_vocabulary_is_400(server):
    status, error = error_of(server.post("/v1/completions", json.dumps({"prompt": "the", "stop_token_ids": [128]})))
    assert status == 400 and "outside the vocabulary" in error["message"]
