"""The ``mmkernels`` op namespace on the Python side.

Ops whose bodies are Triton kernels are defined here with explicit schemas (``torch.ops.mmkernels.*``)
next to the ops the native libraries (``mmkernels/_C.abi3.so``) register from C++.  Each gets a CPU
and a CUDA kernel (the CPU one runs the Triton interpreter), a fake implementation for torch.compile, and
where differentiable an autograd formula, so ``torch.library.opcheck`` passes.

A *backward* op (one that computes the gradients of another op) is defined with ``backward_of=``.
Unless it is given a derivative of its own (``torch.library.register_autograd`` after this call),
differentiating through it -- double backward, ``create_graph=True`` followed by a second
``backward`` -- raises :class:`DoubleBackwardError` naming the operator.  Without that guard torch
only warns and silently returns zeros for the second-order gradient.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch

LIB = torch.library.Library("mmkernels", "FRAGMENT")  # noqa: TOR901 - kept alive for the process


class DoubleBackwardError(RuntimeError):
    """Raised when a graph through a Triton backward op that has no derivative is differentiated again."""


def define_op(name: str, schema: str, impl: Callable, fake: Callable, *,
              backward_of: Optional[str] = None) -> torch._ops.OpOverloadPacket:
    """Define ``mmkernels::name`` with one implementation for CPU and CUDA plus a fake kernel.

    ``backward_of`` names the public function whose gradient this op computes; the op then refuses
    to be differentiated (see the module docstring) until a real derivative is registered over it.
    """
    LIB.define(f"{name}{schema}")
    LIB.impl(name, impl, "CPU")
    LIB.impl(name, impl, "CUDA")
    torch.library.register_fake(f"mmkernels::{name}", fake, lib=LIB)
    if backward_of is not None:
        _refuse_double_backward(name, backward_of)
    return getattr(torch.ops.mmkernels, name)


def _refuse_double_backward(name: str, public: str) -> None:
    def setup_context(ctx, inputs, output):
        pass

    def backward(ctx, *grads):
        raise DoubleBackwardError(
            f"mmkernels::{name} (the gradient of {public} on the triton backend) has no derivative of its "
            f"own: double backward through {public} is not supported on the triton backend.  Run that part "
            "under mmkernels.use_backend('reference') to differentiate twice.")

    torch.library.register_autograd(f"mmkernels::{name}", backward, setup_context=setup_context, lib=LIB)
