"""pytest-benchmark micro-benchmarks of the MoE layer on CPU (tiny sizes, a few seconds in all), and the
checks that keep the benchmark's DeepSpeed baselines honest.

Providers as in ``bench_moe``: ``mmkernels`` (:class:`mmkernels.MoE`, the ``reference`` backend forced so
the result does not depend on TRITON_INTERPRET: the sort + per-expert matmul path), ``deepspeed`` (the
installed DeepSpeed's ``MoE``) or, without DeepSpeed, ``deepspeed_mirror`` (the mirror of DeepSpeed
0.19.8's code path in ``bench_moe``), ``ds095_einsum`` (DeepSpeed 0.9.5's dense einsum formulation, the
in-package mirror) and ``expert_loop`` (plain PyTorch per-expert loop).  Each case also checks that the
provider's output equals mmkernels'.

Run: ``pytest benchmarks`` (``--benchmark-disable`` to only run the checks once).
"""
from __future__ import annotations

import time

import pytest
import torch

import mmkernels
from mmkernels.ops.moe.reference import deepspeed_einsum_moe

from . import harness as H
from .bench_moe import (CF, EINSUM, K_TOP, deepspeed_baseline, deepspeed_fn, deepspeed_mirror_moe, evaluate_targets,
                        expert_loop_moe, installed_deepspeed, make_deepspeed_layer, make_layer, run_deepspeed)

SIZES = [(128, 64, 128), (512, 128, 256)]  # (S, H, F)
MODES = ["fwd", "fwd+bwd"]
BASELINE = deepspeed_baseline()
PROVIDERS = ["mmkernels", BASELINE["provider"], EINSUM, "expert_loop"]
NEEDS_DEEPSPEED = pytest.mark.skipif(installed_deepspeed() is None,
                                     reason="DeepSpeed is not installed (pip install deepspeed==0.19.8): the mirror "
                                            "cannot be checked against it (the mirror-vs-mmkernels checks still run)")


def gumbel(S, E=4):
    return -torch.log(-torch.log(torch.rand(S, E).clamp(1e-20, 1 - 1e-7)))


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("size", SIZES, ids=lambda s: "S{}-H{}-F{}".format(*s))
def test_moe_cpu(benchmark, size, mode, provider):
    S, Hd, Fd = size
    torch.manual_seed(S + Hd + Fd)
    moe, experts, template = make_layer(Hd, Fd, "gelu_tanh", "cpu", torch.float32, skewed=False, with_template=True)
    x = torch.randn(S, Hd).requires_grad_(True)
    dy = torch.randn(S, Hd)
    noise = gumbel(S)
    cap = moe.capacity(S)
    ds_call, ds_params = (deepspeed_fn(BASELINE, moe, experts, template, "cpu") if provider == BASELINE["provider"]
                          else (None, []))
    leaves = [x, *moe.parameters(), *[p for ex in experts for p in ex.parameters()], *ds_params]
    benchmark.group = f"moe {mode} S{S} H{Hd} F{Fd}"
    benchmark.extra_info.update(dict(op="moe", provider=provider, mode=mode, S=S, H=Hd, F=Fd, E=4, k=K_TOP,
                                     capacity_factor=moe.capacity_factor, dtype="float32",
                                     measured_against=BASELINE["measured_against"]
                                     if provider == BASELINE["provider"] else None))

    def forward():
        if provider == "mmkernels":
            with mmkernels.use_backend("reference"):
                return moe(x, second_expert_noise=noise)[0]
        if provider == BASELINE["provider"]:
            return ds_call(x, noise)[0]
        if provider == EINSUM:
            return deepspeed_einsum_moe(x, moe.gate_weight, experts, K_TOP, cap, noise)[0]
        return expert_loop_moe(x, moe.gate_weight, experts, cap, noise)[0]

    y = H.cpu_benchmark_case(benchmark, forward, mode, dy, leaves, rounds=5)
    with torch.no_grad(), mmkernels.use_backend("reference"):
        want = moe(x, second_expert_noise=noise)[0]
    torch.testing.assert_close(y, want, rtol=1e-4, atol=1e-5)
    if mode == "fwd+bwd":
        assert x.grad is not None and x.grad.shape == x.shape


@pytest.mark.parametrize("S,cf,min_capacity", [(61, 0.5, 0), (9, 1.0, 12)])
def test_mirror_matches_mmkernels(S, cf, min_capacity):
    """deepspeed_mirror_moe (what is timed without DeepSpeed) computes what mmkernels.MoE computes."""
    torch.manual_seed(S)
    moe, experts = make_layer(24, 40, "gelu_tanh", "cpu", torch.float64, skewed=True)
    moe.gate_weight.data = moe.gate_weight.data.float()
    moe.capacity_factor, moe.min_capacity = cf, min_capacity
    x, noise = torch.randn(S, 24, dtype=torch.float64), gumbel(S)
    with mmkernels.use_backend("reference"):
        y, l_aux, counts = moe(x, second_expert_noise=noise)
    y_m, l_m, c_m = deepspeed_mirror_moe(x, moe.gate_weight, experts, cf, min_capacity, noise)
    torch.testing.assert_close(y, y_m)
    torch.testing.assert_close(l_aux, l_m, rtol=1e-6, atol=1e-7)
    assert torch.equal(counts, c_m)


@NEEDS_DEEPSPEED
@pytest.mark.parametrize("S,cf,min_capacity", [(61, 0.5, 0), (9, 1.0, 12)])
def test_mirror_is_bitwise_the_installed_deepspeed(S, cf, min_capacity):
    """The mirror is DeepSpeed's code path: same output, l_aux, exp_counts and gradients, bit for bit."""
    torch.manual_seed(S)
    moe, experts, template = make_layer(24, 40, "gelu_tanh", "cpu", torch.float32, skewed=True, with_template=True)
    moe.capacity_factor, moe.min_capacity = cf, min_capacity
    ds = make_deepspeed_layer(moe, template, "cpu")
    noise = gumbel(S)
    x = torch.randn(S, 24)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    got = deepspeed_mirror_moe(xa, moe.gate_weight, experts, cf, min_capacity, noise)
    want = run_deepspeed(ds, xb, noise)
    for a, b in zip(got, want):
        assert torch.equal(a, b)
    (got[0].square().sum() + got[1]).backward()
    (want[0].square().sum() + want[1]).backward()
    assert torch.equal(xa.grad, xb.grad)
    assert torch.equal(moe.gate_weight.grad, ds.deepspeed_moe.gate.wg.weight.grad)
    for e, ex in enumerate(experts):
        for name, p in ex.named_parameters():
            assert torch.equal(p.grad, ds.deepspeed_moe.experts.deepspeed_experts[e].get_parameter(name).grad), name
    assert CF == 1.5   # the benchmark's factor, whose ceiling E*C/kept ~ 1.5 the targets cite


def test_targets_say_what_they_were_measured_against():
    rows = [dict(provider="mmkernels", mode="fwd+bwd", model="m", routing="random", S=16384,
                 paired_speedup_vs_deepspeed=1.4, speedup_vs_deepspeed=1.4, capacity_ceiling=1.5,
                 speedup_vs_ds095_einsum=3.1, same_output_as_deepspeed=True, same_output_as_ds095_einsum=True,
                 speedup_vs_loop=1.0)]
    for on_cuda in (False, True):
        targets = evaluate_targets(rows, [], on_cuda, BASELINE)
        ds = [t for t in targets if "measured_against" in t]
        assert all({"id", "value", "goal", "better", "met", "detail"} <= set(t) for t in targets)
        assert all(isinstance(t["value"], float) for t in targets)
        assert len(ds) == 2
        assert BASELINE["measured_against"] in [t["measured_against"] for t in ds]
        assert any("0.9.5" in t["measured_against"] and "mirror" in t["measured_against"] for t in ds)
        if not BASELINE["installed"]:
            assert "mirror" in BASELINE["measured_against"] and "not installed" in BASELINE["measured_against"]


def test_peer_sections_smoke(monkeypatch):
    """The peer sections run end to end on CPU at a tiny shape: every provider gives a row (a
    measured time or "not measured: <why>"), and the targets come out in the results schema.  (One
    timed call per case: a smoke test, not a timing.)"""
    from .bench_moe import grouped_gemm_peers, layer_peers, peer_targets

    def once(fn, grad_to_none=None, **_):
        for t in grad_to_none or []:
            t.grad = None
        t0 = time.perf_counter()
        fn()
        ms = (time.perf_counter() - t0) * 1e3
        return H.Timing(ms, ms, ms, ms, 1, torch.get_num_threads())

    monkeypatch.setattr(H, "time_ms", once)

    models = {"tiny": (32, 48, "swiglu")}
    gg = grouped_gemm_peers(torch.device("cpu"), True, models=models, S=40)
    assert [r["provider"] for r in gg if r["routing"] == "random"] == [
        "mmkernels", "torch._grouped_mm", "dense", "mmkernels wgrad", "torch._grouped_mm wgrad"]
    for r in gg:
        assert (r["ms"] is not None and r["ms"] > 0 and r["flops"] == 2 * 80 * 32 * 96) or \
            r["note"].startswith("not measured: ")
    layer = layer_peers(torch.device("cpu"), True, models=models, S=40)
    assert {(r["routing"], r["mode"], r["provider"]) for r in layer} == {
        (ro, m, p) for ro in ("random", "skewed") for m in ("fwd", "fwd+bwd") for p in ("mmkernels", "torch_native")}
    assert all(r["ms"] for r in layer)
    assert {r["path"] for r in layer if r["provider"] == "torch_native"} == {"per-expert matmul loop"}  # fp32, CPU
    targets = {t["id"]: t for t in peer_targets(gg, layer)}
    assert set(targets) == {"moe.grouped_gemm_vs_torch", "moe.wgrad_tflops", "moe.layer_fwd_vs_torch",
                            "moe.layer_fwd_bwd_vs_torch"}
    for t in targets.values():
        assert set(t) >= {"id", "value", "goal", "better", "met", "target", "detail"} and t["better"] == "higher"
    worst = min(r["speedup_vs_torch_native"] for r in layer if r["provider"] == "mmkernels" and r["mode"] == "fwd")
    assert targets["moe.layer_fwd_vs_torch"]["value"] == round(worst, 4)


def test_peer_targets_not_measured_is_not_met():
    from .bench_moe import peer_targets

    gg = [dict(provider="mmkernels", model="phi2", routing="random", speedup_vs_torch=None, tflops=600.0),
          dict(provider="mmkernels wgrad", model="phi2", routing="random", speedup_vs_torch=None, tflops=450.0)]
    t = {x["id"]: x for x in peer_targets(gg, [])}
    assert t["moe.grouped_gemm_vs_torch"]["value"] is None and not t["moe.grouped_gemm_vs_torch"]["met"]
    assert t["moe.wgrad_tflops"]["value"] == 450.0 and not t["moe.wgrad_tflops"]["met"]
    assert t["moe.layer_fwd_bwd_vs_torch"]["value"] is None


def test_a_missing_or_failing_peer_is_a_not_measured_row(monkeypatch):
    from . import torch_native_moe
    from .bench_moe import grouped_gemm_peers, peer_targets

    monkeypatch.setattr(torch_native_moe, "grouped_mm_unavailable", lambda *a: "torch X has no torch._grouped_mm")

    def boom(*a, **k):
        raise RuntimeError("kernel exploded")

    monkeypatch.setattr(mmkernels, "grouped_gemm", boom)
    monkeypatch.setattr(H, "time_ms", lambda fn, grad_to_none=None, **k: (fn(), H.Timing(1.0, 1.0, 1.0, 1.0, 1, 1))[1])
    rows = {r["provider"]: r for r in grouped_gemm_peers(torch.device("cpu"), True, models={"t": (16, 24, "gelu_tanh")},
                                                         S=8) if r["routing"] == "random"}
    assert rows["torch._grouped_mm"]["note"] == "not measured: torch X has no torch._grouped_mm"
    assert rows["mmkernels"]["note"] == rows["mmkernels wgrad"]["note"] == "not measured: RuntimeError: kernel exploded"
    assert rows["dense"]["ms"] == 1.0
    t = {x["id"]: x for x in peer_targets(list(rows.values()), [])}
    assert t["moe.grouped_gemm_vs_torch"]["value"] is None and not t["moe.grouped_gemm_vs_torch"]["met"]
