"""The ``mmkernels`` op namespace on the Python side.

Ops whose bodies are Triton kernels are defined here with explicit schemas (``torch.ops.mmkernels.*``)
next to the ops the compiled ``mmkernels._C`` registers from C++.  Each gets a CPU and a CUDA
kernel (the CPU one runs the Triton interpreter), a fake implementation for torch.compile, and
where differentiable an autograd formula, so ``torch.library.opcheck`` passes.
"""
from __future__ import annotations

from typing import Callable

import torch

LIB = torch.library.Library("mmkernels", "FRAGMENT")  # noqa: TOR901 - kept alive for the process


def define_op(name: str, schema: str, impl: Callable, fake: Callable) -> torch._ops.OpOverloadPacket:
    """Define ``mmkernels::name`` with one implementation for CPU and CUDA plus a fake kernel."""
    LIB.define(f"{name}{schema}")
    LIB.impl(name, impl, "CPU")
    LIB.impl(name, impl, "CUDA")
    torch.library.register_fake(f"mmkernels::{name}", fake, lib=LIB)
    return getattr(torch.ops.mmkernels, name)
