"""Our Llama-family model against HF transformers' own implementation, and the loader's errors."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import torch
from hf_models import FAMILIES, make_hf_checkpoint

from easyspec.model.checkpoint import CheckpointError, load_model, save_checkpoint

SPREAD = dict(initializer_range=0.3)


@pytest.fixture(scope="module", params=FAMILIES)
def family_ckpt(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(request.param)
    hf = make_hf_checkpoint(request.param, folder, seed=3, **SPREAD)
    return request.param, folder, hf


def test_logits_match_hf(family_ckpt):
    _, folder, hf = family_ckpt
    ours = load_model(folder)
    tokens = torch.randint(0, 128, (2, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = hf(tokens).logits
        out = ours(tokens, torch.arange(20))
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-5)


def test_cached_decode_matches_full_forward(family_ckpt):
    _, folder, _ = family_ckpt
    model = load_model(folder)
    tokens = torch.randint(0, 128, (30,), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = model(tokens, torch.arange(30))
        cache = model.allocate_cache(64)
        parts = [model(tokens[:11], torch.arange(11), cache, kv_len=64)]
        for i in range(11, 30):  # one token at a time, as decoding does
            parts.append(model(tokens[i : i + 1], torch.tensor([i]), cache, kv_len=64))
    torch.testing.assert_close(torch.cat(parts), full, atol=1e-4, rtol=1e-5)


def test_cli_greedy_matches_hf_generate(family_ckpt):
    _, folder, hf = family_ckpt
    prompt = [1, 2, 3]
    with torch.no_grad():
        ref = hf.generate(torch.tensor([prompt]), max_new_tokens=20, do_sample=False, eos_token_id=None,
                          pad_token_id=0)[0, len(prompt):].tolist()
    cmd = [sys.executable, "-m", "easyspec", "generate", "--model", str(folder), "--prompt-ids", "1,2,3",
           "--max-new-tokens", "20", "--temperature", "0", "--json", "--device", "cpu", "--dtype", "float32",
           "--ignore-eos"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert result["token_ids"] == ref
    assert len(set(ref)) > 3, "the random model should not just repeat one token"
    for key in ("rounds", "drafted", "accepted", "mean_accepted_length", "draft_s", "verify_s", "calibrate_s",
                "total_s", "tokens_per_s"):
        assert key in result["stats"]


def test_prefill_in_pieces_matches_full_forward(family_ckpt):
    """A prompt of any length goes in power-of-two pieces (here 256 + 32 + 8 + 4, and a second
    call continuing it by 5); each piece's last logits equal the full forward's."""
    from easyspec.runtime.runner import ModelRunner, prefill_pieces

    _, folder, _ = family_ckpt
    model = load_model(folder)
    tokens = torch.randint(0, 128, (305,), generator=torch.Generator().manual_seed(2))
    assert prefill_pieces(300) == [256, 32, 8, 4] and prefill_pieces(1100) == [512, 512, 64, 8, 4]
    with torch.no_grad():
        full = model(tokens, torch.arange(305))  # [305, V]
    runner = ModelRunner(model, max_len=400, use_graphs=False)
    torch.testing.assert_close(runner.prefill(tokens[:300]), full[299], atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(runner.prefill(tokens[300:], start=300), full[304], atol=1e-4, rtol=1e-5)
    with pytest.raises(ValueError, match="at least one token"):
        runner.prefill(tokens[:0])
    with pytest.raises(ValueError, match="does not fit"):
        runner.prefill(tokens[:200], start=300)


def test_sharded_checkpoint_roundtrip(tmp_path):
    folder = tmp_path / "src"
    make_hf_checkpoint("qwen2", folder, seed=4, **SPREAD)
    model = load_model(folder)
    save_checkpoint(model, tmp_path / "sharded", max_shard_bytes=40_000)
    assert (tmp_path / "sharded" / "model.safetensors.index.json").exists()
    again = load_model(tmp_path / "sharded")
    tokens = torch.arange(10)
    with torch.no_grad():
        torch.testing.assert_close(again(tokens, torch.arange(10)), model(tokens, torch.arange(10)))


def test_loads_straight_into_bfloat16(tmp_path):
    make_hf_checkpoint("llama2", tmp_path, seed=5)
    model = load_model(tmp_path, dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


def _broken(tmp_path, family="llama2"):
    folder = tmp_path / "ckpt"
    make_hf_checkpoint(family, folder, seed=6)
    return folder


def test_error_unknown_architecture(tmp_path):
    folder = _broken(tmp_path)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["model_type"] = "gpt2"
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="config.json: unsupported model_type 'gpt2'"):
        load_model(folder)


def test_error_missing_weights(tmp_path):
    folder = _broken(tmp_path)
    (folder / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        load_model(folder)


def test_error_missing_folder(tmp_path):
    with pytest.raises(CheckpointError, match="directory not found"):
        load_model(tmp_path / "nope")


def test_error_shape_mismatch(tmp_path):
    folder = _broken(tmp_path)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["intermediate_size"] = 100
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"model.safetensors: .*gate_proj.* has shape .* config.json implies"):
        load_model(folder)


def test_error_bad_json(tmp_path):
    folder = _broken(tmp_path)
    (folder / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="config.json: invalid JSON"):
        load_model(folder)


def test_cli_errors_are_one_line(tmp_path):
    folder = _broken(tmp_path)
    shutil.copy(folder / "config.json", tmp_path / "c.json")
    cases = [
        (["--model", str(tmp_path / "missing"), "--prompt-ids", "1"], "directory not found"),
        (["--model", str(folder), "--prompt-ids", "1,x"], "--prompt-ids must be comma-separated"),
        (["--model", str(folder), "--prompt-ids", "1", "--dtype", "int8"], "unknown --dtype"),
        (["--model", str(folder), "--prompt-ids", "1", "--temperature", "-1"], "temperature must be >= 0"),
        (["--model", str(folder), "--prompt-ids", "999"], "outside the vocabulary"),
        (["--model", str(folder), "--prompt", "hi"], "no tokenizer.json"),
        (["--model", str(folder), "--prompt-ids", "1", "--method", "sd"], "needs a draft model"),
        (["--model", str(folder), "--prompt-ids", "1", "--max-new-tokens", "5000"], "exceeds --max-context"),
        (["--model", str(folder), "--prompt-ids", "1", "--timeout", "nan"], "--timeout must be a positive number"),
        (["--model", str(folder), "--prompt-ids", "1", "--seed", str(2**63)], "seed must be None or a 64-bit"),
    ]
    for args, message in cases:
        out = subprocess.run([sys.executable, "-m", "easyspec", "generate", *args], capture_output=True,
                             text=True, timeout=60)
        assert out.returncode != 0
        # One error line, last; before it only the engine's notes (context length), never a traceback.
        lines = out.stderr.strip().splitlines()
        assert lines[-1].startswith("error:") and message in lines[-1], (args, out.stderr)
        assert all(not line.startswith(("error", "Traceback")) for line in lines[:-1]), (args, out.stderr)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_kernels_match_reference_formulas(dtype: torch.dtype) -> None:
    from easyspec.model import kernels

    g = torch.Generator("cuda").manual_seed(5)
    x = torch.randn(1, 3, 64, generator=g, device="cuda").to(dtype)
    weight = torch.randn(64, generator=g, device="cuda").to(dtype)
    q = torch.randn(1, 3, 4, 16, generator=g, device="cuda").to(dtype)
    k = torch.randn(1, 3, 2, 16, generator=g, device="cuda").to(dtype)
    cos = torch.randn(3, 1, 16, generator=g, device="cuda").to(dtype)
    sin = torch.randn(3, 1, 16, generator=g, device="cuda").to(dtype)
    gate_up = torch.randn(1, 3, 96, generator=g, device="cuda").to(dtype)
    expected = (kernels.rms_norm_reference(x, weight, 1e-5), *kernels.rotary_reference(q, k, cos, sin),
                kernels.silu_mul_reference(gate_up))
    kernels.use_fused(True)
    try:
        got = (kernels.rms_norm(x, weight, 1e-5), *kernels.rotary(q, k, cos, sin), kernels.silu_mul(gate_up))
    finally:
        kernels.use_fused(False)
    tol = {"atol": 1e-5, "rtol": 1e-5} if dtype == torch.float32 else {"atol": 2e-2, "rtol": 2e-2}
    for a, b in zip(got, expected, strict=True):
        torch.testing.assert_close(a, b, **tol)
