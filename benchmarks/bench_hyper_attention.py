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
3. Peers side by side (GPU only, in the same run; :mod:`benchmarks.hyper_peers`), on the
   7B hyper layer (H 28, H_kv 4, D 128, T 729, bf16), the fused op alone on precomputed K/V
   (``check_metadata=False``):
   * ``prefill_peer``: forward and forward+backward of ``mmkernels.hyper_attention`` against FlexAttention
     (compiled) on the hyper block mask (joint mode) and SDPA causal + FlexAttention lse + the gate
     combine (gated mode), 1k/2k/4k text x 1/8/32 images; the peers' layout changes (``[B, H, L, D]``,
     visual keys concatenated) and block masks are made outside the timed region;
   * ``causal``: zero images, 4k and 8k tokens, against dense causal SDPA (the practical ceiling: torch's
     default backend choice, then flash and cuDNN (``SDPBackend.CUDNN_ATTENTION``) pinned) and
     FlexAttention;
   * ``decode_step``: one token after 2k and 8k text tokens (8 / 32 images): the op's GPU kernel time
     (torch.profiler, every kernel the call launches), the op eager and replayed in a CUDA graph, one
     SDPA call over all the K/V the row sees (a reference point), the
     module's cached decode step (``HyperAttention(..., past_key_value=cache)``) eager and replayed in a
     CUDA graph (captured, replayed and compared with eager); GB/s against the K/V bytes.
   TFLOP/s count visible (query, key) pairs only: forward ``4*H*D`` FLOPs per pair (QK^T and PV);
   forward+backward ``3.5x`` that (the FlashAttention convention: the backward's five matmuls are
   ``2.5x`` the forward's two; the recomputation of P is not counted).  A peer or measurement that
   cannot run says ``not measured: <reason>`` and the run goes on.  The shapes the targets name run
   first; after every shape ``hyper_attention_partial-<card>-latest.json`` (the rows and targets so
   far) is rewritten and, once the section completes, removed -- a run cut short by a timeout keeps
   what it measured.  ``--quick`` keeps only the target shapes (prefill 1k+8 and 2k+32, causal 4k,
   decode after 2k with 32 images); FlexAttention compiles once per shape, which dominates a full sweep.
4. Packed samples (``hyper_attention_varlen``) against the same samples padded to the longest
   (``hyper_attention`` on ``[S, L_max]``): a batch of :data:`VARLEN_GPU` (16 samples, 256-4096 text
   tokens and 1-8 images of 729 tokens each, fixed seed) on the 7B layer.  The forward FLOPs over
   visible pairs, packed and padded, are counted on any machine (also for the tiny CPU mix); on a GPU
   (full run, or ``python -m benchmarks.bench_hyper_attention --varlen``, the prepared GPU run's step)
   fwd+bwd tokens/s of both, both modes, and in joint mode beside FlexAttention with a document mask
   combined with the hyper mask (:class:`benchmarks.hyper_peers.DocumentFlexPeer`) and flash-attn's
   varlen causal attention over the text alone when flash-attn is installed.
5. GPU targets (printed as MET / NOT MET on CUDA only; the results JSON's ``"targets"`` list of
   ``{id, value, goal, better, met, target}``, ``value`` the worst case over the stated shapes).
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import torch

from . import harness as H

OP = "hyper_attention"

# 7B hyper layer (Qwen2-7B): hidden 3584, 28 heads, 4 KV heads, head dim 128; 729 tokens per image.
GPU_MODEL = dict(hidden=3584, heads=28, kv_heads=4, head_dim=128, T=729)
GPU_TEXT = (1024, 2048, 4096)
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
    return H.time_mode(fn, "fwd")   # the layer sweep times forward passes (no_grad)


def _paired(on_cuda: bool, fn_ours, fn_base) -> dict:
    """CPU: the speed-up over the baseline again from back-to-back pairs, and the ``rank`` flag
    (:func:`harness.rank_flag`); nothing on CUDA."""
    if on_cuda:
        return {}
    paired = H.paired_ratio(H.mode_call(fn_ours, "fwd"), H.mode_call(fn_base, "fwd"))
    return dict(paired_speedup_vs_baseline=paired, rank=H.rank_flag(vs_owl3=paired))


def _row(case: str, mode: str, provider: str, L: int, n: int, T: int, times, dtype, **extra) -> dict:
    return dict(op=OP, case=case, mode=mode, provider=provider, L=L, images=n, T=T,
                dtype=H.dtype_name(dtype), **times.fields(), **extra)


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
                rows.append(_row("prefill", mode, "mmkernels", L, n, T, t_ours, dtype, speedup_vs_baseline=speed,
                                 **_paired(on_cuda, lambda: ours(x, pid, img, pos, cu),
                                           lambda: base(x, pid, img, [positions]))))
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
            rows.append(_row("decode", mode, "mmkernels", past, n, T, t_ours, dtype, speedup_vs_baseline=speed,
                             **_paired(on_cuda, lambda: ours(xs, ps, past_key_value=cache),
                                       lambda: base(xs, ps, img, [positions], past_key_value=bcache))))
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
                  ("paired_speedup_vs_baseline", "paired vs owl3", ".2f"), ("rank", "rank", None),
                  ("tflops", "TFLOP/s (visible)", ".3g"), ("tflops_dense", "TFLOP/s (dense)", ".3g"),
                  ("gbps", "GB/s", ".3g"), ("x_bandwidth_floor", "x BW floor", ".2f")]


# --------------------------------------------------------------------------- peers side by side

# (L text tokens, images) of the prefill sweep, the zero-image causal lengths and the decode points
# (past text tokens, images); the quick variant keeps the shapes the targets name.
GPU_PEERS = dict(model=GPU_MODEL, dtype=torch.bfloat16,
                 prefill=[(L, n) for L in (1024, 2048, 4096) for n in (1, 8, 32)],
                 causal=(4096, 8192), decode=[(2048, 8), (2048, 32), (8192, 8), (8192, 32)])
GPU_PEERS_QUICK = dict(GPU_PEERS, prefill=[(1024, 8), (2048, 32)], causal=(4096,), decode=[(2048, 32)])
FWD_BWD_FLOP_FACTOR = 3.5        # forward + backward = 3.5x forward FLOPs (backward 2.5x: 5 matmuls vs 2)
DENSE_SDPA_BACKENDS = (None, "flash", "cudnn")   # the dense causal case's SDPA peers (None: torch's choice)
PROFILE_CALLS = 20               # decode calls under torch.profiler for the kernel time

TARGET_FWD_BWD_VS_FLEX = 1.25    # hyper.fwd_bwd_vs_flex: peer / mmkernels time, 1k+8 and 2k+32, both modes
TARGET_FWD_VS_FLEX = 1.3         # hyper.fwd_vs_flex
TARGET_FWD_TFLOPS_32 = 400.0     # hyper.fwd_tflops_32img: 2k text + 32 images, both modes
TARGET_CAUSAL_VS_SDPA = 0.75     # hyper.causal_fwd_bwd_vs_sdpa: SDPA / mmkernels fwd+bwd, 4k and 8k
TARGET_DECODE_KERNEL_US = 20.0   # hyper.decode_kernel_us: 2k text + 32 images
TARGET_DECODE_GRAPH_US = 25.0    # hyper.decode_graph_us
TARGET_DECODE_EAGER_US = 45.0    # hyper.decode_eager_us
TARGET_SHAPES_VS_FLEX = ((1024, 8), (2048, 32))


def _not_measured(e: BaseException) -> str:
    return f"not measured: {H.error_line(e)}"


def _measure(timer, fn, *, grad: bool, leaves=()):
    """``(Timing, None)`` or ``(None, "not measured: ...")``: ``fn`` timed with ``timer`` under
    no_grad (``grad=False``) or with autograd (its gradients cleared before each call)."""
    def call():
        if grad:
            return fn()
        with torch.no_grad():
            return fn()
    try:
        return timer(call, grad_to_none=list(leaves) if grad else None), None
    except Exception as e:  # a peer/feature that cannot run must not end the run
        if torch.cuda.is_available():
            try:
                torch.cuda.synchronize()
                torch.cuda.empty_cache()
            except Exception:  # a sticky CUDA error: the next measurement reports it
                pass
        return None, _not_measured(e)


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b| (the peers' agreement with mmkernels, in the inputs' dtype)."""
    a, b = a.float(), b.float()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30)) if b.numel() else 0.0


def _attention_inputs(model: dict, L_q: int, L_k: int, n: int, mode: str, device, dtype, seed: int):
    g = torch.Generator(device=device).manual_seed(seed)
    Hq, Hkv, D, T = model["heads"], model["kv_heads"], model["head_dim"], model["T"]

    def r(*shape):
        return torch.randn(*shape, generator=g, device=device, dtype=dtype)
    q, k, v = r(1, L_q, Hq, D), r(1, L_k, Hkv, D), r(1, L_k, Hkv, D)
    kv, vv = r(n, T if n else 1, Hkv, D), r(n, T if n else 1, Hkv, D)
    gate = r(Hq * D) if mode == "gated" else None
    return q, k, v, kv, vv, gate


def _peer_row(case, mode, provider, L, n, T, pas, t, note, dtype, **extra) -> dict:
    fields = t.fields() if t is not None else dict(ms=None)
    return dict(op=OP, case=case, mode=mode, provider=provider, L=L, images=n, T=T, **{"pass": pas},
                dtype=H.dtype_name(dtype), **fields, note=note, **extra)


def _prefill_vs_peer(model, mode, L, n, device, dtype, timer, log, dense: bool = False) -> list[dict]:
    """mmkernels vs its peer at one prefill shape, forward and forward+backward (``dense``: zero images,
    mmkernels in joint mode against dense causal SDPA and FlexAttention)."""
    import mmkernels

    from . import hyper_peers as P

    T, Hq, D = model["T"], model["heads"], model["head_dim"]
    vis = "strict" if mode == "gated" else "inclusive"
    case = "causal" if dense else "prefill_peer"
    positions = image_positions_for(L, n)
    pos = torch.tensor(positions, dtype=torch.int32, device=device)
    cu = torch.tensor([0, n], dtype=torch.int32, device=device)
    q, k, v, kv, vv, gate = _attention_inputs(model, L, L, n, mode, device, dtype, seed=L + n)
    dy = torch.randn_like(q)
    leaves = [x.requires_grad_() for x in (q, k, v, kv, vv, gate) if x is not None]
    fl = attention_flops(visible_pairs(L, L, positions, T, vis), Hq, D)
    fl_pass = {"fwd": fl, "fwd+bwd": FWD_BWD_FLOP_FACTOR * fl}

    def mk():
        return mmkernels.hyper_attention(q, k, v, kv, vv, pos, cu, mode=mode, gate=gate, visibility=vis,
                                         check_metadata=False)

    def mk_fb():
        mk().backward(dy)

    peers = []   # (name, peer, prepare args)
    if dense:   # torch's own SDPA choice first (the target's peer), then flash and cuDNN pinned
        for backend in DENSE_SDPA_BACKENDS:
            peers.append((P.DenseCausalPeer(L, L, device=device, backend=backend).name,
                          lambda need_grad, backend=backend: P.DenseCausalPeer(L, L, device=device, backend=backend),
                          (q, k, v)))
    if mode == "joint":
        peers.append(("flex_joint", lambda need_grad: P.JointFlexPeer(pos, cu, L, L, T, visibility=vis, device=device,
                                                                      needs_grad=need_grad), (q, k, v, kv, vv)))
    else:
        peers.append(("sdpa+flex_gated", lambda need_grad: P.GatedPeer(pos, cu, L, L, T, visibility=vis, device=device,
                                                                       needs_grad=need_grad), (q, k, v, kv, vv, gate)))
    rows = []
    ref = dq_ref = None
    try:  # mmkernels' output and dq once, for the peers' agreement
        with torch.no_grad():
            ref = mk()
        mk_fb()
        dq_ref = q.grad.clone()
    except Exception as e:
        log(f"  {case} {mode} L={L} images={n}: mmkernels {_not_measured(e)}", flush=True)
    for x in leaves:
        x.grad = None
    mk_t = {"fwd": _measure(timer, mk, grad=False), "fwd+bwd": _measure(timer, mk_fb, grad=True, leaves=leaves)}
    peer_t: dict[str, dict] = {}
    for name, build, args in peers:
        peer_t[name] = {}
        for pas in ("fwd", "fwd+bwd"):
            need = pas == "fwd+bwd"
            extra: dict[str, Any] = {}
            try:
                peer = build(need)
                if peer.unavailable:
                    raise RuntimeError(peer.unavailable)
                prep = peer.prepare(*[a.detach().requires_grad_(need) if a is not None else None for a in args],
                                     detach=True)
                plv = [x for x in prep if x is not None and x.requires_grad]
                if need:
                    t0 = time.perf_counter()
                    out = peer.run(*prep)                                               # compiles here
                    dyp = dy.transpose(1, 2).contiguous()          # mmkernels' dy in the peer's [B, H, L, D]
                    out.backward(dyp)
                    H.synchronize()
                    extra["first_call_s"] = time.perf_counter() - t0
                    if dq_ref is not None and prep[0].grad is not None:
                        extra["rel_err_dq_vs_mk"] = _rel_err(prep[0].grad.transpose(1, 2), dq_ref)

                    def fn(peer=peer, prep=prep, dyp=dyp):
                        peer.run(*prep).backward(dyp)
                else:
                    t0 = time.perf_counter()
                    with torch.no_grad():
                        out = peer.output(peer.run(*prep))                                  # compiles here
                    H.synchronize()
                    extra["first_call_s"] = time.perf_counter() - t0
                    if ref is not None:   # after the first-call clock, as in the fwd+bwd branch
                        extra["rel_err_vs_mk"] = _rel_err(out, ref)

                    def fn(peer=peer, prep=prep):
                        return peer.run(*prep)
                t, note = _measure(timer, fn, grad=need, leaves=plv)
            except Exception as e:
                t, note = None, _not_measured(e)
            peer_t[name][pas] = (t, note)
            rows.append(_peer_row(case, mode, name, L, n, T, pas, t, note, dtype,
                                  tflops=H.tflops(fl_pass[pas], t[0]) if t else None, **extra))
    main_peer = peers[0][0]
    mk_rows = []
    for pas in ("fwd", "fwd+bwd"):
        t, note = mk_t[pas]
        speed = {}
        for name in peer_t:
            pt = peer_t[name][pas][0]
            speed[f"speedup_vs_{name}"] = (pt[0] / t[0]) if (t and pt) else None
        mk_rows.append(_peer_row(case, mode, "mmkernels", L, n, T, pas, t, note, dtype,
                                 tflops=H.tflops(fl_pass[pas], t[0]) if t else None,
                                 speedup_vs_peer=speed[f"speedup_vs_{main_peer}"], **speed))
    rows = mk_rows + rows
    for r in rows:
        ms = f"{r['ms']:.3f}ms" if r.get("ms") is not None else r["note"]
        tf = f" {r['tflops']:.0f} TFLOP/s" if r.get("tflops") is not None else ""
        sp = f" ({r['speedup_vs_peer']:.2f}x vs {main_peer})" if r.get("speedup_vs_peer") is not None else ""
        log(f"  {case:<12} {mode:<5} L={L:<5} images={n:<3} {r['pass']:<7} {r['provider']:<16} {ms}{tf}{sp}",
            flush=True)
    return rows


def _graph_capture(fn):
    """Capture ``fn`` (no grad) in a CUDA graph after warm-up calls on a side stream: ``(graph, static output)``."""
    with torch.no_grad():
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            for _ in range(3):
                fn()
        torch.cuda.current_stream().wait_stream(s)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            out = fn()
    torch.cuda.synchronize()
    return g, out


def _graph_measure(fn, timer) -> tuple[Any, str | None, dict]:
    """Time a CUDA-graph replay of ``fn``; checks the replayed output against an eager call."""
    if not torch.cuda.is_available():
        return None, "not measured: CUDA graphs need CUDA", {}
    try:
        g, out = _graph_capture(fn)
        g.replay()
        torch.cuda.synchronize()
        with torch.no_grad():
            eager = fn()
        info = dict(graph_matches_eager=bool(torch.equal(out, eager)), graph_max_abs_diff=float((out.float() -
                    eager.float()).abs().max()) if out.numel() else 0.0)
        return timer(g.replay), None, info
    except Exception as e:
        try:
            torch.cuda.synchronize()
        except Exception:
            pass
        return None, _not_measured(e), {}


def _kernel_us(fn, calls: int = PROFILE_CALLS) -> tuple[float | None, str | None, dict]:
    """GPU time of one call of ``fn``: the device time of every kernel it launches (torch.profiler over
    ``calls`` calls, after a warm-up call), in µs per call; plus the per-kernel split."""
    if not torch.cuda.is_available():
        return None, "not measured: the kernel time needs CUDA (torch.profiler)", {}
    try:
        from torch.profiler import ProfilerActivity, profile

        with torch.no_grad():
            fn()
            torch.cuda.synchronize()
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                for _ in range(calls):
                    fn()
                torch.cuda.synchronize()
        per: dict[str, float] = {}
        for e in prof.key_averages():
            if str(getattr(e, "device_type", "")).split(".")[-1] != "CUDA":
                continue
            us = getattr(e, H.profiler_device_time_attr(e), 0.0)
            if us:
                per[e.key] = per.get(e.key, 0.0) + us / calls
        if not per:  # older/newer profilers: the raw device events
            for e in prof.events():
                if str(getattr(e, "device_type", "")).split(".")[-1] == "CUDA":
                    per[e.name] = per.get(e.name, 0.0) + e.time_range.elapsed_us() / calls
        if not per:
            return None, "not measured: the profiler recorded no CUDA kernel", {}
        return sum(per.values()), None, {"kernels_us": {k: round(v, 2) for k, v in per.items()}}
    except Exception as e:
        return None, _not_measured(e), {}


def _decode_step(model, mode, past, n, device, dtype, timer, log, modules=None) -> list[dict]:
    """One decode step after ``past`` text tokens and ``n`` images: the op (kernel time, eager, graph) on
    precomputed K/V and the module's cached step (eager, graph)."""
    import mmkernels

    T, Hq, Hkv, D = model["T"], model["heads"], model["kv_heads"], model["head_dim"]
    vis = "strict" if mode == "gated" else "inclusive"
    elem = torch.finfo(dtype).bits // 8
    positions = image_positions_for(past, n)
    pos = torch.tensor(positions, dtype=torch.int32, device=device)
    cu = torch.tensor([0, n], dtype=torch.int32, device=device)
    nb = kv_bytes(past + 1, n, T, Hkv, D, elem)
    ceil = H.ceilings(measure=torch.cuda.is_available())["reference"] or {}
    bw = ceil.get("hbm_tbps")
    floor_us = nb / (bw * 1e12) * 1e6 if bw else None
    rows = []

    def add(provider, us, note, **extra):
        gb = nb / (us * 1e-6) / 1e9 if us else None
        rows.append(dict(op=OP, case="decode_step", mode=mode, provider=provider, L=past, images=n, T=T,
                         dtype=H.dtype_name(dtype), us=us, ms=us / 1e3 if us else None, note=note,
                         gbps=gb, x_bandwidth_floor=(us / floor_us) if (us and floor_us) else None,
                         floor_us=floor_us, **extra))
        shown = f"{us:.1f}us" + (f" {gb:.0f} GB/s" if gb else "") if us else note
        log(f"  decode_step  {mode:<5} past={past:<5} images={n:<3} {provider:<18} {shown}", flush=True)

    q, k, v, kv, vv, gate = _attention_inputs(model, 1, past + 1, n, mode, device, dtype, seed=past + n)

    def op():
        return mmkernels.hyper_attention(q, k, v, kv, vv, pos, cu, mode=mode, gate=gate, visibility=vis,
                                         check_metadata=False)
    us, note, info = _kernel_us(op)
    add("op_kernels", us, note, **info)
    t, note = _measure(timer, op, grad=False)
    add("op_eager", t[0] * 1e3 if t else None, note)
    t, note, info = _graph_measure(op, timer)
    add("op_graph", t[0] * 1e3 if t else None, note, **info)
    # reference point: one SDPA call over all the K/V the row sees (every image precedes the row)
    try:
        import torch.nn.functional as F

        from .hyper_peers import _padded_visual

        qh = q.transpose(1, 2).contiguous()
        kk = torch.cat([_padded_visual(kv, cu, n), k.transpose(1, 2)], 2) if n else k.transpose(1, 2).contiguous()
        vv2 = torch.cat([_padded_visual(vv, cu, n), v.transpose(1, 2)], 2) if n else v.transpose(1, 2).contiguous()
        def sdpa():
            return F.scaled_dot_product_attention(qh, kk, vv2, enable_gqa=True)
        t, note = _measure(timer, sdpa, grad=False)
        extra = {}
        if mode == "joint":   # the same math as the joint op's decode row: check it
            with torch.no_grad():
                extra["rel_err_vs_mk"] = _rel_err(sdpa().transpose(1, 2), op())
        add("sdpa_all_kv", t[0] * 1e3 if t else None, note, **extra)
    except Exception as e:
        add("sdpa_all_kv", None, _not_measured(e))
    # the module's cached decode step
    try:
        _, ours = modules if modules is not None else _make_modules(model, mode, device, dtype, seed=0)
        g = torch.Generator(device=device).manual_seed(7)
        x = torch.randn(1, past + 1, model["hidden"], generator=g, device=device, dtype=dtype)
        img = torch.randn(n, T, model["hidden"], generator=g, device=device, dtype=dtype)
        pid = torch.arange(past + 1, device=device)[None]
        with torch.no_grad():
            _, cache = ours(x[:, :past], pid[:, :past], img, pos, cu, use_cache=True)
        xs, ps = x[:, past:], pid[:, past:]

        def step():
            return ours(xs, ps, past_key_value=cache)[0]
        t, note = _measure(timer, step, grad=False)
        add("module_eager", t[0] * 1e3 if t else None, note)
        t, note, info = _graph_measure(step, timer)
        add("module_graph", t[0] * 1e3 if t else None, note, **info)
        # the generation loop's step: a static cache (fixed buffers, position advanced on the device);
        # each call rewinds it to `past`, so every eager call and replay is the same step
        static = cache.to_static(past + 1)

        def static_step():
            static.length.fill_(past)
            static.filled = past
            return ours(xs, ps, past_key_value=static)[0]
        t, note = _measure(timer, static_step, grad=False)
        add("module_static_eager", t[0] * 1e3 if t else None, note, includes="a 1-element rewind of the length")
        t, note, info = _graph_measure(static_step, timer)
        add("module_static_graph", t[0] * 1e3 if t else None, note, includes="a 1-element rewind of the length",
            **info)
    except Exception as e:
        add("module_eager", None, _not_measured(e))
    return rows


CPU_DECODE_STEP_PROVIDERS = ("op_eager", "sdpa_all_kv", "module_eager", "module_static_eager")


def cpu_decode_steps(device: torch.device, cfg: dict, log=print) -> list[dict]:
    """The decode-step rows of :func:`_decode_step` that a CPU can measure (no kernel profile, no CUDA
    graph), at the CPU model and decode points of ``cfg``, both modes."""
    rows = []
    for mode in MODES:
        for n in cfg["decode"]["images"]:
            rows += [r for r in _decode_step(cfg["model"], mode, cfg["decode"]["past"], n, device, cfg["dtype"],
                                             H.time_ms, lambda *a, **k: None)
                     if r["provider"] in CPU_DECODE_STEP_PROVIDERS]
    for r in rows:
        log(f"  decode_step  {r['mode']:<5} past={r['L']:<5} images={r['images']:<3} {r['provider']:<20} "
            + (f"{r['us']:.1f}us" if r["us"] else r["note"]), flush=True)
    return rows


def run_peers(device: torch.device, cfg: dict, log=print, timer=None, on_progress=None) -> list[dict]:
    """Section 3: the prefill, causal and decode comparisons of ``cfg`` (:data:`GPU_PEERS`).  The shapes
    the targets name run first (prefill 1k+8 / 2k+32, the causal lengths, decode after 2k with 32
    images), then the rest of the sweep; ``on_progress(rows)`` is called after each shape (the run
    writes a partial results file with it, so a run cut short by a timeout keeps what it measured)."""
    timer = timer or H.time_ms
    model, dtype = cfg["model"], cfg["dtype"]
    prefill = sorted(cfg["prefill"], key=lambda s: s not in TARGET_SHAPES_VS_FLEX)       # stable: targets first
    decode = sorted(cfg["decode"], key=lambda s: s != (2048, 32))
    n_first = sum(s in TARGET_SHAPES_VS_FLEX for s in prefill)
    d_first = sum(s == (2048, 32) for s in decode)
    rows: list[dict] = []

    def step(new_rows):
        rows.extend(new_rows)
        if on_progress is not None:
            on_progress(rows)

    def decode_points(points):
        for mode in MODES:
            if not points:
                continue
            try:
                modules = _make_modules(model, mode, device, dtype, seed=0)
            except Exception as e:
                log(f"  decode_step {mode}: module {_not_measured(e)}", flush=True)
                modules = None
            for past, n in points:
                step(_decode_step(model, mode, past, n, device, dtype, timer, log, modules))
            del modules
            if device.type == "cuda":
                torch.cuda.empty_cache()

    for shapes in (prefill[:n_first], None, prefill[n_first:]):
        if shapes is None:   # between the targets' prefill shapes and the rest: causal + the target decode point
            for L in cfg["causal"]:
                step(_prefill_vs_peer(model, "joint", L, 0, device, dtype, timer, log, dense=True))
            decode_points(decode[:d_first])
            continue
        for L, n in shapes:
            for mode in MODES:
                step(_prefill_vs_peer(model, mode, L, n, device, dtype, timer, log))
    decode_points(decode[d_first:])
    return rows


PEER_COLUMNS = [("case", "case", None), ("mode", "mode", None), ("L", "L", None), ("images", "images", None),
                ("pass", "pass", None), ("provider", "provider", None), ("ms", "median ms", ".4f"),
                ("tflops", "TFLOP/s (visible)", ".3g"), ("speedup_vs_peer", "speedup vs peer", ".2f"),
                ("rel_err_vs_mk", "rel err vs mk", ".1e"), ("rel_err_dq_vs_mk", "dq rel err", ".1e"),
                ("first_call_s", "1st call s", ".1f"), ("us", "us", ".1f"), ("gbps", "GB/s", ".4g"),
                ("x_bandwidth_floor", "x BW floor", ".2f"), ("note", "note", None)]


def peer_targets(rows: list[dict]) -> list[dict]:
    """The targets against the peers from :func:`run_peers`'s rows (value: the worst case over the stated shapes;
    None -- not met -- when nothing was measured there)."""
    out = []
    mk = [r for r in rows if r["provider"] == "mmkernels"]

    def vs_flex(pas, id_, goal, what):
        sel = [r for r in mk if r["case"] == "prefill_peer" and r["pass"] == pas
               and (r["L"], r["images"]) in TARGET_SHAPES_VS_FLEX]
        vals = [r.get("speedup_vs_peer") for r in sel]
        n_meas = sum(v is not None for v in vals)
        t = H.target(id_, H.worst(vals, "higher"), goal, "higher",
                     f"{what} >= {goal}x the peer (gated: SDPA+FlexAttention, joint: FlexAttention), 1k+8 and "
                     f"2k+32 images ({n_meas}/{2 * len(TARGET_SHAPES_VS_FLEX)} cases measured)")
        out.append(dict(t, detail={f"{r['mode']} L={r['L']} n={r['images']}": r.get("speedup_vs_peer") for r in sel}))
    vs_flex("fwd+bwd", "hyper.fwd_bwd_vs_flex", TARGET_FWD_BWD_VS_FLEX, "fwd+bwd speed-up")
    vs_flex("fwd", "hyper.fwd_vs_flex", TARGET_FWD_VS_FLEX, "fwd speed-up")
    sel = [r for r in mk if r["case"] == "prefill_peer" and r["pass"] == "fwd" and r["L"] == 2048
           and r["images"] == 32]
    out.append(H.target("hyper.fwd_tflops_32img", H.worst([r.get("tflops") for r in sel], "higher"),
                        TARGET_FWD_TFLOPS_32, "higher",
                        f"fwd >= {TARGET_FWD_TFLOPS_32:.0f} TFLOP/s over visible pairs, 2k text + 32 images, "
                        "both modes"))
    sel = [r for r in mk if r["case"] == "causal" and r["pass"] == "fwd+bwd"]
    t = H.target("hyper.causal_fwd_bwd_vs_sdpa", H.worst([r.get("speedup_vs_sdpa_causal") for r in sel], "higher"),
                 TARGET_CAUSAL_VS_SDPA, "higher", f"zero images, L {sorted({r['L'] for r in sel})}: fwd+bwd time "
                 f"SDPA (torch's backend choice) / mmkernels >= {TARGET_CAUSAL_VS_SDPA}")
    out.append(dict(t, detail={f"L={r['L']} vs {name}": r.get(f"speedup_vs_{name}") for r in sel
                               for name in ("sdpa_causal", "sdpa_flash", "sdpa_cudnn", "flex_joint")}))
    dec = [r for r in rows if r["case"] == "decode_step" and r["L"] == 2048 and r["images"] == 32]
    for id_, prov, goal, what in (
            ("hyper.decode_kernel_us", "op_kernels", TARGET_DECODE_KERNEL_US,
             "GPU time of one decode step (every kernel of the op), 2k text + 32 images, us"),
            ("hyper.decode_graph_us", "op_graph", TARGET_DECODE_GRAPH_US,
             "one decode step (the op) replayed in a CUDA graph, 2k text + 32 images, us"),
            ("hyper.decode_eager_us", "module_eager", TARGET_DECODE_EAGER_US,
             "one eager decode step through the module's cache path, 2k text + 32 images, us")):
        out.append(H.target(id_, H.worst([r.get("us") for r in dec if r["provider"] == prov], "lower"), goal, "lower",
                            f"{what} <= {goal:.0f}"))
    return [dict(t, note="not measured") if t["value"] is None else t for t in out]


# --------------------------------------------------------------------------- packed samples (varlen)

# The length mix of a packed training batch: ``samples`` samples, text lengths drawn uniformly from
# ``text`` and ``images`` images each (of the model's T tokens), with a fixed seed.  GPU: the 7B layer;
# CPU: the same construction at tiny sizes, FLOPs only.
VARLEN_GPU = dict(samples=16, text=(256, 4096), images=(1, 8), seed=0)
VARLEN_CPU = dict(samples=4, text=(16, 64), images=(1, 3), seed=0)
TARGET_VARLEN_VS_PADDED = 1.5     # hyper.varlen_tokens_per_s_vs_padded: fwd+bwd tokens/s, packed / padded
TARGET_VARLEN_VS_FLEX = 1.25      # hyper.varlen_fwd_bwd_vs_flex_document: FlexAttention (document mask) / packed


def varlen_mix(spec: dict) -> list[tuple[int, int]]:
    """The ``(text length, images)`` of each sample of ``spec`` (:data:`VARLEN_GPU`), drawn with its seed."""
    g = torch.Generator().manual_seed(spec["seed"])
    (lo, hi), (n_lo, n_hi) = spec["text"], spec["images"]
    lengths = torch.randint(lo, hi + 1, (spec["samples"],), generator=g).tolist()
    counts = torch.randint(n_lo, n_hi + 1, (spec["samples"],), generator=g).tolist()
    return list(zip(lengths, counts))


def varlen_flops(mix: list[tuple[int, int]], model: dict, visibility: str) -> dict:
    """Forward FLOPs (visible pairs, :func:`attention_flops`) of the mix packed against the same samples
    padded to the longest one (a ``[S, L_max]`` batch computes every row of ``L_max``; each sample's
    images at the same positions, :func:`image_positions_for` of its own length)."""
    T, Hq, D = model["T"], model["heads"], model["head_dim"]
    L_max = max(L for L, _ in mix)
    packed = sum(visible_pairs(L, L, image_positions_for(L, n), T, visibility) for L, n in mix)
    padded = sum(visible_pairs(L_max, L_max, image_positions_for(L, n), T, visibility) for L, n in mix)
    fp, fd = attention_flops(packed, Hq, D), attention_flops(padded, Hq, D)
    return dict(samples=len(mix), tokens=sum(L for L, _ in mix), padded_tokens=L_max * len(mix),
                images=sum(n for _, n in mix), packed_gflop=fp / 1e9, padded_gflop=fd / 1e9,
                flops_saved=1.0 - fp / fd if fd else 0.0)


def varlen_inputs(mix: list[tuple[int, int]], model: dict, mode: str, device, dtype, seed: int = 0) -> dict:
    """The mix as ``hyper_attention_varlen`` takes it (``packed``: q, k, v, k_vis, v_vis, cu_seqlens_q/k,
    max_seqlen_q/k, image_positions, cu_images; ``gate`` in gated mode) and the same samples right-padded
    to ``[S, L_max]`` for ``hyper_attention`` (``padded``; a padding row sees only earlier keys, so the
    real rows need no key mask); ``rows``: the padded batch's real rows, as a boolean ``[S, L_max]``."""
    g = torch.Generator(device=device).manual_seed(seed)
    Hq, Hkv, D, T = model["heads"], model["kv_heads"], model["head_dim"], model["T"]
    S, L_max, total = len(mix), max(L for L, _ in mix), sum(L for L, _ in mix)
    N = sum(n for _, n in mix)

    def r(*shape):
        return torch.randn(*shape, generator=g, device=device, dtype=dtype)
    q, k, v, kv, vv = r(total, Hq, D), r(total, Hkv, D), r(total, Hkv, D), r(N, T, Hkv, D), r(N, T, Hkv, D)
    i32 = dict(dtype=torch.int32, device=device)
    cu = torch.tensor([0] + torch.tensor([L for L, _ in mix]).cumsum(0).tolist(), **i32)
    cu_img = torch.tensor([0] + torch.tensor([n for _, n in mix]).cumsum(0).tolist(), **i32)
    pos = torch.tensor([p for L, n in mix for p in image_positions_for(L, n)], **i32)
    rows = torch.zeros(S, L_max, dtype=torch.bool, device=device)
    for s, (L, _) in enumerate(mix):
        rows[s, :L] = True

    def pad(x):
        out = x.new_zeros((S, L_max, *x.shape[1:]))
        out[rows] = x
        return out
    gate = r(Hq * D) if mode == "gated" else None
    return dict(packed=(q, k, v, kv, vv, cu, cu, L_max, L_max, pos, cu_img), gate=gate, rows=rows,
                padded=(pad(q), pad(k), pad(v), kv, vv, pos, cu_img))


def run_varlen(model: dict, spec: dict, device, dtype, timer, log=print, on_progress=None) -> list[dict]:
    """Forward+backward of the mix packed (``hyper_attention_varlen``) and padded (``hyper_attention`` on
    ``[S, L_max]``), both modes, tokens/s counting the real text tokens; then, in joint mode, the peers:
    FlexAttention with a document mask combined with the hyper mask and, when flash-attn is installed,
    its varlen causal attention over the text alone (no image).  Every call with ``check_metadata=False``
    (no host sync).  ``on_progress(rows)`` after each mode and each peer (the packed-vs-padded rows
    come first: a run cut short keeps them)."""
    import mmkernels

    from . import hyper_peers as P

    mix = varlen_mix(spec)
    T = model["T"]
    rows: list[dict] = []

    def add(mode, fl, name, t, note, **extra):
        tokens = fl["tokens"]
        rows.append(dict(_peer_row("varlen", mode, name, tokens, fl["images"], T, "fwd+bwd", t, note, dtype),
                         samples=fl["samples"], tokens_per_s=(tokens / t[0] * 1e3) if t else None, **extra))
        log(f"  varlen {mode:<5} {fl['samples']} samples, {tokens} tokens, {fl['images']} images  {name:<20} "
            + (f"{t[0]:.3f}ms {rows[-1]['tokens_per_s']:.4g} tokens/s" if t else note), flush=True)
        if on_progress is not None:
            on_progress(rows)
        return rows[-1]

    joint = None
    for mode in MODES:
        vis = "strict" if mode == "gated" else "inclusive"
        x = varlen_inputs(mix, model, mode, device, dtype)
        fl = varlen_flops(mix, model, vis)
        q, k, v, kv, vv = x["packed"][:5]
        qp, kp, vp = x["padded"][:3]
        gate = x["gate"]
        dy = torch.randn_like(q)
        dyp = dy.new_zeros(qp.shape)
        dyp[x["rows"]] = dy
        leaves = [t.requires_grad_() for t in (q, k, v, kv, vv, gate, qp, kp, vp) if t is not None]

        def packed_fb(x=x, mode=mode, vis=vis, dy=dy):
            mmkernels.hyper_attention_varlen(*x["packed"], mode=mode, gate=x["gate"], visibility=vis,
                                             check_metadata=False).backward(dy)

        def padded_fb(x=x, mode=mode, vis=vis, dyp=dyp):
            mmkernels.hyper_attention(*x["padded"], mode=mode, gate=x["gate"], visibility=vis,
                                      check_metadata=False).backward(dyp)

        packed, padded = (_measure(timer, packed_fb, grad=True, leaves=leaves),
                          _measure(timer, padded_fb, grad=True, leaves=leaves))
        speed = (padded[0][0] / packed[0][0]) if (packed[0] and padded[0]) else None
        row = add(mode, fl, "packed", *packed, speedup_vs_padded=speed, speedup_vs_flex_document=None,
                  flops_saved=fl["flops_saved"])
        add(mode, fl, "padded", *padded)
        if mode == "joint":
            joint = (x, dy, fl, vis, row)
        del x, leaves, qp, kp, vp, dyp
        if device.type == "cuda":
            torch.cuda.empty_cache()

    x, dy, fl, vis, packed_row = joint
    q, k, v, kv, vv, cu_q, cu_k, max_q, max_k, pos, cu_img = x["packed"]
    peers = [("flex_document", lambda: P.DocumentFlexPeer(cu_q, cu_k, pos, cu_img, T, visibility=vis, device=device,
                                                          needs_grad=True), (q, k, v, kv, vv)),
             ("flash_varlen_causal", lambda: P.FlashVarlenCausalPeer(cu_q, cu_k, max_q, max_k), (q, k, v))]
    for name, build, args in peers:
        try:
            peer = build()
            if peer.unavailable:
                raise RuntimeError(peer.unavailable)
            prep = peer.prepare(*[a.detach().requires_grad_() for a in args], detach=True)
            dy_peer = dy if name == "flash_varlen_causal" else dy.transpose(0, 1)[None].contiguous()

            def fn(peer=peer, prep=prep, dy_peer=dy_peer):
                peer.run(*prep).backward(dy_peer)
            fn()                                                   # compiles here
            t, note = _measure(timer, fn, grad=True, leaves=list(prep))
        except Exception as e:
            t, note = None, _not_measured(e)
        if name == "flex_document" and t and packed_row.get("ms"):
            packed_row["speedup_vs_flex_document"] = t[0] / packed_row["ms"]
        add("joint", fl, name, t, note)
    return rows


VARLEN_COLUMNS = [("case", "case", None), ("mode", "mode", None), ("samples", "samples", None),
                  ("L", "text tokens", None), ("images", "images", None), ("provider", "provider", None),
                  ("ms", "fwd+bwd ms", ".3f"), ("tokens_per_s", "tokens/s", ".4g"),
                  ("speedup_vs_padded", "vs padded", ".2f"), ("speedup_vs_flex_document", "vs flex document", ".2f"),
                  ("note", "note", None)]
VARLEN_FLOP_COLUMNS = [("shapes", "shapes", None), ("samples", "samples", None), ("tokens", "text tokens", None),
                       ("padded_tokens", "padded tokens", None), ("images", "images", None),
                       ("visibility", "visibility", None), ("packed_gflop", "packed GFLOP (fwd)", ".4g"),
                       ("padded_gflop", "padded GFLOP (fwd)", ".4g"), ("flops_saved", "FLOPs saved", ".1%")]


def varlen_flop_rows(include_gpu_mix: bool = True) -> list[dict]:
    """The FLOPs saved by packing, computed (no run): the tiny CPU mix and the 7B layer's mix."""
    sets = [("tiny CPU shapes", CPU_MODEL, VARLEN_CPU)] + ([("7B layer mix", GPU_MODEL, VARLEN_GPU)]
                                                          if include_gpu_mix else [])
    return [dict(shapes=label, visibility=vis, **varlen_flops(varlen_mix(spec), model, vis))
            for label, model, spec in sets for vis in ("strict", "inclusive")]


def varlen_targets(rows: list[dict]) -> list[dict]:
    """The packed-sample targets from :func:`run_varlen`'s rows (None -- not met -- when not measured)."""
    mk = [r for r in rows if r["case"] == "varlen" and r["provider"] == "packed"]
    t1 = H.target("hyper.varlen_tokens_per_s_vs_padded", H.worst([r.get("speedup_vs_padded") for r in mk], "higher"),
                  TARGET_VARLEN_VS_PADDED, "higher",
                  f"fwd+bwd tokens/s packed >= {TARGET_VARLEN_VS_PADDED}x padded, {VARLEN_GPU['samples']} samples "
                  f"of {VARLEN_GPU['text'][0]}-{VARLEN_GPU['text'][1]} text tokens and {VARLEN_GPU['images'][0]}-"
                  f"{VARLEN_GPU['images'][1]} images, both modes")
    sel = [r for r in mk if r["mode"] == "joint"]
    t2 = H.target("hyper.varlen_fwd_bwd_vs_flex_document",
                  H.worst([r.get("speedup_vs_flex_document") for r in sel], "higher"), TARGET_VARLEN_VS_FLEX, "higher",
                  f"fwd+bwd >= {TARGET_VARLEN_VS_FLEX}x FlexAttention with a document mask combined with the hyper "
                  "mask, the same mix, joint mode")
    return [dict(t, note="not measured") if t["value"] is None else t for t in (t1, t2)]


# --------------------------------------------------------------------------- targets

def evaluate_targets(rows: list[dict], on_cuda: bool, peer_rows: list[dict] | None = None,
                     varlen_rows: list[dict] | None = None) -> list[dict]:
    """The targets against the mPLUG-Owl3 baseline (layer sweep) and, from ``peer_rows``, the peer
    targets (:func:`peer_targets`).  Without a GPU the peer targets still keep their ids in the results
    JSON, each "not measured"."""
    if not on_cuda:
        return [dict(t, note="not measured: no CUDA GPU in this run") for t in peer_targets([]) + varlen_targets([])]
    targets = []
    for n, want in TARGET_PREFILL_SPEEDUP.items():
        sel = [r for r in rows if r["case"] == "prefill" and r["provider"] == "mmkernels" and r["images"] == n]
        if sel:
            worst = min(sel, key=lambda r: r["speedup_vs_baseline"])
            targets.append(dict(H.target(f"hyper.prefill_vs_owl3_{n}img", worst["speedup_vs_baseline"], want, "higher",
                                         f"prefill layer fwd >= {want:.0f}x the mPLUG-Owl3 baseline ({n} images)"),
                                detail=f"worst {worst['speedup_vs_baseline']:.2f}x ({worst['mode']}, L={worst['L']})"))
    att = [r for r in rows if r["case"] == "prefill" and r["provider"] == "attention" and r["images"] >= 8]
    if att:
        worst, best = min(att, key=lambda r: r["tflops"]), max(att, key=lambda r: r["tflops"])
        targets.append(dict(H.target("hyper.fwd_tflops_8img_plus", worst["tflops"], TARGET_TFLOPS, "higher",
                                     f"attention fwd >= {TARGET_TFLOPS:.0f} TFLOP/s over visible pairs (>= 8 images)"),
                            detail=f"worst {worst['tflops']:.0f} ({worst['mode']}, L={worst['L']}, "
                                   f"{worst['images']} img), best {best['tflops']:.0f}"))
    dec = [r for r in rows if r["case"] == "decode" and r["provider"] == "mmkernels"]
    if dec:
        worst = min(dec, key=lambda r: r["speedup_vs_baseline"])
        targets.append(dict(H.target("hyper.decode_vs_owl3", worst["speedup_vs_baseline"], TARGET_DECODE_SPEEDUP,
                                     "higher", f"decode step >= {TARGET_DECODE_SPEEDUP:.0f}x faster than the "
                                               "mPLUG-Owl3 baseline's step"),
                            detail=f"worst {worst['speedup_vs_baseline']:.1f}x ({worst['mode']}, "
                                   f"{worst['images']} img)"))
    bw = [r for r in rows if r["case"] == "decode" and r["provider"] == "attention"
          and r.get("x_bandwidth_floor") is not None]
    if bw:
        worst = max(bw, key=lambda r: r["x_bandwidth_floor"])
        targets.append(dict(H.target("hyper.decode_x_bw_floor", worst["x_bandwidth_floor"], TARGET_DECODE_VS_BW,
                                     "lower",
                                     f"decode attention within {TARGET_DECODE_VS_BW:.0f}x of reading K/V once"),
                            detail=f"worst {worst['x_bandwidth_floor']:.2f}x ({worst['mode']}, {worst['images']} img, "
                                   f"{worst['gbps']:.0f} GB/s)"))
    if peer_rows is not None:
        targets += peer_targets(peer_rows)
    if varlen_rows is not None:
        targets += varlen_targets(varlen_rows)
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
    print(f"\n### {OP}: timing on {device.type} ({H.dtype_name(cfg['dtype'])}, hidden {m['hidden']}, "
          f"H {m['heads']}/{m['kv_heads']}, D {m['head_dim']}, T {m['T']}; no grad)", flush=True)
    print(f"timer: {H.timer_description(on_cuda)}", flush=True)
    rows = run_timing(device, quick, ref)
    H.print_table(f"{OP} timing", rows, TIMING_COLUMNS)

    peer_rows = None
    if on_cuda:
        pcfg = GPU_PEERS_QUICK if quick else GPU_PEERS
        print(f"\n### {OP}: mmkernels vs the peers (FlexAttention compiled, SDPA) in the same run, "
              f"{H.dtype_name(pcfg['dtype'])}; TFLOP/s over visible pairs (fwd 4*H*D per pair, "
              f"fwd+bwd {FWD_BWD_FLOP_FACTOR}x fwd)", flush=True)
        partial_op = f"{OP}_partial"

        def progress(rows_so_far):
            H.write_results(partial_op, {"partial": True, "peer_rows": rows_so_far,
                                         "targets": peer_targets(rows_so_far)},
                            getattr(args, "out", None), keep_timestamped=False)
        peer_rows = run_peers(device, pcfg, on_progress=progress)
        partial = H.result_paths(partial_op, getattr(args, "out", None))["json_latest"]
        Path(partial).unlink(missing_ok=True)          # complete: the results JSON has everything
        H.print_table(f"{OP} vs peers", peer_rows, PEER_COLUMNS)
    else:
        print(f"\n### {OP}: peers (FlexAttention compiled, SDPA; benchmarks/hyper_peers.py) are GPU-only; "
              "their agreement with the reference on CPU is benchmarks/test_hyper_peers.py", flush=True)
        peer_rows = cpu_decode_steps(device, cfg)
        H.print_table(f"{OP} decode step (the op and the module's cached step on the reference path; "
                      "SDPA over all the K/V as a reference point)", peer_rows, PEER_COLUMNS)
    print(f"\n### {OP}: packed samples (hyper_attention_varlen) against the same samples padded to the longest; "
          "forward FLOPs over visible pairs, counted (no run)", flush=True)
    flop_rows = varlen_flop_rows()
    H.print_table(f"{OP} packed vs padded: FLOPs", flop_rows, VARLEN_FLOP_COLUMNS)
    varlen_rows = []
    if on_cuda and not quick:   # the prepared GPU run times it in its own step (python -m benchmarks.bench_hyper_attention)
        m7 = GPU_MODEL
        print(f"\n### {OP}: packed vs padded, fwd+bwd, {H.dtype_name(GPU_PEERS['dtype'])}, 7B layer (H {m7['heads']}/"
              f"{m7['kv_heads']}, D {m7['head_dim']}, T {m7['T']}), {VARLEN_GPU['samples']} samples of "
              f"{VARLEN_GPU['text'][0]}-{VARLEN_GPU['text'][1]} text tokens, {VARLEN_GPU['images'][0]}-"
              f"{VARLEN_GPU['images'][1]} images each (seed {VARLEN_GPU['seed']})", flush=True)
        varlen_rows = run_varlen(m7, VARLEN_GPU, device, GPU_PEERS["dtype"], H.time_ms)
        H.print_table(f"{OP} packed vs padded", varlen_rows, VARLEN_COLUMNS)
    else:
        print(f"{OP} packed vs padded: tokens/s are measured on a GPU (full run, or python -m "
              "benchmarks.bench_hyper_attention --varlen); the FLOPs above are counted", flush=True)
    targets = evaluate_targets(rows, on_cuda, peer_rows, varlen_rows if on_cuda and not quick else None)
    H.print_targets(OP, targets, on_cuda, "CPU timings compare the reference path with the mPLUG-Owl3-style baseline")
    plot = H.plot_sweep(
        OP, [r for r in rows if r["provider"] in ("mmkernels", "owl3_baseline")], panel_keys=("case", "mode", "L"),
        x_key="images", y_key="ms", series_key="provider", out_dir=getattr(args, "out", None),
        title=f"Hyper attention layer time, {H.dtype_name(cfg['dtype'])} (lower is better)",
        y_label="ms", x_label="images", panel_title=lambda k: f"{k[0]} {k[1]} L={k[2]}")
    return {
        "plot": str(plot) if plot else None,
        "ok": ver_ok,
        "verification_ok": ver_ok,
        "verification": ver_rows,
        "rows": rows,
        "peer_rows": peer_rows or [],
        "varlen_flops": flop_rows,
        "varlen_rows": varlen_rows,
        "targets": targets,
        "ceilings": ceil,
        "config": {"quick": quick, "timing_dtype": cfg["dtype"], "model": m, "text": list(cfg["text"]),
                   "images": list(cfg["images"]), "decode": cfg["decode"],
                   "timer": H.timer_description(on_cuda),
                   "peers": ({k: v for k, v in (GPU_PEERS_QUICK if quick else GPU_PEERS).items() if k != "model"}
                             if on_cuda else None),
                   "flop_convention": f"visible (query, key) pairs only; fwd 4*H*D FLOPs per pair; fwd+bwd "
                                      f"{FWD_BWD_FLOP_FACTOR}x fwd (backward 2.5x: five matmuls vs two)"},
    }


def varlen_main(argv=None) -> dict[str, Any]:
    """``python -m benchmarks.bench_hyper_attention --varlen [--out DIR]``: the packed-vs-padded section alone
    (FLOPs; on a GPU the fwd+bwd timing and its two targets), written to
    ``hyper_attention_varlen-<card>-latest.json`` after each mode (a run cut short keeps what it measured)."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_hyper_attention",
                                     description="packed samples against padded ones (hyper_attention_varlen)")
    parser.add_argument("--varlen", action="store_true", required=True, help="run the packed-vs-padded section")
    parser.add_argument("--out", default=None, help="output folder (default benchmarks/results)")
    args = parser.parse_args(argv)
    from .run import _prepare_interpreter

    _prepare_interpreter()
    device = H.default_device()
    on_cuda = device.type == "cuda"
    flop_rows = varlen_flop_rows()
    H.print_table(f"{OP} packed vs padded: FLOPs (fwd, visible pairs, counted)", flop_rows, VARLEN_FLOP_COLUMNS)
    op = f"{OP}_varlen"
    rows: list[dict] = []

    def save(rows_so_far):
        targets = varlen_targets(rows_so_far) if on_cuda else [
            dict(t, note="not measured: no CUDA GPU in this run") for t in varlen_targets([])]
        H.write_results(op, {"varlen_flops": flop_rows, "varlen_rows": rows_so_far, "targets": targets},
                        args.out, keep_timestamped=False)
        return targets
    if on_cuda:
        rows = run_varlen(GPU_MODEL, VARLEN_GPU, device, GPU_PEERS["dtype"], H.time_ms, on_progress=save)
        H.print_table(f"{OP} packed vs padded", rows, VARLEN_COLUMNS)
    targets = save(rows)
    H.print_targets(op, targets, on_cuda, "tokens/s need a GPU; the FLOPs are counted")
    return {"varlen_flops": flop_rows, "varlen_rows": rows, "targets": targets}


if __name__ == "__main__":
    varlen_main()
