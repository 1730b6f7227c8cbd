"""Host launchers for the Hyper Attention kernels: block sizes, grids, output allocation.

Block sizes are fixed per kernel and head dim (no autotuning: the first call costs one compile).
On the GPU they are tensor-core shaped; under the CPU interpreter they are the smallest legal
``tl.dot`` tiles (16) so the tests stay fast.
"""
from __future__ import annotations

import functools
import math
from typing import NamedTuple

import torch

from ..._interpreter import interpreter_enabled
from ..._utils import allow_tf32, cdiv, new_output
from . import kernels

# (GPU, half precision) by head dim; fp32 halves the key blocks (see _config).  name -> block sizes
# + launch options.  "bwd" is one launch of two kinds of program (kernels._hyper_bwd_kernel): dQ over
# BLOCK_M query rows x BLOCK_N keys, dK/dV over BLOCK_N_KV keys x BLOCK_M_KV query rows (the masked,
# partial row tiles in steps of BLOCK_M_KV_MASKED rows, a divisor).  The tiles put distinct rows on
# each warpgroup (a 64-row tile on 8 warps would make both warpgroups compute the same S and dP), so
# 8 warps take 128-row tiles and 4 warps 64-row ones.
# The dK/dV programs' two row-tile loops set their own pipeline depth (num_stages sets the dQ loops'):
# the full tiles 3, the masked partial tiles 2 (with 3 that loop keeps the two fp32 accumulators of a
# 128-key tile only by spilling under Triton 3.6; kernels._dkv_row_tiles).  The same for every dtype and
# head dim: the interpreter ignores them.
_DKV_STAGES = dict(KV_STAGES=3, KV_STAGES_MASKED=2)
_GPU_HALF = {
    "fwd": {64: dict(BLOCK_M=128, BLOCK_N=64, num_warps=4, num_stages=3),
            128: dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=3)},
    "bwd_pre": {64: dict(BLOCK_M=64, num_warps=4),
                128: dict(BLOCK_M=64, num_warps=8)},
    "bwd": {64: dict(BLOCK_M=64, BLOCK_N=64, BLOCK_N_KV=64, BLOCK_M_KV=64, BLOCK_M_KV_MASKED=32, num_warps=4,
                     num_stages=3, **_DKV_STAGES),
            128: dict(BLOCK_M=128, BLOCK_N=64, BLOCK_N_KV=128, BLOCK_M_KV=64, BLOCK_M_KV_MASKED=32, num_warps=8,
                      num_stages=3, **_DKV_STAGES)},
    # decode split: bandwidth-bound.  One 64-row wgmma tile (all G * L_q rows of a K/V head) and a
    # 3-stage K/V pipeline in <= 76 KB of shared memory, so DECODE_CTAS_PER_SM programs share an SM.
    "decode": {64: dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=3),
               128: dict(BLOCK_M=64, BLOCK_N=32, num_warps=4, num_stages=3)},
}
_INTERPRETER = {
    "fwd": dict(BLOCK_M=16, BLOCK_N=16),
    "bwd_pre": dict(BLOCK_M=16),
    "bwd": dict(BLOCK_M=16, BLOCK_N=16, BLOCK_N_KV=16, BLOCK_M_KV=16, BLOCK_M_KV_MASKED=16, **_DKV_STAGES),
    "decode": dict(BLOCK_M=16, BLOCK_N=16),
}
# Element-wise launches (the block classification, the producer's rotation, the text RoPE, the decode
# merge): one entry for every head dim and dtype.
# (the decode merge's TILE: most elements of its [slots, channels] tile of partials per program)
_ELEMENTWISE_GPU = {"layout": dict(BLOCK_R=128, BLOCK_I=32, num_warps=4), "visual_kv_rope": dict(BLOCK_M=32),
                    "rope": dict(BLOCK_R=32), "decode_merge": dict(num_warps=4, TILE=4096)}
_ELEMENTWISE_INTERPRETER = {"layout": dict(BLOCK_R=16, BLOCK_I=4), "visual_kv_rope": dict(BLOCK_M=16),
                            "rope": dict(BLOCK_R=16), "decode_merge": dict(num_warps=1, TILE=64)}
# The decode split's grid fills the resident CTA slots (SMs x CTAs per SM) once.  The SM count and the
# shared memory per SM are the CUDA device's; DECODE_MACHINE["gpu"] (an H100/H200: 132 SMs, 228 KB)
# stands in where no CUDA device is queried (meta tensors: the offline sm_90 compile), and
# DECODE_MACHINE["cpu"] under the interpreter (small, so the tests see several splits per sample).
# CTAs per SM, at most (fewer where shared memory holds fewer; the launcher caps registers to match):
# the half-precision "decode" configs up to head dim 128 take 64 KB, so an H100 holds 3; float32 and
# head dim 256 hold more registers and count on 2.
DECODE_CTAS_PER_SM = {"gpu": 3, "gpu_wide": 2, "cpu": 2}
DECODE_MACHINE = {"gpu": (132, 233472), "cpu": (4, None)}  # (SMs, shared memory bytes per SM)
DECODE_REFINE_STEPS = 4  # at most this many BLOCK_N steps below the closed-form chunk (host time)


def _config(name: str, device: torch.device, dtype: torch.dtype, head_dim: int) -> dict:
    """The launch config of kernel ``name``: every block size comes from the tables above (the CPU
    entries are the interpreter's), so the offline compile test compiles what a GPU runs."""
    if name in _ELEMENTWISE_GPU:
        return dict((_ELEMENTWISE_INTERPRETER if device.type == "cpu" else _ELEMENTWISE_GPU)[name])
    if device.type == "cpu":
        return dict(_INTERPRETER[name])
    table = _GPU_HALF[name]
    cfg = dict(table[64] if head_dim <= 64 else table[128])
    if dtype == torch.float32:   # fp32 tiles take twice the shared memory: halve the key blocks
        for key in ("BLOCK_N", "BLOCK_N_KV"):
            if key in cfg:
                cfg[key] = max(16, cfg[key] // 2)
        if name == "bwd":        # and the backward's row blocks, on one warpgroup (64-row tiles)
            cfg.update(BLOCK_M=min(cfg["BLOCK_M"], 64), BLOCK_M_KV=min(cfg["BLOCK_M_KV"], 32), num_warps=4,
                       BLOCK_M_KV_MASKED=min(cfg["BLOCK_M_KV_MASKED"], 16))
        if "num_stages" in cfg:
            cfg["num_stages"] = min(cfg["num_stages"], 2)
    if head_dim > 128:
        cfg["BLOCK_M"] = min(cfg["BLOCK_M"], 64)
        if "num_stages" in cfg:
            cfg["num_stages"] = 1
        for key in ("BLOCK_N", "BLOCK_N_KV", "BLOCK_M_KV"):
            if key in cfg:
                cfg[key] = 32
        if "BLOCK_M_KV_MASKED" in cfg:
            cfg["BLOCK_M_KV_MASKED"] = 16
    if name == "bwd" and min(cfg["BLOCK_M"], cfg["BLOCK_N_KV"]) < 128:
        cfg["num_warps"] = 4     # a 64-row tile on 8 warps would compute S and dP twice
    return cfg


def _dot_precision(dtype: torch.dtype) -> str:
    return "tf32" if (dtype == torch.float32 and allow_tf32() and not interpreter_enabled()) else "ieee"


def unit_stride(*tensors):
    """The kernels read the 1-D metadata (``image_positions``, ``cu_images``) and vectors (bias, rstd)
    as ``ptr + i``: a strided view is made contiguous first (these are tiny; None stays None)."""
    return tuple(t if t is None or t.is_contiguous() else t.contiguous() for t in tensors)


def flat_visual(x: torch.Tensor) -> torch.Tensor:
    """``[N, T, H_kv, D] -> [N*T, H_kv, D]`` (a view whenever N and T are mergeable)."""
    N, T, Hkv, D = x.shape
    return x.reshape(N * T, Hkv, D)


def expand_gate(gate: torch.Tensor | None, q: torch.Tensor) -> torch.Tensor:
    """The gate as a ``[B, L_q, H, D]`` view (zero strides on broadcast dims; ``[H*D]`` -> ``[H, D]``)."""
    B, Lq, H, D = q.shape
    if gate is None:
        return q.new_zeros(1).expand(B, Lq, H, D)
    if gate.dim() == 1 and gate.numel() == H * D:
        gate = gate.view(H, D)
    return gate.expand(B, Lq, H, D)


class Packed(NamedTuple):
    """Packed samples (flash-attn's varlen convention): sample b's queries are rows
    ``cu_seqlens_q[b]:cu_seqlens_q[b+1]`` of a ``[total_q, ...]`` tensor, its keys rows
    ``cu_seqlens_k[b]:cu_seqlens_k[b+1]``; ``max_seqlen_*`` bound every sample's lengths (they size the
    grids, so the launchers never read the offsets on the host)."""
    cu_seqlens_q: torch.Tensor
    cu_seqlens_k: torch.Tensor
    max_seqlen_q: int
    max_seqlen_k: int


def _packed_args(packed: Packed | None, cu_images: torch.Tensor) -> tuple:
    """The kernels' ``(cu_q_ptr, cu_k_ptr)`` arguments (any int tensor when not packed: never read)."""
    if packed is None:
        return cu_images, cu_images
    return unit_stride(packed.cu_seqlens_q, packed.cu_seqlens_k)


def _batched(packed: Packed | None, *tensors):
    """The per-row/per-key tensors as the kernels index them: ``[B, L, H, D]`` as given, packed
    ``[total, H, D]`` ones as ``[1, total, H, D]`` views (None stays None)."""
    if packed is None:
        return tensors
    return tuple(None if t is None else t.unsqueeze(0) for t in tensors)


def hyper_layout(image_positions: torch.Tensor, cu_images: torch.Tensor, Lq: int, Lk: int, T: int,
                 inclusive: bool, packed: Packed | None = None, total_q: int | None = None) -> torch.Tensor:
    """The hyper mask's block classification data (int32 ``[B*L_q + 2*N]``, layout described in
    ``kernels.py``, "block classification"): per query row the end of its visible images, per image
    its first seeing row and its sample.  One launch, no host sync; the forward computes it once and
    the backward reuses it.  ``packed``: packed samples (``L_q``, ``L_k`` their ``max_seqlen_*``), the
    layout ``[total_q + 2*N]``."""
    image_positions, cu_images = unit_stride(image_positions, cu_images)
    B, N = cu_images.shape[0] - 1, image_positions.shape[0]
    n_layout_rows = B * Lq if packed is None else total_q
    layout = new_output((n_layout_rows + 2 * N,), dtype=torch.int32, device=cu_images.device)
    cfg = _config("layout", cu_images.device, torch.int32, 0)
    n_row_programs = B * cdiv(Lq, cfg["BLOCK_R"])
    grid = (n_row_programs + cdiv(N, cfg["BLOCK_I"]),)
    if grid[0]:
        kernels._hyper_layout_kernel[grid](image_positions, cu_images, *_packed_args(packed, cu_images), layout, B,
                                           Lq, Lk, N, n_layout_rows, n_row_programs, INCLUSIVE=inclusive,
                                           VARLEN=packed is not None, **cfg)
    return layout


BLOCK_EMPTY, BLOCK_PARTIAL, BLOCK_FULL = 0, 1, 2   # the classes block_classes reports


def block_classes(layout: torch.Tensor, cu_images: torch.Tensor, Lq: int, Lk: int, T: int, N: int,
                  fwd: dict, bwd: dict, packed: Packed | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The class (BLOCK_EMPTY / BLOCK_PARTIAL / BLOCK_FULL) the kernels give each of their tiles,
    computed on the device from ``layout`` (:func:`hyper_layout`) by the kernels' own rules, for
    tests and tile statistics.  ``fwd``/``bwd``: the ``"fwd"``/``"bwd"`` block configs (the dQ
    tiles are the forward's when both use the same BLOCK_M, BLOCK_N).

    Returns ``(row_view int8 [B, cdiv(L_q, BM), n_vis_tiles + n_text_tiles], key_view int8
    [n_key_blocks, cdiv(L_q, BM_KV)])``: per row block, its visual key tiles (counted from the
    sample's first visual key; ``n_vis_tiles = cdiv(N*T, BN)``) then its text key tiles; per dK/dV
    key block (text blocks ``kb * B + b`` first, then image n's blocks), its row tiles.  ``packed``:
    packed samples (``L_q``, ``L_k`` their ``max_seqlen_*``), each classified in its own coordinates
    (tiles past a sample's end are empty)."""
    cu_images = unit_stride(cu_images)[0]
    B = cu_images.shape[0] - 1
    BM, BN = fwd["BLOCK_M"], fwd["BLOCK_N"]
    BM_KV, BN_KV = bwd["BLOCK_M_KV"], bwd["BLOCK_N_KV"]
    n_rb, n_vis, n_text, n_rows = cdiv(Lq, BM), cdiv(N * T, BN), cdiv(Lk, BN), cdiv(Lq, BM_KV)
    n_text_blocks = cdiv(Lk, BN_KV) * B
    n_key_blocks = n_text_blocks + cdiv(T, BN_KV) * N
    dev = cu_images.device
    row_view = new_output((B, n_rb, n_vis + n_text), dtype=torch.int8, device=dev)
    key_view = new_output((n_key_blocks, n_rows), dtype=torch.int8, device=dev)
    grid = (B * n_rb + n_key_blocks,)
    n_layout_rows = B * Lq if packed is None else layout.shape[0] - 2 * N
    if grid[0] and Lq:
        kernels._hyper_block_classes_kernel[grid](
            layout, cu_images, *_packed_args(packed, cu_images), row_view, key_view, B, Lq, Lk, T, N, n_layout_rows,
            B * n_rb, n_text_blocks, n_vis, n_text, n_rows, VARLEN=packed is not None, BLOCK_M=BM, BLOCK_N=BN,
            BLOCK_M_KV=BM_KV, BLOCK_N_KV=BN_KV, BLOCK_T=16)
    return row_view, key_view


def _unbatched(packed: Packed | None, out, o_t, o_v, lse):
    """The forward's outputs as returned: packed ones without the batch dim of one (``lse [S, H, total_q]``;
    the parts not saved stay zero-size 1-D tensors, the saved ones lose that dim even when empty)."""
    if packed is None:
        return out, o_t, o_v, lse
    return out[0], o_t[0] if o_t.dim() == 4 else o_t, o_v[0] if o_v.dim() == 4 else o_v, lse[:, 0]


def hyper_forward(q, k, v, k_vis, v_vis, image_positions, cu_images, gate, key_padding_mask,
                  gated: bool, inclusive: bool, scale: float, save_parts: bool, layout=None,
                  packed: Packed | None = None):
    """Fused forward.  Returns ``(out, o_text, o_vis, lse)``; ``o_text``/``o_vis`` are the two gated
    partial outputs when ``save_parts`` (else zero-size tensors).  ``layout``: :func:`hyper_layout` of
    the same metadata, or None to compute it here (the few-row decode path does not use it).

    ``packed``: q ``[total_q, H, D]`` and k, v ``[total_k, H_kv, D]`` hold packed samples (no padding
    mask); the outputs are ``[total_q, H, D]`` and ``lse [S, H, total_q]``.  They always take the
    row-block kernels (decoding stays on the ``[B, L]`` path)."""
    image_positions, cu_images = unit_stride(image_positions, cu_images)
    q, k, v = _batched(packed, q, k, v)
    Bq, Lq, H, D = q.shape                     # the per-row tensors' batch and row dims
    Lk, Hkv = k.shape[1], k.shape[2]
    B = Bq if packed is None else cu_images.shape[0] - 1
    if packed is not None:                     # the grid's row and key counts: the longest sample's
        Lq, Lk = packed.max_seqlen_q, packed.max_seqlen_k
    T = k_vis.shape[1]
    dev, dt = q.device, q.dtype
    S = 2 if gated else 1
    out = new_output(q.shape, dtype=dt, device=dev)
    lse = new_output((S, Bq, H, q.shape[1]), dtype=torch.float32, device=dev)
    if save_parts and gated:
        o_t = new_output(q.shape, dtype=dt, device=dev)
        o_v = new_output(q.shape, dtype=dt, device=dev)
    else:
        o_t, o_v = q.new_empty(0), q.new_empty(0)
    if out.numel() == 0:
        return _unbatched(packed, out, o_t, o_v, lse)
    kv, vv = flat_visual(k_vis), flat_visual(v_vis)
    g = expand_gate(gate, q)
    kpm = key_padding_mask.view(torch.uint8) if key_padding_mask is not None else cu_images
    if packed is None and use_decode_path(Lq, H // Hkv):
        _decode_forward(q, k, v, kv, vv, image_positions, cu_images, g, key_padding_mask, kpm, out, o_t, o_v, lse,
                        gated, inclusive, scale, save_parts, T)
        return out, o_t, o_v, lse
    if layout is None:
        layout = hyper_layout(image_positions, cu_images, Lq, Lk, T, inclusive, packed, q.shape[1])
    cfg = _config("fwd", dev, dt, D)
    grid = (cdiv(Lq, cfg["BLOCK_M"]), B * H)
    # gated: the visual part goes to o_v (saved for the backward) or, at inference, to out as scratch
    ov_buf = o_v if o_v.numel() else out
    kernels._hyper_fwd_kernel[grid](
        q, k, v, kv, vv, cu_images, *_packed_args(packed, cu_images), layout, g, kpm,
        out, o_t if o_t.numel() else out, ov_buf, lse,
        Lq, Lk, H, H // Hkv, T,
        *q.stride(), *k.stride(), *v.stride(), *kv.stride(), *vv.stride(), *g.stride(),
        *(key_padding_mask.stride() if key_padding_mask is not None else (0, 0)),
        out.stride(0), out.stride(1), out.stride(2),
        lse.stride(0), lse.stride(1), lse.stride(2),
        float(scale) * kernels.LOG2E,
        GATED=gated, HAS_KPM=key_padding_mask is not None, SAVE_PARTS=bool(save_parts and gated),
        VARLEN=packed is not None, BLOCK_D=D, DOT_PRECISION=_dot_precision(dt), **cfg)
    return _unbatched(packed, out, o_t, o_v, lse)


def backward_grid(B: int, Lq: int, Lk: int, H: int, Hkv: int, N: int, T: int, cfg: dict) -> tuple[int, int, int]:
    """Program counts of the backward launch: ``(text dK/dV, all dK/dV, total)`` (see
    ``kernels._hyper_bwd_kernel``: dK/dV programs first, text key blocks then visual ones, then dQ)."""
    n_text = cdiv(Lk, cfg["BLOCK_N_KV"]) * B * Hkv
    n_kv = n_text + cdiv(T, cfg["BLOCK_N_KV"]) * N * Hkv
    return n_text, n_kv, n_kv + cdiv(Lq, cfg["BLOCK_M"]) * B * H


def packed_stats_len(total_q: int, n_samples: int) -> int:
    """Rows of the backward's per-row statistics for packed samples: sample b's start at
    ``16 * (cdiv(q0, 16) + b)`` (``q0`` its first packed row), so every start is 16-aligned and the
    samples do not overlap; a multiple of 16, so every head's rows start aligned too; and
    ``kernels.PACKED_STATS_PAD`` more rows, read (and discarded) by the dK/dV loop's last row tile."""
    return 16 * (cdiv(total_q, 16) + n_samples) + kernels.PACKED_STATS_PAD


def hyper_backward(grad_out, q, k, v, k_vis, v_vis, image_positions, cu_images, gate, key_padding_mask,
                   out, o_t, o_v, lse, gated: bool, inclusive: bool, scale: float, layout=None,
                   packed: Packed | None = None):
    """Gradients ``(dq, dk, dv, dk_vis, dv_vis, dgate)``; ``dgate`` has the gate's shape (zero-size
    in joint mode).  Deterministic: every element is written by one program, no atomics.  ``layout``:
    the forward's :func:`hyper_layout` (computed here when None).  ``packed``: packed samples, the
    tensors as :func:`hyper_forward` takes and returns them."""
    image_positions, cu_images = unit_stride(image_positions, cu_images)
    q_shape, k_shape = q.shape, k.shape
    grad_out, q, k, v, out, o_t, o_v = _batched(packed, grad_out, q, k, v, out, o_t if o_t.numel() else None,
                                                o_v if o_v.numel() else None)
    o_t = q.new_empty(0) if o_t is None else o_t
    o_v = q.new_empty(0) if o_v is None else o_v
    if packed is not None:
        lse = lse.unsqueeze(1)
    Bq, Lq, H, D = q.shape
    Lk, Hkv = k.shape[1], k.shape[2]
    B = Bq if packed is None else cu_images.shape[0] - 1
    if packed is not None:
        Lq, Lk = packed.max_seqlen_q, packed.max_seqlen_k
    N, T = k_vis.shape[0], k_vis.shape[1]
    G = H // Hkv
    dev, dt = q.device, q.dtype
    S = 2 if gated else 1
    dq = new_output(q.shape, dtype=dt, device=dev)
    dk = new_output(k.shape, dtype=dt, device=dev)
    dv = new_output(v.shape, dtype=dt, device=dev)
    dk_vis = new_output(k_vis.shape, dtype=dt, device=dev)
    dv_vis = new_output(v_vis.shape, dtype=dt, device=dev)
    dgate = q.new_empty(0)
    if q.shape[1] == 0 or Lq == 0 or B == 0 or H == 0:
        for t in (dq, dk, dv, dk_vis, dv_vis):
            t.zero_()
        if gated:
            dgate = torch.zeros_like(gate)
        return dq.view(q_shape), dk.view(k_shape), dv.view(k_shape), dk_vis, dv_vis, dgate
    if gated and (o_t.numel() == 0 or o_v.numel() == 0):
        raise RuntimeError("the gated backward needs the forward's partial outputs: call hyper_attention_fwd "
                           "with save_parts=True when gradients are required")
    if layout is None:
        layout = hyper_layout(image_positions, cu_images, Lq, Lk, T, inclusive, packed, q.shape[1])
    kv, vv = flat_visual(k_vis), flat_visual(v_vis)
    dkv, dvv = flat_visual(dk_vis), flat_visual(dv_vis)
    g = expand_gate(gate if gated else None, q)
    has_kpm = key_padding_mask is not None
    kpm = key_padding_mask.view(torch.uint8) if has_kpm else cu_images
    kpm_strides = key_padding_mask.stride() if has_kpm else (0, 0)

    # 1. row statistics: base-2 lse and delta per part (and the gated part gradients + elementwise d(gate))
    if packed is None:
        stats = new_output((S, 2, Bq, H, q.shape[1]), dtype=torch.float32, device=dev)
    else:   # each sample's rows start 16-aligned; the gaps are read (and discarded): zeros, not poison
        stats = torch.zeros((S, 2, Bq, H, packed_stats_len(q.shape[1], B)), dtype=torch.float32, device=dev)
    if gated:   # the two part gradients dO_t, dO_v, one buffer (parts selected by an offset in the kernels)
        do_parts = new_output((2, *q.shape), dtype=dt, device=dev)
        do_strides = (*do_parts.stride()[1:], do_parts.stride(0))
        dg_full = new_output(q.shape, dtype=torch.float32, device=dev)
    else:
        do_parts = grad_out
        do_strides = (*grad_out.stride(), 0)
        dg_full = stats
    cfg = _config("bwd_pre", dev, dt, D)
    o_ref = out if not gated else o_t
    cu_q, cu_k = _packed_args(packed, cu_images)
    kernels._hyper_bwd_pre_kernel[(cdiv(Lq, cfg["BLOCK_M"]), B * H)](
        grad_out, o_ref, o_t if gated else out, o_v if gated else out, g, cu_images, cu_q, cu_k, layout, lse,
        do_parts, stats, dg_full,
        Lq, H, *grad_out.stride(), do_strides[4], *g.stride(), o_ref.stride(0), o_ref.stride(1), o_ref.stride(2),
        lse.stride(0), lse.stride(1), lse.stride(2), *stats.stride()[:4],
        GATED=gated, VARLEN=packed is not None, BLOCK_D=D, **cfg)
    if gated:
        dgate = dg_full.sum_to_size(expand_gate_shape(gate, q)).reshape(gate.shape).to(gate.dtype)

    # 2. dK/dV (text keys, visual keys) and dQ, one launch
    cfg = _config("bwd", dev, dt, D)
    assert packed is None or cfg["BLOCK_M_KV"] <= kernels.PACKED_STATS_PAD, "packed statistics too short"
    n_text, n_kv, n_all = backward_grid(B, Lq, Lk, H, Hkv, N, T, cfg)
    kernels._hyper_bwd_kernel[(n_all,)](
        q, k, v, kv, vv, cu_images, cu_q, cu_k, layout, kpm, do_parts, stats, dq, dk, dv, dkv, dvv,
        B, Lq, Lk, H, G, T, N, Bq * q.shape[1], n_text, n_kv,
        *q.stride(), *k.stride(), *v.stride(), *kv.stride(), *vv.stride(), *kpm_strides, *do_strides,
        *stats.stride()[:4], dq.stride(0), dq.stride(1), dq.stride(2),
        dk.stride(0), dk.stride(1), dk.stride(2), dkv.stride(0), dkv.stride(1),
        float(scale) * kernels.LOG2E, float(scale),
        GATED=gated, HAS_KPM=has_kpm, VARLEN=packed is not None, BLOCK_D=D, DOT_PRECISION=_dot_precision(dt),
        **cfg)
    return dq.view(q_shape), dk.view(k_shape), dv.view(k_shape), dk_vis, dv_vis, dgate


def expand_gate_shape(gate: torch.Tensor, q: torch.Tensor) -> tuple:
    """The shape the gate broadcasts from, as used by :func:`expand_gate` (``[H*D]`` -> ``(H, D)``)."""
    H, D = q.shape[2], q.shape[3]
    if gate.dim() == 1 and gate.numel() == H * D:
        return (H, D)
    return tuple(gate.shape)


def visual_kv_rope(kv_proj: torch.Tensor, rstd: torch.Tensor | None, bias: torch.Tensor | None,
                   image_positions: torch.Tensor, inv_freq: torch.Tensor, T: int, num_kv_heads: int,
                   position_offset: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``kv_proj [N*T, 2*H_kv*D]`` (row stride free, unit channel stride), optional ``rstd [N*T]``
    float32 and ``bias [2*H_kv*D]`` -> ``(k_vis, v_vis)`` ``[N*T, H_kv, D]`` with MI-RoPE on K."""
    rstd, bias, image_positions = unit_stride(rstd, bias, image_positions)
    if kv_proj.dim() == 2 and kv_proj.shape[1] > 1 and kv_proj.stride(1) != 1:
        kv_proj = kv_proj.contiguous()
    M, C = kv_proj.shape
    D = C // (2 * num_kv_heads)
    k_vis = new_output((M, num_kv_heads, D), dtype=kv_proj.dtype, device=kv_proj.device)
    v_vis = new_output((M, num_kv_heads, D), dtype=kv_proj.dtype, device=kv_proj.device)
    if M and num_kv_heads:
        block_m = _config("visual_kv_rope", kv_proj.device, kv_proj.dtype, D)["BLOCK_M"]
        grid = (cdiv(M, block_m), num_kv_heads)
        kernels._visual_kv_rope_kernel[grid](
            kv_proj, rstd if rstd is not None else kv_proj, bias if bias is not None else kv_proj,
            image_positions, inv_freq, k_vis, v_vis, M, T, float(position_offset),
            kv_proj.stride(0), k_vis.stride(0), k_vis.stride(1),
            FORWARD=True, HAS_RSTD=rstd is not None, HAS_BIAS=bias is not None, HALF_D=D // 2, BLOCK_M=block_m)
    return k_vis, v_vis


def visual_kv_rope_backward(dk_vis: torch.Tensor, dv_vis: torch.Tensor, image_positions: torch.Tensor,
                            inv_freq: torch.Tensor, T: int, position_offset: int) -> torch.Tensor:
    """``dy [N*T, 2*H_kv*D]``, the gradient of ``y = rstd * kv_proj + bias`` (interleaved layout)."""
    M, Hkv, D = dk_vis.shape
    dk_vis, dv_vis, image_positions = dk_vis.contiguous(), dv_vis.contiguous(), image_positions.contiguous()
    dx = new_output((M, 2 * Hkv * D), dtype=dk_vis.dtype, device=dk_vis.device)
    if M and Hkv:
        block_m = _config("visual_kv_rope", dk_vis.device, dk_vis.dtype, D)["BLOCK_M"]
        grid = (cdiv(M, block_m), Hkv)
        kernels._visual_kv_rope_kernel[grid](
            dx, dx, dx, image_positions, inv_freq, dk_vis, dv_vis, M, T, float(position_offset),
            dx.stride(0), dk_vis.stride(0), dk_vis.stride(1),
            FORWARD=False, HAS_RSTD=False, HAS_BIAS=False, HALF_D=D // 2, BLOCK_M=block_m)
    return dx


DECODE_MAX_ROWS = 64  # G * L_q rows per split program (the GPU config's BLOCK_M)
DECODE_INT32_TILE_OFFSETS = 2 ** 31  # a split tile's offsets from its first key are int32 below this


def use_decode_path(Lq: int, G: int) -> bool:
    """Few query rows (decode steps, tiny chunks): split the keys across programs instead of rows."""
    return 0 < Lq * G <= DECODE_MAX_ROWS and Lq <= 16


@functools.lru_cache(maxsize=None)
def _cuda_machine(index: int) -> tuple[int, int]:
    props = torch.cuda.get_device_properties(index)
    smem = getattr(props, "shared_memory_per_multiprocessor", None) or DECODE_MACHINE["gpu"][1]
    return props.multi_processor_count, smem


def decode_residency(device: torch.device, dtype: torch.dtype, head_dim: int, cfg: dict) -> tuple[int, int]:
    """``(SMs, CTAs per SM)`` the decode split's grid fills: the CUDA device's (cached; a host query, no
    sync) or DECODE_MACHINE's SMs, and DECODE_CTAS_PER_SM, or fewer if the SM's shared memory holds
    fewer programs of ``cfg`` (Q and ``num_stages`` K/V tiles, plus 1 KB reserved per CTA)."""
    if device.type == "cpu":
        return DECODE_MACHINE["cpu"][0], DECODE_CTAS_PER_SM["cpu"]
    if device.type == "cuda":
        sms, smem = _cuda_machine(device.index if device.index is not None else torch.cuda.current_device())
    else:
        sms, smem = DECODE_MACHINE["gpu"]
    ctas = DECODE_CTAS_PER_SM["gpu_wide" if (dtype == torch.float32 or head_dim > 128) else "gpu"]
    per_cta = (cfg["BLOCK_M"] + 2 * cfg["num_stages"] * cfg["BLOCK_N"]) * head_dim * dtype.itemsize + 1024
    return sms, max(1, min(ctas, smem // per_cta))


def decode_plan(B: int, Lk: int, N: int, T: int, Hkv: int, block_n: int, slots: int, tile: int):
    """``(chunk, n_text, n_items, max_slots)`` of the split-K decode, from the shapes alone (no host sync).

    Per K/V head, sample b's keys are cut into chunks of ``chunk`` keys (a multiple of ``block_n``):
    ``n_text = cdiv(L_k, chunk)`` text items per sample, then ``cdiv(n_b * T, chunk)`` visual ones.
    ``n_items`` counts them (an upper bound for B > 1: the per-sample image counts are on the device);
    ``chunk`` is about the smallest for which ``n_items * H_kv`` programs fit ``slots`` in one wave
    (several waves only when the batch alone has more text items than that).  ``max_slots`` bounds the
    items of any one sample (the merge loads them at once; kept <= ``tile``)."""
    vis = N * T
    k = min(B, N) if vis else 0                      # samples that can hold visual keys
    per_head = max(1, slots // max(Hkv, 1))
    target = max(1, cdiv(2 * (B + k), per_head)) * per_head

    def items(c):
        # sum_b cdiv(x_b, c) <= (sum_b x_b + k (c - 1)) // c over the k samples with images
        return B * cdiv(Lk, c) + (vis + k * (c - 1)) // c

    chunk = cdiv(cdiv(vis + B * Lk, target - B - k), block_n) * block_n
    for _ in range(DECODE_REFINE_STEPS):
        if chunk <= block_n or items(chunk - block_n) > target:
            break
        chunk -= block_n
    while 1 << (cdiv(Lk, chunk) + cdiv(vis, chunk) - 1).bit_length() > tile:
        chunk *= 2
    return chunk, cdiv(Lk, chunk), items(chunk), cdiv(Lk, chunk) + cdiv(vis, chunk)


def _pow2(n: int) -> int:
    """The smallest power of two >= n (n >= 1)."""
    return 1 << (n - 1).bit_length()


def _decode_forward(q, k, v, kv, vv, image_positions, cu_images, g, key_padding_mask, kpm, out, o_t, o_v, lse,
                    gated, inclusive, scale, save_parts, T):
    """Split-K forward (flash-decoding): partials per (key chunk, K/V head), then one merge program
    per (channel block, query row, sample, head).  Two launches, the same every step for the same
    shapes, no host sync (CUDA-graph capturable)."""
    B, Lq, H, D = q.shape
    Lk, Hkv = k.shape[1], k.shape[2]
    G = H // Hkv
    N = image_positions.shape[0]
    R = G * Lq
    dev, dt = q.device, q.dtype
    cfg = _config("decode", dev, dt, D)
    cfg["BLOCK_M"] = max(cfg["BLOCK_M"], _pow2(R))
    merge = _config("decode_merge", dev, dt, D)
    tile = merge.pop("TILE")
    sms, ctas = decode_residency(dev, dt, D, cfg)
    if dev.type != "cpu":  # registers for `ctas` CTAs of num_warps warps (65536 per SM, in steps of 8)
        regs = 65536 // (ctas * cfg["num_warps"] * 32) // 8 * 8
        if regs < 255:
            cfg["maxnreg"] = regs
    chunk, n_text, n_items, max_slots = decode_plan(B, Lk, N, T, Hkv, cfg["BLOCK_N"], sms * ctas, tile)
    # rows see every image but (at most) the last n_uncertain ones of their sample (kernels.py, decode)
    n_uncertain = Lq if not inclusive else Lq - 1
    consts = dict(INCLUSIVE=inclusive, SINGLE_SAMPLE=B == 1, BLOCK_B=_pow2(B),
                  BLOCK_W=_pow2(n_uncertain) if (n_uncertain > 0 and N > 0) else 0)
    part = torch.empty(Hkv * n_items * R * (D + 2), dtype=torch.float32, device=dev)
    qk_scale = float(scale) * kernels.LOG2E
    # a tile's offsets from its first key are int32 unless BLOCK_N keys of some stride pass 2^31 elements
    # (every base, and each tile's first key, is int64)
    key_strides = (k.stride(1), v.stride(1), kv.stride(0), vv.stride(0),
                   key_padding_mask.stride(1) if key_padding_mask is not None else 0)
    wide = cfg["BLOCK_N"] * max(abs(x) for x in key_strides) + D * max(abs(x) for x in (
        k.stride(3), v.stride(3), kv.stride(2), vv.stride(2))) >= DECODE_INT32_TILE_OFFSETS
    kernels._hyper_decode_split_kernel[(n_items, Hkv)](
        q, k, v, kv, vv, image_positions, cu_images, kpm, part,
        B, N, Lq, Lk, G, T, chunk, n_text, n_uncertain,
        *q.stride(), *k.stride(), *v.stride(), *kv.stride(), *vv.stride(),
        *(key_padding_mask.stride() if key_padding_mask is not None else (0, 0)),
        qk_scale, HAS_KPM=key_padding_mask is not None, WIDE_TILE=wide, BLOCK_D=D,
        DOT_PRECISION=_dot_precision(dt), **consts, **cfg)
    block_s = _pow2(max_slots)
    block_dm = min(D, max(1, tile // block_s))
    kernels._hyper_decode_merge_kernel[(D // block_dm, Lq, B * H)](
        part, image_positions, cu_images, g,
        out, o_t if o_t.numel() else out, o_v if o_v.numel() else out, lse,
        B, N, Lq, Lk, H, G, T, chunk, n_text, n_items, n_uncertain, *g.stride(),
        out.stride(0), out.stride(1), out.stride(2), lse.stride(0), lse.stride(1), lse.stride(2),
        GATED=gated, SAVE_PARTS=bool(save_parts and gated), BLOCK_S=block_s, BLOCK_DM=block_dm, BLOCK_D=D,
        **consts, **merge)


def rope(x: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor, inverse: bool) -> torch.Tensor:
    """RoPE of ``x [B, L, H, D]`` at ``positions [B, L]`` (any strides); returns a contiguous tensor."""
    B, L, Hx, D = x.shape
    out = new_output((B, L, Hx, D), dtype=x.dtype, device=x.device)
    if out.numel():
        block_r = _config("rope", x.device, x.dtype, D)["BLOCK_R"]
        kernels._rope_kernel[(cdiv(B * L, block_r), Hx)](
            x, positions, inv_freq, out, B * L, L, *x.stride(), *positions.stride(),
            out.stride(0), out.stride(1), out.stride(2),
            SIGN=-1.0 if inverse else 1.0, HALF_D=D // 2, BLOCK_R=block_r)
    return out
