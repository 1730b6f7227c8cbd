"""Expert parallelism for :class:`~.module.MoE` over ``torch.distributed`` (DeepSpeed's ``ep_size``).

An expert-parallel (EP) group of P ranks shares the E experts: group rank r holds the global experts
``r*L ... (r+1)*L - 1`` (``L = E / P``), as DeepSpeed assigns them.  Every rank routes its own tokens
with the full (replicated) router, sends each kept (token, choice) row to the rank holding its expert,
runs its L local experts on the rows it receives (the fused grouped-GEMM kernels of :func:`moe_ffn`),
sends the results back and combines them with the routing weights.

Two exchanges, each an ``all_to_all_single`` whose backward is the reverse all-to-all:

* **capacity mode** (``drop_tokens=True``): the ``[E, C, H]`` capacity buffer (expert e's kept rows at
  positions ``0 .. count-1``, zero padding after) goes out with *equal* splits, ``L*C`` rows per rank,
  exactly DeepSpeed's ``_AllToAll``; every rank therefore needs the same C, i.e. the same token count
  and train/eval mode (checked first, see :func:`agree_capacity`).  The receiver runs its experts on all ``P*C`` rows
  of each local expert, padding included, as DeepSpeed does.
* **dropless mode**: one small ``all_to_all_single`` of the per-expert row counts ``[E]``, then one
  *uneven* ``all_to_all_single`` of exactly the routed rows (no padding).  The split sizes are host
  integers the collective needs, so this mode reads them on the host once: the one device-to-host
  synchronisation of the layer (both directions' sizes in one read; the backward reuses them).

:func:`expert_parallel_groups` builds DeepSpeed's groups from the default group.
"""
from __future__ import annotations

from typing import Optional

import torch

from .function import MoERouting, moe_ffn, moe_route_topk

try:
    import torch.distributed as dist
except ImportError:   # pragma: no cover - torch built without distributed
    dist = None


def distributed_ready() -> bool:
    """torch.distributed is built and its default process group is initialised."""
    return dist is not None and dist.is_available() and dist.is_initialized()


# (default group, ep_size) -> (the default group, expert-parallel group, expert-data-parallel group).
# One set per ep_size, as DeepSpeed keeps one per group name "ep_size_P": new_group is a collective
# and every MoE layer of a model shares the groups.  The default group is kept in the value so that a
# re-initialised default group (a new object, possibly at a reused id) never hits a stale entry.
_GROUPS: dict = {}


def expert_parallel_groups(ep_size: int):
    """``(ep_group, expert_data_parallel_group)`` of this rank, built as DeepSpeed's
    ``groups._create_expert_and_data_parallel(ep_size)`` builds them from the default group:
    consecutive ranks ``[i*P, (i+1)*P)`` form an expert-parallel group, and the ranks holding the
    same experts (``{j, j+P, j+2P, ...}``) form its expert-data-parallel group.

    A collective (``torch.distributed.new_group``): every rank of the default group must call it, in
    the same order.  The groups are built once per ``ep_size`` and shared by every layer."""
    if not distributed_ready():
        raise ValueError(f"ep_size={ep_size} > 1 needs an initialised torch.distributed default process group "
                         "(call torch.distributed.init_process_group first, or pass ep_group)")
    world = dist.get_world_size()
    if world % ep_size:
        raise ValueError(f"the world size ({world}) must be divisible by ep_size ({ep_size}): ep_group=None "
                         "splits the default group into expert-parallel groups of ep_size consecutive ranks")
    default = dist.group.WORLD
    key = (id(default), ep_size)
    hit = _GROUPS.get(key)
    if hit is not None and hit[0] is default:
        return hit[1], hit[2]
    rank = dist.get_rank()
    ep_group = edp_group = None
    for j in range(ep_size):   # DeepSpeed's order: the expert-data-parallel groups first
        ranks = list(range(j, world, ep_size))
        group = dist.new_group(ranks)
        if rank in ranks:
            edp_group = group
    for i in range(world // ep_size):
        ranks = list(range(i * ep_size, (i + 1) * ep_size))
        group = dist.new_group(ranks)
        if rank in ranks:
            ep_group = group
    _GROUPS[key] = (default, ep_group, edp_group)
    return ep_group, edp_group


def resolve_ep_group(ep_size: int, ep_group):
    """``(ep_group, expert_data_parallel_group, rank in ep_group)`` for ``MoE(ep_size=..., ep_group=...)``;
    ``(None, None, 0)`` for ``ep_size=1``.  Errors name the argument."""
    if dist is not None and ep_group is dist.GroupMember.NON_GROUP_MEMBER:   # new_group() on a rank outside it
        raise ValueError(f"ep_group does not contain this rank (global rank {dist.get_rank()}): pass the group this "
                         "rank belongs to")
    if ep_group is not None and (dist is None or not isinstance(ep_group, dist.ProcessGroup)):
        raise TypeError(f"ep_group must be None or a torch.distributed.ProcessGroup, got {type(ep_group).__name__}")
    if ep_size == 1:
        if ep_group is not None:
            raise ValueError("ep_group is only used with ep_size > 1; got ep_size=1 and a group")
        return None, None, 0
    if ep_group is None:
        group, edp_group = expert_parallel_groups(ep_size)
    else:
        if not distributed_ready():
            raise ValueError(f"ep_size={ep_size} > 1 needs an initialised torch.distributed default process group "
                             "(call torch.distributed.init_process_group first)")
        group, edp_group = ep_group, None   # which ranks hold the same experts is the caller's layout
    size = dist.get_world_size(group)
    if size != ep_size:
        raise ValueError(f"ep_group has {size} ranks but ep_size={ep_size}; the expert-parallel group must have "
                         "ep_size ranks")
    rank = dist.get_rank(group)
    if rank < 0:
        raise ValueError(f"ep_group does not contain this rank (global rank {dist.get_rank()})")
    return group, edp_group, rank


class _AllToAll(torch.autograd.Function):
    """``all_to_all_single`` along dim 0; the backward is the reverse exchange (splits swapped)."""

    @staticmethod
    def forward(ctx, x, group, output_splits, input_splits):
        ctx.group, ctx.output_splits, ctx.input_splits = group, output_splits, input_splits
        x = x.contiguous()
        rows = x.shape[0] if output_splits is None else sum(output_splits)
        out = x.new_empty((rows, *x.shape[1:]))
        dist.all_to_all_single(out, x, output_splits, input_splits, group=group)
        return out

    @staticmethod
    def backward(ctx, grad):
        return _AllToAll.apply(grad, ctx.group, ctx.input_splits, ctx.output_splits), None, None, None


def all_to_all(x: torch.Tensor, group, output_splits: Optional[list] = None,
               input_splits: Optional[list] = None) -> torch.Tensor:
    """Differentiable ``all_to_all_single`` of the rows of ``x``: equal splits when both lists are None
    (DeepSpeed's ``_AllToAll``), else ``input_splits[p]`` rows to rank p and ``output_splits[p]`` from it."""
    return _AllToAll.apply(x, group, output_splits, input_splits)


def agree_capacity(capacity_fn, num_tokens: int, group, device: torch.device) -> int:
    """Capacity mode's precondition, checked before anything is exchanged: every rank of ``group`` has
    the same capacity C (equal-split ``[E, C, H]`` buffers of one size), i.e. the same token count (or
    one that gives the same C) and the same train/eval capacity factor.  ``capacity_fn(num_tokens)``
    gives this rank's C (it may raise, e.g. k = 1 with fewer than ``min_capacity`` tokens); a rank
    without tokens takes the others' C.  Returns C.

    One ``all_reduce`` of three integers and one host read.  Every rank sees the same result, so a
    mismatch, or an error on any rank, raises on all of them, instead of leaving the others waiting
    in a collective (or exchanging mis-sized buffers)."""
    error = None
    capacity = None
    if num_tokens > 0:
        try:
            capacity = int(capacity_fn(num_tokens))
        except (TypeError, ValueError) as e:
            error = e
    big = 2 ** 62
    mine = -1 if capacity is None else capacity
    t = torch.tensor([mine, -(big if capacity is None else capacity), int(error is not None)], dtype=torch.int64,
                     device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    hi, neg_lo, failed = t.tolist()
    if error is not None:
        raise error
    if failed:
        raise ValueError("another rank of the expert-parallel group could not route its tokens (see its error); "
                         "this rank stops too instead of waiting in the exchange")
    if hi < 0:
        return 0   # no rank has tokens
    if hi != -neg_lo:
        raise ValueError(
            f"hidden_states: with drop_tokens=True (capacity mode) every rank of the expert-parallel group must have "
            f"the same capacity C = max(ceil(S / E * capacity_factor * k), min_capacity) (the [E, C, H] buffers are "
            f"exchanged with equal splits, as DeepSpeed does); got C between {-neg_lo} and {hi} (this rank: "
            f"S={num_tokens} tokens, C={capacity}).  Pass the same number of tokens, in the same train/eval mode, on "
            "every rank, or use drop_tokens=False (an uneven exchange)")
    return hi


def gather_experts(t: torch.Tensor, group) -> torch.Tensor:
    """``[L, ...]`` local expert tensors of every rank of ``group`` -> ``[P*L, ...]`` in rank order."""
    t = t.detach().contiguous()
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, t, group=group)
    return torch.cat(parts, 0)


def expert_parallel_ffn(x2: torch.Tensor, routing: MoERouting, w1: torch.Tensor, b1: Optional[torch.Tensor],
                        w2: torch.Tensor, b2: Optional[torch.Tensor], activation: str, group,
                        capacity: Optional[int], out_shape=None) -> torch.Tensor:
    """``y [S, H]``: :func:`moe_ffn`'s result for this rank's rows ``x2 [S, H]`` and ``routing`` (over all E
    experts), with the experts spread over ``group`` (``w1 [L, ...]`` etc. are this rank's L = E / P).

    ``capacity`` None: dropless (uneven exchange, one host read of the split sizes); an int C: capacity
    mode (equal-split exchange of ``[E, C, H]``; C from :func:`agree_capacity`, the routing's own
    capacity when this rank has tokens).  Collective: every rank of ``group`` calls it, in the same
    mode, and (through autograd) its backward.  ``out_shape`` (default ``[S, H]``): the shape of the result,
    which is never a view."""
    S, H = x2.shape
    k = routing.k
    E = routing.num_experts
    P = dist.get_world_size(group)
    L = E // P
    dev = x2.device
    M = S * k
    slots = routing.sorted_slots.long()
    # order[t]: where slot t = s*k + j stands in the expert-sorted order (the inverse permutation)
    slot_ids = torch.arange(M, device=dev)
    order = torch.empty_like(slots).scatter_(0, slots, slot_ids)
    C = capacity
    if C is None:
        # dropless: every slot is kept; row r of the send buffer is the r-th slot in expert order, so the
        # rows for rank p (experts p*L .. p*L+L-1) are one contiguous block, in rank order
        dest = order
        send_rows = x2.index_select(0, torch.div(slots, k, rounding_mode="floor"))
        counts = routing.expert_offsets.diff().to(torch.int64)                  # [E] rows per global expert
        recv_counts = torch.empty_like(counts)                                  # [P, L]: rank p's rows per local expert
        dist.all_to_all_single(recv_counts, counts, group=group)
        # the one device-to-host synchronisation: both directions' split sizes, read together
        splits = torch.cat([counts.view(P, L).sum(1), recv_counts.view(P, L).sum(1)]).tolist()
        send_splits, recv_splits = splits[:P], splits[P:]
        received = all_to_all(send_rows, group, recv_splits, send_splits)
        # received rows come in (source rank, local expert) blocks: name each row's local expert
        R = sum(recv_splits)
        local_expert = torch.arange(L, device=dev).repeat(P).repeat_interleave(recv_counts, output_size=R)
    else:
        # capacity mode (DeepSpeed's layout): slot t goes to row e*C + (its place among expert e's kept
        # slots) of the [E, C, H] buffer; dropped slots to a scratch row E*C that is never sent
        idx = routing.indices.reshape(-1)
        place = order - routing.expert_offsets.to(torch.int64)[idx]
        dest = torch.where(routing.keep.reshape(-1), idx * C + place, E * C)
        source = torch.full((E * C + 1,), S, dtype=torch.int64, device=dev)     # S: the zero padding row
        source.scatter_(0, dest, torch.div(slot_ids, k, rounding_mode="floor"))
        padded = torch.cat([x2, x2.new_zeros((1, H))], 0)
        send_rows = padded.index_select(0, source[:E * C])                      # [E*C, H] = [P, L, C, H]
        send_splits = recv_splits = None
        received = all_to_all(send_rows, group)              # [P, L, C, H]: (source rank, local expert, c)
        local_expert = torch.div(torch.arange(P * L * C, device=dev), C, rounding_mode="floor") % L
    # the local experts: the fused grouped-GEMM FFN over the received rows, one choice per row with
    # weight 1; moe_route_topk groups the rows by local expert (a stable sort) without a host read
    ones = torch.ones((received.shape[0], 1), dtype=torch.float32, device=dev)
    local = moe_route_topk(local_expert[:, None], ones, L, check_metadata=False)
    out = moe_ffn(received, local, w1, b1, w2, b2, activation)
    back = all_to_all(out, group, send_splits, recv_splits)                    # the sender's row order again
    if C is not None:
        back = torch.cat([back, back.new_zeros((1, H))], 0)                     # dropped slots read the zero row
    per_slot = back.index_select(0, dest)                                       # [S*k, H] in slot order
    acc = torch.promote_types(x2.dtype, torch.float32)
    lead = tuple(out_shape[:-1]) if out_shape is not None else (S,)
    y = (per_slot.to(acc) * routing.weights.reshape(M, 1).to(acc)).view(*lead, k, H).sum(-2)
    return y.to(out.dtype)   # the experts' dtype (x2's; under autocast the autocast dtype), as DeepSpeed's combine
