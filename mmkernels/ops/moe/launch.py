"""Host launchers for the MoE kernels: routing op lookup, block sizes, grids.

Block sizes are fixed per kernel (no autotuning).  On the GPU they are tensor-core shaped; under
the CPU interpreter they are the smallest legal ``tl.dot`` tiles (16) so tests stay fast.  No
launcher reads a device value on the host (the grouped GEMM grid is an upper bound, see
``kernels.py``), so the Triton path needs no host synchronisation.
"""
from __future__ import annotations

import math

import torch

from ..._extension import NativeOp
from ..._interpreter import interpreter_enabled
from ..._utils import allow_tf32, cdiv, new_output
from . import kernels
from .reference import GATED_ACTIVATIONS, PLAIN_ACTIVATIONS, route_reference

_GPU_HALF = {
    "mm": dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=3),
    "mm_swiglu": dict(BLOCK_M=128, BLOCK_N=64, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=3),
    "wgrad": dict(BLOCK_N=128, BLOCK_K=128, BLOCK_M=64, num_warps=8, num_stages=3),
    "combine": dict(BLOCK_S=16, BLOCK_H=256, num_warps=4),
    "combine_bwd": dict(BLOCK_S=16, BLOCK_H=256, num_warps=4),
}
_GPU_FP32 = {name: dict(cfg, **({"BLOCK_K": 32, "num_stages": 2} if name.startswith("mm") else {}))
             for name, cfg in _GPU_HALF.items()}
_GPU_FP32["wgrad"] = dict(BLOCK_N=64, BLOCK_K=64, BLOCK_M=32, num_warps=4, num_stages=2)
_INTERPRETER = {
    "mm": dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=16, GROUP_M=2),
    "mm_swiglu": dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=16, GROUP_M=2),
    "wgrad": dict(BLOCK_N=16, BLOCK_K=16, BLOCK_M=16),
    "combine": dict(BLOCK_S=16, BLOCK_H=32),
    "combine_bwd": dict(BLOCK_S=16, BLOCK_H=32),
}

# activation name -> (forward epilogue, backward epilogue, ACT constexpr); the names are
# reference.ACTIVATIONS (gated ones stack [gate; up] in w1)
_ACT_OF = {"silu": kernels.ACT_SILU, "gelu_tanh": kernels.ACT_GELU_TANH, "gelu": kernels.ACT_GELU,
           "relu": kernels.ACT_RELU}
ACT_CODES = {**{name: (kernels.EPI_ACT, kernels.EPI_ACT_BWD, _ACT_OF[name]) for name in PLAIN_ACTIVATIONS},
             **{name: (kernels.EPI_GATED, kernels.EPI_GATED_BWD, _ACT_OF[act])
                for name, act in GATED_ACTIVATIONS.items()}}


def _config(name: str, device: torch.device, dtype: torch.dtype) -> dict:
    if device.type == "cpu":
        return dict(_INTERPRETER[name])
    table = _GPU_FP32 if dtype == torch.float32 else _GPU_HALF
    return dict(table[name])


def _dot_precision(dtype: torch.dtype) -> str:
    return "tf32" if (dtype == torch.float32 and allow_tf32() and not interpreter_enabled()) else "ieee"


# ----------------------------------------------------------------------------------------- routing

# Looked up once at import (torch.compile cannot trace has_op): on which devices the native op runs.
NATIVE_ROUTE_OP = NativeOp("moe_route")
NATIVE_ROUTE = NATIVE_ROUTE_OP.declared

if NATIVE_ROUTE:
    @torch.library.register_fake("mmkernels::moe_route")
    def _moe_route_fake(logits, k, capacity, noise, token_order):
        S, E = logits.shape
        i64 = dict(dtype=torch.int64)
        return (logits.new_empty((S, k), **i64), logits.new_empty((S, k), dtype=torch.bool),
                logits.new_empty((E,), **i64), logits.new_empty((E,), **i64),
                logits.new_empty((S * k,), dtype=torch.int32), logits.new_empty((E + 1,), dtype=torch.int32))


def route(logits: torch.Tensor, k: int, capacity, noise, token_order, drop_policy: str = "choice",
          rts_uniform=None):
    """Routing decisions ``(indices, keep, exp_counts, top1_counts, sorted_slots, expert_offsets)``;
    ``capacity < 0`` means dropless.  ``drop_policy="choice"`` runs the native op (C++ on CPU, CUDA
    kernels on GPU, no host sync) when the extension has it for ``logits``' device (a CPU-only build,
    or a GPU arch the build carries no code for, has none); the other policies (and ``"choice"``
    without a native kernel, or with a capacity while torch.compile traces) run the torch reference,
    which needs no host sync either and scans no one-hot ``[S*k, E]`` tensor along its rows."""
    # While torch.compile traces, a capacity may be symbolic (a SymInt from capacity_for on a dynamic
    # token count; Dynamo shows it as an int, so it cannot be told apart) and the native op's schema
    # takes a plain int, which would specialise the graph on every capacity value: the torch path is
    # traced instead (same results).  Dropless (-1) is a constant and keeps the native op.
    traced_capacity = torch.compiler.is_compiling() and capacity >= 0
    if drop_policy == "choice" and not traced_capacity and NATIVE_ROUTE_OP.runs_on(logits.device):
        return torch.ops.mmkernels.moe_route(logits, k, capacity, noise, token_order)
    d = route_reference(logits, k, None if capacity < 0 else capacity, noise, token_order, drop_policy, rts_uniform)
    return d.indices, d.keep, d.exp_counts, d.top1_counts, d.sorted_slots, d.expert_offsets


# ----------------------------------------------------------------------------------------- launchers

def grouped_mm(a, b, bias, offsets, m_alloc, c, *, N, K, z=None, a_idx=None, a_div=1, c_idx=None,
               epilogue=kernels.EPI_PLAIN, act=kernels.ACT_SILU, half_n=0, b_strides=None, y=None,
               y_weights=None):
    """``c[crow(r)] = epilogue(a[arow(r)] @ b[e].T + bias[e])`` over the ``m_alloc`` sorted rows.

    ``b`` is addressed as ``[E, N, K]`` through ``b_strides`` (default: its own strides), so a
    transposed expert weight needs no copy."""
    E = offsets.numel() - 1
    if m_alloc == 0 or N == 0 or E == 0:
        return
    swiglu = epilogue in (kernels.EPI_SWIGLU, kernels.EPI_SWIGLU_BWD)
    cfg = _config("mm_swiglu" if swiglu else "mm", a.device, a.dtype)
    sbe, sbn, sbk = b_strides if b_strides is not None else b.stride()
    grid = ((cdiv(m_alloc, cfg["BLOCK_M"]) + E) * cdiv(N, cfg["BLOCK_N"]),)
    zt = z if z is not None else c
    yt = y if y is not None else c
    kernels._grouped_mm_kernel[grid](
        a, b, bias if bias is not None else a, c, zt,
        a_idx if a_idx is not None else offsets, c_idx if c_idx is not None else offsets, offsets,
        yt, y_weights if y_weights is not None else offsets,
        m_alloc, N, K, E, a_div, half_n,
        a.stride(0), a.stride(1), sbe, sbn, sbk,
        bias.stride(0) if bias is not None else 0, bias.stride(1) if bias is not None else 0,
        c.stride(0), c.stride(1), zt.stride(0), zt.stride(1), yt.stride(0), yt.stride(1),
        EPILOGUE=epilogue, GATHER_A=a_idx is not None, SCATTER_C=c_idx is not None, HAS_BIAS=bias is not None,
        WEIGHTED_Y=y is not None, ACT=act if epilogue != kernels.EPI_PLAIN else 0,
        DOT_PRECISION=_dot_precision(a.dtype), **cfg)


def grouped_wgrad(g, a, offsets, *, N, K, need_db, need_dbias, g_idx=None, g_div=1, a_idx=None, a_div=1):
    """``(dB [E, N, K], dbias [E, N])`` (empty tensors where not wanted) for ``c = a @ B[e].T``."""
    E = offsets.numel() - 1
    dev, dt = g.device, g.dtype
    db = new_output((E, N, K), dtype=dt, device=dev) if need_db else g.new_empty(0)
    dbias = new_output((E, N), dtype=dt, device=dev) if need_dbias else g.new_empty(0)
    if not (need_db or need_dbias) or E == 0 or N == 0:
        return db, dbias
    if need_db and K == 0:  # nothing to write in dB; dbias alone
        need_db = False
    cfg = _config("wgrad", dev, dt)
    num_k = cdiv(K, cfg["BLOCK_K"]) if need_db else 1
    if not need_db and not need_dbias:
        return db, dbias
    grid = (E * cdiv(N, cfg["BLOCK_N"]) * num_k,)
    kernels._grouped_wgrad_kernel[grid](
        g, a, db if need_db else g, dbias if need_dbias else g,
        g_idx if g_idx is not None else offsets, a_idx if a_idx is not None else offsets, offsets,
        N, K, num_k, g_div, a_div,
        g.stride(0), g.stride(1), a.stride(0), a.stride(1),
        *(db.stride() if need_db else (0, 0, 0)), *(dbias.stride() if need_dbias else (0, 0)),
        HAS_DB=need_db, HAS_DBIAS=need_dbias, GATHER_G=g_idx is not None, GATHER_A=a_idx is not None,
        DOT_PRECISION=_dot_precision(dt), **cfg)
    return db, dbias


def combine(o, weights, keep_u8, S, H, out_dtype, out_shape=None):
    """``y[s] = sum_j keep * w * o[s*k+j]`` (``weights=None``: unweighted sum of the kept slots).

    ``y`` is allocated as ``out_shape`` (default ``(S, H)``; any shape of S*H elements, e.g. the layer
    input's ``[B, T, H]``) so a caller never has to return a view of it."""
    k = keep_u8.shape[1] if keep_u8.dim() == 2 else 1
    y = new_output(tuple(out_shape) if out_shape is not None else (S, H), dtype=out_dtype, device=o.device)
    if S == 0 or H == 0:
        return y
    if k == 0:
        return y.zero_()
    y2 = y.view(S, H)
    cfg = _config("combine", o.device, o.dtype)
    grid = (cdiv(S, cfg["BLOCK_S"]), cdiv(H, cfg["BLOCK_H"]))
    kernels._moe_combine_kernel[grid](
        o, weights if weights is not None else o, keep_u8, y2, S, H, k,
        o.stride(0), o.stride(1), y2.stride(0), y2.stride(1),
        HAS_WEIGHT=weights is not None, **cfg)
    return y


def combine_backward(dy, o, weights, keep_u8, need_dw):
    """``(do [S*k, H] slot space, dweights [S, k] fp32 or empty)``."""
    S, H = dy.shape
    k = keep_u8.shape[1]
    do = new_output((S * k, H), dtype=o.dtype, device=o.device)
    dw = new_output((S, k), dtype=torch.float32, device=o.device) if need_dw else dy.new_empty(0)
    if S == 0 or k == 0:
        return do, dw
    if H == 0:
        if need_dw:
            dw.zero_()
        return do, dw
    cfg = _config("combine_bwd", o.device, o.dtype)
    grid = (cdiv(S, cfg["BLOCK_S"]),)
    kernels._moe_combine_bwd_kernel[grid](
        dy, o, weights, keep_u8, do, dw if need_dw else weights, S, H, k,
        dy.stride(0), dy.stride(1), o.stride(0), o.stride(1), do.stride(0), do.stride(1),
        HAS_DW=need_dw, **cfg)
    return do, dw


def _swap_last(t):
    return (t.stride(0), t.stride(2), t.stride(1))


def moe_ffn_forward(x, weights, keep, sorted_slots, offsets, w1, b1, w2, b2, activation):
    """Permute -> grouped GEMM + activation -> grouped GEMM -> un-permute -> weighted combine (k = 1:
    fused into the second GEMM's epilogue).

    ``x`` is ``[..., H]`` with S rows.  Returns ``(y [..., H] (x's shape, not a view), z [S*k, F1]
    pre-activation, h [S*k, F] activation (sorted space), o [S*k, H] expert outputs (slot space))``;
    ``z``, ``h`` and ``o`` are saved for the backward."""
    out_shape = x.shape
    H = x.shape[-1]
    S = math.prod(x.shape[:-1])
    x = x.reshape(S, H)
    k = weights.shape[1]
    F1, F = w1.shape[1], w2.shape[2]
    M = S * k
    dev, dt = x.device, x.dtype
    weights, keep = weights.contiguous(), keep.contiguous()
    z = new_output((M, F1), dtype=dt, device=dev)
    h = new_output((M, F), dtype=dt, device=dev)
    o = new_output((M, H), dtype=dt, device=dev)
    epi, _, act = ACT_CODES[activation]
    grouped_mm(x, w1, b1, offsets, M, h, N=F, K=H, z=z, a_idx=sorted_slots, a_div=k, epilogue=epi, act=act,
               half_n=F)
    if k == 1:  # weighted scatter fused into the second GEMM's epilogue; dropped rows stay 0
        y = torch.zeros(out_shape, dtype=dt, device=dev)
        grouped_mm(h, w2, b2, offsets, M, o, N=H, K=F, c_idx=sorted_slots, y=y.view(S, H), y_weights=weights)
        return y, z, h, o
    grouped_mm(h, w2, b2, offsets, M, o, N=H, K=F, c_idx=sorted_slots)
    y = combine(o, weights, keep.view(torch.uint8), S, H, dt, out_shape)
    return y, z, h, o


def moe_ffn_backward(dy, x, weights, keep, sorted_slots, offsets, w1, w2, z, h, o, activation, output_mask):
    """Gradients ``(dx, dweights, dw1, db1, dw2, db2)``; entries not in ``output_mask`` are empty."""
    need_dx, need_dwts, need_dw1, need_db1, need_dw2, need_db2 = (bool(v) for v in output_mask)
    out_shape = x.shape                      # x, dy and dx are [..., H] with S rows
    H = x.shape[-1]
    S = math.prod(x.shape[:-1])
    x = x.reshape(S, H)
    k = weights.shape[1]
    F1, F = w1.shape[1], w2.shape[2]
    M = S * k
    dev, dt = x.device, x.dtype
    empty = x.new_empty(0)
    dy, weights, keep = dy.reshape(S, H).contiguous(), weights.contiguous(), keep.contiguous()
    keep_u8 = keep.view(torch.uint8)
    _, epi_bwd, act = ACT_CODES[activation]
    do, dwts = combine_backward(dy, o, weights, keep_u8, need_dwts)
    dz = None
    if need_dx or need_dw1 or need_db1:
        dz = new_output((M, F1), dtype=dt, device=dev)
        grouped_mm(do, w2, None, offsets, M, dz, N=F, K=H, z=z, a_idx=sorted_slots, a_div=1,
                   epilogue=epi_bwd, act=act, half_n=F, b_strides=_swap_last(w2))
    dx = empty
    if need_dx:
        dxp = new_output((M, H), dtype=dt, device=dev)
        grouped_mm(dz, w1, None, offsets, M, dxp, N=H, K=F1, c_idx=sorted_slots, b_strides=_swap_last(w1))
        dx = combine(dxp, None, keep_u8, S, H, dt, out_shape)
    dw2, db2 = grouped_wgrad(do, h, offsets, N=H, K=F, need_db=need_dw2, need_dbias=need_db2,
                             g_idx=sorted_slots, g_div=1)
    dw1, db1 = empty, empty
    if need_dw1 or need_db1:
        dw1, db1 = grouped_wgrad(dz, x, offsets, N=F1, K=H, need_db=need_dw1, need_dbias=need_db1,
                                 a_idx=sorted_slots, a_div=k)
    return dx, dwts if need_dwts else empty, dw1, db1, dw2, db2


def grouped_gemm_forward(a, b, bias, offsets):
    """``c[r] = a[r] @ b[e].T + bias[e]`` for rows r of group e; rows outside every group are 0."""
    M, K = a.shape
    N = b.shape[1]
    c = torch.zeros((M, N), dtype=a.dtype, device=a.device)
    grouped_mm(a, b, bias, offsets, M, c, N=N, K=K)
    return c


def grouped_gemm_backward(dc, a, b, offsets, output_mask):
    need_da, need_db, need_dbias = (bool(v) for v in output_mask)
    M, K = a.shape
    N = b.shape[1]
    dc = dc.contiguous()
    da = a.new_empty(0)
    if need_da:
        da = torch.zeros((M, K), dtype=a.dtype, device=a.device)
        grouped_mm(dc, b, None, offsets, M, da, N=K, K=N, b_strides=_swap_last(b))
    db, dbias = grouped_wgrad(dc, a, offsets, N=N, K=K, need_db=need_db, need_dbias=need_dbias)
    return da, db, dbias
