"""What the model's Triton kernels share: where they run, their dot-product types, and launching
with a clean fallback.

The kernels run on CUDA, and on the CPU only under Triton's interpreter (TRITON_INTERPRET=1, which
the tests set on machines without a GPU). Every launch goes through `launch`: if a kernel cannot be
compiled or launched on this machine (an old GPU, too little shared memory for its pipeline), it
warns once, stops using that kernel and the caller runs the reference formulas instead. Errors
are never swallowed under the interpreter or inside a CUDA-graph capture, where a silent fallback
would hide a bug or change a captured graph.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable

import torch
from torch import Tensor

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: every caller falls back to the reference formulas
    triton = None
    tl = None

ROW_BLOCK = 16  # rows (tokens) per program: the smallest tl.dot tile, the same for every token count
MAX_ROWS = 64  # longer inputs (prompt pieces) go to cuBLAS: there a kernel of our own has nothing to gain

_failed: set[str] = set()


def interpreting() -> bool:
    """Whether Triton kernels run in Triton's CPU interpreter (decided when the kernels are defined)."""
    return triton is not None and os.environ.get("TRITON_INTERPRET", "0") == "1"


def runs_on(t: Tensor) -> bool:
    """Whether the kernels can run on t's device: CUDA, or the CPU under the interpreter."""
    if triton is None or (torch.is_grad_enabled() and t.requires_grad):
        return False  # the kernels have no backward: training keeps the reference formulas
    return t.is_cuda or (t.device.type == "cpu" and interpreting())


def tl_type(dtype: torch.dtype):
    """The Triton type of a floating-point torch dtype the kernels support, else None."""
    return {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}.get(dtype)


def dot_type(dtype: torch.dtype):
    """The operand type of tl.dot for activations of `dtype`: the half type itself on the GPU
    (tensor cores); float32 for float32 (IEEE, no TF32) and under the interpreter, whose dot
    multiplies bfloat16 bit patterns as integers."""
    if dtype == torch.float32 or interpreting():
        return tl.float32
    return tl_type(dtype)


def multiprocessors(device: torch.device) -> int:
    """How many programs run at once on the device, roughly: its multiprocessor count."""
    if device.type != "cuda":
        return 4
    return torch.cuda.get_device_properties(device).multi_processor_count


def pipeline_stages(bytes_per_stage: int) -> int:
    """Software-pipelining depth for a loop that stages `bytes_per_stage` of shared memory per
    iteration: up to 5 (enough loads in flight to stream at full bandwidth), keeping the buffers
    within 200 KB (an H100/H200 block may use 227 KB)."""
    return max(2, min(5, (200 << 10) // bytes_per_stage))


def launch(name: str, kernel, grid: Callable | tuple, *args, **kwargs) -> bool:
    """kernel[grid](*args, **kwargs); False (after one warning) if `name` cannot run here."""
    if name in _failed:
        return False
    try:
        kernel[grid](*args, **kwargs)
    except Exception as err:  # compile errors and out-of-resources: the reference formulas run instead
        capturing = torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()
        if interpreting() or capturing:
            raise
        _failed.add(name)
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else ""
        warnings.warn(f"easyspec: the fused {name} kernel cannot run here ({type(err).__name__}: {first_line}); "
                      f"using the reference formulas for it", stacklevel=2)
        return False
    return True


def failed_kernels() -> frozenset[str]:
    """The kernels that fell back to the reference formulas in this process."""
    return frozenset(_failed)
