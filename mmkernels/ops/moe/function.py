"""MoE custom ops, their autograd formulas, and the public functional API.

Ops in the ``mmkernels`` namespace:

* ``moe_route(logits, k, capacity, noise, token_order)`` -- native (``csrc/moe``, ``csrc/cuda``):
  top-k selection, DeepSpeed capacity positions, counts and the dispatch permutation (no gradient);
* ``moe_ffn_forward / moe_ffn_backward`` -- Triton: gather -> grouped GEMM + activation -> grouped
  GEMM -> scatter -> weighted combine, and the gradient of x, the combine weights and every expert
  weight/bias;
* ``grouped_gemm_forward / grouped_gemm_backward`` -- Triton: ``c[r] = a[r] @ b[e].T + bias[e]``.

The gate's differentiable part (softmax, renormalised combine weights, ``l_aux``) is a handful of
``[S, E]`` torch ops (:func:`~.reference.combine_weights_and_aux`), so its gradient is torch's.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from ..._library import define_op
from ..._validation import FLOAT_DTYPES, check_same_device, check_same_dtype, check_shape, check_tensor
from ...backend import require_triton, resolve_backend
from . import launch
from .reference import ACTIVATIONS, combine_weights_and_aux, moe_ffn_reference

# --------------------------------------------------------------------------------------- routing


@dataclass
class MoERouting:
    """Output of :func:`moe_route`.  ``S`` rows, ``k`` choices, ``E`` experts.

    indices [S, k] int64 (expert per choice); weights [S, k] float32 combine weights (differentiable,
    0 for dropped choices); keep [S, k] bool; exp_counts [E] int64 (all k choices, before dropping,
    sums to k*S); top1_counts [E] int64; l_aux (0-d float32, differentiable); probs [S, E] float32;
    sorted_slots [S*k] int32 and expert_offsets [E+1] int32: the kept slots ``s*k + j`` grouped by
    expert (group e is ``sorted_slots[expert_offsets[e]:expert_offsets[e+1]]``, in slot order; dropped
    slots follow ``expert_offsets[E]``); capacity (int, or None when dropless).
    """
    indices: torch.Tensor
    weights: torch.Tensor
    keep: torch.Tensor
    exp_counts: torch.Tensor
    top1_counts: torch.Tensor
    l_aux: torch.Tensor
    probs: torch.Tensor
    sorted_slots: torch.Tensor
    expert_offsets: torch.Tensor
    capacity: Optional[int]

    @property
    def k(self) -> int:
        return self.indices.shape[1]

    @property
    def num_experts(self) -> int:
        return self.expert_offsets.shape[0] - 1


def moe_route(logits: torch.Tensor, k: int, capacity: Optional[int] = None,
              second_expert_noise: Optional[torch.Tensor] = None,
              token_order: Optional[torch.Tensor] = None) -> MoERouting:
    """DeepSpeed top-k gating on router logits (``x.float() @ Wg.T``).

    Args:
        logits: ``[S, E]`` router logits (computed in float32; other float dtypes are upcast).
        k: choices per row, ``1 <= k <= E``.
        capacity: per-expert capacity C (DeepSpeed: ``max(ceil(S/E * cf * k), min_capacity)``, see
            :func:`mmkernels.ops.moe.reference.capacity_for`); ``None`` is dropless.
        second_expert_noise: optional ``[S, E]`` noise added to the logits for choices 2..k (DeepSpeed's
            Gumbel sampling of the second expert; pass the sample to make it reproducible).
        token_order: optional permutation ``[S]`` giving the order in which rows claim capacity
            (default: row order); k = 1 random token selection is ``argsort(-uniform)``.

    Returns a :class:`MoERouting`.  The first choice is ``argmax(logits)`` (DeepSpeed's
    ``argmax(softmax(logits))``: the same index unless two different logits round to one
    probability); choice j >= 2 is the argmax of ``logits + noise`` over the experts not chosen yet
    (k > 2 without noise is plain top-k).  Priority: all first choices before all second choices, then
    ``token_order`` (for k > 2 this is DeepSpeed ``topkgating``'s ``drop_policy='position'``).  Weights: ``p[s, e_j] keep / max(sum_j p[s, e_j] keep, eps)`` for k >= 2, the raw
    gate value ``p[s, e_1] keep`` for k = 1 (DeepSpeed ``top1gating``).

    Example::

        >>> r = moe_route(torch.randn(6, 4), k=2, capacity=3)
        >>> r.indices.shape, r.weights.shape, int(r.exp_counts.sum())
        (torch.Size([6, 2]), torch.Size([6, 2]), 12)
    """
    check_tensor("logits", logits, ndim=2, dtypes=FLOAT_DTYPES)
    S, E = logits.shape
    if isinstance(k, bool) or not isinstance(k, int):
        raise TypeError(f"k must be an int, got {type(k).__name__}")
    if E < 1:
        raise ValueError(f"logits must have at least one expert column, got shape {tuple(logits.shape)}")
    if not 1 <= k <= E:
        raise ValueError(f"k must be in [1, num_experts={E}], got k={k}")
    if capacity is not None:
        if isinstance(capacity, bool) or not isinstance(capacity, int):
            raise TypeError(f"capacity must be an int or None, got {type(capacity).__name__}")
        if capacity < 0:
            raise ValueError(f"capacity must be >= 0 (or None for dropless), got {capacity}")
    logits32 = logits.float()
    noise = None
    if second_expert_noise is not None and k >= 2:
        check_tensor("second_expert_noise", second_expert_noise, ndim=2, dtypes=FLOAT_DTYPES)
        check_shape("second_expert_noise", second_expert_noise, (S, E), "like logits")
        check_same_device([("logits", logits), ("second_expert_noise", second_expert_noise)])
        noise = second_expert_noise.detach().float().contiguous()
    if token_order is not None:
        check_tensor("token_order", token_order, ndim=1, dtypes=(torch.int64, torch.int32))
        if token_order.shape[0] != S:
            raise ValueError(f"token_order must have shape ({S},), got {tuple(token_order.shape)}")
        check_same_device([("logits", logits), ("token_order", token_order)])
        token_order = token_order.to(torch.int64).contiguous()
    cap = -1 if capacity is None else int(capacity)
    idx, keep, exp_counts, top1, slots, offsets = launch.route(logits32.detach().contiguous(), k, cap, noise,
                                                                token_order)
    probs, weights, l_aux = combine_weights_and_aux(logits32, idx, keep, top1, exp_counts)
    return MoERouting(idx, weights, keep, exp_counts, top1, l_aux, probs, slots, offsets, capacity)


# --------------------------------------------------------------------------------------- moe_ffn ops

def _ffn_fwd_impl(x, weights, keep, sorted_slots, expert_offsets, w1, b1, w2, b2, activation):
    require_triton(x.device, x.dtype)
    return launch.moe_ffn_forward(x, weights, keep, sorted_slots, expert_offsets, w1, b1, w2, b2, activation)


def _ffn_fwd_fake(x, weights, keep, sorted_slots, expert_offsets, w1, b1, w2, b2, activation):
    S, H = x.shape
    M = S * weights.shape[1]
    return (x.new_empty((S, H)), x.new_empty((M, w1.shape[1])), x.new_empty((M, w2.shape[2])),
            x.new_empty((M, H)))


def _ffn_bwd_impl(dy, x, weights, keep, sorted_slots, expert_offsets, w1, w2, z, h, o, activation, output_mask):
    require_triton(x.device, x.dtype)
    return launch.moe_ffn_backward(dy, x, weights, keep, sorted_slots, expert_offsets, w1, w2, z, h, o,
                                   activation, output_mask)


def _ffn_bwd_fake(dy, x, weights, keep, sorted_slots, expert_offsets, w1, w2, z, h, o, activation, output_mask):
    E, F1, H = w1.shape
    F = w2.shape[2]

    def maybe(flag, shape, dtype=None):
        return x.new_empty(shape, dtype=dtype) if flag else x.new_empty(0)

    return (maybe(output_mask[0], x.shape), maybe(output_mask[1], weights.shape, torch.float32),
            maybe(output_mask[2], (E, F1, H)), maybe(output_mask[3], (E, F1)),
            maybe(output_mask[4], (E, H, F)), maybe(output_mask[5], (E, H)))


moe_ffn_forward_op = define_op(
    "moe_ffn_forward",
    "(Tensor x, Tensor weights, Tensor keep, Tensor sorted_slots, Tensor expert_offsets, Tensor w1, "
    "Tensor? b1, Tensor w2, Tensor? b2, str activation) -> (Tensor, Tensor, Tensor, Tensor)",
    _ffn_fwd_impl, _ffn_fwd_fake)

moe_ffn_backward_op = define_op(
    "moe_ffn_backward",
    "(Tensor dy, Tensor x, Tensor weights, Tensor keep, Tensor sorted_slots, Tensor expert_offsets, "
    "Tensor w1, Tensor w2, Tensor z, Tensor h, Tensor o, str activation, bool[6] output_mask) "
    "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)",
    _ffn_bwd_impl, _ffn_bwd_fake, backward_of="moe_ffn")


class MoEFFNFunction(torch.autograd.Function):
    """Autograd of the fused expert FFN (sorted rows r of expert e, slot t = sorted_slots[r])::

        Z = x[t // k] @ W1[e].T + b1;  Hh = act(Z);  O[t] = Hh @ W2[e].T + b2;  y[s] = sum_j w[s,j] O[s*k+j]
        dO[s*k+j] = w[s,j] dy[s];   dw[s,j] = <dy[s], O[s*k+j]>
        dZ = (dO[t] @ W2[e]) * act'(Z);   dx[s] = sum_j (dZ @ W1[e])[slot s*k+j]
        dW2[e] = sum_r dO[t]^T Hh[r];   dW1[e] = sum_r dZ[r]^T x[t // k];   db = column sums
    """

    @staticmethod
    def forward(x, weights, keep, sorted_slots, expert_offsets, w1, b1, w2, b2, activation):
        return moe_ffn_forward_op(x, weights, keep, sorted_slots, expert_offsets, w1, b1, w2, b2, activation)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, weights, keep, sorted_slots, expert_offsets, w1, b1, w2, b2, activation = inputs
        _, z, h, o = output
        ctx.save_for_backward(x, weights, keep, sorted_slots, expert_offsets, w1, w2, z, h, o)
        ctx.activation = activation
        ctx.has_b1 = b1 is not None
        ctx.has_b2 = b2 is not None

    @staticmethod
    def backward(ctx, dy, dz_unused, dh_unused, do_unused):
        x, weights, keep, sorted_slots, expert_offsets, w1, w2, z, h, o = ctx.saved_tensors
        need = ctx.needs_input_grad
        mask = [need[0], need[1], need[5], bool(need[6] and ctx.has_b1), need[7], bool(need[8] and ctx.has_b2)]
        if not any(mask):
            return (None,) * 10
        dx, dw, dw1, db1, dw2, db2 = moe_ffn_backward_op(dy, x, weights, keep, sorted_slots, expert_offsets,
                                                         w1, w2, z, h, o, ctx.activation, mask)
        g = [t if f else None for t, f in zip((dx, dw, dw1, db1, dw2, db2), mask)]
        return g[0], g[1], None, None, None, g[2], g[3], g[4], g[5], None


torch.library.register_autograd("mmkernels::moe_ffn_forward", MoEFFNFunction.backward,
                                setup_context=MoEFFNFunction.setup_context)


def _check_ffn_weights(H, w1, b1, w2, b2, activation, num_experts=None):
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    check_tensor("w1", w1, ndim=3, dtypes=FLOAT_DTYPES)
    check_tensor("w2", w2, ndim=3, dtypes=FLOAT_DTYPES)
    E, F1, H1 = w1.shape
    if H1 != H:
        raise ValueError(f"w1 must have shape (E, F, {H}) to match x's last dimension H={H}, got {tuple(w1.shape)}")
    F = F1 // 2 if activation == "swiglu" else F1
    if activation == "swiglu" and F1 % 2:
        raise ValueError(f"w1 for swiglu must stack [gate; up] with an even row count 2F, got {tuple(w1.shape)}")
    check_shape("w2", w2, (E, H, F), f"(E, H, F) to match w1 {tuple(w1.shape)}")
    if b1 is not None:
        check_tensor("b1", b1, ndim=2, dtypes=FLOAT_DTYPES)
        check_shape("b1", b1, (E, F1))
    if b2 is not None:
        check_tensor("b2", b2, ndim=2, dtypes=FLOAT_DTYPES)
        check_shape("b2", b2, (E, H))
    if num_experts is not None and E != num_experts:
        raise ValueError(f"w1 has {E} experts but the routing has {num_experts}")


def moe_ffn(x: torch.Tensor, routing: MoERouting, w1: torch.Tensor, b1: Optional[torch.Tensor], w2: torch.Tensor,
            b2: Optional[torch.Tensor], activation: str = "gelu_tanh") -> torch.Tensor:
    """The expert half of the MoE layer: ``y[s] = sum_j routing.weights[s, j] * Expert_{e_j}(x[s])``.

    Args:
        x: ``[..., H]`` with ``prod(...) = S`` rows (float16, bfloat16, float32; float64 on the reference).
        routing: from :func:`moe_route` on the same S rows.
        w1: ``[E, F, H]`` (``gelu_tanh``: fc1) or ``[E, 2F, H]`` (``swiglu``: gate rows then up rows).
        b1: ``[E, F]`` / ``[E, 2F]`` or None.   w2: ``[E, H, F]`` (fc2 / down).   b2: ``[E, H]`` or None.
        activation: ``"gelu_tanh"`` (``fc2(gelu_tanh(fc1 x))``) or ``"swiglu"`` (``down(silu(gate x) * up x)``).

    Returns ``[..., H]`` in x's dtype; a row whose choices were all dropped is 0.  Differentiable in x,
    the routing weights (hence the router) and every weight and bias.  Triton backend: no host sync,
    deterministic (no atomics).
    """
    check_tensor("x", x, min_ndim=1, dtypes=FLOAT_DTYPES)
    if not isinstance(routing, MoERouting):
        raise TypeError(f"routing must be a MoERouting from moe_route, got {type(routing).__name__}")
    H = x.shape[-1]
    x2 = x.reshape(-1, H)
    S = x2.shape[0]
    if routing.indices.shape[0] != S:
        raise ValueError(f"routing was computed for {routing.indices.shape[0]} rows but x has {S} rows")
    _check_ffn_weights(H, w1, b1, w2, b2, activation, routing.num_experts)
    check_same_dtype([("x", x), ("w1", w1), ("b1", b1), ("w2", w2), ("b2", b2)])
    check_same_device([("x", x), ("w1", w1), ("b1", b1), ("w2", w2), ("b2", b2), ("routing", routing.indices)])
    backend = resolve_backend(x.device, x.dtype)
    if backend == "reference":
        y = moe_ffn_reference(x2, routing.weights, routing.sorted_slots, routing.expert_offsets, w1, b1, w2, b2,
                              activation)
        return y.view(x.shape)
    if x2.numel() and x2.stride(-1) != 1:
        x2 = x2.contiguous()
    y, _, _, _ = moe_ffn_forward_op(x2, routing.weights.contiguous(), routing.keep.contiguous(),
                                    routing.sorted_slots, routing.expert_offsets, w1, b1, w2, b2, activation)
    return y.view(x.shape)


# --------------------------------------------------------------------------------------- grouped_gemm

def _gg_fwd_impl(a, b, bias, group_offsets):
    require_triton(a.device, a.dtype)
    return launch.grouped_gemm_forward(a, b, bias, group_offsets)


def _gg_fwd_fake(a, b, bias, group_offsets):
    return a.new_empty((a.shape[0], b.shape[1]))


def _gg_bwd_impl(dc, a, b, group_offsets, output_mask):
    require_triton(a.device, a.dtype)
    return launch.grouped_gemm_backward(dc, a, b, group_offsets, output_mask)


def _gg_bwd_fake(dc, a, b, group_offsets, output_mask):
    E, N, K = b.shape
    return (a.new_empty(a.shape) if output_mask[0] else a.new_empty(0),
            a.new_empty((E, N, K)) if output_mask[1] else a.new_empty(0),
            a.new_empty((E, N)) if output_mask[2] else a.new_empty(0))


grouped_gemm_forward_op = define_op(
    "grouped_gemm_forward", "(Tensor a, Tensor b, Tensor? bias, Tensor group_offsets) -> Tensor",
    _gg_fwd_impl, _gg_fwd_fake)
grouped_gemm_backward_op = define_op(
    "grouped_gemm_backward",
    "(Tensor dc, Tensor a, Tensor b, Tensor group_offsets, bool[3] output_mask) -> (Tensor, Tensor, Tensor)",
    _gg_bwd_impl, _gg_bwd_fake, backward_of="grouped_gemm")


class GroupedGemmFunction(torch.autograd.Function):
    """``c[r] = a[r] @ b[e].T + bias[e]``;  ``da[r] = dc[r] @ b[e]``;  ``db[e] = dc[g_e].T @ a[g_e]``;
    ``dbias[e] = dc[g_e].sum(0)`` (g_e: the rows of group e)."""

    @staticmethod
    def forward(a, b, bias, group_offsets):
        return grouped_gemm_forward_op(a, b, bias, group_offsets)

    @staticmethod
    def setup_context(ctx, inputs, output):
        a, b, bias, group_offsets = inputs
        ctx.save_for_backward(a, b, group_offsets)
        ctx.has_bias = bias is not None

    @staticmethod
    def backward(ctx, dc):
        a, b, group_offsets = ctx.saved_tensors
        need = ctx.needs_input_grad
        mask = [need[0], need[1], bool(need[2] and ctx.has_bias)]
        if not any(mask):
            return None, None, None, None
        da, db, dbias = grouped_gemm_backward_op(dc, a, b, group_offsets, mask)
        return (da if mask[0] else None, db if mask[1] else None, dbias if mask[2] else None, None)


torch.library.register_autograd("mmkernels::grouped_gemm_forward", GroupedGemmFunction.backward,
                                setup_context=GroupedGemmFunction.setup_context)


def grouped_gemm_reference(a, b, group_offsets, bias=None):
    """Loop over groups: ``c[lo:hi] = a[lo:hi] @ b[e].T (+ bias[e])``; rows outside every group are 0."""
    bounds = group_offsets.tolist()
    parts = [torch.nn.functional.linear(a[bounds[e]:bounds[e + 1]], b[e], None if bias is None else bias[e])
             for e in range(b.shape[0])]
    parts.append(a.new_zeros((a.shape[0] - bounds[-1], b.shape[1])))
    return torch.cat(parts, 0)


def grouped_gemm(a: torch.Tensor, b: torch.Tensor, group_offsets: torch.Tensor,
                 bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Grouped GEMM: ``c[r] = a[r] @ b[e].T (+ bias[e])`` for ``group_offsets[e] <= r < group_offsets[e+1]``.

    Args:
        a: ``[M, K]``, rows grouped by expert.   b: ``[E, N, K]``.   bias: ``[E, N]`` or None.
        group_offsets: int32/int64 ``[E+1]``, non-decreasing, ``group_offsets[0] = 0``,
            ``group_offsets[E] <= M`` (rows past it come out as 0).  An empty group is fine.

    Returns ``[M, N]``; differentiable in a, b and bias.  Triton backend: one launch for all groups,
    no host sync; the offsets are read on the device.

    Example::

        >>> a, b = torch.randn(10, 32), torch.randn(3, 16, 32)
        >>> grouped_gemm(a, b, torch.tensor([0, 4, 4, 10])).shape
        torch.Size([10, 16])
    """
    check_tensor("a", a, ndim=2, dtypes=FLOAT_DTYPES)
    check_tensor("b", b, ndim=3, dtypes=FLOAT_DTYPES)
    check_tensor("group_offsets", group_offsets, ndim=1, dtypes=(torch.int32, torch.int64))
    E, N, K = b.shape
    if a.shape[1] != K:
        raise ValueError(f"b must have shape (E, N, {a.shape[1]}) to match a's K={a.shape[1]}, got {tuple(b.shape)}")
    if group_offsets.shape[0] != E + 1:
        raise ValueError(f"group_offsets must have shape ({E + 1},) (E+1 for E={E} groups), "
                         f"got {tuple(group_offsets.shape)}")
    if bias is not None:
        check_tensor("bias", bias, ndim=2, dtypes=FLOAT_DTYPES)
        check_shape("bias", bias, (E, N))
    check_same_dtype([("a", a), ("b", b), ("bias", bias)])
    check_same_device([("a", a), ("b", b), ("bias", bias), ("group_offsets", group_offsets)])
    backend = resolve_backend(a.device, a.dtype)
    if backend == "reference":
        return grouped_gemm_reference(a, b, group_offsets, bias)
    offs = group_offsets.to(torch.int32).contiguous()
    if a.numel() and a.stride(-1) != 1:
        a = a.contiguous()
    return grouped_gemm_forward_op(a, b, bias, offs)

