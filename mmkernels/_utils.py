"""Small helpers shared by the operator launchers."""
from __future__ import annotations

import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - triton is a hard dependency on Linux
    triton = None
    tl = None


def poison_outputs() -> bool:
    """When ``MMKERNELS_POISON_OUTPUTS=1`` (the test suite sets it) every kernel output is
    allocated full of NaN instead of uninitialised, so an element a kernel forgot to write shows."""
    return os.environ.get("MMKERNELS_POISON_OUTPUTS", "0") == "1"


def new_output(shape, *, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    if poison_outputs():
        if dtype.is_floating_point:
            return torch.full(shape, float("nan"), dtype=dtype, device=device)
        return torch.full(shape, -123 if dtype == torch.int8 else -12345, dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


def triton_dtype(dtype: torch.dtype):
    return {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}[dtype]


def cdiv(a: int, b: int) -> int:
    return (a + b - 1) // b


def autocast_dtype(device: torch.device) -> torch.dtype | None:
    """The dtype ``torch.autocast`` casts to for tensors on ``device`` right now, or None when it is off
    there.  (Autocast exists for CPU and CUDA tensors; torch raises when asked about another device
    type, e.g. ``meta``.)"""
    if device.type in ("cpu", "cuda") and torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type)
    return None


def allow_tf32() -> bool:
    """fp32 ``tl.dot`` follows torch's own matmul setting (off by default: exact fp32 like F.linear)."""
    return bool(torch.backends.cuda.matmul.allow_tf32)
