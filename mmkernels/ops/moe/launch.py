"""Host launchers for the MoE kernels: routing op lookup, the grouped GEMMs on the shared core, the
combine.

The grouped GEMMs run on the shared GEMM core (:mod:`mmkernels.ops._gemm`), whose per-arch table
gives each role (``moe.up``, ``moe.down``, ``moe.dz``, ``moe.dx``, ``moe.wgrad``, ``grouped.*``) its
path -- the Triton core or ``torch._grouped_mm`` -- and its block sizes.  The combine kernels' block
sizes are below (no autotuning; under the CPU interpreter the smallest tiles, so tests stay fast).
No launcher reads a device value on the host (a grouped launch covers an upper bound of the tile
count, see :mod:`mmkernels.ops._gemm.kernels`), so the Triton path needs no host synchronisation.
"""
from __future__ import annotations

import math

import torch

from ..._extension import NativeOp
from ..._utils import cdiv, new_output
from .._gemm import config as gemm_config
from .._gemm import kernels as gemm
from .._gemm import launch as gemm_launch
from . import kernels
from .reference import GATED_ACTIVATIONS, PLAIN_ACTIVATIONS, elementwise_activation, route_reference

_GPU = {"combine": dict(BLOCK_S=16, BLOCK_H=256, num_warps=4), "combine_bwd": dict(BLOCK_S=16, BLOCK_H=256, num_warps=4)}
_INTERPRETER = {"combine": dict(BLOCK_S=16, BLOCK_H=32), "combine_bwd": dict(BLOCK_S=16, BLOCK_H=32)}

# activation name -> (forward epilogue, backward epilogue, ACT constexpr, elementwise name); the names
# are reference.ACTIVATIONS (gated ones stack [gate; up] in w1)
_ACT_OF = {"silu": gemm.ACT_SILU, "gelu_tanh": gemm.ACT_GELU_TANH, "gelu": gemm.ACT_GELU, "relu": gemm.ACT_RELU}
ACT_CODES = {**{name: (gemm.EPI_ACT, gemm.EPI_ACT_BWD, _ACT_OF[name], name) for name in PLAIN_ACTIVATIONS},
             **{name: (gemm.EPI_GATED, gemm.EPI_GATED_BWD, _ACT_OF[act], act)
                for name, act in GATED_ACTIVATIONS.items()}}


def _config(name: str, device: torch.device, dtype: torch.dtype) -> dict:
    """Block sizes of the combine kernels (the GEMMs' come from the shared core's table)."""
    return dict((_INTERPRETER if gemm_config.arch_of(device, dtype) == "interpreter" else _GPU)[name])


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

def _torch_path(role, a, *widths):
    """True when ``role`` runs on ``torch._grouped_mm`` for this launch (the core's table decides)."""
    return gemm_config.choose(role, a.device, a.dtype, widths).path == gemm_config.GROUPED_MM


def _torch_act_fwd(z, activation, F):
    """``(z, h)`` of the torch path: the activation (or gated activation) of the first GEMM's output."""
    _, _, _, name = ACT_CODES[activation]
    if activation in GATED_ACTIVATIONS:
        gate, up = z[:, :F], z[:, F:]
        return (elementwise_activation(name, gate.float()) * up.float()).to(z.dtype)
    return elementwise_activation(name, z.float()).to(z.dtype)


def _torch_act_bwd(dh, z, activation, F):
    """dZ of the torch path: ``dh * act'(z)`` (or the gated pair) via autograd of the elementwise act."""
    _, _, _, name = ACT_CODES[activation]
    with torch.enable_grad():
        if activation in GATED_ACTIVATIONS:
            gate = z[:, :F].float().requires_grad_(True)
            up = z[:, F:].float()
            act = elementwise_activation(name, gate)
            (d_gate,) = torch.autograd.grad(act, gate, dh.float() * up)
            return torch.cat([d_gate, dh.float() * act.detach()], 1).to(z.dtype)
        zz = z.float().requires_grad_(True)
        (dz,) = torch.autograd.grad(elementwise_activation(name, zz), zz, dh.float())
        return dz.to(z.dtype)


def grouped_wgrad(role, g, a, offsets, *, N, K, need_db, need_dbias, a_idx=None, a_div=1):
    """``(dB [E, N, K], dbias [E, N])`` (empty tensors where not wanted) for ``c = a @ B[e].T``, with
    ``g = dc``; ``a_idx // a_div`` gathers a's rows.  An empty group gets zeros."""
    E = offsets.numel() - 1
    dev, dt = g.device, g.dtype
    db = new_output((E, N, K), dtype=dt, device=dev) if need_db else g.new_empty(0)
    dbias = new_output((E, N), dtype=dt, device=dev) if need_dbias else g.new_empty(0)
    if need_db and E and N and K and _torch_path(role, g, N, K):
        as_ = a if a_idx is None else a.index_select(0, (a_idx.long() // a_div))
        db.copy_(gemm_launch.torch_grouped_wgrad(g, as_, offsets))
        need_db = False   # the bias sums (if wanted) still come from the Triton kernel: deterministic
    gemm_launch.wgrad(role, g, a, offsets, db, dbias, N=N, K=K, need_db=need_db, need_dbias=need_dbias,
                      a_idx=a_idx, a_div=a_div)
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


def combine_backward(dy, o, weights, keep_u8, sorted_slots, need_dw):
    """``(dO [S*k, H] in sorted space, dweights [S, k] fp32 or empty)``."""
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
    grid = (cdiv(S * k, cfg["BLOCK_S"]),)
    kernels._moe_combine_bwd_kernel[grid](
        dy, o, weights, keep_u8, sorted_slots, do, dw if need_dw else weights, S, H, k,
        dy.stride(0), dy.stride(1), o.stride(0), o.stride(1), do.stride(0), do.stride(1),
        HAS_DW=need_dw, **cfg)
    return do, dw


def _up(x, w1, b1, sorted_slots, offsets, k, z, h, activation):
    """``Z = x[t // k] @ w1[e].T + b1[e]``, ``H = act(Z)`` over the sorted rows (role ``moe.up``)."""
    M, F1, H = z.shape[0], w1.shape[1], x.shape[1]
    gated = activation in GATED_ACTIVATIONS
    F = F1 // 2 if gated else F1
    role = "moe.up_gated" if gated else "moe.up"
    epi, _, act, _ = ACT_CODES[activation]
    if _torch_path(role, x, H, F1):
        xs = x.index_select(0, sorted_slots.long() // k)
        zz = gemm_launch.torch_grouped_mm(xs, w1, offsets, b_kmajor=True)
        if b1 is not None:
            zz = zz + b1[gemm_launch.row_groups(offsets, M).clamp(max=w1.shape[0] - 1)]
        z.copy_(zz)
        h.copy_(_torch_act_fwd(z, activation, F))
        return
    gemm_launch.row_gemm(role, x, w1, h, M=M, N=F, K=H, offsets=offsets, a_idx=sorted_slots, a_div=k,
                         bias=b1, epilogue=epi, act=act, z=z, half_n=F if gated else 0)


def _down(h, w2, b2, sorted_slots, offsets, o, y=None, y_weights=None):
    """``O[t] = H[r] @ w2[e].T + b2[e]`` scattered to the slots t (role ``moe.down``); with ``y`` (k = 1)
    also ``y[t] = w[t] * O[t]``."""
    M, F, Hd = h.shape[0], h.shape[1], w2.shape[1]
    if _torch_path("moe.down", h, F, Hd):
        oo = gemm_launch.torch_grouped_mm(h, w2, offsets, b_kmajor=True)
        if b2 is not None:
            oo = oo + b2[gemm_launch.row_groups(offsets, M).clamp(max=w2.shape[0] - 1)]
        group = gemm_launch.row_groups(offsets, M)
        oo = torch.where((group < w2.shape[0])[:, None], oo, 0).to(o.dtype)   # dropped slots: 0
        o.index_copy_(0, sorted_slots.long(), oo)
        if y is not None:  # rows past the last group are dropped slots: their weight is 0
            y.copy_((o.float() * y_weights.reshape(-1, 1)).to(y.dtype))
        return
    gemm_launch.row_gemm("moe.down", h, w2, o, M=M, N=Hd, K=F, offsets=offsets, bias=b2, c_idx=sorted_slots,
                         y=y, y_weights=y_weights)


def _dz(do, w2, offsets, z, dz, activation):
    """``dZ = (dO @ w2[e]) * act'(Z)`` over the sorted rows (role ``moe.dz`` / ``moe.dz_gated``)."""
    M, Hd, F = do.shape[0], w2.shape[1], w2.shape[2]
    gated = activation in GATED_ACTIVATIONS
    role = "moe.dz_gated" if gated else "moe.dz"
    _, epi_bwd, act, _ = ACT_CODES[activation]
    if _torch_path(role, do, Hd, F):
        dz.copy_(_torch_act_bwd(gemm_launch.torch_grouped_mm(do, w2, offsets, b_kmajor=False), z, activation, F))
        return
    gemm_launch.row_gemm(role, do, w2, dz, M=M, N=F, K=Hd, b_kmajor=False, offsets=offsets, epilogue=epi_bwd, act=act,
                         z=z, half_n=F if gated else 0)


def _dx(dz, w1, sorted_slots, offsets, dxp):
    """``dX[t] = dZ[r] @ w1[e]`` scattered to the slots t (role ``moe.dx``)."""
    M, F1, Hd = dz.shape[0], w1.shape[1], w1.shape[2]
    if _torch_path("moe.dx", dz, F1, Hd):
        dxp.index_copy_(0, sorted_slots.long(), gemm_launch.torch_grouped_mm(dz, w1, offsets, b_kmajor=False))
        return
    gemm_launch.row_gemm("moe.dx", dz, w1, dxp, M=M, N=Hd, K=F1, b_kmajor=False, offsets=offsets, c_idx=sorted_slots)


def moe_ffn_forward(x, weights, keep, sorted_slots, offsets, w1, b1, w2, b2, activation):
    """Gather -> grouped GEMM + activation -> grouped GEMM -> scatter -> weighted combine (k = 1:
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
    _up(x, w1, b1, sorted_slots, offsets, k, z, h, activation)
    if k == 1:  # weighted scatter fused into the second GEMM's epilogue; dropped rows stay 0
        y = torch.zeros(out_shape, dtype=dt, device=dev)
        _down(h, w2, b2, sorted_slots, offsets, o, y=y.view(S, H), y_weights=weights)
        return y, z, h, o
    _down(h, w2, b2, sorted_slots, offsets, o)
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
    do, dwts = combine_backward(dy, o, weights, keep_u8, sorted_slots, need_dwts)     # dO in sorted space
    dz = None
    if need_dx or need_dw1 or need_db1:
        dz = new_output((M, F1), dtype=dt, device=dev)
        _dz(do, w2, offsets, z, dz, activation)
    dx = empty
    if need_dx:
        dxp = new_output((M, H), dtype=dt, device=dev)
        _dx(dz, w1, sorted_slots, offsets, dxp)
        dx = combine(dxp, None, keep_u8, S, H, dt, out_shape)
    dw2, db2 = grouped_wgrad("moe.wgrad", do, h, offsets, N=H, K=F, need_db=need_dw2, need_dbias=need_db2)
    dw1, db1 = empty, empty
    if need_dw1 or need_db1:
        dw1, db1 = grouped_wgrad("moe.wgrad", dz, x, offsets, N=F1, K=H, need_db=need_dw1, need_dbias=need_db1,
                                 a_idx=sorted_slots, a_div=k)
    return dx, dwts if need_dwts else empty, dw1, db1, dw2, db2


def grouped_gemm_forward(a, b, bias, offsets):
    """``c[r] = a[r] @ b[e].T + bias[e]`` for rows r of group e; rows outside every group are 0."""
    M, K = a.shape
    N = b.shape[1]
    c = torch.zeros((M, N), dtype=a.dtype, device=a.device)
    if _torch_path("grouped.fwd", a, K, N) and M and N and K:
        cc = gemm_launch.torch_grouped_mm(a, b, offsets, b_kmajor=True)
        group = gemm_launch.row_groups(offsets, M)
        if bias is not None:
            cc = cc + bias[group.clamp(max=b.shape[0] - 1)]
        c.copy_(torch.where((group < b.shape[0])[:, None], cc, 0))
        return c
    gemm_launch.row_gemm("grouped.fwd", a, b, c, M=M, N=N, K=K, offsets=offsets, bias=bias)
    return c


def grouped_gemm_backward(dc, a, b, offsets, output_mask):
    need_da, need_db, need_dbias = (bool(v) for v in output_mask)
    M, K = a.shape
    N = b.shape[1]
    dc = dc.contiguous()
    da = a.new_empty(0)
    if need_da:
        da = torch.zeros((M, K), dtype=a.dtype, device=a.device)
        if _torch_path("grouped.dgrad", dc, N, K) and M and N and K:
            group = gemm_launch.row_groups(offsets, M)
            dd = gemm_launch.torch_grouped_mm(dc, b, offsets, b_kmajor=False)
            da.copy_(torch.where((group < b.shape[0])[:, None], dd, 0))
        else:
            gemm_launch.row_gemm("grouped.dgrad", dc, b, da, M=M, N=K, K=N, b_kmajor=False, offsets=offsets)
    db, dbias = grouped_wgrad("grouped.wgrad", dc, a, offsets, N=N, K=K, need_db=need_db, need_dbias=need_dbias)
    return da, db, dbias
