"""pytest-benchmark micro-benchmarks of the MoE layer on CPU (tiny sizes, a few seconds in all).

Providers as in ``bench_moe``: ``mmkernels`` (:class:`mmkernels.MoE`, the ``reference`` backend forced so
the result does not depend on TRITON_INTERPRET: the sort + per-expert matmul path), ``ds_einsum``
(DeepSpeed's dense einsum gating/dispatch/combine) and ``expert_loop`` (plain PyTorch per-expert
loop).  Each test also checks that the provider's output equals the DeepSpeed formulation.

Run: ``pytest benchmarks`` (``--benchmark-disable`` to only run the checks once).
"""
from __future__ import annotations

import pytest
import torch

import mmkernels
from mmkernels.ops.moe.reference import deepspeed_einsum_moe

from . import harness as H
from .bench_moe import K_TOP, expert_loop_moe, make_layer

SIZES = [(128, 64, 128), (512, 128, 256)]  # (S, H, F)
MODES = ["fwd", "fwd+bwd"]
PROVIDERS = ["mmkernels", "ds_einsum", "expert_loop"]


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("size", SIZES, ids=lambda s: "S{}-H{}-F{}".format(*s))
def test_moe_cpu(benchmark, size, mode, provider):
    S, Hd, Fd = size
    torch.manual_seed(S + Hd + Fd)
    moe, experts = make_layer(Hd, Fd, "gelu_tanh", "cpu", torch.float32, skewed=False)
    x = torch.randn(S, Hd).requires_grad_(True)
    dy = torch.randn(S, Hd)
    noise = -torch.log(-torch.log(torch.rand(S, 4).clamp(1e-20, 1 - 1e-7)))
    cap = moe.capacity(S)
    leaves = [x, *moe.parameters(), *[p for ex in experts for p in ex.parameters()]]
    benchmark.group = f"moe {mode} S{S} H{Hd} F{Fd}"
    benchmark.extra_info.update(dict(op="moe", provider=provider, mode=mode, S=S, H=Hd, F=Fd, E=4, k=K_TOP,
                                     capacity_factor=moe.capacity_factor, dtype="float32"))

    def forward():
        if provider == "mmkernels":
            with mmkernels.use_backend("reference"):
                return moe(x, second_expert_noise=noise)[0]
        if provider == "ds_einsum":
            return deepspeed_einsum_moe(x, moe.gate_weight, experts, K_TOP, cap, noise)[0]
        return expert_loop_moe(x, moe.gate_weight, experts, cap, noise)[0]

    y = H.cpu_benchmark_case(benchmark, forward, mode, dy, leaves, rounds=5)
    with torch.no_grad():
        want = deepspeed_einsum_moe(x, moe.gate_weight, experts, K_TOP, cap, noise)[0]
    torch.testing.assert_close(y, want, rtol=1e-4, atol=1e-5)
    if mode == "fwd+bwd":
        assert x.grad is not None and x.grad.shape == x.shape
