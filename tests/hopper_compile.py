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

import torch  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from easyspec.model import decode_attention, fused_linear, fused_qkv  # noqa: E402
from easyspec.model.triton_support import pipeline_stages  # noqa: E402

ACT = {"bf16": tl.bfloat16, "fp32": tl.float32}
SIZE = {"bf16": 2, "fp32": 4}
TORCH = {"bf16": torch.bfloat16, "fp32": torch.float32}


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


def linear_case(dtype: str, gated: bool, residual: bool, outputs: int, inputs: int,
                split: int = 1) -> tuple:
    """The cut a GPU would choose for this shape, with the inputs split as given (a CPU has no
    multiprocessor count to choose it from)."""
    cut = fused_linear.blocks(outputs, inputs, TORCH[dtype], torch.device("cpu"), gated)._replace(split=split)
    pointers = dict.fromkeys(("x_ptr", "w_ptr", "bias_ptr", "res_ptr", "out_ptr"), dtype) | {"part_ptr": "fp32"}
    constexprs = dict(N=outputs, K=inputs, SPLIT=cut.split, BIAS=False, GATED=gated, RESIDUAL=residual,
                      ACT=ACT[dtype], DOT=ACT[dtype], IEEE=dtype == "fp32", BLOCK_M=16, BLOCK_N=cut.n, BLOCK_K=cut.k)
    stage = (16 + (2 if gated else 1) * cut.n) * cut.k * SIZE[dtype]
    return fused_linear._linear_kernel, pointers, constexprs, pipeline_stages(stage), 3 if gated else 2


def rotary_case(dtype: str, qk_norm: bool) -> tuple:
    names = ("qkv_ptr", "cos_ptr", "sin_ptr", "q_norm_ptr", "k_norm_ptr", "q_ptr", "key_ptr", "value_ptr")
    pointers = dict.fromkeys(names, dtype) | {"slot_ptr": "i64"}
    constexprs = dict(HEADS=16, KV_HEADS=8, HEAD_DIM=128, PAIRS=64, QK_NORM=qk_norm, ACT=ACT[dtype], BLOCK_M=16)
    return fused_qkv._rotary_cache_kernel, pointers, constexprs, 1, 0


def main() -> None:
    cases = {
        "linear-bf16-residual": linear_case("bf16", False, True, 2048, 8192, split=4),
        "linear-bf16-gated": linear_case("bf16", True, False, 8192, 2048),
        "linear-bf16-split": linear_case("bf16", False, False, 3072, 2048, split=2),
        "linear-fp32": linear_case("fp32", False, False, 128256, 2048),
        "rms-norm-bf16": (fused_linear._rms_norm_kernel, dict.fromkeys(("x_ptr", "weight_ptr", "out_ptr"), "bf16"),
                          dict(K=4096, ACT=tl.bfloat16, BLOCK=4096), 1, 0),
        "rotary-bf16": rotary_case("bf16", False),
        "rotary-fp32-qknorm": rotary_case("fp32", True),
    }
    split_sum = dict.fromkeys(("bias_ptr", "res_ptr", "out_ptr"), "bf16") | {"part_ptr": "fp32"}
    cases["linear-split-sum-bf16"] = (fused_linear._split_sum_kernel, split_sum,
                                      dict(N=2048, SPLIT=4, BIAS=True, RESIDUAL=True, ACT=tl.bfloat16,
                                           BLOCK_M=16, BLOCK_N=64), 1, 0)
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
