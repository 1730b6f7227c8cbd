"""Triton's CPU interpreter: detection and one numerical fix.

``@triton.jit`` decides at decoration time whether a kernel is compiled or interpreted, so
``TRITON_INTERPRET=1`` must be in the environment before any kernel module is imported.

The fix: the interpreter keeps bfloat16 tensors as their raw ``uint16`` bit patterns and its
``create_dot`` hands those integers straight to ``np.matmul``, so a bf16 ``tl.dot`` returns garbage
(triton-lang/triton#11584, closed upstream without a fix).  :func:`patch_bf16_dot` wraps
``InterpreterBuilder.create_dot`` so bf16 operands are widened to float32 first (bf16 is the top
half of an IEEE float32, so the widening is exact); every other dtype goes through untouched.
The second fix: the interpreter casts float32 -> bfloat16 by truncation, while GPUs round to
nearest even, which doubles the rounding error of every bf16 store (two chained bf16 GEMMs then sit
at the edge of the bf16 tolerance).  :func:`patch_bf16_cast` rounds to nearest even, as the GPU does.

Both patches are applied only when the interpreter is enabled and never touch compiled GPU kernels.
"""
from __future__ import annotations

import os

_PATCHED = False
_CAST_PATCHED = False
# Read once at import: kernels decorated after this point are interpreted iff this is True.
_INTERPRET = os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on", "yes")


def interpreter_enabled() -> bool:
    return _INTERPRET


def _bf16_bits_to_float32(data):
    import numpy as np

    return (data.astype(np.uint32) << 16).view(np.float32)


def patch_bf16_dot() -> bool:
    """Make the interpreter's ``tl.dot`` correct for bfloat16 operands.  Returns True if patched."""
    global _PATCHED
    if _PATCHED:
        return True
    try:
        import triton.language as tl
        from triton.runtime.interpreter import InterpreterBuilder, TensorHandle
    except Exception:  # triton missing or without an interpreter: nothing to patch
        return False
    original = InterpreterBuilder.create_dot

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        if a.dtype == tl.bfloat16 or b.dtype == tl.bfloat16:
            a_data = _bf16_bits_to_float32(a.data) if a.dtype == tl.bfloat16 else a.data
            b_data = _bf16_bits_to_float32(b.data) if b.dtype == tl.bfloat16 else b.data
            a = TensorHandle(a_data.astype(d.data.dtype), d.dtype.scalar)
            b = TensorHandle(b_data.astype(d.data.dtype), d.dtype.scalar)
        return original(self, a, b, d, input_precision, max_num_imprecise_acc)

    InterpreterBuilder.create_dot = create_dot
    _PATCHED = True
    return True


def patch_bf16_cast() -> bool:
    """Make the interpreter's float32 -> bfloat16 cast round to nearest even (NaN stays NaN)."""
    global _CAST_PATCHED
    if _CAST_PATCHED:
        return True
    try:
        import numpy as np
        import triton.language as tl
        from triton.runtime.interpreter import InterpreterBuilder, TensorHandle
    except Exception:
        return False
    original = InterpreterBuilder.cast_impl

    def cast_impl(self, src, dst_type):
        if src.dtype.scalar == tl.float32 and dst_type.scalar == tl.bfloat16:
            bits = np.ascontiguousarray(src.data, dtype=np.float32).view(np.uint32).astype(np.uint64)
            rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)
            nan = np.isnan(src.data)
            rounded[nan] = ((bits[nan] >> 16) | 0x40).astype(np.uint16)
            return TensorHandle(rounded, dst_type.scalar)
        return original(self, src, dst_type)

    InterpreterBuilder.cast_impl = cast_impl
    _CAST_PATCHED = True
    return True


if interpreter_enabled():
    patch_bf16_dot()
    patch_bf16_cast()
