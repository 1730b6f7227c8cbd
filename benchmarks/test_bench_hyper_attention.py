"""pytest-benchmark micro-benchmarks of Hyper Attention on CPU (tiny sizes, a few seconds in all).

Providers as in ``bench_hyper_attention``: ``mmkernels`` (:class:`mmkernels.HyperAttention`, the
``reference`` backend forced so the result does not depend on TRITON_INTERPRET) and
``owl3_baseline`` (the mPLUG-Owl3-style module: per-sample loop, dense masks, producer recomputed at
every step).  Each test also checks that the two agree.

Run: ``pytest benchmarks`` times them (thread count pinned, see ``harness.pedantic_cpu``); ``make test``
passes ``--benchmark-disable``, which runs each case once as a smoke test and prints no timing table.
"""
from __future__ import annotations

import pytest
import torch

import mmkernels

from . import harness as H
from .bench_hyper_attention import _make_modules, image_positions_for

MODEL = dict(hidden=128, heads=4, kv_heads=2, head_dim=32, T=16)
CASES = ["prefill", "decode"]
PROVIDERS = ["mmkernels", "owl3_baseline"]


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("mode", ["gated", "joint"])
def test_hyper_attention_cpu(benchmark, mode, case, provider):
    L, n = 64, 3
    base, ours = _make_modules(MODEL, mode, "cpu", torch.float32, seed=0)
    g = torch.Generator().manual_seed(L + n)
    x = torch.randn(1, L + 1, MODEL["hidden"], generator=g)
    img = torch.randn(n, MODEL["T"], MODEL["hidden"], generator=g)
    positions = image_positions_for(L, n)
    pos = torch.tensor(positions, dtype=torch.int32)
    cu = torch.tensor([0, n], dtype=torch.int32)
    pid = torch.arange(L + 1)[None]
    benchmark.group = f"hyper_attention {mode} {case} L{L} images{n}"
    benchmark.extra_info.update(dict(op="hyper_attention", provider=provider, mode=mode, case=case, L=L, images=n))
    with torch.no_grad(), mmkernels.use_backend("reference"):
        _, cache = ours(x[:, :L], pid[:, :L], img, pos, cu, use_cache=True)
        _, bcache = base(x[:, :L], pid[:, :L], img, [positions], use_cache=True)
        if case == "prefill":
            fns = {"mmkernels": lambda: ours(x, pid, img, pos, cu)[0],
                   "owl3_baseline": lambda: base(x, pid, img, [positions])[0]}
        else:
            xs, ps = x[:, L:], pid[:, L:]
            fns = {"mmkernels": lambda: ours(xs, ps, past_key_value=cache)[0],
                   "owl3_baseline": lambda: base(xs, ps, img, [positions], past_key_value=bcache)[0]}
        y = H.pedantic_cpu(benchmark, fns[provider], rounds=5)
        other = fns["owl3_baseline" if provider == "mmkernels" else "mmkernels"]()
    torch.testing.assert_close(y, other, rtol=1e-4, atol=1e-4)
