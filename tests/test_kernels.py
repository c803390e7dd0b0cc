"""Each fused kernel against its reference formula (easyspec.model.kernels), and the fused model.

With a GPU the kernels run compiled on CUDA, at small and at real shapes (Llama-3.2-1B and
Llama-3.1-8B layers, Qwen2-style biases, Qwen3-style q/k norms); without one they run in
Triton's CPU interpreter (tests/conftest.py sets TRITON_INTERPRET=1) at small shapes. Token
counts cover decode (1), verification of k=4 drafts (5) and a tree of 4x5 nodes plus its root
(21: two row tiles). The interpreter rounds float32 to bfloat16 by truncation where the GPU
rounds to nearest, so its bfloat16 tolerance is a few units of bfloat16's last place.

Bitwise equality of a token's logits whether it is decoded alone or verified among others
needs the GPU: the interpreter's dot products go through the CPU's BLAS, whose result for a
row depends on the row's position in the tile; tensor cores and the float32 FMA loops do not.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from engine_cases import GREEDY, PROMPTS, options, run
from hf_models import make_hf_checkpoint

triton = pytest.importorskip("triton", reason="the fused kernels are Triton kernels: pip install -e '.[test]'")

from easyspec import Engine  # noqa: E402
from easyspec.model import decode_attention, fused_linear, fused_qkv, kernels, triton_support  # noqa: E402
from easyspec.model.checkpoint import load_model  # noqa: E402
from easyspec.model.transformer import seen_spans  # noqa: E402

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
TOKENS = [1, 5, 21]
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs CUDA (the CPU interpreter runs the small shapes)")
needs_transformers = pytest.mark.skipif(importlib.util.find_spec("transformers") is None,
                                        reason="the test checkpoints are written by transformers")



def with_dtypes(small: list, real: list) -> list:
    """(shape, dtype) pairs: small shapes in every dtype, real ones (GPU only) in float32 and bfloat16."""
    pairs = [(shape, dtype) for shape in small for dtype in DTYPES]
    if CUDA:
        pairs += [(shape, dtype) for shape in real for dtype in (torch.float32, torch.bfloat16)]
    return pairs


def ids(case) -> str:
    return "-".join(str(v).replace("torch.", "") for v in (case if isinstance(case, tuple) else (case,)))


# (inputs K, outputs N): small everywhere, plus Llama-3.2-1B and Llama-3.1-8B layers on the GPU.
# (512, 32) gives one column tile, so its inputs are split (the sums added by a second kernel).
LINEAR_CASES = with_dtypes([(64, 96), (512, 32)], [(2048, 2048), (8192, 2048), (14336, 4096)])
GATED_CASES = with_dtypes([(64, 96)], [(2048, 8192), (4096, 14336)])
HEAD_CASES = with_dtypes([(64, 128)], [(2048, 128256)])
# (D, H, Hkv, hd, q/k norm, bias)
QKV_CASES = with_dtypes([(64, 4, 2, 32, False, True), (64, 4, 2, 16, True, False), (64, 4, 2, 24, True, False)],
                        [(2048, 32, 8, 64, False, False), (4096, 32, 8, 128, False, False),
                         (1536, 12, 2, 128, False, True), (2048, 16, 8, 128, True, False)])
# (tokens, kv_len, H, Hkv, hd); the interpreter runs the merge one row at a time, so it gets fewer long cases.
ATTENTION_CASES = with_dtypes(
    [(t, *shape) for shape in [(256, 4, 2, 16), (300, 4, 2, 32), (100, 8, 2, 24)] for t in (1, 5)]
    + [(21, 256, 4, 2, 16)],
    [(21, 300, 4, 2, 32), (21, 100, 8, 2, 24)]
    + [(t, *shape) for shape in [(512, 32, 8, 64), (4096, 32, 8, 128), (4352, 32, 8, 64)] for t in TOKENS])


def tolerance(dtype: torch.dtype) -> dict:
    if dtype == torch.float32:
        return dict(atol=1e-4, rtol=1e-4)
    if dtype == torch.float16:
        return dict(atol=4e-3, rtol=4e-3)
    return dict(atol=6e-2, rtol=3e-2) if triton_support.interpreting() else dict(atol=3e-2, rtol=2e-2)


@pytest.fixture(autouse=True)
def no_fallback():
    """Every test here must run the kernels themselves, not the reference they fall back to."""
    yield
    assert not triton_support.failed_kernels()


def randn(*shape: int, dtype: torch.dtype, scale: float = 1.0, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed + sum(shape))
    return (torch.randn(*shape, generator=g) * scale).to(DEVICE, dtype)


def assert_close(got: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> None:
    torch.testing.assert_close(got.float(), expected.float(), **tolerance(dtype))


@pytest.mark.parametrize("tokens", TOKENS)
@pytest.mark.parametrize(("shape", "dtype"), LINEAR_CASES, ids=ids)
def test_linear_with_norm_bias_and_residual(shape, dtype, tokens):
    inputs, outputs = shape
    x = randn(tokens, inputs, dtype=dtype)
    weight = randn(outputs, inputs, dtype=dtype, scale=inputs ** -0.5, seed=1)
    bias = randn(outputs, dtype=dtype, scale=0.1, seed=2)
    norm = 1 + randn(inputs, dtype=dtype, scale=0.1, seed=3)
    residual = randn(tokens, outputs, dtype=dtype, seed=4)
    assert fused_linear.applies(x, weight)
    for args in ((None, None, residual), (bias, norm, None), (bias, norm, residual)):
        b, n, r = args
        got = fused_linear.linear(x, weight, b, n, 1e-5, r)
        assert got.shape == (tokens, outputs) and got.dtype == dtype
        assert_close(got, kernels.linear_reference(x, weight, b, n, 1e-5, r), dtype)


@pytest.mark.parametrize("tokens", TOKENS)
@pytest.mark.parametrize(("shape", "dtype"), HEAD_CASES, ids=ids)
def test_norm_and_lm_head_give_float32_logits(shape, dtype, tokens):
    inputs, vocab = shape
    x = randn(1, tokens, inputs, dtype=dtype)
    weight = randn(vocab, inputs, dtype=dtype, scale=inputs ** -0.5, seed=1)
    norm = 1 + randn(inputs, dtype=dtype, scale=0.1, seed=3)
    got = fused_linear.linear(x, weight, norm_weight=norm, eps=1e-6, out_dtype=torch.float32)
    assert got.shape == (1, tokens, vocab) and got.dtype == torch.float32
    assert_close(got, kernels.linear_reference(x, weight, None, norm, 1e-6, None, torch.float32), dtype)


@pytest.mark.parametrize("tokens", TOKENS)
@pytest.mark.parametrize(("shape", "dtype"), GATED_CASES, ids=ids)
def test_gate_up_silu(shape, dtype, tokens):
    inputs, intermediate = shape
    x = randn(tokens, inputs, dtype=dtype)
    weight = randn(2 * intermediate, inputs, dtype=dtype, scale=inputs ** -0.5, seed=1)
    norm = 1 + randn(inputs, dtype=dtype, scale=0.1, seed=3)
    got = fused_linear.linear(x, weight, norm_weight=norm, eps=1e-5, gated=True)
    assert got.shape == (tokens, intermediate)
    assert_close(got, kernels.gate_up_silu_reference(x, norm, 1e-5, weight), dtype)


@pytest.mark.parametrize("tokens", TOKENS)
@pytest.mark.parametrize(("shape", "dtype"), QKV_CASES, ids=ids)
def test_attention_inputs_project_rotate_and_fill_the_cache(shape, dtype, tokens):
    dim, heads, kv_heads, head_dim, qk_norm, has_bias = shape
    slots_total = 96
    x = randn(tokens, dim, dtype=dtype)
    weight = randn((heads + 2 * kv_heads) * head_dim, dim, dtype=dtype, scale=dim ** -0.5, seed=1)
    bias = randn(weight.shape[0], dtype=dtype, scale=0.1, seed=2) if has_bias else None
    norm = 1 + randn(dim, dtype=dtype, scale=0.1, seed=3)
    q_norm = 1 + randn(head_dim, dtype=dtype, scale=0.1, seed=4) if qk_norm else None
    k_norm = 1 + randn(head_dim, dtype=dtype, scale=0.1, seed=5) if qk_norm else None
    angles = torch.rand(tokens, head_dim // 2, generator=torch.Generator().manual_seed(6)) * 6.28
    cos = torch.cat((angles.cos(), angles.cos()), -1).to(DEVICE, dtype)  # [T, hd], as the model builds them
    sin = torch.cat((angles.sin(), angles.sin()), -1).to(DEVICE, dtype)
    slots = torch.randperm(slots_total, generator=torch.Generator().manual_seed(7))[:tokens].to(DEVICE)
    keys = randn(kv_heads, slots_total, head_dim, dtype=dtype, seed=8)  # old entries must survive
    values = randn(kv_heads, slots_total, head_dim, dtype=dtype, seed=9)
    ref_keys, ref_values = keys.clone(), values.clone()
    args = (x, norm, 1e-5, weight, bias, q_norm, k_norm, 1e-6, cos, sin, heads, kv_heads)
    assert fused_qkv.applies(x, weight, cos, keys, values)
    q = fused_qkv.attention_inputs(*args, keys, values, slots)
    expected = kernels.attention_inputs_reference(*args, ref_keys, ref_values, slots)
    assert q.shape == (tokens, heads, head_dim)
    assert_close(q, expected, dtype)
    assert_close(keys, ref_keys, dtype)
    assert_close(values, ref_values, dtype)


@pytest.mark.parametrize(("case", "dtype"), ATTENTION_CASES, ids=ids)
def test_split_kv_attention(case, dtype):
    tokens, kv_len, heads, kv_heads, head_dim = case
    max_len = kv_len + 64
    q = randn(tokens, heads, head_dim, dtype=dtype)
    keys = randn(kv_heads, max_len, head_dim, dtype=dtype, seed=1)
    values = randn(kv_heads, max_len, head_dim, dtype=dtype, seed=2)
    if tokens == 1:
        # The engine's usual case: a causal prefix far shorter than the bucket, so whole key
        # blocks and whole splits are masked out.
        mask = torch.arange(kv_len, device=DEVICE)[None, :] < 37
    else:  # any mask with a visible slot per row: a random tree-like pattern
        mask = torch.rand(tokens, kv_len, generator=torch.Generator().manual_seed(3)).to(DEVICE) < 0.5
        mask[:, 0] = True
    group_mask = mask.repeat(heads // kv_heads, 1)
    assert decode_attention.supported(q, keys, values, group_mask, kv_len)
    got = decode_attention.decode_attention(q, keys, values, group_mask, kv_len)
    expected = kernels.cached_attention_reference(q.float(), keys.float(), values.float(), group_mask, kv_len)
    assert_close(got, expected, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_split_kv_attention_over_a_batch_of_rows(dtype):
    """Tokens of 3 sequences, each in its own 512-slot row of the cache and seeing only its row up to
    its position (the batch's block mask): the result matches the reference, and each token's rows
    equal the token attending alone (bitwise on a GPU; Triton's CPU interpreter multiplies a tile's
    rows with NumPy, whose rounding depends on the other rows)."""
    heads, kv_heads, head_dim, row_len = 4, 2, 64, 512
    positions = [(0, 100), (1, 300), (1, 301), (2, 7)]  # (row, position)
    kv_len = 3 * row_len
    q = randn(len(positions), heads, head_dim, dtype=dtype)
    keys = randn(kv_heads, kv_len, head_dim, dtype=dtype, seed=1)
    values = randn(kv_heads, kv_len, head_dim, dtype=dtype, seed=2)
    cols = torch.arange(kv_len, device=DEVICE)
    mask = torch.stack([(cols >= row * row_len) & (cols <= row * row_len + pos) for row, pos in positions])
    group_mask = mask.repeat(heads // kv_heads, 1)
    got = decode_attention.decode_attention(q, keys, values, group_mask, kv_len)
    expected = kernels.cached_attention_reference(q.float(), keys.float(), values.float(), group_mask, kv_len)
    assert_close(got, expected, dtype)
    for i in range(len(positions)):
        alone = decode_attention.decode_attention(q[i : i + 1], keys, values,
                                                  mask[i : i + 1].repeat(heads // kv_heads, 1), kv_len)
        if DEVICE == "cuda":
            assert torch.equal(alone[0], got[i])
        else:
            assert_close(alone[0], got[i], dtype)


def test_reference_attention_reads_only_the_blocks_some_token_sees():
    """On the CPU a step drops the cache blocks that no token of it sees (a batch's other rows, the
    unused end of a row; model.transformer.seen_spans): attention over the rest is plain attention over
    every slot with the mask."""
    heads, kv_heads, head_dim, row_len = 6, 2, 32, 300  # rows not a multiple of the block size
    positions = [(0, 5), (2, 299), (2, 150), (3, 0)]  # (row, position); row 1 unused
    kv_len = 4 * row_len
    q = randn(len(positions), heads, head_dim, dtype=torch.float32).cpu()
    keys = randn(kv_heads, kv_len + 40, head_dim, dtype=torch.float32, seed=1).cpu()
    values = randn(kv_heads, kv_len + 40, head_dim, dtype=torch.float32, seed=2).cpu()
    cols = torch.arange(kv_len)
    mask = torch.stack([(cols >= row * row_len) & (cols <= row * row_len + pos) for row, pos in positions])
    group = heads // kv_heads
    group_mask = mask.repeat(group, 1)
    spans = seen_spans(mask)
    kept_keys, kept_values, kept_mask = (torch.cat([t[:, span] for span in spans], dim=1)
                                         for t in (keys, values, group_mask))
    assert kept_keys.shape[1] == kept_mask.shape[1] < kv_len and kept_mask.sum() == group_mask.sum()
    qg = q.view(-1, kv_heads, group, head_dim).permute(1, 2, 0, 3).reshape(1, kv_heads, -1, head_dim)
    plain = torch.nn.functional.scaled_dot_product_attention(qg, keys[None, :, :kv_len], values[None, :, :kv_len],
                                                             attn_mask=group_mask)
    plain = plain.view(kv_heads, group, -1, head_dim).permute(2, 0, 1, 3).reshape(-1, heads, head_dim)
    got = kernels.cached_attention_reference(q, kept_keys, kept_values, kept_mask, kept_mask.shape[1])
    torch.testing.assert_close(got, plain, rtol=1e-5, atol=1e-6)


def _prefill_then_steps(model, fused: bool, positions_split: int, tokens: torch.Tensor) -> tuple:
    """Logits of tokens[positions_split:] after a prefill of the rest, as one step, and the cache."""
    kernels.use_fused(fused)
    try:
        with torch.inference_mode():
            cache = model.allocate_cache(320)
            model(tokens[:positions_split], torch.arange(positions_split, device=DEVICE), cache, kv_len=256)
            positions = torch.arange(positions_split, tokens.shape[0], device=DEVICE)
            logits = model(tokens[positions_split:], positions, cache, kv_len=256)
    finally:
        kernels.use_fused(False)
    return logits, cache


@needs_transformers
@pytest.mark.parametrize("family", ["qwen2", "qwen3"])
def test_fused_model_matches_reference(tmp_path, family):
    """The whole decoder through the fused kernels (biases, q/k norms, tied head): logits and cache."""
    make_hf_checkpoint(family, tmp_path / family, seed=0, num_hidden_layers=2, initializer_range=0.3)
    model = load_model(tmp_path / family, device=DEVICE)
    tokens = torch.tensor([1, 5, 9, 2, 7, 3, 11, 12, 13, 14, 15], device=DEVICE)
    got, cache = _prefill_then_steps(model, True, 6, tokens)
    expected, ref_cache = _prefill_then_steps(model, False, 6, tokens)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    for layer in range(2):
        torch.testing.assert_close(cache.keys[layer][:, :11], ref_cache.keys[layer][:, :11], atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(cache.values[layer][:, :11], ref_cache.values[layer][:, :11], atol=1e-4,
                                   rtol=1e-4)


@needs_cuda
@needs_transformers
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_token_decoded_alone_equals_it_verified_among_others(tmp_path, dtype):
    """Bitwise: decode steps (T=1, 256 cache slots read) against one verification step (T=5, 512
    slots read: the step crosses a bucket boundary, so attention reads more chunks)."""
    make_hf_checkpoint("llama3", tmp_path / "m", seed=0, num_hidden_layers=2, initializer_range=0.3)
    model = load_model(tmp_path / "m", dtype=dtype, device=DEVICE)
    prompt = torch.arange(1, 253, device=DEVICE) % 100  # the verified tokens sit at positions 252..256
    new = torch.tensor([11, 12, 13, 14, 15], device=DEVICE)
    kernels.use_fused(True)
    try:
        with torch.inference_mode():
            alone = []
            cache = model.allocate_cache(600)
            model(prompt, torch.arange(252, device=DEVICE), cache, kv_len=256)
            for i in range(5):
                kv_len = 256 if 252 + i < 256 else 512
                alone.append(model(new[i : i + 1], torch.tensor([252 + i], device=DEVICE), cache, kv_len=kv_len))
            cache = model.allocate_cache(600)
            model(prompt, torch.arange(252, device=DEVICE), cache, kv_len=256)
            together = model(new, torch.arange(252, 257, device=DEVICE), cache, kv_len=512)
    finally:
        kernels.use_fused(False)
    assert torch.equal(torch.cat(alone), together)


ON_CUDA = dict(device="cuda", fused_kernels=True, cuda_graphs=True)


@pytest.fixture(scope="module")
def plain_on_cuda(pair_dir) -> list[list[int]]:
    with Engine(options(pair_dir, **ON_CUDA)) as engine:
        return [run(engine, p, GREEDY)[0] for p in PROMPTS]


@needs_cuda
@needs_transformers
@pytest.mark.parametrize("config", [dict(method="sd", draft="near"), dict(method="sd", draft="far", num_draft=3),
                                    dict(method="easyspec", draft="deep", layer_parallel=1),
                                    dict(method="sd", draft="near", tree_width=3, num_draft=3)],
                         ids=lambda c: "-".join(f"{v}" for v in c.values()))
def test_engine_greedy_with_fused_kernels_equals_plain(pair_dir, plain_on_cuda, config):
    """float32 on the GPU with the fused kernels and CUDA graphs: speculative greedy == plain greedy."""
    with Engine(options(pair_dir, **ON_CUDA, **config)) as engine:
        assert [run(engine, p, GREEDY)[0] for p in PROMPTS] == plain_on_cuda


def test_kernels_compile_for_hopper_with_pipelined_weight_loads():
    """Without a GPU too: every kernel compiles for sm_90, fits an H100/H200's shared memory at the
    pipelining depth chosen at run time, and streams the weights (and x) through asynchronous copies.
    In a process of its own: Triton's own library functions are interpreted in this one."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = str(Path(__file__).parent.parent)  # the script imports easyspec from this checkout, installed or not
    env["PYTHONPATH"] = os.pathsep.join(filter(None, (root, env.get("PYTHONPATH"))))
    script = Path(__file__).parent / "hopper_compile.py"
    out = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    results = json.loads(out.stdout)
    assert {r["case"] for r in results} >= {"linear-bf16-residual", "linear-bf16-gated", "linear-bf16-split",
                                            "rms-norm-bf16",
                                            "linear-split-sum-bf16", "rotary-fp32-qknorm",
                                            "attention-partial-bf16", "attention-merge-bf16"}
    for r in results:
        assert r["shared"] <= 227 * 1024, r
        assert r["loop_async_copies"] >= r["streamed_loads"], r
