"""MoE custom ops, their autograd formulas, and the public functional API.

Ops in the ``mmkernels`` namespace:

* ``moe_route(logits, k, capacity, noise, token_order)`` -- native (``csrc/moe``, ``csrc/cuda``):
  top-k selection, DeepSpeed capacity positions (``top2gating``'s rule, the ``"choice"`` drop
  policy), counts and the dispatch permutation (no gradient).  The other DeepSpeed drop policies run
  :func:`~.reference.route_reference` (torch ops, no host sync, no scan down the rows of a one-hot
  ``[S*k, E]`` tensor);
* ``moe_ffn_forward / moe_ffn_backward`` -- Triton: gather -> grouped GEMM + activation -> grouped
  GEMM -> scatter -> weighted combine, and the gradient of x, the combine weights and every expert
  weight/bias;
* ``grouped_gemm_forward / grouped_gemm_backward`` -- Triton: ``c[r] = a[r] @ b[e].T + bias[e]``.

The gate's differentiable part (softmax, renormalised combine weights, ``l_aux``) is a handful of
``[S, E]`` torch ops (:func:`~.reference.combine_weights_and_aux`), so its gradient is torch's.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch

from ..._library import define_op
from ..._utils import autocast_dtype
from ..._validation import (FLOAT_DTYPES, check_int, check_same_device, check_same_dtype, check_shape,
                             check_tensor)
from ...backend import require_triton, resolve_backend
from . import launch
from .reference import ACTIVATIONS, GATED_ACTIVATIONS, combine_weights_and_aux, moe_ffn_reference, resolve_drop_policy

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

    A routing built by hand (or one whose index tensors were modified after :func:`moe_route`
    returned it) is checked by :func:`moe_ffn` before a kernel trusts it (see its ``check_metadata``).
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

    # moe_route "seals" what it returns: the identity and version counter of each index tensor.  A
    # routing that still holds the same, unmodified tensors (no re-assignment, no in-place write) was
    # built by moe_route and needs no value check -- so MoE's own forward stays free of host syncs.
    # Inference tensors (made under torch.inference_mode) have no version counter, so an index tensor
    # made there is sealed as a normal-tensor copy: in-place writes to it bump its counter even inside
    # inference mode (one small device copy per index tensor, no host sync).
    _INDEX_FIELDS = ("indices", "keep", "sorted_slots", "expert_offsets")

    def _seal(self) -> None:
        sealed = []
        for field in self._INDEX_FIELDS:
            t = getattr(self, field)
            if t.is_inference():
                with torch.inference_mode(False):
                    t = t.clone()
                setattr(self, field, t)
            sealed.append((t, t._version))
        self._sealed = tuple(sealed)

    def _is_sealed(self) -> bool:
        sealed = getattr(self, "_sealed", None)
        return sealed is not None and all(getattr(self, f) is t and t._version == v
                                          for f, (t, v) in zip(self._INDEX_FIELDS, sealed))


def _check_token_order_values(token_order: torch.Tensor, S: int) -> None:
    """token_order must be a permutation of range(S) (one host sync)."""
    order = token_order.detach().to("cpu", torch.int64)
    if S == 0:
        return
    lo, hi = int(order.min()), int(order.max())
    if lo < 0 or hi >= S:
        raise ValueError(f"token_order must be a permutation of range(S={S}): its values must lie in [0, {S}), "
                         f"got min {lo}, max {hi}")
    seen = torch.zeros(S, dtype=torch.bool).scatter_(0, order, True)
    if not bool(seen.all()):
        missing = int((~seen).nonzero()[0])
        raise ValueError(f"token_order must be a permutation of range(S={S}): {int((~seen).sum())} value(s) "
                         f"are repeated and e.g. {missing} is missing")


def moe_route(logits: torch.Tensor, k: int, capacity: Optional[int] = None,
              second_expert_noise: Optional[torch.Tensor] = None,
              token_order: Optional[torch.Tensor] = None, *, drop_policy: Optional[str] = None,
              rts_uniform: Optional[torch.Tensor] = None, check_metadata: bool = True) -> MoERouting:
    """DeepSpeed top-k gating on router logits (``x.float() @ Wg.T``).

    Args:
        logits: ``[S, E]`` router logits (computed in float32; other float dtypes are upcast).
        k: choices per row, ``1 <= k <= E``.
        capacity: per-expert capacity C (DeepSpeed: ``max(ceil(S/E * cf * k), min_capacity)``, see
            :func:`mmkernels.ops.moe.reference.capacity_for`); ``None`` is dropless.  May be a
            ``torch.SymInt`` under torch.compile.
        second_expert_noise: optional ``[S, E]`` noise added to the logits for choices 2..k (DeepSpeed's
            Gumbel sampling of the second expert; pass the sample to make it reproducible).  Only the
            ``"choice"`` policy takes it.
        token_order: optional permutation of ``range(S)`` giving the order in which rows claim capacity
            (default: row order).  Only the ``"choice"`` and ``"position"`` policies take it.
        drop_policy: which choices an over-full expert keeps (names follow DeepSpeed):

            * ``None`` (default): what DeepSpeed's ``TopKGate`` runs for this k -- k = 1
              ``top1gating`` (``"rts"`` when ``rts_uniform`` is given, i.e. ``use_rts=True``;
              ``"choice"`` when ``token_order`` is given; else ``"topk_ties"``, i.e. ``use_rts=False``);
              k = 2 ``top2gating`` (``"choice"``); k >= 3 ``topkgating`` with its default
              ``drop_policy='probs'`` (``"probs"``).
            * ``"choice"``: every first choice before every second choice (and so on), then
              ``token_order`` (``top2gating``'s rule; the native op's).
            * ``"position"``: ``topkgating(drop_policy='position')``: an expert keeps the first C rows
              in ``token_order`` that chose it, *whichever* of their k choices it was.  For k = 1 the
              same as ``"choice"``.
            * ``"probs"``: ``topkgating(drop_policy='probs')``: an expert keeps its C choices of largest
              probability (``torch.topk`` over the rows; ties as torch breaks them).
            * ``"topk_ties"`` (k = 1 only): ``top1gating(use_rts=False)``: DeepSpeed picks the kept
              rows with ``torch.topk`` over the 0/1 one-hot mask, so *which* rows of an over-full
              expert survive is torch.topk's tie order -- implementation-defined, not token order,
              and different on CPU and CUDA.  It is reproduced by making the same call on the same
              device.  Use ``"choice"`` for a documented order (first rows win).
            * ``"rts"`` (k = 1 only, needs ``rts_uniform``): ``top1gating(use_rts=True)``, random token
              selection: an over-full expert keeps the C rows with the largest ``rts_uniform[s, e]``
              among the rows that chose it -- the rows ``torch.topk`` returns from
              ``one_hot(indices) * rts_uniform``, DeepSpeed's own call (so ties, e.g. two equal draws,
              are broken as DeepSpeed's are on that device).

            ``"position"`` and ``"probs"`` choose the experts as ``topk(softmax(logits), k)`` and
            compute ``l_aux`` as ``topkgating`` does (all k choices, ``/ k``), like every k >= 3.
        rts_uniform: optional ``[S, E]`` float draw of DeepSpeed's random token selection (k = 1):
            ``torch.rand(S, E)`` on the logits' device, what ``top1gating(use_rts=True)`` draws (and
            :class:`~mmkernels.MoE` draws from torch's generator).  Selects the ``"rts"`` policy.
        check_metadata: check that ``token_order`` is a permutation of ``range(S)`` (one host
            synchronisation; skipped while torch.compile traces).  Pass False when it is one by
            construction (e.g. ``argsort`` of random numbers); an invalid order is then undefined
            behaviour.

    Returns a :class:`MoERouting`.  With ``"choice"``, the first choice is ``argmax(logits)``
    (DeepSpeed's ``argmax(softmax(logits))``: the same index unless two different logits round to one
    probability); choice j >= 2 is the argmax of ``logits + noise`` over the experts not chosen yet
    (k > 2 without noise is plain top-k).  Weights: ``p[s, e_j] keep / max(sum_j p[s, e_j] keep, eps)``
    for k >= 2, the raw gate value ``p[s, e_1] keep`` for k = 1 (DeepSpeed ``top1gating``).
    ``"choice"`` runs the native op (no host sync); the other policies run torch ops (no host sync).

    Example::

        >>> r = moe_route(torch.randn(6, 4), k=2, capacity=3)
        >>> r.indices.shape, r.weights.shape, int(r.exp_counts.sum())
        (torch.Size([6, 2]), torch.Size([6, 2]), 12)
    """
    check_tensor("logits", logits, ndim=2, dtypes=FLOAT_DTYPES)
    S, E = logits.shape
    k = check_int("k", k)
    if E < 1:
        raise ValueError(f"logits must have at least one expert column, got shape {tuple(logits.shape)}")
    if not 1 <= k <= E:
        raise ValueError(f"k must be in [1, num_experts={E}], got k={k}")
    if S * k >= 2 ** 31:
        raise ValueError(f"logits has S={S} rows: S*k={S * k} slots must stay below 2**31 (int32 slot indices)")
    if capacity is not None:
        if isinstance(capacity, torch.SymInt):   # traced by torch.compile
            if capacity < 0:
                raise ValueError(f"capacity (None for dropless) must be >= 0, got {capacity}")
        else:
            capacity = check_int("capacity (None for dropless)", capacity, low=0)
    policy = resolve_drop_policy(drop_policy, k, token_order is not None, rts_uniform is not None)
    logits32 = logits.float()
    noise = None
    if second_expert_noise is not None and k >= 2:
        if policy != "choice":
            raise ValueError(f"second_expert_noise applies to drop_policy='choice' (DeepSpeed top2gating), "
                             f"not to {policy!r}")
        check_tensor("second_expert_noise", second_expert_noise, ndim=2, dtypes=FLOAT_DTYPES)
        check_shape("second_expert_noise", second_expert_noise, (S, E), "like logits")
        check_same_device([("logits", logits), ("second_expert_noise", second_expert_noise)])
        noise = second_expert_noise.detach().float().contiguous()
    if token_order is not None:
        if policy not in ("choice", "position"):
            raise ValueError(f"token_order applies to drop_policy 'choice' or 'position', not to {policy!r}")
        check_tensor("token_order", token_order, ndim=1, dtypes=(torch.int64, torch.int32))
        if token_order.shape[0] != S:
            raise ValueError(f"token_order must have shape ({S},), got {tuple(token_order.shape)}")
        check_same_device([("logits", logits), ("token_order", token_order)])
        if check_metadata and not torch.compiler.is_compiling():
            _check_token_order_values(token_order, S)
        token_order = token_order.to(torch.int64).contiguous()
    if rts_uniform is not None or policy == "rts":
        if rts_uniform is not None and k != 1:
            raise ValueError(f"rts_uniform is the draw of DeepSpeed's random token selection, which only its "
                             f"top1gating applies: it needs k = 1, got k={k}")
        if rts_uniform is None or policy != "rts":
            raise ValueError("rts_uniform (DeepSpeed's random token selection draw) goes with drop_policy='rts', "
                             f"the default when it is given; got drop_policy={policy!r} with rts_uniform "
                             f"{'given' if rts_uniform is not None else 'None'}")
        check_tensor("rts_uniform", rts_uniform, ndim=2, dtypes=FLOAT_DTYPES)
        check_shape("rts_uniform", rts_uniform, (S, E), "like logits")
        check_same_device([("logits", logits), ("rts_uniform", rts_uniform)])
        rts_uniform = rts_uniform.detach()
    cap = -1 if capacity is None else capacity
    idx, keep, exp_counts, top1, slots, offsets = launch.route(logits32.detach().contiguous(), k, cap, noise,
                                                                token_order, policy, rts_uniform)
    probs, weights, l_aux = combine_weights_and_aux(logits32, idx, keep, top1, exp_counts,
                                                    topkgating=k >= 3 or policy in ("position", "probs"))
    routing = MoERouting(idx, weights, keep, exp_counts, top1, l_aux, probs, slots, offsets, capacity)
    if not torch.compiler.is_compiling():
        routing._seal()
    return routing


def _check_topk_index_values(top_k_index: torch.Tensor, num_experts: int) -> None:
    """Every index lies in [0, num_experts) (one host sync)."""
    if top_k_index.numel() == 0:
        return
    lo, hi = int(top_k_index.min()), int(top_k_index.max())
    if lo < 0 or hi >= num_experts:
        raise ValueError(f"top_k_index must lie in [0, num_experts={num_experts}), got min {lo}, max {hi} (pass "
                         "check_metadata=False to drop out-of-range choices, e.g. expert-parallel sentinels)")


def moe_route_topk(top_k_index: torch.Tensor, top_k_weights: torch.Tensor, num_experts: int, *,
                   check_metadata: bool = True) -> MoERouting:
    """Routing from a router's own top-k choice (dropless): what transformers' MoE models compute.

    Args:
        top_k_index: ``[S, k]`` int64/int32 expert of each choice (``torch.topk`` of the router).
        top_k_weights: ``[S, k]`` float combine weights (differentiable: the gradient of
            :func:`moe_ffn`'s output flows back to them, hence to the router).
        num_experts: E.
        check_metadata: check that every index lies in ``[0, E)`` (``ValueError`` naming
            ``top_k_index``; one host synchronisation; skipped while torch.compile traces).  With False
            the routing is built without reading anything on the host, and a choice outside ``[0, E)``
            is *dropped* (``keep`` False, contributes nothing, weight gradient 0) -- what transformers'
            ``grouped_mm`` does with the sentinel index of expert parallelism; never an out-of-bounds read.

    Returns a sealed :class:`MoERouting` (``moe_ffn`` trusts it without a check): ``indices`` int64,
    ``weights`` float32 (``top_k_weights.float()``, still in the autograd graph), ``keep`` (all True
    unless dropped as above), ``exp_counts`` / ``top1_counts`` over the kept choices, ``sorted_slots`` /
    ``expert_offsets`` from a stable sort of the choices by expert, ``capacity`` None.  There are no
    router logits here: ``l_aux`` is 0 (compute the model's own auxiliary loss from its logits) and
    ``probs`` holds the given weights at their experts (0 elsewhere, no gradient).  No host
    synchronisation with ``check_metadata=False``; all torch ops, so CUDA-graph and torch.compile friendly.

    Example::

        >>> idx, w = torch.tensor([[0, 2], [1, 0], [2, 1]]), torch.rand(3, 2)
        >>> r = moe_route_topk(idx, w, num_experts=3)
        >>> r.expert_offsets.tolist(), r.sorted_slots.tolist()
        ([0, 2, 4, 6], [0, 3, 2, 5, 1, 4])
    """
    check_tensor("top_k_index", top_k_index, ndim=2, dtypes=(torch.int64, torch.int32))
    check_tensor("top_k_weights", top_k_weights, ndim=2, dtypes=FLOAT_DTYPES)
    check_shape("top_k_weights", top_k_weights, tuple(top_k_index.shape), "like top_k_index")
    check_same_device([("top_k_index", top_k_index), ("top_k_weights", top_k_weights)])
    num_experts = check_int("num_experts", num_experts, low=1)
    S, k = top_k_index.shape
    if k < 1:
        raise ValueError(f"top_k_index must have at least one choice per row, got shape {tuple(top_k_index.shape)}")
    if S * k >= 2 ** 31:
        raise ValueError(f"top_k_index has S*k={S * k} slots: it must stay below 2**31 (int32 slot indices)")
    if check_metadata and not torch.compiler.is_compiling():
        _check_topk_index_values(top_k_index, num_experts)
    E = num_experts
    idx = top_k_index.detach().to(torch.int64)
    flat = idx.reshape(-1)
    keep_flat = (flat >= 0) & (flat < E)
    # out-of-range choices sort after every expert (key E), so they fall past expert_offsets[E]
    key = torch.where(keep_flat, flat, E)
    _, order = torch.sort(key, stable=True)                       # slot order within each expert
    safe = torch.where(keep_flat, flat, 0)
    ones = keep_flat.to(torch.int64)
    exp_counts = torch.zeros(E, dtype=torch.int64, device=idx.device).scatter_add_(0, safe, ones)
    top1_counts = torch.zeros(E, dtype=torch.int64, device=idx.device).scatter_add_(
        0, safe.view(S, k)[:, 0], ones.view(S, k)[:, 0])
    offsets = torch.zeros(E + 1, dtype=torch.int32, device=idx.device)
    offsets[1:] = torch.cumsum(exp_counts, 0)
    weights = top_k_weights.float()
    keep = keep_flat.view(S, k)
    probs = torch.zeros((S, E), dtype=torch.float32, device=idx.device).scatter_add_(
        1, safe.view(S, k), torch.where(keep, weights.detach(), 0.0))
    l_aux = torch.zeros((), dtype=torch.float32, device=idx.device)
    routing = MoERouting(idx, weights, keep, exp_counts, top1_counts, l_aux, probs, order.to(torch.int32),
                         offsets, None)
    if not torch.compiler.is_compiling():
        routing._seal()
    return routing


# --------------------------------------------------------------------------------------- moe_ffn ops

def _ffn_fwd_impl(x, weights, keep, sorted_slots, expert_offsets, w1, b1, w2, b2, activation):
    require_triton(x.device, x.dtype)
    return launch.moe_ffn_forward(x, weights, keep, sorted_slots, expert_offsets, w1, b1, w2, b2, activation)


def _ffn_fwd_fake(x, weights, keep, sorted_slots, expert_offsets, w1, b1, w2, b2, activation):
    H = x.shape[-1]
    M = weights.shape[0] * weights.shape[1]          # S*k slots (weights is [S, k])
    return (x.new_empty(x.shape), x.new_empty((M, w1.shape[1])), x.new_empty((M, w2.shape[2])),
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
    gated = activation in GATED_ACTIVATIONS
    F = F1 // 2 if gated else F1
    if gated and F1 % 2:
        raise ValueError(f"w1 for {activation} must stack [gate; up] with an even row count 2F, got {tuple(w1.shape)}")
    check_shape("w2", w2, (E, H, F), f"(E, H, F) to match w1 {tuple(w1.shape)}")
    if b1 is not None:
        check_tensor("b1", b1, ndim=2, dtypes=FLOAT_DTYPES)
        check_shape("b1", b1, (E, F1))
    if b2 is not None:
        check_tensor("b2", b2, ndim=2, dtypes=FLOAT_DTYPES)
        check_shape("b2", b2, (E, H))
    if num_experts is not None and E != num_experts:
        raise ValueError(f"w1 has {E} experts but the routing has {num_experts}")


def _check_offset_list(name: str, bounds: list, total: int, what: str) -> None:
    """Group offsets (already on the host): start at 0, non-negative, non-decreasing, end <= total."""
    if bounds[0] != 0:
        raise ValueError(f"{name} must start at 0, got {name}[0]={bounds[0]}")
    for e in range(1, len(bounds)):
        if bounds[e] < 0:
            raise ValueError(f"{name} must be non-negative, got {name}[{e}]={bounds[e]}")
        if bounds[e] < bounds[e - 1]:
            raise ValueError(f"{name} must be non-decreasing, got {name}[{e}]={bounds[e]} < "
                             f"{name}[{e - 1}]={bounds[e - 1]}")
    if bounds[-1] > total:
        raise ValueError(f"{name} must end at most at {what}={total}, got {name}[-1]={bounds[-1]}")


def _check_routing(routing: MoERouting, x: torch.Tensor, S: int, num_experts: int) -> None:
    """Shapes, dtypes and devices of the routing tensors the kernels read (no host sync)."""
    if routing.indices.dim() != 2 or routing.indices.shape[0] != S:
        raise ValueError(f"routing was computed for {routing.indices.shape[0] if routing.indices.dim() else 0} "
                         f"rows but x has {S} rows")
    k = routing.indices.shape[1]
    check_tensor("routing.indices", routing.indices, dtypes=(torch.int64,))
    check_tensor("routing.weights", routing.weights, dtypes=FLOAT_DTYPES)
    check_shape("routing.weights", routing.weights, (S, k), "like routing.indices")
    check_tensor("routing.keep", routing.keep, dtypes=(torch.bool,))
    check_shape("routing.keep", routing.keep, (S, k), "like routing.indices")
    check_tensor("routing.sorted_slots", routing.sorted_slots, dtypes=(torch.int32, torch.int64))
    check_shape("routing.sorted_slots", routing.sorted_slots, (S * k,), "S*k slots")
    check_tensor("routing.expert_offsets", routing.expert_offsets, ndim=1, dtypes=(torch.int32, torch.int64))
    if routing.expert_offsets.shape[0] != num_experts + 1:
        raise ValueError(f"w1 has {num_experts} experts but the routing has {routing.num_experts} "
                         f"(routing.expert_offsets has shape {tuple(routing.expert_offsets.shape)})")
    check_same_device([("x", x), ("routing.indices", routing.indices), ("routing.weights", routing.weights),
                       ("routing.keep", routing.keep), ("routing.sorted_slots", routing.sorted_slots),
                       ("routing.expert_offsets", routing.expert_offsets)])


def _check_routing_values(routing: MoERouting, S: int) -> None:
    """The values the kernels trust (host syncs): the offsets are valid group bounds of the S*k slots,
    the kept slots ``sorted_slots[:expert_offsets[-1]]`` are distinct slots in range, ``keep`` is True
    exactly there, and ``indices`` names each kept slot's group."""
    k = routing.indices.shape[1]
    M = S * k
    E = routing.num_experts
    bounds = routing.expert_offsets.tolist()
    _check_offset_list("routing.expert_offsets", bounds, M, "the number of slots S*k")
    n = bounds[-1]
    slots = routing.sorted_slots.detach()[:n].to("cpu", torch.int64)
    if n and (int(slots.min()) < 0 or int(slots.max()) >= M):
        raise ValueError(f"routing.sorted_slots[:{n}] (the kept slots) must lie in [0, S*k={M}), got min "
                         f"{int(slots.min())}, max {int(slots.max())}")
    kept = torch.zeros(M, dtype=torch.bool).scatter_(0, slots, True)
    if int(kept.sum()) != n:
        raise ValueError(f"routing.sorted_slots[:{n}] (the kept slots) must be distinct; {n - int(kept.sum())} "
                         "repeat")
    if not torch.equal(routing.keep.detach().to("cpu").reshape(-1), kept):
        raise ValueError("routing.keep must be True exactly at the kept slots "
                         "routing.sorted_slots[:routing.expert_offsets[-1]]")
    groups = torch.repeat_interleave(torch.arange(E), torch.tensor(bounds).diff())
    if not torch.equal(routing.indices.detach().to("cpu").reshape(-1)[slots], groups):
        raise ValueError("routing.indices disagrees with routing.sorted_slots/expert_offsets: a kept slot is "
                         "grouped under another expert than the one it chose")


def moe_ffn(x: torch.Tensor, routing: MoERouting, w1: torch.Tensor, b1: Optional[torch.Tensor], w2: torch.Tensor,
            b2: Optional[torch.Tensor], activation: str = "gelu_tanh", *, check_metadata: bool = True) -> torch.Tensor:
    """The expert half of the MoE layer: ``y[s] = sum_j routing.weights[s, j] * Expert_{e_j}(x[s])``.

    Args:
        x: ``[..., H]`` with ``prod(...) = S`` rows (float16, bfloat16, float32; float64 on the reference).
        routing: from :func:`moe_route` on the same S rows.
        w1: ``[E, F, H]`` (plain activation: fc1) or ``[E, 2F, H]`` (gated: gate rows then up rows).
        b1: ``[E, F]`` / ``[E, 2F]`` or None.   w2: ``[E, H, F]`` (fc2 / down).   b2: ``[E, H]`` or None.
        activation: plain ``"gelu_tanh"`` (``fc2(gelu_tanh(fc1 x))``), ``"gelu"`` (exact, erf),
            ``"silu"``; or gated ``"swiglu"`` (``down(silu(gate x) * up x)``),
            ``"geglu_tanh"``, ``"geglu"`` (exact GELU), ``"reglu"`` (ReLU).  All are fused into the
            grouped GEMMs' epilogues on the Triton backend.
        check_metadata: check the *values* of the routing's index tensors before the kernels trust them
            (``expert_offsets`` are group bounds of the S*k slots, the kept ``sorted_slots`` are distinct
            and in range, ``keep`` and ``indices`` agree with them): host synchronisations.  A routing
            returned by :func:`moe_route` whose index tensors were not replaced or modified in place is
            known to be valid and is never checked, so the usual ``moe_route`` -> ``moe_ffn`` path (and
            :class:`MoE`) has no sync.  Pass False to skip the check for a hand-built routing known to be
            valid (an invalid one is then undefined behaviour).  Skipped while torch.compile traces.
            Shapes, dtypes and devices are always checked.

    Under ``torch.autocast`` x and the expert weights and biases are cast to the autocast dtype first,
    as DeepSpeed's expert ``nn.Linear`` calls are (the routing weights stay float32; the gradients flow
    back to the full-precision tensors).

    Returns ``[..., H]`` in x's dtype (the autocast dtype under autocast); a row whose choices were all
    dropped is 0.  Differentiable in x, the routing weights (hence the router) and every weight and
    bias.  Triton backend: no host sync, deterministic (no atomics).
    """
    check_tensor("x", x, min_ndim=1, dtypes=FLOAT_DTYPES)
    dtype = autocast_dtype(x.device)
    if dtype is not None:
        x, w1, b1, w2, b2 = (t.to(dtype) if isinstance(t, torch.Tensor) and t.is_floating_point() else t
                             for t in (x, w1, b1, w2, b2))
    if not isinstance(routing, MoERouting):
        raise TypeError(f"routing must be a MoERouting from moe_route, got {type(routing).__name__}")
    H = x.shape[-1]
    S = math.prod(x.shape[:-1])
    x2 = x.reshape(S, H)
    check_tensor("w1", w1, ndim=3, dtypes=FLOAT_DTYPES)
    _check_routing(routing, x, S, w1.shape[0])
    _check_ffn_weights(H, w1, b1, w2, b2, activation, routing.num_experts)
    check_same_dtype([("x", x), ("w1", w1), ("b1", b1), ("w2", w2), ("b2", b2)])
    check_same_device([("x", x), ("w1", w1), ("b1", b1), ("w2", w2), ("b2", b2), ("routing", routing.indices)])
    if check_metadata and not torch.compiler.is_compiling() and not routing._is_sealed():
        _check_routing_values(routing, S)
    backend = resolve_backend(x.device, x.dtype)
    # the result is never a view (FSDP2 hooks a module's outputs, and an in-place residual `y += x` on a
    # view output loses that hook): the Triton op allocates y in x's shape, the reference copies
    if backend == "reference":
        y = moe_ffn_reference(x2, routing.weights, routing.sorted_slots, routing.expert_offsets, w1, b1, w2, b2,
                              activation)
        return y if x.dim() == 2 else y.reshape(x.shape).clone()
    if x.numel() and x.stride(-1) != 1:
        x = x.contiguous()
    slots = routing.sorted_slots.to(torch.int32).contiguous()
    offsets = routing.expert_offsets.to(torch.int32).contiguous()
    y, _, _, _ = moe_ffn_forward_op(x, routing.weights.float().contiguous(), routing.keep.contiguous(),
                                    slots, offsets, w1, b1, w2, b2, activation)
    return y


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
    """Loop over groups: ``c[lo:hi] = a[lo:hi] @ b[e].T (+ bias[e])``; rows outside every group are 0.
    Reads the offsets on the host, so it always checks them (``ValueError`` naming ``group_offsets``)."""
    bounds = group_offsets.tolist()
    _check_offset_list("group_offsets", bounds, a.shape[0], "the number of rows M")
    parts = [torch.nn.functional.linear(a[bounds[e]:bounds[e + 1]], b[e], None if bias is None else bias[e])
             for e in range(b.shape[0])]
    parts.append(a.new_zeros((a.shape[0] - bounds[-1], b.shape[1])))
    return torch.cat(parts, 0)


def grouped_gemm(a: torch.Tensor, b: torch.Tensor, group_offsets: torch.Tensor,
                 bias: Optional[torch.Tensor] = None, *, check_metadata: bool = True) -> torch.Tensor:
    """Grouped GEMM: ``c[r] = a[r] @ b[e].T (+ bias[e])`` for ``group_offsets[e] <= r < group_offsets[e+1]``.

    Args:
        a: ``[M, K]``, rows grouped by expert.   b: ``[E, N, K]``.   bias: ``[E, N]`` or None.
        group_offsets: int32/int64 ``[E+1]``, non-decreasing, ``group_offsets[0] = 0``,
            ``group_offsets[E] <= M`` (rows past it come out as 0).  An empty group is fine.
        check_metadata: check those rules on the *values* of ``group_offsets`` (``ValueError`` naming
            it): one host synchronisation on the Triton backend.  Pass False when the offsets are valid
            by construction (e.g. a cumulative sum of counts that add up to at most M) to keep the call
            sync-free; invalid offsets are then undefined behaviour (out-of-bounds memory access).
            Skipped while torch.compile traces.  The reference backend reads the offsets on the host
            anyway and always checks them.

    Returns ``[M, N]``; differentiable in a, b and bias.  Triton backend: one launch for all groups,
    no host sync (with ``check_metadata=False``); the offsets are read on the device.

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
    if a.shape[0] >= 2 ** 31:
        raise ValueError(f"a has M={a.shape[0]} rows: group_offsets are int32 on the device, so M must stay "
                         "below 2**31")
    backend = resolve_backend(a.device, a.dtype)
    if backend == "reference":
        return grouped_gemm_reference(a, b, group_offsets, bias)
    if check_metadata and not torch.compiler.is_compiling():
        _check_offset_list("group_offsets", group_offsets.tolist(), a.shape[0], "the number of rows M")
    offs = group_offsets.to(torch.int32).contiguous()
    if a.numel() and a.stride(-1) != 1:
        a = a.contiguous()
    return grouped_gemm_forward_op(a, b, bias, offs)
