"""The torch-native MoE peer (benchmarks/torch_native_moe.py) computes what mmkernels.MoE computes:
dropless top-2, no second-expert sampling, same weights; output and every gradient, on CPU."""
from __future__ import annotations

import copy

import pytest
import torch

import mmkernels

from .bench_moe import make_layer
from .torch_native_moe import GROUPED, LOOP, grouped_mm_unavailable, torch_native_moe


def _dropless(activation, dtype, S=37, Hd=16, Fd=24, skewed=True):
    torch.manual_seed(S + Hd)
    moe, _ = make_layer(Hd, Fd, activation, "cpu", dtype, skewed=skewed)
    moe.drop_tokens, moe.top2_2nd_expert_sampling = False, False
    return moe, torch.randn(S, Hd, dtype=dtype) * 0.5, torch.randn(S, Hd, dtype=dtype)


def _grads(moe, x, dy, fn):
    xr = x.clone().requires_grad_(True)
    for p in moe.parameters():
        p.grad = None
    y = fn(xr)
    y.backward(dy)
    return [y.detach(), xr.grad, *(p.grad.clone() for p in moe.parameters())]


@pytest.mark.parametrize("activation", ["gelu_tanh", "swiglu"])
def test_loop_path_matches_moe_float64(activation):
    moe, x, dy = _dropless(activation, torch.float64)
    names = ["y", "dx", *(n for n, _ in moe.named_parameters())]
    paths = []

    def native(xr):
        y, path = torch_native_moe(xr, moe)
        paths.append(path)
        return y

    with mmkernels.use_backend("reference"):
        want = _grads(moe, x, dy, lambda xr: moe(xr)[0])
    got = _grads(moe, x, dy, native)
    assert paths == [LOOP]           # no float64 grouped_mm: the loop ran, and said so
    assert grouped_mm_unavailable("cpu", torch.float64) is not None
    for n, g, w in zip(names, got, want):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12, msg=n)


def test_empty_input():
    moe, _, _ = _dropless("gelu_tanh", torch.float64)
    y, path = torch_native_moe(torch.randn(0, 16, dtype=torch.float64), moe)
    assert y.shape == (0, 16) and path == LOOP


def test_grouped_path_bf16_against_float64():
    """Where this torch runs torch._grouped_mm on CPU in bf16, that path (what the GPU times) is checked
    too; against the float64 layer with the bf16 tolerance."""
    why = grouped_mm_unavailable("cpu", torch.bfloat16, 16, 48, 24)
    if why is not None:
        pytest.skip(f"not measured: {why}")
    moe, x, dy = _dropless("swiglu", torch.float64, S=40, Hd=16)
    with torch.no_grad():   # the float64 layer sees the bf16-rounded weights and inputs
        for p in (moe.w1, moe.w2):
            p.copy_(p.bfloat16())
    x, dy = x.bfloat16().double(), dy.bfloat16().double()
    with mmkernels.use_backend("reference"):
        want = _grads(moe, x, dy, lambda xr: moe(xr)[0])
    moe_bf = copy.deepcopy(moe).to(torch.bfloat16)
    moe_bf.gate_weight.data = moe_bf.gate_weight.data.float()
    paths = []

    def native(xr):
        y, path = torch_native_moe(xr, moe_bf)
        paths.append(path)
        return y

    got = _grads(moe_bf, x.bfloat16(), dy.bfloat16(), native)
    assert paths == [GROUPED]
    for n, g, w in zip(["y", "dx", "w1", "w2"], [got[0], got[1], got[3], got[4]], [want[0], want[1], want[3], want[4]]):
        # plain PyTorch rounds every intermediate (z, h, o, the scaled o) to bf16, unlike the fused kernels'
        # fp32 epilogues, so this is a same-layer check (a wrong route or weight is off by O(1)), not a
        # kernel tolerance
        rel = ((g.double() - w).norm() / w.norm()).item()
        assert rel < 3e-2, (n, rel)
