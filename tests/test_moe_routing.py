"""MoE routing without a scan down the rows of a one-hot ``[S*k, E]`` tensor.

DeepSpeed computes capacity positions as ``cumsum(one_hot(experts), dim=0)``; on a GPU that scan runs
over S*k rows with only E (= 4 in MoE-LLaVA) columns of parallelism and cost 5.4 ms of a phi-2 training
step.  The routing paths compute the same positions as ranks in a 1-D sequence (a stable sort by
expert), so no path of a ``MoE`` training step, for any DeepSpeed rule it implements, may run a cumsum
over dim 0 of a 2-D tensor: checked with a dispatch-mode recorder (eager, native routing op present or
not, both backends) and on the aten graphs torch.compile produces (forward and backward).

The positions themselves are checked against a hand-written loop (the rule as DeepSpeed's docs state it).
"""
import itertools

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from mmkernels import MoE, moe_ffn, moe_route, use_backend
from mmkernels.ops.moe import launch
from mmkernels.ops.moe.reference import _claim_positions, capacity_for, route_reference

from conftest import BACKEND_DEVICES, KERNEL_DEVICES
from test_moe import PhiMLP

H, F_, E = 16, 24, 4

# every rule MoE implements: (k, constructor options)
RULES = {
    "top1-rts": (1, {}),                                   # DeepSpeed's default for k = 1
    "top1-no-rts": (1, dict(use_rts=False)),
    "top1-dropless": (1, dict(drop_tokens=False)),
    "top2": (2, {}),                                       # MoE-LLaVA's layer
    "top2-unsampled": (2, dict(top2_2nd_expert_sampling=False)),
    "top2-dropless": (2, dict(drop_tokens=False)),
    "top3-probs": (3, {}),
    "top3-position": (3, dict(drop_policy="position")),
    "top3-dropless": (3, dict(drop_tokens=False)),
}


def _row_scans(calls):
    """The recorded cumsums that scan dim 0 of a tensor with two or more dimensions."""
    return [(shape, dim) for shape, dim in calls if len(shape) >= 2 and dim % len(shape) == 0]


class CumsumRecorder(TorchDispatchMode):
    """Records (input shape, dim) of every aten.cumsum, and the names of the ops seen."""

    def __init__(self):
        super().__init__()
        self.cumsums, self.ops = [], set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        self.ops.add(str(func.overloadpacket))
        if func.overloadpacket in (torch.ops.aten.cumsum, torch.ops.aten.cumsum_):
            dim = args[1] if len(args) > 1 else kwargs["dim"]
            self.cumsums.append((tuple(args[0].shape), dim))
        return func(*args, **kwargs)


def _layer(rule, device="cpu"):
    k, kw = RULES[rule]
    # capacity factor 0.5: tokens are dropped wherever the rule drops
    moe = MoE(H, PhiMLP(H, F_), num_experts=E, k=k, capacity_factor=0.5, min_capacity=0, **kw)
    return moe.to(device).train()


def test_the_recorder_sees_deepspeeds_scan():
    """The check can fail: DeepSpeed's location computation is what it reports."""
    with CumsumRecorder() as rec:
        torch.cumsum(F.one_hot(torch.randint(0, E, (10,)), E), dim=0)
        torch.cumsum(torch.ones(3, 4), dim=-1)
    assert _row_scans(rec.cumsums) == [((10, E), 0)]


@pytest.mark.parametrize("native", [True, False], ids=["native-op", "no-native-op"])
@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
@pytest.mark.parametrize("rule", list(RULES))
def test_training_step_scans_no_one_hot_rows(rule, backend, device, native, monkeypatch):
    """Forward and backward of a default MoE training step, each rule: no cumsum over dim 0 of a 2-D
    tensor, whether the native routing op exists or not (a build without ``_C`` routes in torch)."""
    if native and not launch.NATIVE_ROUTE_OP.runs_on(torch.device(device)):
        pytest.skip(f"the native routing op has no kernel for {device} in this build")
    if not native:   # as a build without the native op: every device takes the torch path
        monkeypatch.setattr(launch.NATIVE_ROUTE_OP, "device_types", frozenset())
    moe = _layer(rule, device)
    x = torch.randn(2, 9, H, device=device, requires_grad=True)
    with use_backend(backend), CumsumRecorder() as rec:
        y, l_aux, counts = moe(x)
        (y.square().sum() + l_aux).backward()
    assert _row_scans(rec.cumsums) == [], rec.cumsums
    if not native:   # the torch routing path ran
        assert "mmkernels.moe_route" not in rec.ops
    assert x.grad is not None and int(counts.sum()) == RULES[rule][0] * 18


def _aten_cumsums(gm, calls):
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target in (torch.ops.aten.cumsum.default,):
            calls.append((tuple(node.args[0].meta["val"].shape), node.args[1]))


@pytest.mark.skipif(not KERNEL_DEVICES, reason="no Triton device")
@pytest.mark.parametrize("rule", ["top1-rts", "top1-dropless", "top2", "top3-position"])
def test_compiled_training_step_scans_no_one_hot_rows(rule):
    """torch.compile(fullgraph=True) traces the torch routing whenever there is a capacity (it may be
    symbolic): its forward and backward aten graphs hold no cumsum over dim 0 of a 2-D tensor."""
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd

    calls, graphs = [], []

    def inspect(gm, example_inputs):
        graphs.append(gm)
        _aten_cumsums(gm, calls)
        return make_boxed_func(gm.forward)

    torch._dynamo.reset()
    device = KERNEL_DEVICES[0] if isinstance(KERNEL_DEVICES[0], str) else KERNEL_DEVICES[0].values[0]
    moe = _layer(rule, device)
    compiled = torch.compile(moe, fullgraph=True, backend=aot_autograd(fw_compiler=inspect, bw_compiler=inspect))
    x = torch.randn(2, 9, H, device=device, requires_grad=True)
    with use_backend("triton"):
        y, l_aux, _ = compiled(x)
        (y.square().sum() + l_aux).backward()
    assert len(graphs) == 2 and _row_scans(calls) == [], calls


# ------------------------------------------------------------------ the positions, against the rule as stated

def _positions_by_loop(idx, order, choice_major):
    """DeepSpeed's positions written as the loop its docs describe: walk the choices (j-major for
    top2gating, a row's choices together for topkgating 'position'), rows in ``order``, and count per
    expert."""
    S, k = idx.shape
    seen = [0] * E
    pos = [[None] * k for _ in range(S)]
    walk = ([(s, j) for j in range(k) for s in order] if choice_major else [(s, j) for s in order for j in range(k)])
    for s, j in walk:
        e = int(idx[s, j])
        pos[s][j] = seen[e]
        seen[e] += 1
    return torch.tensor(pos)


@pytest.mark.parametrize("S,k", [(0, 2), (1, 1), (23, 1), (37, 2), (29, 3), (64, 4)])
def test_claim_positions_are_the_counting_loop(S, k):
    idx = torch.stack([torch.randperm(E)[:k] for _ in range(S)]) if S else torch.empty(0, k, dtype=torch.long)
    order = torch.randperm(S)
    for choice_major in (True, False):
        for token_order in (None, order):
            walk = range(S) if token_order is None else token_order.tolist()
            want = _positions_by_loop(idx, walk, choice_major).reshape(S, k)
            got = _claim_positions(idx, token_order, choice_major, E)
            assert got.is_contiguous() and torch.equal(got, want), (choice_major, token_order is not None)


@pytest.mark.parametrize("policy", ["choice", "position"])
def test_torch_route_keeps_what_the_loop_keeps(policy):
    """route_reference (the native op's fallback and the traced path) against the loop, with drops."""
    S, k, C = 41, 2, 9
    logits = torch.randn(S, E)
    order = torch.randperm(S)
    d = route_reference(logits, k, C, None, order, policy)
    if policy == "choice":
        assert torch.equal(d.indices, torch.topk(logits, k, dim=1).indices)
    want = _positions_by_loop(d.indices, order.tolist(), policy == "choice") < C
    assert torch.equal(d.keep, want)
    r = moe_route(logits, k, C, token_order=order, drop_policy=policy)
    assert torch.equal(r.keep, want) and not bool(want.all())


# ------------------------------------------------------------------ k = 1 random token selection (DeepSpeed's rule)

def _rts_spec(indices, uniform, capacity):
    """DeepSpeed's top1gating(use_rts=True) as its comment states it, written out: expert e keeps, of the
    rows that chose it, the ``capacity`` rows with the largest ``uniform[s, e]`` (distinct draws here)."""
    S = indices.shape[0]
    keep = torch.zeros(S, dtype=torch.bool)
    for e in range(uniform.shape[1]):
        rows = [s for s in range(S) if int(indices[s]) == e]
        rows.sort(key=lambda s: -float(uniform[s, e]))
        keep[rows[:capacity]] = True
    return keep


@pytest.mark.parametrize("S,C", [(29, 3), (29, 0), (40, 9), (7, 12), (1, 1), (0, 2)])
def test_rts_keeps_each_experts_largest_draws(S, C):
    logits = torch.randn(S, E) * 2
    logits[:, 1] += 1.0                                       # expert 1 is over-full
    uniform = (torch.randperm(S * E).float() / (S * E)).view(S, E)   # distinct values: no ties
    r = moe_route(logits, 1, C, rts_uniform=uniform)
    want = _rts_spec(logits.argmax(1), uniform, C)
    assert torch.equal(r.keep[:, 0], want)
    assert torch.equal(r.indices[:, 0], logits.argmax(1))
    probs = torch.softmax(logits, 1)
    assert torch.equal(r.weights[:, 0], probs.gather(1, r.indices)[:, 0] * want)   # raw gate value, as top1gating
    if S:   # top1gating's l_aux: E * sum_e mean_s p[s, e] * (fraction of first choices of e)
        top1_share = F.one_hot(logits.argmax(1), E).double().mean(0)
        torch.testing.assert_close(r.l_aux.double(), (probs.double().mean(0) * top1_share).sum() * E)
    assert torch.equal(r.exp_counts, torch.bincount(logits.argmax(1), minlength=E))
    bounds = r.expert_offsets.tolist()               # kept rows grouped by expert, in row order
    for e in range(E):
        rows = r.sorted_slots[bounds[e]:bounds[e + 1]].tolist()
        assert rows == [s for s in range(S) if want[s] and int(r.indices[s, 0]) == e]
    same = moe_route(logits, 1, C, rts_uniform=uniform, drop_policy="rts")
    assert torch.equal(same.keep, r.keep) and torch.equal(same.sorted_slots, r.sorted_slots)
    assert moe_route(logits, 1, None, rts_uniform=uniform).keep.all()       # dropless keeps every row
    if S == 29 and C == 3:
        assert 0 < int(want.sum()) < S


def test_rts_ties_are_broken_by_deepspeeds_topk_call():
    """Equal draws in an over-full expert: the kept rows are those torch.topk returns from the masked draw,
    DeepSpeed's own call (not token order)."""
    S, C = 12, 4
    logits = torch.randn(S, E)
    logits[:, 2] += 20.0                                      # every row chooses expert 2
    uniform = torch.rand(S, E)
    uniform[:, 2] = 0.5                                       # all tied
    r = moe_route(logits, 1, C, rts_uniform=uniform)
    want = torch.zeros(S, dtype=torch.bool)
    want[torch.topk(F.one_hot(logits.argmax(1), E) * uniform, k=C, dim=0)[1][:, 2]] = True
    assert torch.equal(r.keep[:, 0], want) and int(want.sum()) == C


@pytest.mark.parametrize("drop_tokens", [True, False], ids=["capacity", "dropless"])
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_module_draws_deepspeeds_uniform_and_keeps_what_it_selects(train, drop_tokens):
    """MoE(k=1, use_rts=True) draws torch.rand(S, E) from torch's generator in training and eval, with or
    without drops (as DeepSpeed's top1gating does), routes with it, and leaves the generator where that
    one draw leaves it; use_rts=False draws nothing."""
    S = 30
    moe = MoE(H, PhiMLP(H, F_), num_experts=E, k=1, capacity_factor=0.5, eval_capacity_factor=0.75, min_capacity=0,
              drop_tokens=drop_tokens).train(train)
    x = torch.randn(S, H)
    with use_backend("reference"):
        torch.manual_seed(7)
        y, l_aux, counts = moe(x)
        after = torch.get_rng_state()
        torch.manual_seed(7)
        uniform = torch.rand(S, E)
        assert torch.equal(torch.get_rng_state(), after)
        r = moe_route(F.linear(x, moe.gate_weight), 1, moe.capacity(S), rts_uniform=uniform)
        want = moe_ffn(x, r, moe.w1, moe.b1, moe.w2, moe.b2)
    assert torch.equal(y, want) and torch.equal(l_aux, r.l_aux) and torch.equal(counts, r.exp_counts)
    if drop_tokens:
        assert not bool(r.keep.all())
        assert torch.equal(r.keep[:, 0], _rts_spec(r.indices[:, 0], uniform, moe.capacity(S)))
    moe.use_rts = False
    state = torch.get_rng_state()
    with use_backend("reference"):
        moe(x)
    assert torch.equal(torch.get_rng_state(), state)


def test_rts_uniform_arguments_are_checked():
    logits = torch.randn(8, E)
    with pytest.raises(ValueError, match="rts_uniform .*needs k = 1, got k=2"):
        moe_route(logits, 2, 4, rts_uniform=torch.rand(8, E))
    with pytest.raises(ValueError, match="rts_uniform must have shape"):
        moe_route(logits, 1, 4, rts_uniform=torch.rand(8, E + 1))
    with pytest.raises(TypeError, match="rts_uniform"):
        moe_route(logits, 1, 4, rts_uniform=torch.rand(8, E).long())
    with pytest.raises(ValueError, match="rts_uniform"):
        moe_route(logits, 1, 4, drop_policy="rts")                          # the policy needs the draw
    with pytest.raises(ValueError, match="rts_uniform"):
        moe_route(logits, 1, 4, rts_uniform=torch.rand(8, E), drop_policy="topk_ties")
    with pytest.raises(ValueError, match="token_order"):
        moe_route(logits, 1, 4, token_order=torch.randperm(8), rts_uniform=torch.rand(8, E))


# ------------------------------------------------------------------ DeepSpeed's own gating functions, bit for bit

# (k, DeepSpeed option) -> 12 rules with drop_tokens on and off; x 4 token counts x 2 expert counts x 5 capacity
# factors x 2 min_capacity = 960 configurations
_DS_RULES = [(1, dict(use_rts=True)), (1, dict(use_rts=False)), (2, dict(top2_2nd_expert_sampling=True)),
             (2, dict(top2_2nd_expert_sampling=False)), (3, dict(drop_policy="probs")),
             (3, dict(drop_policy="position"))]


def _deepspeed_gating(sharded_moe, logits, k, cf, min_capacity, drop_tokens, opt, noise):
    """(kept [S, E], weights [S, E], l_aux, exp_counts) from DeepSpeed's top1/top2/topkgating."""
    if k == 1:
        out = sharded_moe.top1gating(logits.clone(), cf, min_capacity, drop_tokens=drop_tokens, use_rts=opt["use_rts"])
    elif k == 2:
        out = sharded_moe.top2gating(logits.clone(), cf, min_capacity, drop_tokens=drop_tokens,
                                     top2_2nd_expert_sampling=opt["top2_2nd_expert_sampling"])
    else:
        out = sharded_moe.topkgating(logits.clone(), k, cf, min_capacity, drop_tokens=drop_tokens,
                                     drop_policy=opt["drop_policy"])
    l_aux, combine, dispatch, exp_counts = out
    return dispatch.any(-1), combine.sum(-1), l_aux, exp_counts


def test_routing_is_deepspeeds_gating_bit_for_bit(monkeypatch):
    """moe_route with the policy MoE picks for each DeepSpeed rule against DeepSpeed 0.19.8's top1gating,
    top2gating and topkgating on 960 configurations (half with a capacity, most of those dropping
    tokens): the kept (token, expert) pairs, the combine weights and l_aux bit for bit, exp_counts, and
    -- for k = 1 random token selection -- the same draw from torch's generator, left in the same state."""
    sharded_moe = pytest.importorskip("deepspeed.moe.sharded_moe", reason="DeepSpeed is not installed (pip install "
                                      "deepspeed==0.19.8); the rule's own tests above still run")
    noise_box = []
    monkeypatch.setattr(sharded_moe, "gumbel_rsample", lambda shape, device: noise_box[0].clone())
    n = dropped = 0
    for (k, opt), drop_tokens, S, num_experts, cf, min_capacity in itertools.product(
            _DS_RULES, (True, False), (5, 17, 33, 64), (4, 8), (0.25, 0.5, 1.0, 1.25, 2.0), (0, 4)):
        logits = torch.randn(S, num_experts) * 2
        logits[:, 0] += 1.0                                   # a popular expert
        noise = -torch.log(-torch.log(torch.rand(S, num_experts).clamp(1e-20, 1 - 1e-7)))
        noise_box[:] = [noise]
        state = torch.get_rng_state()
        kept, weights, l_aux, counts = _deepspeed_gating(sharded_moe, logits, k, cf, min_capacity, drop_tokens, opt,
                                                         noise)
        after = torch.get_rng_state()
        torch.set_rng_state(state)
        kw = {}
        if k == 1 and opt["use_rts"]:
            kw["rts_uniform"] = torch.rand(S, num_experts)    # what MoE draws
        if k == 2 and opt["top2_2nd_expert_sampling"]:
            kw["second_expert_noise"] = noise
        if k == 3:
            kw["drop_policy"] = opt["drop_policy"]
        capacity = capacity_for(S, num_experts, cf, k, min_capacity) if drop_tokens else None
        r = moe_route(logits, k, capacity, **kw)
        where = (k, opt, drop_tokens, S, num_experts, cf, min_capacity)
        assert torch.equal(torch.get_rng_state(), after), where
        ours_kept = torch.zeros(S, num_experts, dtype=torch.bool).scatter(1, r.indices, r.keep)
        ours_weights = torch.zeros(S, num_experts).scatter(1, r.indices, r.weights)
        assert torch.equal(ours_kept, kept), where
        assert torch.equal(ours_weights, weights), where
        assert torch.equal(r.l_aux, l_aux), where
        assert torch.equal(r.exp_counts, counts), where
        n += 1
        dropped += not bool(r.keep.all())
    assert n == 960 and dropped > 200, (n, dropped)   # about 300 of the 480 with a capacity drop tokens
