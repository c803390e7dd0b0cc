"""Compile every fused kernel for sm_90 without a GPU and print what the compiler made of it (JSON).

Run by tests/test_kernels.py in a process without TRITON_INTERPRET. Pointers and strides carry the
16-byte alignment PyTorch tensors give at run time, so the compiler pipelines what it will
pipeline on the device; each case reports its shared memory and the asynchronous copies in its
main loop (the weights' and x's loads must be among them).
"""

from __future__ import annotations

import json
import os

assert os.environ.get("TRITON_INTERPRET", "0") != "1", "compile cases need the compiler, not the interpreter"

import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from easyspec.model import decode_attention, fused_linear, fused_qkv  # noqa: E402
from easyspec.model.triton_support import pipeline_stages  # noqa: E402

ACT = {"bf16": tl.bfloat16, "fp32": tl.float32}
SIZE = {"bf16": 2, "fp32": 4}


def compile_for_hopper(kernel, pointers: dict[str, str], constexprs: dict, num_stages: int):
    signature, attrs = {}, {}
    for i, name in enumerate(kernel.arg_names):
        if name in constexprs:
            signature[name] = "constexpr"
        elif name in pointers:
            signature[name], attrs[(i,)] = f"*{pointers[name]}", [["tt.divisibility", 16]]
        elif name in ("eps", "qk_eps", "scale"):
            signature[name] = "fp32"
        else:
            signature[name] = "i32"
            if name.startswith("stride"):
                attrs[(i,)] = [["tt.divisibility", 16]]
    return triton.compile(ASTSource(kernel, signature, constexprs, attrs), target=GPUTarget("cuda", 90, 32),
                          options=dict(num_warps=4, num_stages=num_stages))


def linear_case(dtype: str, gated: bool, norm: bool, residual: bool) -> tuple:
    block_k = 512 // SIZE[dtype]
    pointers = dict.fromkeys(("x_ptr", "w_ptr", "bias_ptr", "norm_ptr", "res_ptr", "out_ptr"), dtype)
    constexprs = dict(N=8192 if gated else 2048, K=2048, NORM=norm, NORM_FIRST=False, BIAS=False, GATED=gated,
                      RESIDUAL=residual, ACT=ACT[dtype], DOT=ACT[dtype], IEEE=dtype == "fp32", BLOCK_M=16,
                      BLOCK_N=16, BLOCK_K=block_k)
    stage = (16 + (2 if gated else 1) * 16) * block_k * SIZE[dtype]
    return fused_linear._linear_kernel, pointers, constexprs, pipeline_stages(stage), 3 if gated else 2


def qkv_case(dtype: str, qk_norm: bool) -> tuple:
    pairs, block_k = (64 if qk_norm else 16), 512 // SIZE[dtype]
    names = ("x_ptr", "norm_ptr", "w_ptr", "bias_ptr", "cos_ptr", "sin_ptr", "q_norm_ptr", "k_norm_ptr", "q_ptr",
             "key_ptr", "value_ptr")
    pointers = dict.fromkeys(names, dtype) | {"slot_ptr": "i64"}
    constexprs = dict(K=2048, HEADS=16, KV_HEADS=8, HEAD_DIM=128, PAIRS=pairs, NORM_FIRST=False, BIAS=True,
                      QK_NORM=qk_norm, ACT=ACT[dtype], DOT=ACT[dtype], IEEE=dtype == "fp32", BLOCK_M=16,
                      BLOCK_K=block_k)
    return fused_qkv._qkv_kernel, pointers, constexprs, pipeline_stages((16 + 2 * pairs) * block_k * SIZE[dtype]), 3


def main() -> None:
    cases = {
        "linear-bf16-residual": linear_case("bf16", False, False, True),
        "linear-bf16-norm-gated": linear_case("bf16", True, True, False),
        "linear-fp32-norm": linear_case("fp32", False, True, False),
        "qkv-bf16": qkv_case("bf16", False),
        "qkv-fp32-qknorm": qkv_case("fp32", True),
    }
    attention = dict.fromkeys(("q_ptr", "k_ptr", "v_ptr", "out_ptr"), "bf16") | {
        "mask_ptr": "u8", "part_ptr": "fp32", "lse_ptr": "fp32"}
    cases["attention-partial-bf16"] = (decode_attention._partial_kernel, attention,
                                       dict(GROUP=4, HEAD_DIM=128, HEAD_PAD=128, CHUNK=64, DOT=tl.bfloat16,
                                            BLOCK_M=16, BLOCK=64, IEEE=False), 3, 0)
    cases["attention-merge-bf16"] = (decode_attention._merge_kernel, attention,
                                     dict(GROUP=4, HEAD_DIM=128, HEAD_PAD=128, SPLITS=64), 3, 0)
    results = []
    for name, (kernel, pointers, constexprs, stages, streamed) in cases.items():
        compiled = compile_for_hopper(kernel, pointers, constexprs, stages)
        loop = compiled.asm["ttgir"].split("scf.for")[-1]  # the last loop: the main loop over K
        results.append(dict(case=name, shared=compiled.metadata.shared, num_stages=stages, streamed_loads=streamed,
                            loop_async_copies=loop.count("async_copy_global_to_local")))
    print(json.dumps(results))


if __name__ == "__main__":
    main()
