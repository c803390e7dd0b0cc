"""Broken checkpoint folders: every failure is one CheckpointError that names the file, and values
that would only show as garbage output (bad norms, RoPE, sizes, token ids, NaN weights) are refused."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hf_models import make_hf_checkpoint
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import models

from easyspec.model.checkpoint import CheckpointError, load_config, load_model, save_checkpoint
from easyspec.model.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("pristine") / "ckpt"
    make_hf_checkpoint("llama2", folder, seed=6)
    return folder


@pytest.fixture
def folder(pristine, tmp_path) -> Path:
    """A fresh copy of a good checkpoint, to break."""
    copy = tmp_path / "ckpt"
    copy.mkdir()
    for file in pristine.iterdir():
        (copy / file.name).write_bytes(file.read_bytes())
    return copy


def _edit_json(path: Path, **changes) -> None:
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _poison(path: Path) -> None:
    tensors = load_file(path)
    tensors["model.layers.1.mlp.down_proj.weight"][3, 5] = float("nan")
    save_file(tensors, path, metadata={"format": "pt"})


CONFIG_CASES = [
    (dict(rms_norm_eps=0), "config.json: rms_norm_eps must be a positive finite number, got 0"),
    (dict(rms_norm_eps=-1e-5), "config.json: rms_norm_eps must be a positive finite number"),
    (dict(rope_theta=0), "config.json: rope_theta must be a positive finite number, got 0"),
    (dict(rope_theta=-10000.0), "config.json: rope_theta must be a positive finite number"),
    (dict(hidden_size=64.5), "config.json: hidden_size must be a positive integer, got 64.5"),
    (dict(num_hidden_layers="3"), "config.json: num_hidden_layers must be a positive integer, got '3'"),
    (dict(max_position_embeddings=0), "config.json: max_position_embeddings must be a positive integer, got 0"),
    (dict(eos_token_id=500), r"config.json: eos_token_id 500 is not a token id of the vocabulary \[0, 128\)"),
    (dict(eos_token_id=[2, -1]), "config.json: eos_token_id -1 is not a token id"),
    (dict(bos_token_id=128), "config.json: bos_token_id 128 is not a token id"),
    (dict(tie_word_embeddings="false"), "config.json: tie_word_embeddings must be true or false, got 'false'"),
]


@pytest.mark.parametrize("changes,message", CONFIG_CASES, ids=[m.split(": ")[1][:40] for _, m in CONFIG_CASES])
def test_invalid_config_values_are_refused(folder, changes, message):
    _edit_json(folder / "config.json", **changes)
    with pytest.raises(CheckpointError, match=message):
        load_config(folder)


def test_generation_config_eos_out_of_vocabulary(folder):
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 4096]}))
    with pytest.raises(CheckpointError, match="generation_config.json: eos_token_id 4096 is not a token id"):
        load_config(folder)


FILE_CASES = [
    ("truncated safetensors", lambda f: _truncate(f / "model.safetensors"),
     "model.safetensors: not a readable safetensors file"),
    ("empty safetensors", lambda f: (f / "model.safetensors").write_bytes(b""),
     "model.safetensors: not a readable safetensors file"),
    ("non-UTF-8 config", lambda f: (f / "config.json").write_bytes(b'{"model_type": "llama\xff"}'),
     "config.json: not UTF-8 text"),
    ("config is a list", lambda f: (f / "config.json").write_text("[1, 2]"),
     "config.json: expected a JSON object, got list"),
    ("NaN weight", lambda f: _poison(f / "model.safetensors"),
     "model.safetensors: tensor 'model.layers.1.mlp.down_proj.weight' holds NaN or inf"),
]


@pytest.mark.parametrize("case,breaker,message", FILE_CASES, ids=[c[0] for c in FILE_CASES])
def test_broken_files_name_the_file(folder, case, breaker, message):
    breaker(folder)
    with pytest.raises(CheckpointError, match=message):
        load_model(folder)


def test_weights_that_overflow_the_dtype_are_refused(folder):
    tensors = load_file(folder / "model.safetensors")
    tensors["model.norm.weight"][0] = 1e6  # fine in float32, inf in float16
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    load_model(folder)
    with pytest.raises(CheckpointError, match="tensor 'model.norm.weight' holds NaN or inf"):
        load_model(folder, dtype=torch.float16)


@pytest.fixture
def sharded(folder, tmp_path) -> Path:
    out = tmp_path / "sharded"
    save_checkpoint(load_model(folder), out, max_shard_bytes=40_000)
    return out


def test_index_naming_the_wrong_shard(sharded):
    index_path = sharded / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    shards = sorted(set(index["weight_map"].values()))
    name = next(n for n, f in index["weight_map"].items() if f == shards[0])
    index["weight_map"][name] = shards[1]
    index_path.write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=f"{shards[1]}: cannot read tensor '{name}'"):
        load_model(sharded)


@pytest.mark.parametrize("entry", ["../outside.safetensors", "/tmp/outside.safetensors", "a/../../outside.safetensors"])
def test_index_entries_stay_inside_the_folder(sharded, entry):
    # A valid shard outside the folder: it must never be opened.
    index_path = sharded / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    first = sorted(set(index["weight_map"].values()))[0]
    save_file(load_file(sharded / first), sharded.parent / "outside.safetensors")
    index["weight_map"] = dict.fromkeys(index["weight_map"], entry)
    index_path.write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="weight_map entry .* is not a file name inside the folder"):
        load_model(sharded)


def _with_tokenizer(folder: Path, config: object) -> None:
    tok = HFTokenizer(models.WordLevel({"<unk>": 0, "a": 1}, unk_token="<unk>"))
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps(config))


TOKENIZER_CASES = [
    ("config is a list", [{"chat_template": "x"}], "tokenizer_config.json: expected a JSON object, got list"),
    ("template list of strings", {"chat_template": ["{{ messages }}"]},
     "tokenizer_config.json: chat_template must be a string or a list"),
    ("template entry without name", {"chat_template": [{"template": "x"}]},
     "tokenizer_config.json: chat_template must be a string or a list"),
    ("template of the wrong type", {"chat_template": 5}, "tokenizer_config.json: chat_template must be"),
    ("template does not parse", {"chat_template": "{% for m in messages %}"},
     "tokenizer_config.json: the chat template does not parse"),
]


@pytest.mark.parametrize("case,config,message", TOKENIZER_CASES, ids=[c[0] for c in TOKENIZER_CASES])
def test_broken_tokenizer_config_names_the_file(tmp_path, case, config, message):
    _with_tokenizer(tmp_path, config)
    with pytest.raises(CheckpointError, match=message):
        Tokenizer.from_folder(tmp_path)


def test_named_chat_templates_pick_the_default(tmp_path):
    _with_tokenizer(tmp_path, {"chat_template": [{"name": "tool_use", "template": "T"},
                                                 {"name": "default", "template": "D{{ messages[0].content }}"}]})
    assert Tokenizer.from_folder(tmp_path).render_chat([{"role": "user", "content": "a"}]) == "Da"


@pytest.mark.parametrize("positions,message", [
    (0, "max_position_embeddings must be a positive integer, got 0"),
    (8, "the models support 8 positions (max_position_embeddings), fewer than the 16 easyspec needs"),
])
def test_cli_context_too_small_for_the_model(folder, positions, message):
    """The model's context, not --max-context, is what is too small: the message must not tell the user
    to raise --max-context to 0."""
    _edit_json(folder / "config.json", max_position_embeddings=positions)
    out = subprocess.run([sys.executable, "-m", "easyspec", "generate", "--model", str(folder), "--prompt-ids", "1"],
                         capture_output=True, text=True, timeout=60)
    lines = out.stderr.strip().splitlines()
    assert out.returncode == 2 and len(lines) == 1 and message in lines[0], out.stderr
    assert "--max-context 0" not in lines[0]
