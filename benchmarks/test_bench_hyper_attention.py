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


# --------------------------------------------------------------------------- the peer section on CPU

TINY = dict(model=dict(hidden=64, heads=4, kv_heads=2, head_dim=16, T=5), dtype=torch.float32,
            prefill=[(13, 2)], causal=(9,), decode=[(11, 2)])


def _once(fn, grad_to_none=None):
    """A one-call timer: the section's code paths run, nothing is really timed."""
    return H.cpu_time_ms(fn, warmup=0, min_reps=1, max_reps=1, min_time_s=0.0, grad_to_none=grad_to_none)


def test_peer_section_runs_on_cpu():
    """The GPU section (prefill vs peers, causal vs SDPA, decode step) runs end to end on CPU at tiny
    shapes: the peers agree with mmkernels, what needs CUDA (FlexAttention's backward, CUDA graphs,
    the profiler's kernel time) says "not measured: <reason>" instead of failing, and the targets come
    out in the results schema."""
    from .bench_hyper_attention import peer_targets, run_peers

    progress = []
    rows = run_peers(torch.device("cpu"), TINY, log=lambda *a, **k: None, timer=_once,
                     on_progress=lambda r: progress.append(len(r)))
    assert progress == sorted(progress) and progress[-1] == len(rows)   # a partial file after every shape
    by = {(r["case"], r["mode"], r["provider"], r.get("pass")): r for r in rows}
    for mode, peer in (("gated", "sdpa+flex_gated"), ("joint", "flex_joint")):
        assert by[("prefill_peer", mode, "mmkernels", "fwd")]["ms"] > 0
        assert by[("prefill_peer", mode, "mmkernels", "fwd+bwd")]["ms"] > 0
        fwd = by[("prefill_peer", mode, peer, "fwd")]
        assert fwd["ms"] > 0 and fwd["rel_err_vs_mk"] < 1e-5
        assert by[("prefill_peer", mode, "mmkernels", "fwd")]["speedup_vs_peer"] > 0
        assert by[("prefill_peer", mode, peer, "fwd+bwd")]["note"].startswith("not measured:")
        for prov in ("op_eager", "module_eager", "module_static_eager", "sdpa_all_kv"):
            assert by[("decode_step", mode, prov, None)]["us"] > 0
        for prov in ("op_kernels", "op_graph", "module_graph", "module_static_graph"):
            assert by[("decode_step", mode, prov, None)]["note"].startswith("not measured:")
    assert by[("decode_step", "joint", "sdpa_all_kv", None)]["rel_err_vs_mk"] < 1e-5
    for backend in ("flash", "cudnn"):   # pinned backends: they agree with mmkernels, or say why they cannot run
        pinned = by[("causal", "joint", f"sdpa_{backend}", "fwd")]
        assert (pinned["note"] or "").startswith("not measured:") or pinned["rel_err_vs_mk"] < 1e-5, pinned
    sdpa = by[("causal", "joint", "sdpa_causal", "fwd+bwd")]
    assert sdpa["ms"] > 0 and sdpa["rel_err_dq_vs_mk"] < 1e-5               # SDPA has a CPU backward
    assert by[("causal", "joint", "sdpa_causal", "fwd")]["rel_err_vs_mk"] < 1e-5
    assert by[("causal", "joint", "mmkernels", "fwd+bwd")]["speedup_vs_sdpa_causal"] > 0
    targets = peer_targets(rows)
    assert [t["id"] for t in targets] == ["hyper.fwd_bwd_vs_flex", "hyper.fwd_vs_flex", "hyper.fwd_tflops_32img",
                                          "hyper.causal_fwd_bwd_vs_sdpa", "hyper.decode_kernel_us",
                                          "hyper.decode_graph_us", "hyper.decode_eager_us"]
    assert all({"id", "value", "goal", "better", "met", "target"} <= set(t) for t in targets)
    causal = targets[3]
    assert causal["value"] is not None and causal["value"] > 0           # measured at L=9 on CPU
    assert targets[0]["value"] is None and not targets[0]["met"]         # the stated shapes were not run


def test_peer_targets_take_the_worst_case():
    """value = the worst case over the stated shapes: the smallest speed-up / TFLOP/s, the largest time."""
    from .bench_hyper_attention import peer_targets

    def mk(mode, L, n, pas, speed, tflops=None):
        return dict(case="prefill_peer", mode=mode, provider="mmkernels", L=L, images=n, **{"pass": pas},
                    speedup_vs_peer=speed, tflops=tflops)

    rows = [mk("gated", 1024, 8, "fwd+bwd", 1.4), mk("joint", 2048, 32, "fwd+bwd", 1.1),
            mk("joint", 4096, 32, "fwd+bwd", 0.5),                                  # not a stated shape
            mk("gated", 2048, 32, "fwd", 1.5, 410.0), mk("joint", 2048, 32, "fwd", None, 390.0),
            dict(case="decode_step", mode="gated", provider="op_kernels", L=2048, images=32, us=18.0),
            dict(case="decode_step", mode="joint", provider="op_kernels", L=2048, images=32, us=21.0),
            dict(case="decode_step", mode="joint", provider="op_kernels", L=8192, images=32, us=90.0)]
    t = {x["id"]: x for x in peer_targets(rows)}
    assert t["hyper.fwd_bwd_vs_flex"]["value"] == 1.1 and not t["hyper.fwd_bwd_vs_flex"]["met"]
    assert t["hyper.fwd_vs_flex"]["value"] == 1.5 and t["hyper.fwd_vs_flex"]["met"]     # the unmeasured one skipped
    assert "1/4 cases measured" in t["hyper.fwd_vs_flex"]["target"]
    assert t["hyper.fwd_tflops_32img"]["value"] == 390.0 and not t["hyper.fwd_tflops_32img"]["met"]
    assert t["hyper.decode_kernel_us"]["value"] == 21.0 and t["hyper.decode_kernel_us"]["better"] == "lower"
    assert t["hyper.decode_graph_us"]["value"] is None and not t["hyper.decode_graph_us"]["met"]


def test_baseline_targets_keep_their_place_in_the_schema():
    """The targets against the mPLUG-Owl3 baseline come out in the same {id, value, goal, better, met}
    schema as the peer targets, in one list."""
    from .bench_hyper_attention import evaluate_targets

    rows = [dict(case="prefill", provider="mmkernels", mode="gated", L=1024, images=8, speedup_vs_baseline=2.5),
            dict(case="prefill", provider="mmkernels", mode="joint", L=1024, images=32, speedup_vs_baseline=3.0),
            dict(case="prefill", provider="attention", mode="joint", L=1024, images=32, tflops=310.0),
            dict(case="decode", provider="mmkernels", mode="joint", L=2048, images=32, speedup_vs_baseline=12.0),
            dict(case="decode", provider="attention", mode="joint", L=2049, images=32, x_bandwidth_floor=2.5,
                 gbps=1900.0)]
    cpu = evaluate_targets(rows, on_cuda=False)   # the GPU targets keep their ids, "not measured"
    assert [t["id"] for t in cpu][:2] == ["hyper.fwd_bwd_vs_flex", "hyper.fwd_vs_flex"]
    assert all(t["value"] is None and not t["met"] and t["note"].startswith("not measured") for t in cpu)
    t = {x["id"]: x for x in evaluate_targets(rows, on_cuda=True, peer_rows=[])}
    assert t["hyper.prefill_vs_owl3_8img"]["met"] and not t["hyper.prefill_vs_owl3_32img"]["met"]
    assert t["hyper.fwd_tflops_8img_plus"]["met"] and t["hyper.decode_vs_owl3"]["met"]
    assert not t["hyper.decode_x_bw_floor"]["met"] and t["hyper.decode_x_bw_floor"]["better"] == "lower"
    assert "hyper.decode_eager_us" in t and t["hyper.decode_eager_us"]["value"] is None


def test_cpu_decode_step_rows():
    """On CPU the decode-step section measures what a CPU can (the op and the module's cached step,
    eager; SDPA as a reference point), both modes, every decode point of the sweep."""
    from .bench_hyper_attention import CPU_DECODE_STEP_PROVIDERS, MODES, cpu_decode_steps

    cfg = dict(model=TINY["model"], dtype=torch.float32, decode=dict(past=11, images=(2,)))
    with mmkernels.use_backend("reference"):
        rows = cpu_decode_steps(torch.device("cpu"), cfg, log=lambda *a, **k: None)
    assert [(r["mode"], r["provider"]) for r in rows] == [(m, p) for m in MODES for p in CPU_DECODE_STEP_PROVIDERS]
    assert all(r["us"] and r["us"] > 0 and r["L"] == 11 and r["images"] == 2 for r in rows), rows


# --------------------------------------------------------------------------- packed samples (varlen)

def test_varlen_mix_and_flops():
    """The length mix is fixed by its seed and within its ranges; packing never computes more than padding
    (the same when every sample has the longest length)."""
    from .bench_hyper_attention import VARLEN_CPU, VARLEN_GPU, varlen_flop_rows, varlen_flops, varlen_mix

    mix = varlen_mix(VARLEN_GPU)
    assert mix == varlen_mix(VARLEN_GPU) and len(mix) == 16
    assert all(256 <= L <= 4096 and 1 <= n <= 8 for L, n in mix)
    model = TINY["model"]
    fl = varlen_flops(varlen_mix(VARLEN_CPU), model, "strict")
    assert 0 < fl["packed_gflop"] < fl["padded_gflop"] and 0 < fl["flops_saved"] < 1
    assert fl["tokens"] == sum(L for L, _ in varlen_mix(VARLEN_CPU))
    same = varlen_flops([(9, 2), (9, 1)], model, "inclusive")
    assert same["flops_saved"] == 0.0 and same["padded_tokens"] == same["tokens"] == 18
    rows = varlen_flop_rows()
    assert {r["shapes"] for r in rows} == {"tiny CPU shapes", "7B layer mix"}
    assert all(r["flops_saved"] > 0 for r in rows)


def test_varlen_inputs_pad_the_same_samples():
    """The padded batch holds the packed samples' rows, and the padded run's real rows equal the packed run."""
    from .bench_hyper_attention import varlen_inputs

    model = dict(TINY["model"], T=3)
    mix = [(5, 1), (1, 0), (7, 2)]
    x = varlen_inputs(mix, model, "gated", torch.device("cpu"), torch.float32)
    q, k = x["packed"][:2]
    qp, kp = x["padded"][:2]
    assert torch.equal(qp[x["rows"]], q) and torch.equal(kp[x["rows"]], k) and int(x["rows"].sum()) == 13
    with mmkernels.use_backend("reference"):
        packed = mmkernels.hyper_attention_varlen(*x["packed"], mode="gated", gate=x["gate"])
        padded = mmkernels.hyper_attention(*x["padded"], mode="gated", gate=x["gate"])
    torch.testing.assert_close(padded[x["rows"]], packed)


def test_varlen_section_runs_on_cpu_and_targets():
    """The packed-vs-padded rows at tiny shapes on CPU (the peers say why they cannot run: no CPU FlexAttention
    backward, flash-attn missing or CUDA-only), and the targets: the worst mode, "not measured" without rows."""
    from .bench_hyper_attention import run_varlen, varlen_targets

    model = dict(TINY["model"], T=3)
    spec = dict(samples=3, text=(2, 6), images=(0, 2), seed=1)
    def one_ms(fn, grad_to_none=None):   # runs the case once; every provider "takes" 1 ms
        fn()
        return H.Timing(1.0, 1.0, 1.0, 1.0, 1, 1)
    with mmkernels.use_backend("reference"):
        rows = run_varlen(model, spec, torch.device("cpu"), torch.float32, one_ms, log=lambda *a, **k: None)
    by = {(r["mode"], r["provider"]): r for r in rows}
    assert by[("gated", "packed")]["speedup_vs_padded"] == 1.0 and by[("joint", "packed")]["tokens_per_s"] > 0
    assert by[("joint", "flex_document")]["ms"] is None and "not measured" in by[("joint", "flex_document")]["note"]
    assert by[("joint", "flash_varlen_causal")]["ms"] is None
    t = {x["id"]: x for x in varlen_targets(rows)}
    assert t["hyper.varlen_tokens_per_s_vs_padded"]["value"] == 1.0
    assert t["hyper.varlen_fwd_bwd_vs_flex_document"]["value"] is None
    rows[0]["speedup_vs_padded"] = 1.7
    rows[[r["provider"] for r in rows].index("packed", 1)].update(speedup_vs_padded=1.6, speedup_vs_flex_document=1.3)
    t = {x["id"]: x for x in varlen_targets(rows)}
    assert t["hyper.varlen_tokens_per_s_vs_padded"]["value"] == 1.6 and t["hyper.varlen_tokens_per_s_vs_padded"]["met"]
    assert t["hyper.varlen_fwd_bwd_vs_flex_document"]["met"]
    empty = varlen_targets([])
    assert [x["id"] for x in empty] == ["hyper.varlen_tokens_per_s_vs_padded", "hyper.varlen_fwd_bwd_vs_flex_document"]
    assert all(x["value"] is None and x["note"] == "not measured" for x in empty)


def test_varlen_targets_in_the_cpu_schema():
    from .bench_hyper_attention import evaluate_targets

    ids = [t["id"] for t in evaluate_targets([], on_cuda=False)]
    assert ids[-2:] == ["hyper.varlen_tokens_per_s_vs_padded", "hyper.varlen_fwd_bwd_vs_flex_document"]
