"""Backend selection shared by every operator.

Two implementations exist for each op:

* ``reference`` -- plain PyTorch that mirrors the original model code (any device, any dtype,
  differentiable through ordinary autograd);
* ``triton``    -- the fused Triton kernels behind a registered ``torch.ops.mmkernels`` op.  On a
  CPU tensor they run under Triton's interpreter, which must be switched on with
  ``TRITON_INTERPRET=1`` *before* mmkernels is imported.

``auto`` (the default) picks ``triton`` for CUDA tensors and ``reference`` for CPU tensors.  The
choice comes from, in order: the innermost :func:`use_backend` context, the
``MMKERNELS_BACKEND`` environment variable (read at import), ``auto``.

:func:`use_backend` is scoped like a :mod:`contextvars` variable: per thread and per asyncio task.
A block in one thread (or task) never changes what another one sees; a new thread starts from the
environment default, and a task starts from the context it was created in.

``torch.compile`` traces the lookup.  Where Dynamo can guard on a ``ContextVar`` (torch >= 2.14), a
compiled function recompiles when it runs under a different backend.  On older torch (2.11-2.13)
the backend is read once, when the function is traced: call ``torch.compiler.reset()`` after
switching the backend around a function that was already compiled.
"""
from __future__ import annotations

import contextlib
import contextvars
import os

import torch

from ._interpreter import interpreter_enabled

BACKENDS = ("auto", "reference", "triton")

# Read once at import (like TRITON_INTERPRET, which Triton reads when kernels are decorated).
_ENV_BACKEND = os.environ.get("MMKERNELS_BACKEND") or None
# The innermost use_backend() of this thread / task; None outside every block.
_CURRENT: contextvars.ContextVar = contextvars.ContextVar("mmkernels_backend", default=None)


# Dynamo traces ContextVar.get() with a guard from torch 2.14 on (version, not feature, detection:
# importing torch._dynamo at import time would cost seconds).
_DYNAMO_GUARDS_CONTEXTVARS = tuple(int(p) for p in torch.__version__.split(".")[:2]) >= (2, 14)


def _read_current_as_constant():
    return _CURRENT.get()


# What torch.compiler.assume_constant_result sets, without importing Dynamo: older Dynamo calls the
# function once while tracing and uses its result as a constant (no guard; see the module docstring).
_read_current_as_constant._dynamo_marked_constant = True


def _read_current():
    if _DYNAMO_GUARDS_CONTEXTVARS or not torch.compiler.is_compiling():
        return _CURRENT.get()
    return _read_current_as_constant()


def _check_name(name: str, source: str) -> str:
    if not isinstance(name, str) or name.lower() not in BACKENDS:
        raise ValueError(f"{source} must be one of {BACKENDS}, got {name!r}")
    return name.lower()


def get_backend() -> str:
    """The backend requested right now: ``'auto'``, ``'reference'`` or ``'triton'``."""
    current = _read_current()
    if current is not None:
        return current
    if _ENV_BACKEND:
        return _check_name(_ENV_BACKEND, "MMKERNELS_BACKEND")
    return "auto"


@contextlib.contextmanager
def use_backend(name: str):
    """Run the enclosed code with the given backend (``auto``, ``reference`` or ``triton``)."""
    token = _CURRENT.set(_check_name(name, "backend"))
    try:
        yield
    finally:
        _CURRENT.reset(token)


def resolve_backend(device: torch.device, dtype: torch.dtype | None = None) -> str:
    """The backend that will actually run for tensors on ``device`` (never ``'auto'``).

    ``auto`` uses Triton on CUDA for the dtypes the kernels support (fp16, bf16, fp32) and the
    reference otherwise.  An explicit ``triton`` on a CPU tensor needs the interpreter.
    """
    name = get_backend()
    if name == "auto":
        return "triton" if (device.type == "cuda" and dtype in (None, *TRITON_DTYPES)) else "reference"
    if name == "triton":
        require_triton(device, dtype)
    return name


TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def require_triton(device: torch.device, dtype: torch.dtype | None = None) -> None:
    """Raise a clear error if the Triton kernels cannot run for this device and dtype."""
    if dtype is not None and dtype not in TRITON_DTYPES:
        raise TypeError(
            f"the triton backend supports float16, bfloat16 and float32 inputs, got {dtype}; "
            "use the reference backend for other dtypes")
    if device.type == "cpu" and not interpreter_enabled():
        raise RuntimeError(
            "the triton backend on CPU tensors runs Triton's interpreter: set TRITON_INTERPRET=1 "
            "in the environment before importing mmkernels (or use the reference backend)")
    if device.type not in ("cpu", "cuda"):
        raise RuntimeError(f"the triton backend supports cpu (interpreter) and cuda tensors, got {device}")
