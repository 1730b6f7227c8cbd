"""Benchmark + verification of the Partial-LoRA linear (``mmkernels.plora_linear``).

    y = x @ W0.T + b0 (all rows);   y[im_mask] += scaling * (dropout(x[im_mask]) @ A.T) @ B.T

Sections:

1. Verification (:func:`mmkernels.verify.verify_plora`, the same table as ``python -m mmkernels
   verify --op plora``): ``plora_linear`` under ``use_backend("triton")`` (on CPU: Triton's
   interpreter, which :mod:`benchmarks.run` switches on before importing mmkernels) forward +
   backward, against the reference run in float64 on the same inputs; y, dx, dW0, db0, dA, dB with
   :func:`mmkernels.testing.compare`.  Any FAIL makes ``make bench`` exit non-zero.
2. Timing.  Providers:
   * ``mmkernels``  -- ``plora_linear`` with the default backend (auto: Triton on CUDA; on CPU the
     reference path, and the tables and JSON say so: ``"mmkernels, reference path (CPU)"``);
   * ``xcomposer``  -- :class:`XComposerPLoRA`, InternLM-XComposer2's ``PLoRA`` module verbatim;
   * ``base_linear`` -- ``F.linear(x, W0)`` alone (the floor: what the layer costs without LoRA).
   Modes: ``fwd`` (under ``torch.no_grad``) and ``fwd+bwd`` (x, W0, A, B require grad; a fixed
   random upstream gradient).  On CPU each comparison is also timed in back-to-back pairs
   (``paired x base``, ``paired vs XC``) and a row whose pairs cannot rank the two is flagged
   (``rank``, :data:`harness.NOISE_RULE`).  Dropout is OFF for timing (``training=False`` for
   mmkernels, the XComposer module in ``eval()``), i.e. the inference / p=0 path; no bias
   (InternLM2's projections have none).
3. GPU targets (printed as MET / NOT MET on CUDA only), in the results JSON's ``"targets"`` as
   ``{id, value, goal, better, met, target, detail}`` (:func:`harness.target`; value = the worst case):
   ``plora.fwd_vs_base`` (<= 1.10), ``plora.fwd_bwd_vs_xcomposer`` (>= 1.5), ``plora.all_text_vs_base``
   (<= 1.03), ``plora.fwd_bwd_peak_memory_vs_xcomposer`` (< 1).  Shapes (GPU, bf16): the InternLM2-7B
   projections at 4k-16k tokens with 0/25/50/100 % visual rows (and a scattered 50 % case).
"""
from __future__ import annotations

import argparse
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from . import harness as H

OP = "plora"

# InternLM2-7B projections (in_features K, out_features N).  w1 and w3 have the same shape.
GPU_PROJECTIONS = {"wqkv": (4096, 6144), "wo": (4096, 4096), "w1/w3": (4096, 14336), "w2": (14336, 4096)}
GPU_TOKENS = (4096, 8192, 16384)
GPU_RANK = 256
# (fraction, layout): visual rows as one contiguous span in the middle (an image block), plus one
# scattered case (every row visual with probability 0.5).
GPU_VISUAL = ((0.0, "span"), (0.25, "span"), (0.5, "span"), (0.5, "scattered"), (1.0, "span"))
GPU_QUICK_PROJECTIONS = ("wqkv", "w2")
GPU_QUICK_TOKENS = (4096, 16384)
GPU_QUICK_VISUAL = ((0.0, "span"), (0.5, "span"), (1.0, "span"))

CPU_PROJECTIONS = {"K512xN768": (512, 768)}
CPU_TOKENS = (1024, 2048)
CPU_QUICK_TOKENS = (1024,)
CPU_RANK = 64
CPU_VISUAL = ((0.0, "span"), (0.5, "span"), (1.0, "span"))

SCALING = 1.0
TARGET_FWD_VS_BASE = 1.10      # fused forward <= 1.10x base linear at 50 % visual
TARGET_FWDBWD_SPEEDUP = 1.5    # fwd+bwd >= 1.5x faster than the XComposer module
TARGET_FRACTION = 0.5
TARGET_FWD_TOKENS = (8192, 16384)  # plora.fwd_vs_base is taken at these M
TARGET_ALL_TEXT_VS_BASE = 1.03     # fwd with no visual row <= 1.03x base linear

PROVIDERS = ("mmkernels", "xcomposer", "base_linear")


# --------------------------------------------------------------------------- baseline module

from mmkernels.ops.plora.baseline import XComposerPLoRA  # noqa: E402  (the verbatim module)


# --------------------------------------------------------------------------- cost model

def flops(M: int, Mv: int, K: int, N: int, r: int, mode: str, provider: str) -> float:
    """FLOPs (multiply-add = 2) of the useful work, the same count for every PLoRA provider.

    forward  F = 2*M*N*K (base GEMM, all rows) + 2*Mv*K*r (S = x_v @ A.T) + 2*Mv*r*N (S @ B.T)
    backward B = 2*M*N*K (dX = dY @ W0) + 2*M*N*K (dW0 = dY.T @ x)
               + 2*Mv*N*r (dS = dY_v @ B) + 2*Mv*N*r (dB = dY_v.T @ S)
               + 2*Mv*r*K (dA = dS.T @ x_v) + 2*Mv*r*K (dX_v += dS @ A)      = 2 * F exactly
    fwd+bwd  = 3 * F.   (Mv = number of visual rows; elementwise work, db0 and the scaling ignored.)
    ``base_linear`` counts only its own GEMMs (Mv = 0).
    """
    if provider == "base_linear":
        Mv = 0
    fwd = 2.0 * M * N * K + 2.0 * Mv * K * r + 2.0 * Mv * r * N
    return fwd if mode == "fwd" else 3.0 * fwd


def min_bytes(M: int, K: int, N: int, r: int, mode: str, provider: str, elem: int) -> float:
    """Compulsory HBM traffic (each tensor read or written once).

    forward:  read x [M,K], W0 [N,K], A [r,K], B [N,r]; write y [M,N]
    backward: read dY [M,N], x, W0, A, B; write dX [M,K], dW0 [N,K], dA [r,K], dB [N,r]
    (base_linear: no A, B, dA, dB terms).
    """
    lora = provider != "base_linear"
    lw = (r * K + N * r) if lora else 0
    fwd = M * K + N * K + lw + M * N
    if mode == "fwd":
        return float(elem * fwd)
    bwd = M * N + 2 * M * K + 2 * N * K + 2 * lw
    return float(elem * (fwd + bwd))


# --------------------------------------------------------------------------- inputs

def make_mask(M: int, fraction: float, layout: str, device, batch_shape=None, seed: int = 0) -> torch.Tensor:
    """Bool mask [M] (or ``batch_shape``): ``layout='span'`` = one contiguous block of
    round(fraction*M) visual rows centred in the sequence; ``'scattered'`` = each row visual with
    probability ``fraction`` (seeded)."""
    if layout == "scattered":
        g = torch.Generator().manual_seed(seed)
        mask = torch.rand(M, generator=g) < fraction
    else:
        Mv = int(round(fraction * M))
        mask = torch.zeros(M, dtype=torch.bool)
        start = (M - Mv) // 2
        mask[start:start + Mv] = True
    mask = mask.to(device)
    return mask.view(batch_shape) if batch_shape is not None else mask


def _visual_label(fraction: float, layout: str) -> str:
    return f"{fraction:g}" + (" scat" if layout == "scattered" else "")


# --------------------------------------------------------------------------- verification

def run_verification(device: torch.device, quick: bool) -> tuple[list[dict], bool]:
    """The package's verification (:func:`mmkernels.verify.verify_plora`, also run by
    ``python -m mmkernels verify``), with a progress line per case."""
    from mmkernels import verify

    return verify.verify_plora(device, quick, progress=lambda line: print(line, flush=True))


def verify_columns() -> list[tuple[str, str, str | None]]:
    from mmkernels import verify

    return verify.COLUMNS[OP]


# --------------------------------------------------------------------------- timing

def _sweep_config(device: torch.device, quick: bool) -> dict[str, Any]:
    if device.type == "cuda":
        projs = GPU_PROJECTIONS if not quick else {k: GPU_PROJECTIONS[k] for k in GPU_QUICK_PROJECTIONS}
        return dict(projections=projs, tokens=GPU_QUICK_TOKENS if quick else GPU_TOKENS, rank=GPU_RANK,
                    visual=GPU_QUICK_VISUAL if quick else GPU_VISUAL, dtype=torch.bfloat16)
    return dict(projections=CPU_PROJECTIONS, tokens=CPU_QUICK_TOKENS if quick else CPU_TOKENS, rank=CPU_RANK,
                visual=CPU_VISUAL, dtype=torch.float32)


def _bench_case(fwd_fn, mode: str, dy, leaves, measure_memory: bool):
    """Time ``fwd_fn`` in ``mode``; optionally measure peak memory of one fwd+bwd."""
    times = H.time_mode(fwd_fn, mode, dy, leaves)
    if mode == "fwd":
        return times, None
    peak = H.peak_memory_mb(lambda: fwd_fn().backward(dy), grad_to_none=leaves) if measure_memory else None
    for t in leaves:
        t.grad = None
    return times, peak


def run_timing(device: torch.device, quick: bool, ceiling: dict | None, log=print) -> list[dict]:
    import mmkernels

    cfg = _sweep_config(device, quick)
    dtype, r = cfg["dtype"], cfg["rank"]
    elem = torch.finfo(dtype).bits // 8
    max_m = max(cfg["tokens"])
    rows: list[dict] = []
    torch.manual_seed(0)
    for proj, (K, N) in cfg["projections"].items():
        # Weights shared by all providers: the XComposer module's own Parameters.
        xc = XComposerPLoRA(K, N, bias=False, device=device, dtype=dtype, lora_r=r, lora_alpha=r * SCALING,
                            lora_dropout=0.05).eval()
        with torch.no_grad():
            xc.weight.normal_(0, K ** -0.5)
            xc.Plora_A.weight.normal_(0, K ** -0.5)
            xc.Plora_B.weight.normal_(0, r ** -0.5)  # nonzero B (a trained adapter)
        W0, A, B = xc.weight, xc.Plora_A.weight, xc.Plora_B.weight
        for M in cfg["tokens"]:
            x = torch.randn(1, M, K, device=device, dtype=dtype, requires_grad=True)
            dy = torch.randn(1, M, N, device=device, dtype=dtype)
            measure_mem = device.type == "cuda" and M == max_m
            for mode in ("fwd", "fwd+bwd"):
                base_times, base_peak = _bench_case(lambda: F.linear(x, W0), mode, dy, [x, W0], measure_mem)
                base_row = dict(provider="base_linear", **base_times.fields(), peak_mb=base_peak)
                for fraction, layout in cfg["visual"]:
                    mask = make_mask(M, fraction, layout, device, batch_shape=(1, M))
                    Mv = int(mask.sum().item())
                    results = {"base_linear": base_row}
                    fns = {
                        "mmkernels": lambda: mmkernels.plora_linear(x, W0, None, A, B, mask, scaling=SCALING,
                                                                    dropout_p=0.05, training=False),
                        "xcomposer": lambda: xc(x, mask),
                    }
                    for prov, fwd_fn in fns.items():
                        times, peak = _bench_case(fwd_fn, mode, dy, [x, W0, A, B], measure_mem)
                        results[prov] = dict(provider=prov, **times.fields(), peak_mb=peak)
                    # CPU: the comparisons again in back-to-back pairs, to flag those too noisy to rank
                    paired = {} if device.type == "cuda" else {
                        name: H.paired_ratio(H.mode_call(fns["mmkernels"], mode, dy), H.mode_call(other, mode, dy),
                                             [x, W0, A, B])
                        for name, other in (("x_base", lambda: F.linear(x, W0)), ("vs_xcomposer", fns["xcomposer"]))}
                    for prov in PROVIDERS:
                        res = results[prov]
                        fl = flops(M, Mv, K, N, r, mode, prov)
                        nb = min_bytes(M, K, N, r, mode, prov, elem)
                        tf = H.tflops(fl, res["ms"])
                        row = dict(op=OP, provider=prov, mode=mode, proj=proj, M=M, K=K, N=N, r=r,
                                   visual_fraction=fraction, layout=layout, visual=_visual_label(fraction, layout),
                                   Mv=Mv, dtype=H.dtype_name(dtype), ms=res["ms"], ms_min=res["ms_min"],
                                   ms_p20=res["ms_p20"], ms_p80=res["ms_p80"], reps=res["reps"],
                                   threads=res["threads"], tflops=tf, gbps=H.gbps(nb, res["ms"]),
                                   pct_ceiling=H.pct_of(tf, (ceiling or {}).get("bf16_tflops")) if dtype == torch.bfloat16 else None,
                                   x_base_linear=res["ms"] / base_row["ms"],
                                   speedup_vs_xcomposer=results["xcomposer"]["ms"] / res["ms"],
                                   peak_mb=res["peak_mb"], flops=fl, bytes=nb)
                        if paired and prov == "mmkernels":
                            row.update(paired_x_base=paired["x_base"].inverse(),
                                       paired_speedup_vs_xcomposer=paired["vs_xcomposer"],
                                       rank=H.rank_flag(**paired))
                        rows.append(row)
                    log(f"  {proj:<6} M={M:<6} visual={_visual_label(fraction, layout):<8} {mode:<8} "
                        + "  ".join(f"{p}={results[p]['ms']:.3f}ms" for p in PROVIDERS), flush=True)
            del x, dy
        del xc, W0, A, B
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


TIMING_COLUMNS = [("proj", "proj", None), ("M", "M", None), ("visual", "visual", None), ("mode", "mode", None),
                  ("provider", "provider", None), ("ms_min", "min ms", ".3f"), ("ms", "median ms", ".3f"),
                  ("ms_p80", "p80", ".3f"), ("tflops", "TFLOP/s", ".3g"), ("pct_ceiling", "%ceil", ".0f"),
                  ("gbps", "GB/s", ".3g"), ("x_base_linear", "x base", ".3f"),
                  ("speedup_vs_xcomposer", "speedup vs XC", ".2f"), ("peak_mb", "peak MB", ".0f"),
                  ("paired_x_base", "paired x base", ".3f"), ("paired_speedup_vs_xcomposer", "paired vs XC", ".2f"),
                  ("rank", "rank", None)]


# --------------------------------------------------------------------------- targets

def evaluate_targets(rows: list[dict], on_cuda: bool) -> list[dict]:
    """The GPU targets in the results-JSON schema (:func:`harness.target`: id, value = the worst
    case over the stated shapes, goal, better, met), plus ``detail`` (which shape was worst).

    * ``plora.fwd_vs_base``: fused forward / base linear, 50 % visual (contiguous span), every
      projection at 8k and 16k tokens (at the largest measured M when neither was run);
    * ``plora.fwd_bwd_vs_xcomposer``: fwd+bwd speed-up over the XComposer module, 50 % visual, every M;
    * ``plora.all_text_vs_base``: forward with no visual row / base linear, every projection and M;
    * ``plora.fwd_bwd_peak_memory_vs_xcomposer``: peak-memory ratio at the largest M (must be < 1).
    CPU: none (the CPU table compares the reference path with the baselines)."""
    if not on_cuda:
        return []
    mm = [r for r in rows if r["provider"] == "mmkernels"]
    half = [r for r in mm if r["visual_fraction"] == TARGET_FRACTION and r["layout"] == "span"]
    targets = []

    def where(r):
        return f"{r['proj']}, M={r['M']}"

    fwd = [r for r in half if r["mode"] == "fwd"]
    at = [r for r in fwd if r["M"] in TARGET_FWD_TOKENS] or [r for r in fwd if r["M"] == max(q["M"] for q in fwd)] \
        if fwd else []
    if at:
        worst = max(at, key=lambda r: r["x_base_linear"])
        targets.append(dict(H.target("plora.fwd_vs_base", worst["x_base_linear"], TARGET_FWD_VS_BASE, "lower",
                                     f"fused fwd <= {TARGET_FWD_VS_BASE:.2f}x base linear (50% visual, "
                                     f"M in {sorted({r['M'] for r in at})})"),
                            detail=f"worst {worst['x_base_linear']:.3f}x ({where(worst)}); "
                                   f"geomean {H.geomean(r['x_base_linear'] for r in at):.3f}x"))
    fb = [r for r in half if r["mode"] == "fwd+bwd"]
    if fb:
        worst = min(fb, key=lambda r: r["speedup_vs_xcomposer"])
        targets.append(dict(H.target("plora.fwd_bwd_vs_xcomposer", worst["speedup_vs_xcomposer"],
                                     TARGET_FWDBWD_SPEEDUP, "higher",
                                     f"fwd+bwd >= {TARGET_FWDBWD_SPEEDUP:.1f}x faster than XComposer (50% visual)"),
                            detail=f"worst {worst['speedup_vs_xcomposer']:.2f}x ({where(worst)}); "
                                   f"geomean {H.geomean(r['speedup_vs_xcomposer'] for r in fb):.2f}x"))
    text = [r for r in mm if r["visual_fraction"] == 0.0 and r["mode"] == "fwd"]
    if text:
        worst = max(text, key=lambda r: r["x_base_linear"])
        targets.append(dict(H.target("plora.all_text_vs_base", worst["x_base_linear"], TARGET_ALL_TEXT_VS_BASE,
                                     "lower", f"fwd with no visual row <= {TARGET_ALL_TEXT_VS_BASE:.2f}x base linear"),
                            detail=f"worst {worst['x_base_linear']:.3f}x ({where(worst)})"))
    mem = [r for r in fb if r.get("peak_mb") is not None]
    if mem:
        pairs = []
        for r in mem:
            xc = next((q for q in rows if q["provider"] == "xcomposer" and q["mode"] == "fwd+bwd"
                       and q["proj"] == r["proj"] and q["M"] == r["M"] and q["visual"] == r["visual"]), None)
            if xc and xc.get("peak_mb") is not None:
                pairs.append((r, xc))
        if pairs:
            worst = max(pairs, key=lambda p: p[0]["peak_mb"] / max(p[1]["peak_mb"], 1e-9))
            ratio = worst[0]["peak_mb"] / max(worst[1]["peak_mb"], 1e-9)
            t = H.target("plora.fwd_bwd_peak_memory_vs_xcomposer", ratio, 1.0, "lower",
                         f"fwd+bwd peak memory < XComposer (M={worst[0]['M']}, 50% visual)")
            targets.append(dict(t, met=all(a["peak_mb"] < b["peak_mb"] for a, b in pairs),   # strictly less
                                detail=f"worst {worst[0]['peak_mb']:.0f} MB vs {worst[1]['peak_mb']:.0f} MB "
                                       f"({worst[0]['proj']})"))
    return targets


# --------------------------------------------------------------------------- entry point

def run(args: argparse.Namespace) -> dict[str, Any]:
    """Run verification and timing; print the tables; return the payload for the JSON writer."""
    import mmkernels  # noqa: F401  (imported by benchmarks.run after TRITON_INTERPRET is set)

    device = H.default_device()
    quick = bool(getattr(args, "quick", False))
    out_dir = getattr(args, "out", None)
    on_cuda = device.type == "cuda"

    print(f"\n### {OP}: verification (triton backend{'' if on_cuda else ' under the CPU interpreter'} vs "
          f"float64 reference, bias, scaling 0.5, dropout 0)", flush=True)
    ver_rows, ver_ok = run_verification(device, quick)
    H.print_table(f"{OP} verification ({'PASS' if ver_ok else 'FAIL'})", ver_rows, verify_columns())

    ceil = H.ceilings(measure=on_cuda)
    ref = ceil["reference"]
    if on_cuda:
        print(f"\nceilings: nominal {ceil['nominal']}; measured {ceil['measured']}; % of ceiling uses "
              f"{ref['source'] if ref else 'none'}", flush=True)

    cfg = _sweep_config(device, quick)
    print(f"\n### {OP}: timing on {device.type} ({'quick' if quick else 'full'} sweep, "
          f"{H.dtype_name(cfg['dtype'])}, r={cfg['rank']}, scaling {SCALING}, no bias, dropout off "
          f"(training=False / eval()))", flush=True)
    print(f"timer: {H.timer_description(on_cuda)}", flush=True)
    rows = run_timing(device, quick, ref)
    H.print_table(f"{OP} timing", rows, TIMING_COLUMNS)

    targets = evaluate_targets(rows, on_cuda)
    H.print_targets(OP, targets, on_cuda, "CPU timings compare the reference path with the baselines")
    for t in targets:
        print(f"      {t['id']}: {t['detail']}")

    max_m = max(cfg["tokens"])
    plot = H.plot_sweep(
        OP, [r for r in rows if r["M"] == max_m], panel_keys=("mode", "proj"), x_key="visual",
        y_key="x_base_linear", series_key="provider", out_dir=out_dir,
        title=f"PLoRA: time / base-linear time, M={max_m} tokens, r={cfg['rank']}, "
              f"{H.dtype_name(cfg['dtype'])} (lower is better)",
        y_label="time / base linear", x_label="visual fraction",
        hlines={"fwd:1.10x target": TARGET_FWD_VS_BASE} if on_cuda else None,
        panel_title=lambda k: f"{k[0]}  {k[1]}")
    return {
        "ok": ver_ok,
        "verification_ok": ver_ok,
        "verification": ver_rows,
        "rows": rows,
        "targets": targets,
        "ceilings": ceil,
        "config": {"quick": quick, "timing_dtype": cfg["dtype"], "rank": cfg["rank"], "scaling": SCALING,
                   "tokens": list(cfg["tokens"]), "projections": cfg["projections"],
                   "visual": [list(v) for v in cfg["visual"]],
                   "dropout": "off for timing (training=False; XComposer module in eval())",
                   "timer": H.timer_description(on_cuda)},
        "plot": str(plot) if plot else None,
    }
