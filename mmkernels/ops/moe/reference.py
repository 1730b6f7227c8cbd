"""Pure-PyTorch references for the MoE-LLaVA mixture-of-experts layer (DeepSpeed ``MoE`` semantics).

Three pieces, each usable alone and each the oracle of a kernel:

* :func:`route_reference` -- DeepSpeed's gating as decisions: top-k expert indices, capacity
  positions with DeepSpeed's priority (every j-th choice before every (j+1)-th choice, then token
  order), keep mask, ``exp_counts`` and the dispatch permutation.  Vectorised torch, no host sync;
  it is also the fallback when the native ``mmkernels::moe_route`` op is missing.
* :func:`combine_weights_and_aux` -- the differentiable part of the gate: softmax probabilities,
  combine weights (renormalised over the surviving choices for k >= 2, the raw gate value for k = 1 as
  in DeepSpeed's ``top1gating``) and the load-balancing loss ``l_aux``.
* :func:`moe_ffn_reference` -- permute -> per-expert FFN -> weighted un-permute, written with a sort
  and one matmul pair per expert (no one-hot einsum, no ``[E, C, H]`` buffer).  It is the CPU path
  of the ``auto`` backend and, run in float64, the oracle of the Triton kernels.

:func:`deepspeed_einsum_moe` mirrors DeepSpeed 0.9.5/0.19 ``top2gating`` + ``MOELayer`` (dense
``[S, E, C]`` one-hot dispatch/combine einsums, a loop over experts); it exists for the tests and as
the baseline of ``benchmarks/bench_moe.py`` and is never used by the library itself.

Semantics (DeepSpeed ``sharded_moe.py``; S = B*T rows, E experts)::

    logits = x.float() @ Wg.T;   p = softmax(logits)             (fp32, over all E)
    e_1 = argmax(logits);   e_j = argmax((logits + g).masked_fill(chosen, -inf))   j >= 2
    pos[s, j] = #{(j', s') : j' < j, e_j'(s') = e_j(s)} + #{s' < s : e_j(s') = e_j(s)}
    keep[s, j] = pos[s, j] < C                                     (all True when dropless)
    w[s, j] = p[s, e_j] keep / max(sum_j p[s, e_j] keep, eps)      (k >= 2; k = 1: p[s, e_1] keep)
    y[s] = sum_j w[s, j] Expert_{e_j}(x[s])
    l_aux = E * sum_i mean_s p[s, i] * mean_s [e_1(s) = i]         (k <= 2; k > 2: E/k * sum_i me_i * ce_i
                                                                    with ce over all k choices)
    exp_counts[i] = #{(s, j) : e_j(s) = i}                          (before dropping; sums to k*S)

``token_order`` (a permutation of the rows) replaces token order in the position rule: DeepSpeed's
random token selection for k = 1 (``use_rts``) is ``token_order = argsort(-uniform)``.
"""
from __future__ import annotations

import math
import struct
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

ACTIVATIONS = ("gelu_tanh", "swiglu")


def capacity_for(num_tokens: int, num_experts: int, capacity_factor: float, k: int, min_capacity: int) -> int:
    """DeepSpeed's ``_capacity``: ``max(ceil(S / E * capacity_factor * k), min_capacity)`` (k = 1 for
    top-1), evaluated in float32 exactly as DeepSpeed does."""
    # fp32 x fp32 is exact in double, so rounding the double product to fp32 is the fp32 multiply
    product = _f32(_f32(num_tokens / num_experts) * _f32(float(capacity_factor) * (k if k >= 2 else 1)))
    return max(int(math.ceil(product)), int(min_capacity))


def _f32(value: float) -> float:
    return struct.unpack("f", struct.pack("f", value))[0]


@dataclass
class RouteDecisions:
    """Integer routing decisions (no gradient)."""
    indices: torch.Tensor         # [S, k] int64, expert of each choice
    keep: torch.Tensor            # [S, k] bool, the choice survived capacity
    exp_counts: torch.Tensor      # [E] int64, assignments per expert over all k choices, pre-drop
    top1_counts: torch.Tensor     # [E] int64, first choices per expert (for l_aux)
    sorted_slots: torch.Tensor    # [S*k] int32, slots s*k+j grouped by expert (kept ones), dropped last
    expert_offsets: torch.Tensor  # [E+1] int32, group e is sorted_slots[offsets[e]:offsets[e+1]]


def topk_indices_reference(logits: torch.Tensor, k: int, noise: Optional[torch.Tensor]) -> torch.Tensor:
    """First choice = argmax(logits); choice j >= 2 = argmax(logits + noise) over the experts not chosen yet."""
    S, E = logits.shape
    idx = torch.empty(S, k, dtype=torch.int64, device=logits.device)
    if S == 0:
        return idx
    idx[:, 0] = torch.argmax(logits, dim=1)
    if k > 1:
        noisy = logits + noise if noise is not None else logits.clone()
        chosen = F.one_hot(idx[:, 0], E).bool()
        for j in range(1, k):
            idx[:, j] = torch.argmax(noisy.masked_fill(chosen, float("-inf")), dim=1)
            chosen |= F.one_hot(idx[:, j], E).bool()
    return idx


def route_reference(logits: torch.Tensor, k: int, capacity: Optional[int],
                    noise: Optional[torch.Tensor] = None,
                    token_order: Optional[torch.Tensor] = None) -> RouteDecisions:
    """Routing decisions in plain torch (see the module docstring).  ``capacity=None`` is dropless."""
    S, E = logits.shape
    dev = logits.device
    idx = topk_indices_reference(logits, k, noise)
    order = token_order if token_order is not None else torch.arange(S, device=dev)
    # Positions: walk the choices j-major (all first choices, then all second ...), rows in `order`.
    seq = idx[order].t().reshape(-1)                                   # [k*S]
    onehot = F.one_hot(seq, E)                                         # [k*S, E] (no capacity axis)
    pos_seq = (onehot.cumsum(0) - 1).gather(1, seq[:, None]).squeeze(1)
    pos = torch.empty(S, k, dtype=torch.int64, device=dev)
    pos[order] = pos_seq.view(k, S).t()
    keep = pos < capacity if capacity is not None else torch.ones_like(pos, dtype=torch.bool)
    exp_counts = torch.bincount(idx.reshape(-1), minlength=E)
    top1_counts = torch.bincount(idx[:, 0], minlength=E)
    key = torch.where(keep, idx, torch.full_like(idx, E)).reshape(-1)  # dropped slots sort last
    sorted_slots = torch.sort(key, stable=True).indices.to(torch.int32)
    kept_counts = torch.bincount(key, minlength=E + 1)[:E]
    offsets = torch.zeros(E + 1, dtype=torch.int32, device=dev)
    offsets[1:] = kept_counts.cumsum(0)
    return RouteDecisions(idx, keep, exp_counts, top1_counts, sorted_slots, offsets)


def combine_weights_and_aux(logits: torch.Tensor, indices: torch.Tensor, keep: torch.Tensor,
                            top1_counts: torch.Tensor, exp_counts: torch.Tensor):
    """Differentiable gate outputs: ``(probs [S, E], weights [S, k] fp32, l_aux)``; gradients flow to
    ``logits`` through the softmax only (DeepSpeed's ``me``)."""
    S, E = logits.shape
    k = indices.shape[1]
    probs = torch.softmax(logits.float(), dim=1)
    picked = probs.gather(1, indices) * keep
    if k == 1:
        weights = picked
    else:
        denom = picked.sum(1, keepdim=True).clamp(min=torch.finfo(torch.float32).eps)
        weights = picked / denom
    if S == 0:
        l_aux = probs.sum() * 0.0
    else:
        me = probs.mean(0)
        if k <= 2:
            ce = top1_counts.to(torch.float32) / S
            l_aux = (me * ce).sum() * E
        else:
            ce = exp_counts.to(torch.float32) / S
            l_aux = (me * ce).sum() * E / k
    return probs, weights, l_aux


def expert_ffn(x: torch.Tensor, w1: torch.Tensor, b1: Optional[torch.Tensor], w2: torch.Tensor,
               b2: Optional[torch.Tensor], activation: str) -> torch.Tensor:
    """One expert: ``gelu_tanh``: ``fc2(gelu_tanh(fc1 x + b1)) + b2`` with ``w1 [F, H]``;
    ``swiglu``: ``down(silu(gate x) * up x)`` with ``w1 = cat([gate, up]) [2F, H]``."""
    z = F.linear(x, w1, b1)
    if activation == "gelu_tanh":
        h = F.gelu(z, approximate="tanh")
    else:
        g, u = z.chunk(2, dim=-1)
        h = F.silu(g) * u
    return F.linear(h, w2, b2)


def moe_ffn_reference(x: torch.Tensor, weights: torch.Tensor, sorted_slots: torch.Tensor,
                      expert_offsets: torch.Tensor, w1: torch.Tensor, b1: Optional[torch.Tensor],
                      w2: torch.Tensor, b2: Optional[torch.Tensor], activation: str) -> torch.Tensor:
    """``y[s] = sum_j weights[s, j] * Expert_{e_j}(x[s])`` over the kept choices.

    ``x [S, H]``; ``weights [S, k]`` (0 for dropped choices); ``sorted_slots``/``expert_offsets`` from
    the routing; ``w1 [E, F or 2F, H]``, ``w2 [E, H, F]``.  Gather the kept (row, choice) slots in
    expert order, one FFN per expert on its contiguous rows, multiply by the weight, add back into
    the rows via a slot-ordered buffer (each slot written once, the k choices summed in order).  Reads
    ``expert_offsets`` on the host.
    """
    S, H = x.shape
    k = weights.shape[1]
    bounds = expert_offsets.tolist()
    counts = [hi - lo for lo, hi in zip(bounds[:-1], bounds[1:])]
    slots = sorted_slots[:bounds[-1]].long()
    tokens = torch.div(slots, k, rounding_mode="floor")
    # split/unbind (not slicing/indexing per expert) so that autograd concatenates/stacks the
    # per-expert gradients instead of adding E zero-padded full-size tensors
    parts = x[tokens].split(counts)
    w1s, w2s = w1.unbind(0), w2.unbind(0)
    b1s = b1.unbind(0) if b1 is not None else [None] * len(counts)
    b2s = b2.unbind(0) if b2 is not None else [None] * len(counts)
    outs = [expert_ffn(parts[e], w1s[e], b1s[e], w2s[e], b2s[e], activation)
            for e in range(len(counts)) if counts[e] > 0]
    if not outs:
        # keep every input in the graph so that their gradients are zeros, not None
        anchor = sum(t.sum() for t in (x, w1, w2, b1, b2, weights) if t is not None)
        return x.new_zeros((S, w2.shape[1])) + 0.0 * anchor.to(x.dtype)
    o = torch.cat(outs, 0) * weights.reshape(-1)[slots].to(x.dtype)[:, None]
    # un-permute into slot order (each slot written once), then reduce the k choices in order
    per_slot = x.new_zeros((S * k, w2.shape[1]))
    per_slot[slots] = o
    return per_slot.view(S, k, -1).sum(1)


def deepspeed_einsum_moe(x: torch.Tensor, wg: torch.Tensor, experts, k: int, capacity: Optional[int],
                         noise: Optional[torch.Tensor] = None):
    """DeepSpeed's ``top2gating``/``top1gating`` (use_rts=False) + ``MOELayer`` dispatch/combine, as
    dense einsums over ``[S, E, C]`` (GShard algorithm 2).  ``experts`` is a list of E callables.
    Returns ``(y [S, H], l_aux, exp_counts)``.  Used by tests and the benchmark baseline only."""
    S, H = x.shape
    logits = F.linear(x.float(), wg.float())
    E = logits.shape[1]
    gates = F.softmax(logits, dim=1)
    idx1 = torch.argmax(gates, dim=1)
    mask1 = F.one_hot(idx1, E)
    me = gates.mean(0)
    ce = mask1.float().mean(0)
    if k == 1:
        exp_counts = mask1.sum(0)
        l_aux = (me * ce).sum() * E
        C = capacity if capacity is not None else int(exp_counts.max())
        loc1 = mask1.cumsum(0) - 1
        mask1 = mask1 * (loc1 < C)
        loc1_s = (loc1 * mask1).sum(1)
        g = gates * mask1.float()
        combine = torch.einsum("se,sc->sec", g, F.one_hot(loc1_s, C).float())
    else:
        noisy = logits + noise if noise is not None else logits
        idx2 = torch.argmax(noisy.masked_fill(mask1.bool(), float("-inf")), dim=1)
        mask2 = F.one_hot(idx2, E)
        loc1 = mask1.cumsum(0) - 1
        loc2 = mask2.cumsum(0) - 1 + mask1.sum(0, keepdim=True)
        l_aux = (me * ce).mean() * E * E
        exp_counts = (mask1 + mask2).sum(0)
        C = capacity if capacity is not None else int(exp_counts.max())
        mask1 = mask1 * (loc1 < C)
        mask2 = mask2 * (loc2 < C)
        loc1_s = (loc1 * mask1).sum(1)
        loc2_s = (loc2 * mask2).sum(1)
        g1 = (gates * mask1.float()).sum(1)
        g2 = (gates * mask2.float()).sum(1)
        denom = (g1 + g2).clamp(min=torch.finfo(torch.float32).eps)
        g1, g2 = g1 / denom, g2 / denom
        combine = (torch.einsum("s,se,sc->sec", g1, mask1.float(), F.one_hot(loc1_s, C).float())
                   + torch.einsum("s,se,sc->sec", g2, mask2.float(), F.one_hot(loc2_s, C).float()))
    dispatch = combine.bool()
    dispatched = torch.einsum("sec,sm->ecm", dispatch.type_as(x), x)
    # DeepSpeed's Experts.forward: chunk along the expert axis, one module per chunk, cat
    expert_out = torch.cat([experts[e](chunk) for e, chunk in enumerate(dispatched.chunk(E, dim=0))], 0)
    y = torch.einsum("sec,ecm->sm", combine.type_as(x), expert_out)
    return y, l_aux, exp_counts
