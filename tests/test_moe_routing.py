"""MoE routing without a scan down the rows of a one-hot ``[S*k, E]`` tensor.

DeepSpeed computes capacity positions as ``cumsum(one_hot(experts), dim=0)``; on a GPU that scan runs
over S*k rows with only E (= 4 in MoE-LLaVA) columns of parallelism and cost 5.4 ms of a phi-2 training
step.  The routing paths compute the same positions as ranks in a 1-D sequence (a stable sort by
expert), so no path of a ``MoE`` training step, for any DeepSpeed rule it implements, may run a cumsum
over dim 0 of a 2-D tensor: checked with a dispatch-mode recorder (eager, native routing op present or
not, both backends) and on the aten graphs torch.compile produces (forward and backward).

The positions themselves are checked against a hand-written loop (the rule as DeepSpeed's docs state it).
"""
import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from mmkernels import MoE, moe_route, use_backend
from mmkernels.ops.moe import launch
from mmkernels.ops.moe.reference import _claim_positions, route_reference

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
    if native and not launch.NATIVE_ROUTE:
        pytest.skip("mmkernels._C is not built")
    monkeypatch.setattr(launch, "NATIVE_ROUTE", native)
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
