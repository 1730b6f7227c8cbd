"""pytest-benchmark micro-benchmarks of PLoRA on CPU (tiny sizes, a few seconds in all).

Providers as in ``bench_plora``: ``mmkernels`` (``plora_linear``, reference path on CPU: the
``reference`` backend is forced so the result does not depend on whether TRITON_INTERPRET is set),
``xcomposer`` (the XComposer2 module verbatim) and ``base_linear`` (``F.linear`` alone).  Each test
also checks that the provider's output matches the float64 reference.

Run: ``pytest benchmarks`` times them (thread count pinned, see ``harness.pedantic_cpu``); ``make test``
passes ``--benchmark-disable``, which runs each case once as a smoke test and prints no timing table.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import mmkernels
from mmkernels.testing import compare

from . import harness as H
from .bench_plora import XComposerPLoRA, make_mask

SIZES = [(64, 64, 96, 16), (256, 128, 192, 32)]  # (M, K, N, r)
FRACTIONS = [0.0, 0.5]
MODES = ["fwd", "fwd+bwd"]
PROVIDERS = ["mmkernels", "xcomposer", "base_linear"]
DTYPE = torch.float32
SCALING = 0.5


def _case(M, K, N, r, fraction):
    g = torch.Generator().manual_seed(M * 7 + K + N + r)
    xc = XComposerPLoRA(K, N, bias=True, dtype=DTYPE, lora_r=r, lora_alpha=r * SCALING, lora_dropout=0.05).eval()
    with torch.no_grad():
        xc.weight.copy_(torch.randn(N, K, generator=g) * K ** -0.5)
        xc.bias.copy_(torch.randn(N, generator=g) * 0.1)
        xc.Plora_A.weight.copy_(torch.randn(r, K, generator=g) * K ** -0.5)
        xc.Plora_B.weight.copy_(torch.randn(N, r, generator=g) * r ** -0.5)
    x = torch.randn(1, M, K, generator=g, dtype=DTYPE).requires_grad_(True)
    dy = torch.randn(1, M, N, generator=g, dtype=DTYPE)
    mask = make_mask(M, fraction, "span", "cpu", batch_shape=(1, M))
    return xc, x, dy, mask


def _forward(provider, xc, x, mask):
    W0, b0, A, B = xc.weight, xc.bias, xc.Plora_A.weight, xc.Plora_B.weight
    if provider == "mmkernels":
        with mmkernels.use_backend("reference"):
            return mmkernels.plora_linear(x, W0, b0, A, B, mask, scaling=SCALING, dropout_p=0.05, training=False)
    if provider == "xcomposer":
        return xc(x, mask)
    return F.linear(x, W0, b0)


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("fraction", FRACTIONS, ids=lambda f: f"visual{f:g}")
@pytest.mark.parametrize("size", SIZES, ids=lambda s: "M{}-K{}-N{}-r{}".format(*s))
def test_plora_cpu(benchmark, size, fraction, mode, provider):
    M, K, N, r = size
    xc, x, dy, mask = _case(M, K, N, r, fraction)
    leaves = [x, *xc.parameters()]
    benchmark.group = f"plora {mode} M{M} K{K} N{N} r{r} visual{fraction:g}"
    benchmark.extra_info.update(dict(op="plora", provider=provider, mode=mode, M=M, K=K, N=N, r=r,
                                     visual_fraction=fraction, dtype="float32"))

    y = H.cpu_benchmark_case(benchmark, lambda: _forward(provider, xc, x, mask), mode, dy, leaves, rounds=8)
    # Correctness of what was timed (the base linear is only the floor: checked on text rows).
    ref = mmkernels.plora_linear_reference(
        x.detach().double(), xc.weight.detach().double(), xc.bias.detach().double(),
        xc.Plora_A.weight.detach().double(), xc.Plora_B.weight.detach().double(), mask, scaling=SCALING)
    if provider == "base_linear":
        y, ref = y[~mask], ref[~mask]
    result = compare("y", y, ref, DTYPE)
    assert result.ok, str(result)
    if mode == "fwd+bwd":
        assert x.grad is not None and x.grad.shape == x.shape


def test_targets_use_the_results_schema():
    """The target ids, value = the worst case over the stated shapes, goal, better, met."""
    from .bench_plora import evaluate_targets

    rows = []
    for M, x_base, speedup, text_x in ((4096, 1.30, 1.2, 1.10), (8192, 1.05, 1.7, 1.02), (16384, 1.08, 1.6, 1.01)):
        for frac, mode, xb, sp in ((0.5, "fwd", x_base, 1.0), (0.5, "fwd+bwd", 1.0, speedup), (0.0, "fwd", text_x, 1.0)):
            for prov, peak in (("mmkernels", 90.0), ("xcomposer", 100.0)):
                rows.append(dict(provider=prov, proj="wqkv", M=M, visual_fraction=frac, layout="span",
                                 visual=f"{frac:g}", mode=mode, x_base_linear=xb, speedup_vs_xcomposer=sp,
                                 peak_mb=peak if M == 16384 else None))
    assert evaluate_targets(rows, on_cuda=False) == []
    got = {t["id"]: t for t in evaluate_targets(rows, on_cuda=True)}
    assert set(got) == {"plora.fwd_vs_base", "plora.fwd_bwd_vs_xcomposer", "plora.all_text_vs_base",
                        "plora.fwd_bwd_peak_memory_vs_xcomposer"}
    for t in got.values():
        assert set(t) >= {"id", "value", "goal", "better", "met", "target", "detail"}
    assert got["plora.fwd_vs_base"]["value"] == 1.08 and got["plora.fwd_vs_base"]["met"]   # 4k is not a target M
    assert got["plora.fwd_bwd_vs_xcomposer"]["value"] == 1.2 and not got["plora.fwd_bwd_vs_xcomposer"]["met"]
    assert got["plora.all_text_vs_base"]["value"] == 1.10 and not got["plora.all_text_vs_base"]["met"]
    assert got["plora.fwd_bwd_peak_memory_vs_xcomposer"]["met"]
