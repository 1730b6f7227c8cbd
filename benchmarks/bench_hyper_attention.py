"""Benchmark + verification of mPLUG-Owl3 Hyper Attention (``mmkernels.hyper_attention``).

Sections:

1. Verification (:func:`mmkernels.verify.verify_hyper_attention`, the same table as
   ``python -m mmkernels verify --op hyper_attention``): ``hyper_attention`` under
   ``use_backend("triton")`` (on CPU: Triton's interpreter, which :mod:`benchmarks.run` switches on
   before importing mmkernels), forward + every gradient
   (q, k, v, k_vis, v_vis, gate) in both modes, plus a decode step (split-K path) and the
   ``visual_kv`` producer, against the reference run in float64 on the same inputs.  Any FAIL makes
   ``make bench`` exit non-zero.
2. Timing.  Providers:
   * ``mmkernels``     -- :class:`mmkernels.HyperAttention` (projections + producer + fused attention;
     default backend: Triton on CUDA, the reference path on CPU); for decode it reuses the cached
     visual K/V;
   * ``owl3_baseline`` -- :class:`~mmkernels.ops.hyper_attention.baseline.Owl3HyperAttentionBaseline`,
     mPLUG-Owl3's public code path (per-sample loop, dense boolean masks through SDPA, ``repeat_kv``,
     producer recomputed at every step);
   * ``attention``     -- the fused ``hyper_attention`` op alone on precomputed K/V (GPU only;
     ``check_metadata=False``, i.e. no host sync), for TFLOP/s over the visible (query, key) pairs
     and, for decode, GB/s against the K/V bytes.
   Cases: ``prefill`` (``L`` text tokens, ``n`` images of ``T`` tokens spread over the first 3/4 of
   the text) and ``decode`` (one new token after ``L`` cached text tokens and ``n`` cached images),
   both under ``torch.no_grad``, gated (v1) and joint (v2) modes.
3. GPU targets (printed as MET / NOT MET on CUDA only).
"""
from __future__ import annotations

import argparse
from typing import Any

import torch

from . import harness as H

OP = "hyper_attention"

# 7B hyper layer (Qwen2-7B): hidden 3584, 28 heads, 4 KV heads, head dim 128; 729 tokens per image.
GPU_MODEL = dict(hidden=3584, heads=28, kv_heads=4, head_dim=128, T=729)
GPU_TEXT = (1024, 4096)
GPU_IMAGES = (1, 8, 32)
GPU_DECODE = dict(past=2048, images=(8, 32))
GPU_QUICK_TEXT = (1024,)
GPU_QUICK_IMAGES = (8, 32)

CPU_MODEL = dict(hidden=256, heads=4, kv_heads=2, head_dim=64, T=49)
CPU_TEXT = (256,)
CPU_IMAGES = (2, 4)
CPU_DECODE = dict(past=256, images=(4,))

MODES = ("gated", "joint")
TARGET_PREFILL_SPEEDUP = {8: 2.0, 32: 4.0}   # layer forward vs the baseline, by number of images
TARGET_TFLOPS = 300.0                          # attention forward, visible pairs, H100 bf16 D=128
TARGET_DECODE_SPEEDUP = 10.0                   # decode step (cached visual K/V) vs the baseline's step
TARGET_DECODE_VS_BW = 2.0                      # decode attention time <= 2x (K/V bytes / bandwidth)


# --------------------------------------------------------------------------- inputs / cost model

def image_positions_for(L: int, n: int) -> list[int]:
    """``n`` ``<|image|>`` token indices spread evenly over the first 3/4 of ``L`` text tokens."""
    span = max(1, (3 * L) // 4)
    return [min(L - 1, (j * span) // max(n, 1)) for j in range(n)]


def visible_pairs(L_k: int, L_q: int, positions: list[int], T: int, visibility: str) -> int:
    """Visible (query, key) pairs of one head: causal text pairs + visible visual pairs."""
    pairs = 0
    for t in range(L_k - L_q, L_k):
        c = sum(1 for p in positions if (p < t if visibility == "strict" else p <= t))
        pairs += (t + 1) + c * T
    return pairs


def attention_flops(pairs: int, heads: int, head_dim: int) -> float:
    """Forward FLOPs over the visible pairs: QK^T and PV, 2*D each per pair and head."""
    return 4.0 * pairs * heads * head_dim


def kv_bytes(L_k: int, n_images: int, T: int, kv_heads: int, head_dim: int, elem: int) -> float:
    """Bytes of K and V (text + visual) of one sample: what a decode step must read at least."""
    return 2.0 * (L_k + n_images * T) * kv_heads * head_dim * elem


def _make_modules(model: dict, mode: str, device, dtype, seed: int):
    from mmkernels import HyperAttention
    from mmkernels.ops.hyper_attention.baseline import Owl3HyperAttentionBaseline

    torch.manual_seed(seed)
    base = Owl3HyperAttentionBaseline(model["hidden"], model["heads"], model["kv_heads"], model["head_dim"],
                                      rope_theta=1e6, mode=mode, device=device, dtype=dtype)
    if mode == "gated":
        with torch.no_grad():
            base.gate.normal_()
    ours = HyperAttention(model["hidden"], model["heads"], model["kv_heads"], model["head_dim"], rope_theta=1e6,
                          mode=mode, device=device, dtype=dtype)
    ours.load_state_dict(base.state_dict())
    return base.eval(), ours.eval()


# --------------------------------------------------------------------------- verification

def run_verification(device: torch.device, quick: bool) -> tuple[list[dict], bool]:
    """The package's verification (:func:`mmkernels.verify.verify_hyper_attention`, also run by
    ``python -m mmkernels verify``), with a progress line per case."""
    from mmkernels import verify

    return verify.verify_hyper_attention(device, quick, progress=lambda line: print(line, flush=True))


def verify_columns() -> list[tuple[str, str, str | None]]:
    from mmkernels import verify

    return verify.COLUMNS[OP]


# --------------------------------------------------------------------------- timing

def _sweep(device: torch.device, quick: bool) -> dict[str, Any]:
    if device.type == "cuda":
        return dict(model=GPU_MODEL, text=GPU_QUICK_TEXT if quick else GPU_TEXT,
                    images=GPU_QUICK_IMAGES if quick else GPU_IMAGES, decode=GPU_DECODE, dtype=torch.bfloat16)
    return dict(model=CPU_MODEL, text=CPU_TEXT, images=CPU_IMAGES, decode=CPU_DECODE, dtype=torch.float32)


def _time(fn):
    def call():
        with torch.no_grad():
            return fn()
    return H.time_ms(call)


def _row(case: str, mode: str, provider: str, L: int, n: int, T: int, times, dtype, **extra) -> dict:
    return dict(op=OP, case=case, mode=mode, provider=provider, L=L, images=n, T=T,
                dtype=str(dtype).replace("torch.", ""), **times.fields(), **extra)


def run_timing(device: torch.device, quick: bool, ceiling: dict | None, log=print) -> list[dict]:
    import mmkernels

    cfg = _sweep(device, quick)
    model, dtype = cfg["model"], cfg["dtype"]
    T, Hq, Hkv, D = model["T"], model["heads"], model["kv_heads"], model["head_dim"]
    elem = torch.finfo(dtype).bits // 8
    on_cuda = device.type == "cuda"
    bw = (ceiling or {}).get("hbm_tbps")
    rows: list[dict] = []
    for mode in MODES:
        vis = "strict" if mode == "gated" else "inclusive"
        base, ours = _make_modules(model, mode, device, dtype, seed=0)
        n_max = max(max(cfg["images"]), max(cfg["decode"]["images"]))
        torch.manual_seed(1)
        img_all = torch.randn(n_max, T, model["hidden"], device=device, dtype=dtype)
        # ---- prefill
        for L in cfg["text"]:
            x = torch.randn(1, L, model["hidden"], device=device, dtype=dtype)
            pid = torch.arange(L, device=device)[None]
            for n in cfg["images"]:
                positions = image_positions_for(L, n)
                pos = torch.tensor(positions, dtype=torch.int32, device=device)
                cu = torch.tensor([0, n], dtype=torch.int32, device=device)
                img = img_all[:n]
                t_ours = _time(lambda: ours(x, pid, img, pos, cu))
                t_base = _time(lambda: base(x, pid, img, [positions]))
                pairs = visible_pairs(L, L, positions, T, vis)
                fl = attention_flops(pairs, Hq, D)
                speed = t_base[0] / t_ours[0]
                rows.append(_row("prefill", mode, "mmkernels", L, n, T, t_ours, dtype, speedup_vs_baseline=speed))
                rows.append(_row("prefill", mode, "owl3_baseline", L, n, T, t_base, dtype, speedup_vs_baseline=1.0))
                msg = f"  prefill {mode:<5} L={L:<5} images={n:<3} mmkernels={t_ours[0]:.3f}ms " \
                      f"baseline={t_base[0]:.3f}ms ({speed:.2f}x)"
                if on_cuda:
                    q = torch.randn(1, L, Hq, D, device=device, dtype=dtype)
                    k = torch.randn(1, L, Hkv, D, device=device, dtype=dtype)
                    v = torch.randn_like(k)
                    kvis = torch.randn(n, T, Hkv, D, device=device, dtype=dtype)
                    vvis = torch.randn_like(kvis)
                    gate = torch.randn(Hq * D, device=device, dtype=dtype) if mode == "gated" else None
                    t_att = _time(lambda: mmkernels.hyper_attention(q, k, v, kvis, vvis, pos, cu, mode=mode,
                                                                    gate=gate, visibility=vis,
                                                                    check_metadata=False))
                    tf = H.tflops(fl, t_att[0])
                    dense = attention_flops(L * (L + n * T), Hq, D)
                    rows.append(_row("prefill", mode, "attention", L, n, T, t_att, dtype, tflops=tf,
                                     tflops_dense=H.tflops(dense, t_att[0]),
                                     pct_ceiling=H.pct_of(tf, (ceiling or {}).get("bf16_tflops"))))
                    msg += f" attention={t_att[0]:.3f}ms {tf:.0f} TFLOP/s"
                log(msg, flush=True)
        # ---- decode: one new token after `past` cached tokens and n cached images
        past = cfg["decode"]["past"]
        for n in cfg["decode"]["images"]:
            positions = image_positions_for(past, n)
            pos = torch.tensor(positions, dtype=torch.int32, device=device)
            cu = torch.tensor([0, n], dtype=torch.int32, device=device)
            img = img_all[:n]
            x = torch.randn(1, past + 1, model["hidden"], device=device, dtype=dtype)
            pid = torch.arange(past + 1, device=device)[None]
            with torch.no_grad():
                _, cache = ours(x[:, :past], pid[:, :past], img, pos, cu, use_cache=True)
                _, bcache = base(x[:, :past], pid[:, :past], img, [positions], use_cache=True)
            xs, ps = x[:, past:], pid[:, past:]
            t_ours = _time(lambda: ours(xs, ps, past_key_value=cache))
            t_base = _time(lambda: base(xs, ps, img, [positions], past_key_value=bcache))
            speed = t_base[0] / t_ours[0]
            rows.append(_row("decode", mode, "mmkernels", past, n, T, t_ours, dtype, speedup_vs_baseline=speed))
            rows.append(_row("decode", mode, "owl3_baseline", past, n, T, t_base, dtype, speedup_vs_baseline=1.0))
            msg = f"  decode  {mode:<5} past={past:<5} images={n:<3} mmkernels={t_ours[0]:.3f}ms " \
                  f"baseline={t_base[0]:.3f}ms ({speed:.2f}x)"
            if on_cuda:
                q = torch.randn(1, 1, Hq, D, device=device, dtype=dtype)
                k = torch.randn(1, past + 1, Hkv, D, device=device, dtype=dtype)
                v = torch.randn_like(k)
                kvis = torch.randn(n, T, Hkv, D, device=device, dtype=dtype)
                vvis = torch.randn_like(kvis)
                gate = torch.randn(Hq * D, device=device, dtype=dtype) if mode == "gated" else None
                t_att = _time(lambda: mmkernels.hyper_attention(q, k, v, kvis, vvis, pos, cu, mode=mode, gate=gate,
                                                                visibility=vis, check_metadata=False))
                nb = kv_bytes(past + 1, n, T, Hkv, D, elem)
                floor_ms = nb / (bw * 1e12) * 1e3 if bw else None
                rows.append(_row("decode", mode, "attention", past + 1, n, T, t_att, dtype, gbps=H.gbps(nb, t_att[0]),
                                 x_bandwidth_floor=(t_att[0] / floor_ms) if floor_ms else None))
                msg += f" attention={t_att[0] * 1e3:.1f}us {H.gbps(nb, t_att[0]):.0f} GB/s"
            log(msg, flush=True)
        del base, ours, img_all
        if on_cuda:
            torch.cuda.empty_cache()
    return rows


TIMING_COLUMNS = [("case", "case", None), ("mode", "mode", None), ("L", "L", None), ("images", "images", None),
                  ("provider", "provider", None), ("ms_min", "min ms", ".3f"), ("ms", "median ms", ".3f"),
                  ("ms_p80", "p80", ".3f"), ("speedup_vs_baseline", "speedup vs owl3", ".2f"),
                  ("tflops", "TFLOP/s (visible)", ".3g"), ("tflops_dense", "TFLOP/s (dense)", ".3g"),
                  ("gbps", "GB/s", ".3g"), ("x_bandwidth_floor", "x BW floor", ".2f")]


# --------------------------------------------------------------------------- targets

def evaluate_targets(rows: list[dict], on_cuda: bool) -> list[dict]:
    if not on_cuda:
        return []
    targets = []
    for n, want in TARGET_PREFILL_SPEEDUP.items():
        sel = [r for r in rows if r["case"] == "prefill" and r["provider"] == "mmkernels" and r["images"] == n]
        if sel:
            worst = min(sel, key=lambda r: r["speedup_vs_baseline"])
            targets.append(dict(target=f"prefill layer fwd >= {want:.0f}x baseline ({n} images)",
                                value=f"worst {worst['speedup_vs_baseline']:.2f}x ({worst['mode']}, L={worst['L']})",
                                met=worst["speedup_vs_baseline"] >= want))
    att = [r for r in rows if r["case"] == "prefill" and r["provider"] == "attention" and r["images"] >= 8]
    if att:
        worst, best = min(att, key=lambda r: r["tflops"]), max(att, key=lambda r: r["tflops"])
        targets.append(dict(target=f"attention fwd >= {TARGET_TFLOPS:.0f} TFLOP/s over visible pairs (>= 8 images)",
                            value=f"worst {worst['tflops']:.0f} ({worst['mode']}, L={worst['L']}, "
                                  f"{worst['images']} img), best {best['tflops']:.0f}",
                            met=worst["tflops"] >= TARGET_TFLOPS))
    dec = [r for r in rows if r["case"] == "decode" and r["provider"] == "mmkernels"]
    if dec:
        worst = min(dec, key=lambda r: r["speedup_vs_baseline"])
        targets.append(dict(target=f"decode step >= {TARGET_DECODE_SPEEDUP:.0f}x faster than the baseline step",
                            value=f"worst {worst['speedup_vs_baseline']:.1f}x ({worst['mode']}, {worst['images']} img)",
                            met=worst["speedup_vs_baseline"] >= TARGET_DECODE_SPEEDUP))
    bw = [r for r in rows if r["case"] == "decode" and r["provider"] == "attention"
          and r.get("x_bandwidth_floor") is not None]
    if bw:
        worst = max(bw, key=lambda r: r["x_bandwidth_floor"])
        targets.append(dict(target=f"decode attention within {TARGET_DECODE_VS_BW:.0f}x of reading K/V once",
                            value=f"worst {worst['x_bandwidth_floor']:.2f}x ({worst['mode']}, {worst['images']} img, "
                                  f"{worst['gbps']:.0f} GB/s)",
                            met=worst["x_bandwidth_floor"] <= TARGET_DECODE_VS_BW))
    return targets


# --------------------------------------------------------------------------- entry point

def run(args: argparse.Namespace) -> dict[str, Any]:
    import mmkernels  # noqa: F401  (imported by benchmarks.run after TRITON_INTERPRET is set)

    device = H.default_device()
    quick = bool(getattr(args, "quick", False))
    on_cuda = device.type == "cuda"
    print(f"\n### {OP}: verification (triton backend{'' if on_cuda else ' under the CPU interpreter'} vs float64 "
          "reference: out + all gradients, decode step, visual_kv producer)", flush=True)
    ver_rows, ver_ok = run_verification(device, quick)
    H.print_table(f"{OP} verification ({'PASS' if ver_ok else 'FAIL'})", ver_rows, verify_columns())

    ceil = H.ceilings(measure=on_cuda)
    ref = ceil["reference"]
    cfg = _sweep(device, quick)
    m = cfg["model"]
    print(f"\n### {OP}: timing on {device.type} ({str(cfg['dtype']).replace('torch.', '')}, hidden {m['hidden']}, "
          f"H {m['heads']}/{m['kv_heads']}, D {m['head_dim']}, T {m['T']}; no grad)", flush=True)
    print(f"timer: {H.timer_description(on_cuda)}", flush=True)
    rows = run_timing(device, quick, ref)
    H.print_table(f"{OP} timing", rows, TIMING_COLUMNS)

    targets = evaluate_targets(rows, on_cuda)
    H.print_targets(OP, targets, on_cuda, "CPU timings compare the reference path with the mPLUG-Owl3-style baseline")
    plot = H.plot_sweep(
        OP, [r for r in rows if r["provider"] in ("mmkernels", "owl3_baseline")], panel_keys=("case", "mode", "L"),
        x_key="images", y_key="ms", series_key="provider", out_dir=getattr(args, "out", None),
        title=f"Hyper attention layer time, {str(cfg['dtype']).replace('torch.', '')} (lower is better)",
        y_label="ms", x_label="images", panel_title=lambda k: f"{k[0]} {k[1]} L={k[2]}")
    return {
        "plot": str(plot) if plot else None,
        "ok": ver_ok,
        "verification_ok": ver_ok,
        "verification": ver_rows,
        "rows": rows,
        "targets": targets,
        "ceilings": ceil,
        "config": {"quick": quick, "timing_dtype": cfg["dtype"], "model": m, "text": list(cfg["text"]),
                   "images": list(cfg["images"]), "decode": cfg["decode"],
                   "timer": H.timer_description(on_cuda)},
    }
