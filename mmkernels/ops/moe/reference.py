"""Pure-PyTorch references for the MoE-LLaVA mixture-of-experts layer (DeepSpeed ``MoE`` semantics).

Three pieces, each usable alone and each the oracle of a kernel:

* :func:`route_reference` -- DeepSpeed's gating as decisions: top-k expert indices, which choices
  survive capacity (one of DeepSpeed's drop policies, see :data:`DROP_POLICIES`), keep mask,
  ``exp_counts`` and the dispatch permutation.  Vectorised torch, no host sync; it is the fallback
  when the native ``mmkernels::moe_route`` op is missing and the path of the policies the native op
  does not implement.
* :func:`combine_weights_and_aux` -- the differentiable part of the gate: softmax probabilities,
  combine weights (renormalised over the surviving choices for k >= 2, the raw gate value for k = 1 as
  in DeepSpeed's ``top1gating``) and the load-balancing loss ``l_aux``.
* :func:`moe_ffn_reference` -- permute -> per-expert FFN -> weighted un-permute, written with a sort
  and one matmul pair per expert (no one-hot einsum, no ``[E, C, H]`` buffer).  It is the CPU path
  of the ``auto`` backend and, run in float64, the oracle of the Triton kernels.

:func:`capacity_for` is DeepSpeed's ``_capacity`` (float32 arithmetic, reproduced exactly in integers so
that it also traces with a symbolic token count).  :func:`deepspeed_einsum_moe` mirrors DeepSpeed
``top1gating`` (``use_rts=False``) / ``top2gating`` + ``MOELayer`` as dense ``[S, E, C]`` one-hot
dispatch/combine einsums with a loop over experts; it exists for the tests and as a benchmark
baseline and is never used by the library itself.

Semantics (DeepSpeed ``sharded_moe.py``; S = B*T rows, E experts, C capacity)::

    logits = x.float() @ Wg.T;   p = softmax(logits)             (fp32, over all E)
    "choice" (top2gating; top1gating with random token selection):
      e_1 = argmax(logits);   e_j = argmax((logits + g).masked_fill(chosen, -inf))   j >= 2
      pos[s, j] = #{(j', s') : j' < j, e_j'(s') = e_j(s)} + #{s' before s : e_j(s') = e_j(s)}
      keep[s, j] = pos[s, j] < C
    "position" (topkgating, drop_policy='position'):  e = topk(p, k);
      keep[s, j] = #{s' before s : e_j(s) in e(s')} < C             (all k choices counted together)
    "probs" (topkgating, drop_policy='probs'):  e = topk(p, k);
      keep[s, j] = p[s, e_j] is among the C largest p[., e_j] over the rows that chose e_j
    "topk_ties" (top1gating, use_rts=False; k = 1): keep = the C rows torch.topk picks out of the
      tied 1s of the one-hot mask (torch's tie order)
    "rts" (top1gating, use_rts=True; k = 1; u = the [S, E] uniform draw): keep = the C rows torch.topk
      picks out of onehot(e_1) * u, i.e. per expert the C largest u[s, e] over the rows that chose it
    (all True when dropless)
    w[s, j] = p[s, e_j] keep / max(sum_j p[s, e_j] keep, eps)      (k >= 2; k = 1: p[s, e_1] keep)
    y[s] = sum_j w[s, j] Expert_{e_j}(x[s])
    l_aux = E * sum_i mean_s p[s, i] * mean_s [e_1(s) = i]         (top1/top2gating; topkgating (k > 2,
                                                                    "position", "probs"): E/k * sum_i
                                                                    me_i * ce_i with ce over all k choices)
    exp_counts[i] = #{(s, j) : e_j(s) = i}                          (before dropping; sums to k*S)

``token_order`` (a permutation of the rows) replaces token order in "choice" and "position".

No policy scans a one-hot ``[S*k, E]`` tensor along its rows (DeepSpeed's ``cumsum(mask, dim=0)``; with
E = 4 columns such a scan has almost no parallelism on a GPU): a position is a rank among equal
experts in a 1-D sequence, from a stable sort by expert (:func:`_ranks_among_equal`).
"""
from __future__ import annotations

import math
import struct
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

# Expert activations of moe_ffn.  Plain: ``fc2(act(fc1 x + b1)) + b2``.  Gated (w1 stacks [gate; up]):
# ``down(act(gate x + bg) * (up x + bu)) + b2`` -- the name maps to the elementwise act of the gate.
# (no plain "relu": ReLU runs gated, as "reglu")
PLAIN_ACTIVATIONS = ("gelu_tanh", "gelu", "silu")
GATED_ACTIVATIONS = {"swiglu": "silu", "geglu_tanh": "gelu_tanh", "geglu": "gelu", "reglu": "relu"}
ACTIVATIONS = ("gelu_tanh", "swiglu") + PLAIN_ACTIVATIONS[1:] + tuple(GATED_ACTIVATIONS)[1:]


def elementwise_activation(name: str, z: torch.Tensor) -> torch.Tensor:
    """The elementwise function ``silu``, ``gelu_tanh``, ``gelu`` (exact, erf) or ``relu``."""
    if name == "silu":
        return F.silu(z)
    if name == "gelu_tanh":
        return F.gelu(z, approximate="tanh")
    if name == "gelu":
        return F.gelu(z)
    if name == "relu":
        return F.relu(z)
    raise ValueError(f"unknown elementwise activation {name!r}")


def capacity_for(num_tokens: int, num_experts: int, capacity_factor: float, k: int, min_capacity: int) -> int:
    """DeepSpeed's ``_capacity``: ``max(ceil(S / E * capacity_factor * k), min_capacity)`` (k = 1 for
    top-1), evaluated in float32 exactly as DeepSpeed does.

    DeepSpeed computes ``ceil(float(S / E) * torch.tensor(cf * k))``: the double ``S / E`` and the
    double ``cf * k`` are rounded to float32 and multiplied in float32.  Here the two roundings are
    done in exact integer arithmetic (:func:`_round_f32`), so ``num_tokens`` may be a ``torch.SymInt``
    (torch.compile with dynamic shapes): the result is then a SymInt.  When E is a power of two and
    ``S * factor`` needs at most 24 significant bits (MoE-LLaVA: E = 4, cf * k in {2, 3, 4}) both
    products are exact and the only guard is ``S < 2**24 / factor``; otherwise the guards are on the
    power-of-two range of ``S / E`` (a recompile when S crosses a power of two), never on S itself.
    (The double rounding of ``S / E`` equals a single rounding to float32 for E < 2**29.)

    k = 1 with ``min_capacity > num_tokens`` raises ``ValueError``: DeepSpeed's ``top1gating``
    asserts ``S >= min_capacity``.
    """
    if k == 1 and min_capacity > num_tokens:
        raise ValueError(f"min_capacity={min_capacity} is larger than the number of tokens S={num_tokens}: "
                         "DeepSpeed's top1gating requires S >= min_capacity (set min_capacity=0 or use more "
                         "tokens)")
    factor = _exact_f32(float(capacity_factor) * (k if k >= 2 else 1))
    if factor <= 0 or num_tokens == 0:
        # fp32(S/E) * factor <= 0, whose ceil is 0 (-0.0 rounds to 0)
        return _sym_max(0, int(min_capacity))
    f_num, f_den = factor.as_integer_ratio()              # f_den is a power of two
    if num_experts & (num_experts - 1) == 0 and num_tokens * f_num < 2 ** 24:
        # E a power of two and S * f_num < 2**24: S / E and S / E * factor are exact in fp32, so the
        # result is the exact ceil(S * f_num / (E * f_den)) (no per-octave guard when S is symbolic)
        return _sym_max(-((-num_tokens * f_num) // (num_experts * f_den)), int(min_capacity))
    # fp32(S / E) = m1 * 2**s1, then fp32(m1 * 2**s1 * factor) = m2 * 2**s2, then its ceiling
    f_shift = f_den.bit_length() - 1
    m1, s1 = _round_f32(num_tokens, num_experts)
    shift = s1 - f_shift
    if shift >= 0:
        m2, s2 = _round_f32(m1 * f_num * 2 ** shift, 1)
    else:
        m2, s2 = _round_f32(m1 * f_num, 2 ** -shift)
    ceil = m2 * 2 ** s2 if s2 >= 0 else -((-m2) // 2 ** -s2)
    return _sym_max(ceil, int(min_capacity))


def _exact_f32(value: float) -> float:
    """``value`` rounded to float32 (a concrete Python float, never symbolic)."""
    return struct.unpack("f", struct.pack("f", value))[0]


def _sym_max(a, b):
    return torch.sym_max(a, b) if isinstance(a, torch.SymInt) or isinstance(b, torch.SymInt) else max(a, b)


def _sym_min(a, b):
    return torch.sym_min(a, b) if isinstance(a, torch.SymInt) or isinstance(b, torch.SymInt) else min(a, b)


def _round_f32(num, den: int):
    """float32 round-to-nearest-even of the positive rational ``num / den`` as ``(m, s)`` with value
    ``m * 2**s``, in integer arithmetic (``num`` may be a SymInt; ``den`` is a positive int).

    With ``2**e <= num/den < 2**(e+1)`` the float32 spacing there is ``2**(e-23)``, so
    ``m = RNE(num / den / 2**(e-23))`` (24 significant bits; the carry to ``2**24`` is fine).  Only the
    search for ``e`` compares ``num`` (a guard on its power-of-two range when symbolic); the rounding
    itself is branch-free (``min``/``max`` on integers).
    """
    e = 0
    while not _below_pow2(num, den, e + 1):
        e += 1
    while _below_pow2(num, den, e):
        e -= 1
    s = e - 23
    if s <= 0:
        n, d = num * 2 ** -s, den
    else:
        n, d = num, den * 2 ** s
    q = n // d
    twice_r = 2 * (n - q * d)
    above = _sym_min(1, _sym_max(0, twice_r - d))                         # remainder > 1/2
    tie = 1 - _sym_min(1, _sym_max(twice_r - d, d - twice_r))           # remainder == 1/2
    return q + above + tie * (q % 2), s


def _below_pow2(num, den: int, e: int):
    """``num / den < 2**e`` in integers."""
    return num * 2 ** -e < den if e < 0 else num < den * 2 ** e


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


DROP_POLICIES = ("choice", "position", "probs", "topk_ties", "rts")


def resolve_drop_policy(drop_policy: Optional[str], k: int, token_order_given: bool,
                        rts_uniform_given: bool = False) -> str:
    """The concrete policy :func:`route_reference` runs; ``None`` is what DeepSpeed's ``TopKGate`` runs for
    this k: k = 1 ``top1gating`` (``rts_uniform`` given, i.e. random token selection: ``"rts"``;
    ``token_order`` given: ``"choice"``; else ``"topk_ties"``), k = 2 ``top2gating`` (``"choice"``),
    k >= 3 ``topkgating`` (``"probs"``)."""
    if drop_policy is None:
        if k == 1:
            if rts_uniform_given:
                return "rts"
            return "choice" if token_order_given else "topk_ties"
        return "choice" if k == 2 else "probs"
    if drop_policy not in DROP_POLICIES:
        raise ValueError(f"drop_policy must be None or one of {DROP_POLICIES}, got {drop_policy!r}")
    if drop_policy in ("topk_ties", "rts") and k != 1:
        raise ValueError(f"drop_policy={drop_policy!r} is DeepSpeed's top1gating rule and needs k = 1, got k={k}")
    if drop_policy == "position" and k == 1:
        return "choice"            # one choice per row: the same rule
    return drop_policy


def _group_starts(sorted_values: torch.Tensor, n: int) -> torch.Tensor:
    """``starts[i]`` = number of values < i for i in 0..n, from sorted values (no host sync, no atomics)."""
    bounds = torch.arange(n + 1, device=sorted_values.device, dtype=sorted_values.dtype)
    return torch.searchsorted(sorted_values, bounds)


def _counts(values: torch.Tensor, n: int) -> torch.Tensor:
    """``bincount(values, minlength=n)`` for values in [0, n), without bincount's host sync on CUDA."""
    return _group_starts(torch.sort(values.reshape(-1)).values, n).diff()


def _ranks_among_equal(seq: torch.Tensor, n: int) -> torch.Tensor:
    """``rank[i] = #{i' < i : seq[i'] = seq[i]}`` for a 1-D int64 ``seq`` of values in ``[0, n)``.

    A stable sort by value puts each value's elements together in sequence order; an element's rank is
    its distance from the start of its group.  (DeepSpeed writes this as ``cumsum(one_hot(seq), dim=0)``:
    a scan down the rows of a ``[len, n]`` tensor, which has only n columns of parallelism.)"""
    sorted_values, perm = torch.sort(seq, stable=True)
    starts = _group_starts(sorted_values, n)
    rank_sorted = torch.arange(seq.shape[0], device=seq.device) - starts[sorted_values]
    return torch.empty_like(rank_sorted).scatter_(0, perm, rank_sorted)


def _claim_positions(idx: torch.Tensor, token_order: Optional[torch.Tensor], choice_major: bool,
                     num_experts: int) -> torch.Tensor:
    """``pos[s, j]``: how many choices claim expert ``idx[s, j]`` before choice (s, j) does.  Choices claim
    in rows of ``token_order`` (default: row order); ``choice_major``: all first choices, then all second
    choices ... (top2gating); else a row's choices together (topkgating 'position': its experts differ)."""
    S, k = idx.shape
    ordered = idx if token_order is None else idx[token_order]
    seq = (ordered.t() if choice_major else ordered).reshape(-1)
    ranks = _ranks_among_equal(seq, num_experts)
    ranks = ranks.view(k, S).t() if choice_major else ranks.view(S, k)
    if token_order is None:
        return ranks.contiguous()
    pos = torch.empty_like(ranks, memory_format=torch.contiguous_format)
    pos[token_order] = ranks
    return pos


def route_reference(logits: torch.Tensor, k: int, capacity: Optional[int],
                    noise: Optional[torch.Tensor] = None,
                    token_order: Optional[torch.Tensor] = None, drop_policy: str = "choice",
                    rts_uniform: Optional[torch.Tensor] = None) -> RouteDecisions:
    """Routing decisions in plain torch, for a concrete ``drop_policy`` (see :func:`mmkernels.moe_route`;
    ``capacity=None`` is dropless).  No host synchronisation: it is the fallback of the native op and
    the path of the policies the native op does not implement.

    * ``"choice"`` (the native op's rule; DeepSpeed ``top2gating``): choice j of every row claims
      capacity before choice j + 1 of any row; within a choice, rows in ``token_order``.  The first
      choice is ``argmax(logits)``, choice j >= 2 ``argmax(logits + noise)`` over the unchosen experts.
    * ``"position"`` (DeepSpeed ``topkgating(drop_policy='position')``): choices are
      ``topk(softmax(logits), k)``; an expert keeps the first C rows (in ``token_order``) that chose it,
      whichever choice j it was for them.
    * ``"probs"`` (DeepSpeed ``topkgating(drop_policy='probs')``): choices as for ``"position"``; an
      expert keeps its C choices of largest probability (``torch.topk`` over the rows, as DeepSpeed).
    * ``"topk_ties"`` (k = 1, DeepSpeed ``top1gating(use_rts=False)``): an over-full expert keeps the C
      rows that ``torch.topk`` returns from the tied entries of the 0/1 one-hot mask -- torch's
      implementation-defined tie order (not token order; it differs between CPU and CUDA), reproduced
      by making the same call.
    * ``"rts"`` (k = 1, DeepSpeed ``top1gating(use_rts=True)``): an over-full expert keeps the C rows
      that ``torch.topk`` returns from ``one_hot(indices) * rts_uniform`` -- the rows with the largest
      ``rts_uniform[s, e]`` among those that chose e, ties as torch breaks them (the same call as
      DeepSpeed's).  Dropless keeps every row.
    """
    S, E = logits.shape
    if drop_policy in ("position", "probs"):
        probs = torch.softmax(logits, dim=1)
        top_p, idx = torch.topk(probs, k, dim=1)
        if capacity is None:
            keep = torch.ones_like(idx, dtype=torch.bool)
        elif drop_policy == "position":
            # an expert's rank among the rows (in token order) that chose it, whichever choice it was
            keep = _claim_positions(idx, token_order, False, E) < capacity
        else:
            mask = torch.zeros_like(probs, dtype=torch.bool).scatter_(1, idx, True)      # [S, E]
            gated = torch.zeros_like(probs).scatter(1, idx, top_p)
            sel = torch.topk(gated, k=_sym_min(capacity, S), dim=0, sorted=False).indices
            keep = (mask & torch.zeros_like(mask).scatter_(0, sel, True)).gather(1, idx)
    elif drop_policy in ("topk_ties", "rts"):
        idx = topk_indices_reference(logits, 1, None)
        onehot = F.one_hot(idx[:, 0], E)                                 # int64 [S, E], as DeepSpeed
        if capacity is None:
            keep = torch.ones_like(idx, dtype=torch.bool)
        else:
            # DeepSpeed's top1gating: torch.topk over the rows of the 0/1 mask, or of the mask times the
            # uniform draw (random token selection), and the same call here
            scores = onehot if drop_policy == "topk_ties" else onehot * rts_uniform
            sel = torch.topk(scores, k=_sym_min(capacity, S), dim=0).indices
            keep = (onehot * torch.zeros_like(onehot).scatter_(0, sel, 1)).gather(1, idx).bool()
    elif drop_policy == "choice":
        idx = topk_indices_reference(logits, k, noise)
        if capacity is None:
            keep = torch.ones_like(idx, dtype=torch.bool)
        else:
            # positions: the choices claim j-major (all first choices, then all second ...), rows in order
            keep = _claim_positions(idx, token_order, True, E) < capacity
    else:
        raise ValueError(f"drop_policy must be one of {DROP_POLICIES}, got {drop_policy!r}")
    exp_counts = _counts(idx, E)
    top1_counts = _counts(idx[:, 0], E)
    key = torch.where(keep, idx, torch.full_like(idx, E)).reshape(-1)  # dropped slots sort last
    sorted_key, perm = torch.sort(key, stable=True)
    offsets = _group_starts(sorted_key, E).to(torch.int32)
    return RouteDecisions(idx, keep, exp_counts, top1_counts, perm.to(torch.int32), offsets)


def combine_weights_and_aux(logits: torch.Tensor, indices: torch.Tensor, keep: torch.Tensor,
                            top1_counts: torch.Tensor, exp_counts: torch.Tensor,
                            topkgating: Optional[bool] = None):
    """Differentiable gate outputs: ``(probs [S, E], weights [S, k] fp32, l_aux)``; gradients flow to
    ``logits`` through the softmax only (DeepSpeed's ``me``).

    ``topkgating`` (default: k >= 3) uses DeepSpeed ``topkgating``'s formulas: ``l_aux =
    mean(me * ce) * E * E / k`` with ``ce`` over all k choices, and the renormalising sum taken over
    the dense ``[S, E]`` masked probabilities; otherwise ``top1gating`` / ``top2gating``'s: ``l_aux =
    E * sum(me * ce)`` (k = 2: ``mean(me * ce) * E * E``) with ``ce`` over the first choices.  Each
    is written as DeepSpeed writes it, so the values are bit-identical to DeepSpeed's."""
    S, E = logits.shape
    k = indices.shape[1]
    if topkgating is None:
        topkgating = k >= 3
    probs = torch.softmax(logits.float(), dim=1)
    picked = probs.gather(1, indices) * keep
    if k == 1:
        weights = picked
    else:
        if topkgating:  # DeepSpeed sums gates * mask over the experts
            total = torch.zeros_like(probs).scatter(1, indices, picked).sum(1, keepdim=True)
        else:
            total = picked.sum(1, keepdim=True)
        weights = picked / total.clamp(min=torch.finfo(torch.float32).eps)
    if S == 0:
        l_aux = probs.sum() * 0.0
    else:
        me = probs.mean(0)
        if topkgating:
            ce = exp_counts.to(torch.float32) / S
            l_aux = torch.mean(me * ce) * E * E / k
        elif k == 1:
            ce = top1_counts.to(torch.float32) / S
            l_aux = torch.sum(me * ce) * E                 # top1gating
        else:
            ce = top1_counts.to(torch.float32) / S
            l_aux = torch.mean(me * ce) * E * E            # top2gating (the same value, DeepSpeed's rounding)
    return probs, weights, l_aux


def expert_ffn(x: torch.Tensor, w1: torch.Tensor, b1: Optional[torch.Tensor], w2: torch.Tensor,
               b2: Optional[torch.Tensor], activation: str) -> torch.Tensor:
    """One expert: plain (``gelu_tanh``, ``gelu``, ``silu``): ``fc2(act(fc1 x + b1)) + b2`` with
    ``w1 [F, H]``; gated (``swiglu``, ``geglu_tanh``, ``geglu``, ``reglu``): ``down(act(gate x) * up x)``
    with ``w1 = cat([gate, up]) [2F, H]`` (``act`` = silu, gelu_tanh, gelu, relu)."""
    z = F.linear(x, w1, b1)
    if activation in GATED_ACTIVATIONS:
        g, u = z.chunk(2, dim=-1)
        h = elementwise_activation(GATED_ACTIVATIONS[activation], g) * u
    else:
        h = elementwise_activation(activation, z)
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
        # top1gating (use_rts=False) keeps what torch.topk over the 0/1 mask returns (its tie order)
        top_idx = torch.topk(mask1, k=min(C, S), dim=0)[1]
        mask1 = mask1 * torch.zeros_like(mask1).scatter_(0, top_idx, 1)
        loc1 = mask1.cumsum(0) - 1
        loc1_s = (loc1 * mask1).sum(1)
        g = gates * mask1.float()
        combine = torch.einsum("se,sc->sec", g, F.one_hot(loc1_s, C).float())
    else:
        noisy = logits + noise if noise is not None else logits
        idx2 = torch.argmax(noisy.masked_fill(mask1.bool(), float("-inf")), dim=1)
        mask2 = F.one_hot(idx2, E)
        loc1 = mask1.cumsum(0) - 1
        loc2 = mask2.cumsum(0) - 1 + mask1.sum(0, keepdim=True)
        l_aux = torch.mean(me * ce) * E * E
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
