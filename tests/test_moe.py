"""Mixture of experts (MoE-LLaVA / DeepSpeed MoE): routing, grouped GEMM and the whole layer.

Oracles: the float64 torch reference (``mmkernels.ops.moe.reference``) and a mirror of DeepSpeed's
dense einsum gating/dispatch/combine (``deepspeed_einsum_moe``).  Triton kernels run under the CPU
interpreter when there is no GPU, on tiny shapes (a few 16-row tiles).
"""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import mmkernels
from mmkernels import MoE, grouped_gemm, moe_ffn, moe_route, use_backend
from mmkernels.ops.moe import launch
from mmkernels.ops.moe.function import grouped_gemm_forward_op, moe_ffn_forward_op
from mmkernels.ops.moe.reference import (capacity_for, deepspeed_einsum_moe, expert_ffn, moe_ffn_reference,
                                         route_reference)
from mmkernels.testing import assert_close, compare

from conftest import HAS_CUDA, KERNEL_DEVICES

# The routing op has a C++ kernel for CPU and a CUDA kernel: both are checked against the reference.
ROUTE_DEVICES = ["cpu"] + ([pytest.param("cuda", marks=pytest.mark.gpu)] if HAS_CUDA else [])

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


DT_IDS = lambda d: str(d).split(".")[-1]  # noqa: E731


def gumbel(S, E, device="cpu"):
    return -torch.log(-torch.log(torch.rand(S, E, device=device).clamp(1e-20, 1 - 1e-7)))


def make_weights(E, H, F, activation, dtype, device, bias=True):
    F1 = 2 * F if activation == "swiglu" else F
    w1 = (torch.randn(E, F1, H, device=device) / H**0.5).to(dtype)
    w2 = (torch.randn(E, H, F, device=device) / F**0.5).to(dtype)
    has_bias = bias and activation == "gelu_tanh"
    b1 = (torch.randn(E, F1, device=device) * 0.1).to(dtype) if has_bias else None
    b2 = (torch.randn(E, H, device=device) * 0.1).to(dtype) if has_bias else None
    return w1, b1, w2, b2


def run_layer(x, wg, weights, activation, k, capacity, noise, backend, order=None):
    """Router + moe_ffn on leaf copies; returns (y, l_aux, routing, leaves)."""
    leaves = [t.clone().requires_grad_() if t is not None else None for t in (x, wg, *weights)]
    logits = F.linear(leaves[0].float(), leaves[1].float())
    r = moe_route(logits, k, capacity, noise, order)
    with use_backend(backend):
        y = moe_ffn(leaves[0], r, *leaves[2:], activation=activation)
    return y, r, leaves


def check_layer_vs_float64(x, wg, weights, activation, k, capacity, noise, dtype, backend="triton",
                           check_router=True, order=None):
    y, r, leaves = run_layer(x, wg, weights, activation, k, capacity, noise, backend, order)
    gy = torch.randn_like(y)
    ((y.float() * gy.float()).sum() + r.l_aux * 3.0).backward()
    refs = [t.detach().double().requires_grad_() if t is not None else None for t in (x, wg, *weights)]
    logits = F.linear(refs[0], refs[1]).float()   # same fp32 routing decisions as the kernel path
    r2 = moe_route(logits, k, capacity, noise, order)
    assert torch.equal(r2.indices, r.indices) and torch.equal(r2.keep, r.keep)
    y_ref = moe_ffn_reference(refs[0], r2.weights.double(), r2.sorted_slots, r2.expert_offsets, *refs[2:],
                              activation)
    ((y_ref * gy.double()).sum() + r2.l_aux.double() * 3.0).backward()
    assert_close("y", y, y_ref, dtype)
    for name, got, ref in zip(("dx", "dWg", "dw1", "db1", "dw2", "db2"), leaves, refs):
        if got is not None and name != "dWg":
            assert got.grad is not None, name
            assert_close(name, got.grad, ref.grad, dtype)
    if check_router:
        # The router gradient goes through the softmax backward, whose cancellation amplifies the
        # rounding of the expert outputs: hold it to 2x the error of torch's own low-precision math
        # (flash-attention's rule), or the dtype tolerance, whichever is looser.
        y_t, r_t, torch_leaves = run_layer(x, wg, weights, activation, k, capacity, noise, "reference", order)
        ((y_t.float() * gy.float()).sum() + r_t.l_aux * 3.0).backward()
        ref_wg = refs[1].grad
        c_torch = compare("dWg", torch_leaves[1].grad, ref_wg, dtype)
        c = compare("dWg", leaves[1].grad, ref_wg, dtype)
        limit_rms = max(c.tolerance.rms_err, 2 * c_torch.rms_err)
        limit_max = max(c.tolerance.max_err, 2 * c_torch.max_err)
        assert c.rms_err <= limit_rms and c.max_err <= limit_max, f"{c} (torch {dtype}: {c_torch})"
    return y, r


# ------------------------------------------------------------------------------------------ routing

ROUTE_CASES = [  # (S, E, k, capacity factor or None)
    (33, 4, 2, 1.5), (37, 8, 2, 0.5), (50, 4, 2, None), (64, 8, 1, 1.0), (29, 4, 1, 0.5), (40, 6, 3, 1.0),
    (1, 4, 2, 1.5), (0, 4, 2, 1.5), (20, 1, 1, 1.0),
]


@pytest.mark.parametrize("device", ROUTE_DEVICES)
@pytest.mark.parametrize("S,E,k,cf", ROUTE_CASES + [(5000, 8, 2, 1.0)], ids=lambda v: str(v))
def test_route_op_matches_reference(S, E, k, cf, device):
    """The routing op (native if built, else the torch fallback) equals the torch reference exactly."""
    logits = torch.randn(S, E, device=device) * 2
    noise = gumbel(S, E, device)
    cap = capacity_for(S, E, cf, k, 0) if cf is not None else -1
    for order in (None, torch.randperm(S, device=device)):
        got = launch.route(logits, k, cap, noise if k > 1 else None, order)
        want = route_reference(logits, k, None if cap < 0 else cap, noise if k > 1 else None, order)
        names = ("indices", "keep", "exp_counts", "top1_counts", "sorted_slots", "expert_offsets")
        for name, a, b in zip(names, got, (want.indices, want.keep, want.exp_counts, want.top1_counts,
                                           want.sorted_slots, want.expert_offsets)):
            assert a.dtype == b.dtype and torch.equal(a, b), name
        assert int(got[2].sum()) == k * S


@pytest.mark.parametrize("k", [1, 2])
@pytest.mark.parametrize("S,E,cf", [(33, 4, 1.5), (37, 8, 0.5), (64, 4, 1.0), (50, 8, 2.0)])
def test_layer_matches_deepspeed_einsum(S, E, cf, k):
    """Output, l_aux and exp_counts equal DeepSpeed's dense einsum formulation (incl. dropped tokens)."""
    H, F_ = 24, 40
    x = torch.randn(S, H, dtype=torch.float64)
    wg = torch.randn(E, H, dtype=torch.float64)
    w1, b1, w2, b2 = make_weights(E, H, F_, "gelu_tanh", torch.float64, "cpu")
    noise = gumbel(S, E) if k == 2 else None
    cap = capacity_for(S, E, cf, k, 0)
    experts = [lambda t, e=e: expert_ffn(t, w1[e], b1[e], w2[e], b2[e], "gelu_tanh") for e in range(E)]
    y_ds, l_ds, c_ds = deepspeed_einsum_moe(x, wg, experts, k, cap, noise)
    r = moe_route(F.linear(x.float(), wg.float()), k, cap, noise)
    with use_backend("reference"):
        y = moe_ffn(x, r, w1, b1, w2, b2)
    torch.testing.assert_close(y, y_ds, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(r.l_aux, l_ds.float(), rtol=1e-6, atol=1e-7)
    assert torch.equal(r.exp_counts, c_ds)
    if cf <= 1.0:
        assert not bool(r.keep.all()), "case meant to drop tokens"


def test_route_invariants():
    S, E = 64, 4
    # perfect balance: row s prefers expert s % E with the same margin -> mean p = 1/E, top-1 fraction 1/E
    logits = 3.0 * F.one_hot(torch.arange(S) % E, E).float()
    r = moe_route(logits, 2, None, gumbel(S, E))
    torch.testing.assert_close(r.l_aux, torch.tensor(1.0), rtol=1e-6, atol=1e-6)
    assert int(r.exp_counts.sum()) == 2 * S and int(r.top1_counts.sum()) == S
    # MoE-LLaVA eval: E=4, k=2, eval_capacity_factor=2.0 -> C = S, nothing is ever dropped
    for trial in range(5):
        logits = torch.randn(S + trial, E) * 5
        logits[:, 0] += 10  # even when every first choice is expert 0
        r = moe_route(logits, 2, capacity_for(S + trial, E, 2.0, 2, 0), gumbel(S + trial, E))
        assert bool(r.keep.all())
        torch.testing.assert_close(r.weights.sum(1), torch.ones(S + trial))


def test_route_priority_rules():
    """First choices outrank every second choice; earlier rows outrank later ones; token_order overrides."""
    E, C = 2, 3
    logits = torch.tensor([[2.0, 1.0]] * 4 + [[1.0, 2.0]] * 2)     # 4 first choices to expert 0
    r = moe_route(logits, 2, C)
    assert r.keep[:, 0].tolist() == [True, True, True, False, True, True]
    # 2nd choices queue behind ALL first choices: expert 1 has 2 first choices, so only row 0's fits
    assert r.keep[:, 1].tolist() == [True, False, False, False, False, False]
    torch.testing.assert_close(r.weights[1], torch.tensor([1.0, 0.0]))      # the only survivor weighs 1
    torch.testing.assert_close(r.weights[3], torch.tensor([0.0, 0.0]))      # both dropped: output 0
    order = torch.tensor([5, 4, 3, 2, 1, 0])
    r = moe_route(logits, 2, C, token_order=order)
    assert r.keep[:, 0].tolist() == [False, True, True, True, True, True]
    # k = 1: raw gate value, no renormalisation (DeepSpeed top1gating); dropped rows weigh 0.  Token order
    # is drop_policy="choice" (the default for k = 1 is DeepSpeed's torch.topk tie order, "topk_ties")
    r = moe_route(logits, 1, 2, drop_policy="choice")
    p = torch.softmax(logits, 1)
    torch.testing.assert_close(r.weights[:, 0], p.max(1).values * r.keep[:, 0])
    assert r.keep[:, 0].tolist() == [True, True, False, False, True, True]


def test_route_torch_fallback(monkeypatch):
    """Without the native op, moe_route runs the torch reference (same results)."""
    logits, noise = torch.randn(30, 4), gumbel(30, 4)
    want = moe_route(logits, 2, 12, noise)
    monkeypatch.setattr(launch.NATIVE_ROUTE_OP, "device_types", frozenset())
    got = moe_route(logits, 2, 12, noise)
    for name in ("indices", "keep", "exp_counts", "top1_counts", "sorted_slots", "expert_offsets", "weights", "l_aux"):
        assert torch.equal(getattr(got, name), getattr(want, name)), name


@pytest.mark.parametrize("device", ROUTE_DEVICES)
def test_route_nan_row(device):
    logits = torch.randn(20, 4, device=device)
    logits[7] = float("nan")
    noise = gumbel(20, 4, device)
    got = launch.route(logits, 2, 8, noise, None)
    want = route_reference(logits, 2, 8, noise)
    assert torch.equal(got[0], want.indices)  # torch.argmax semantics: the first NaN wins
    assert torch.equal(got[1], want.keep) and torch.equal(got[4], want.sorted_slots)


# ------------------------------------------------------------------------------------------ grouped GEMM

@pytest.mark.parametrize("device", KERNEL_DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
def test_grouped_gemm_matches_reference(device, dtype):
    M, K, N = 45, 40, 36
    offsets = torch.tensor([0, 20, 20, 37, 41], device=device)  # an empty group, rows 41.. outside
    a = torch.randn(M, K, device=device, dtype=dtype)
    b = (torch.randn(4, N, K, device=device) / K**0.5).to(dtype)
    bias = torch.randn(4, N, device=device, dtype=dtype)
    leaves = [t.clone().requires_grad_() for t in (a, b, bias)]
    with use_backend("triton"):
        c = grouped_gemm(leaves[0], leaves[1], offsets, leaves[2])
    gc = torch.randn_like(c)
    c.backward(gc)
    refs = [t.detach().double().requires_grad_() for t in (a, b, bias)]
    with use_backend("reference"):
        c_ref = grouped_gemm(refs[0], refs[1], offsets, refs[2])
    c_ref.backward(gc.double())
    assert_close("c", c, c_ref, dtype)
    assert torch.count_nonzero(c[41:]) == 0
    for name, got, ref in zip(("da", "db", "dbias"), leaves, refs):
        assert_close(name, got.grad, ref.grad, dtype)
    assert torch.count_nonzero(leaves[1].grad[1]) == 0  # the empty group's weight gradient is zero


# ------------------------------------------------------------------------------------------ moe_ffn

@pytest.mark.parametrize("device", KERNEL_DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
@pytest.mark.parametrize("activation", ["gelu_tanh", "swiglu"])
@pytest.mark.parametrize("mode", ["capacity", "dropless"])
def test_moe_ffn_triton_matches_reference(device, dtype, activation, mode):
    S, H, F_, E, k = 37, 40, 24, 4, 2
    x = torch.randn(S, H, device=device, dtype=dtype)
    wg = torch.randn(E, H, device=device)
    weights = make_weights(E, H, F_, activation, dtype, device)
    cap = capacity_for(S, E, 0.5, k, 0) if mode == "capacity" else None
    _, r = check_layer_vs_float64(x, wg, weights, activation, k, cap, gumbel(S, E, device), dtype)
    if mode == "capacity":
        assert not bool(r.keep.all())


@pytest.mark.parametrize("device", KERNEL_DEVICES)
@pytest.mark.parametrize("case", ["S1", "S0", "one_expert_takes_all", "k1_rts", "k3", "all_dropped"])
def test_moe_ffn_edge_cases(device, case):
    dtype, H, F_, E = torch.float32, 32, 16, 4
    S, k, cf = {"S1": (1, 2, 1.5), "S0": (0, 2, 1.5), "one_expert_takes_all": (40, 2, 4.0),
                "k1_rts": (33, 1, 0.5), "k3": (21, 3, 1.0), "all_dropped": (21, 2, 1.0)}[case]
    x = torch.randn(S, H, device=device, dtype=dtype)
    wg = torch.randn(E, H, device=device)
    if case == "one_expert_takes_all":
        x = x.abs() + 0.1
        wg[2] = 5.0   # expert 2 is every first choice, expert 3 only ever a second choice or nothing
        wg[3] = -5.0
    weights = make_weights(E, H, F_, "gelu_tanh", dtype, device)
    # all_dropped: dx is the router's (l_aux's) gradient alone, exactly 0 up to rounding when every expert
    # is the first choice of as many tokens: S = 21 cannot split evenly over E = 4
    cap = capacity_for(S, E, cf, k, 0) if case != "all_dropped" else 0
    if case == "S0":
        y, r, leaves = run_layer(x, wg, weights, "gelu_tanh", k, cap, None, "triton")
        assert y.shape == (0, H)
        (y.sum() + r.l_aux).backward()
        assert all(t.grad is not None for t in leaves if t is not None)
        return
    order = torch.randperm(S, device=device) if case == "k1_rts" else None   # k = 1: fused combine
    noise = gumbel(S, E, device) if k == 2 else None
    # a saturated softmax makes the router gradient pure rounding noise in the one-expert case
    _, r = check_layer_vs_float64(x, wg, weights, "gelu_tanh", k, cap, noise, dtype,
                                  check_router=case != "one_expert_takes_all", order=order)
    if case == "k1_rts":
        assert not bool(r.keep.all())
    if case == "all_dropped":
        assert not bool(r.keep.any()) and int(r.expert_offsets[-1]) == 0
    if case == "one_expert_takes_all":
        assert int(r.top1_counts[2]) == S and int(r.exp_counts[0] + r.exp_counts[1] + r.exp_counts[3]) == S


@pytest.mark.parametrize("device", KERNEL_DEVICES)
def test_triton_is_bitwise_deterministic(device):
    """No atomics: two runs give the same bits, forward and backward."""
    S, H, F_, E = 45, 32, 16, 4
    x = torch.randn(S, H, device=device, dtype=torch.bfloat16)
    wg = torch.randn(E, H, device=device)
    weights = make_weights(E, H, F_, "swiglu", torch.bfloat16, device)
    noise = gumbel(S, E, device)
    runs = []
    for _ in range(2):
        y, r, leaves = run_layer(x, wg, weights, "swiglu", 2, 20, noise, "triton")
        (y.float().square().sum() + r.l_aux).backward()
        runs.append([y] + [t.grad for t in leaves if t is not None])
    for a, b in zip(*runs):
        assert torch.equal(a, b)


@pytest.mark.parametrize("backend", ["reference", pytest.param("triton", marks=pytest.mark.skipif(
    not KERNEL_DEVICES, reason="no Triton device"))])
def test_nan_row_only_poisons_its_own_output(backend):
    device = KERNEL_DEVICES[0] if backend == "triton" else "cpu"
    device = getattr(device, "values", [device])[0]
    S, H, F_, E = 40, 32, 16, 4
    x = torch.randn(S, H, device=device)
    x[11, 3] = float("nan")
    wg = torch.randn(E, H, device=device)
    weights = make_weights(E, H, F_, "gelu_tanh", torch.float32, device)
    y, r, _ = run_layer(x, wg, weights, "gelu_tanh", 2, None, gumbel(S, E, device), backend)
    bad = ~torch.isfinite(y).all(1)
    assert bad.tolist() == [i == 11 for i in range(S)]


# ------------------------------------------------------------------------------------------ module

class PhiMLP(nn.Module):
    def __init__(self, H, F_, dtype=torch.float32):
        super().__init__()
        self.fc1 = nn.Linear(H, F_, dtype=dtype)
        self.fc2 = nn.Linear(F_, H, dtype=dtype)
        self.act = nn.GELU(approximate="tanh")

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class StableLMMLP(nn.Module):
    def __init__(self, H, F_, dtype=torch.float32):
        super().__init__()
        self.gate_proj = nn.Linear(H, F_, bias=False, dtype=dtype)
        self.up_proj = nn.Linear(H, F_, bias=False, dtype=dtype)
        self.down_proj = nn.Linear(F_, H, bias=False, dtype=dtype)
        self.act_fn = nn.SiLU()

    def forward(self, x):
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class QwenMLP(nn.Module):
    def __init__(self, H, F_, dtype=torch.float32):
        super().__init__()
        self.w1 = nn.Linear(H, F_, bias=False, dtype=dtype)
        self.w2 = nn.Linear(H, F_, bias=False, dtype=dtype)
        self.c_proj = nn.Linear(F_, H, bias=False, dtype=dtype)

    def forward(self, x):
        return self.c_proj(self.w1(x) * F.silu(self.w2(x)))


FORMS = {"phi": PhiMLP, "stablelm": StableLMMLP, "qwen": QwenMLP}


class FakeDeepSpeedMoE(nn.Module):
    """The attribute/key layout of ``deepspeed.moe.layer.MoE`` (DeepSpeed is not a test dependency)."""

    def __init__(self, H, expert, E, k, cf, ecf, min_capacity):
        super().__init__()
        self.num_experts, self.ep_size, self.use_residual = E, 1, False
        self.deepspeed_moe = nn.Module()
        gate = nn.Module()
        gate.wg = nn.Linear(H, E, bias=False).float()
        gate.k, gate.capacity_factor, gate.eval_capacity_factor, gate.min_capacity = k, cf, ecf, min_capacity
        gate.noisy_gate_policy, gate.drop_tokens, gate.use_rts, gate.top2_2nd_expert_sampling = None, True, True, True
        self.deepspeed_moe.gate = gate
        self.deepspeed_moe.experts = nn.Module()
        self.deepspeed_moe.experts.deepspeed_experts = nn.ModuleList([copy.deepcopy(expert) for _ in range(E)])
        with torch.no_grad():
            for ex in self.deepspeed_moe.experts.deepspeed_experts:  # distinct experts
                for p in ex.parameters():
                    p.add_(torch.randn_like(p) * 0.1)


@pytest.mark.parametrize("form", list(FORMS))
def test_from_deepspeed_and_state_dict(form):
    H, F_, E, S = 24, 32, 4, 30
    ds = FakeDeepSpeedMoE(H, FORMS[form](H, F_), E, 2, 1.5, 2.0, 0).train()
    moe = MoE.from_deepspeed(ds)
    assert moe.training and moe.k == 2 and moe.capacity_factor == 1.5 and moe.min_capacity == 0
    x = torch.randn(S, H)
    noise = gumbel(S, E)
    experts = list(ds.deepspeed_moe.experts.deepspeed_experts)
    y_ds, l_ds, c_ds = deepspeed_einsum_moe(x, ds.deepspeed_moe.gate.wg.weight, experts, 2,
                                            capacity_for(S, E, 1.5, 2, 0), noise)
    y, l_aux, counts = moe(x.view(2, 15, H), second_expert_noise=noise)
    torch.testing.assert_close(y.view(S, H), y_ds, rtol=2e-5, atol=2e-5)
    torch.testing.assert_close(l_aux, l_ds)
    assert torch.equal(counts, c_ds)
    # DeepSpeed key layout under a parent prefix (as in a MoE-LLaVA checkpoint), then our own round trip
    parent = nn.Module()
    parent.mlp = MoE(H, FORMS[form](H, F_), num_experts=E, k=2)
    parent.load_state_dict({f"mlp.{k}": v for k, v in ds.state_dict().items()})
    for name, p in moe.named_parameters():
        assert torch.equal(p, getattr(parent.mlp, name)), name
    fresh = MoE(H, FORMS[form](H, F_), num_experts=E, k=2)
    fresh.load_state_dict(moe.state_dict())
    again = MoE(H, FORMS[form](H, F_), num_experts=E, k=2)
    again.load_state_dict(fresh.deepspeed_state_dict())
    assert set(fresh.deepspeed_state_dict()) == set(ds.state_dict())
    for name, p in moe.named_parameters():
        assert torch.equal(p, getattr(again, name)), name


@pytest.mark.parametrize("form", list(FORMS))
def test_identical_experts_equal_dense_ffn(form):
    """Sparse upcycling: a fresh MoE (every expert a copy of the FFN) with no drops is the dense FFN."""
    H, F_ = 24, 32
    ffn = FORMS[form](H, F_).double()
    moe = MoE(H, ffn, num_experts=4, k=2, capacity_factor=1.5, eval_capacity_factor=2.0, min_capacity=0).double()
    moe.gate_weight.data = moe.gate_weight.data.float()
    moe.eval()
    x = torch.randn(3, 11, H, dtype=torch.float64)
    y, l_aux, counts = moe(x)
    torch.testing.assert_close(y, ffn(x))
    assert int(counts.sum()) == 2 * 33


@pytest.mark.parametrize("device", KERNEL_DEVICES)
@pytest.mark.parametrize("form", ["phi", "stablelm"])
def test_module_triton_matches_reference_backend(device, form):
    H, F_, E = 32, 48, 4
    moe = MoE(H, FORMS[form](H, F_), num_experts=E, k=2, capacity_factor=1.0, min_capacity=0).to(device).train()
    with torch.no_grad():
        for p in (moe.w1, moe.w2):
            p.add_(torch.randn_like(p) * 0.1)
    x = torch.randn(2, 19, H, device=device)
    noise = gumbel(38, E, device)
    outs = {}
    for backend in ("triton", "reference"):
        moe.zero_grad()
        xb = x.clone().requires_grad_()
        with use_backend(backend):
            y, l_aux, counts = moe(xb, second_expert_noise=noise)
        (y.square().sum() + l_aux).backward()
        outs[backend] = (y, l_aux, counts, xb.grad, *[p.grad.clone() for p in moe.parameters()])
    for a, b in zip(outs["triton"], outs["reference"]):
        if a.is_floating_point():
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
        else:
            assert torch.equal(a, b)


def test_module_rts_uses_torch_generator():
    H = 16
    moe = MoE(H, PhiMLP(H, 32), num_experts=4, k=1, capacity_factor=0.5, min_capacity=0)
    x = torch.randn(40, H)
    torch.manual_seed(1)
    y1, _, _ = moe(x)
    torch.manual_seed(1)
    y2, _, _ = moe(x)
    torch.manual_seed(2)
    y3, _, _ = moe(x)
    assert torch.equal(y1, y2) and not torch.equal(y1, y3)
    keep_order = MoE(H, PhiMLP(H, 32), num_experts=4, k=1, capacity_factor=0.5, min_capacity=0, use_rts=False)
    keep_order.load_state_dict(moe.state_dict())
    r = keep_order.route(x)
    assert torch.equal(r.indices, route_reference(F.linear(x, moe.gate_weight), 1, keep_order.capacity(40)).indices)


# ------------------------------------------------------------------------------------------ errors

def test_bad_inputs_name_the_argument():
    logits = torch.randn(8, 4)
    with pytest.raises(ValueError, match="k must be in"):
        moe_route(logits, 5)
    with pytest.raises(ValueError, match="second_expert_noise"):
        moe_route(logits, 2, None, torch.randn(8, 3))
    with pytest.raises(TypeError, match="logits"):
        moe_route(logits.long(), 2)
    with pytest.raises(ValueError, match="capacity"):
        moe_route(logits, 2, -1)
    r = moe_route(logits, 2)
    w1, b1, w2, b2 = make_weights(4, 16, 8, "gelu_tanh", torch.float32, "cpu")
    x = torch.randn(8, 16)
    with pytest.raises(ValueError, match="w2"):
        moe_ffn(x, r, w1, b1, w2[:, :, :4], b2)
    with pytest.raises(ValueError, match="w1"):
        moe_ffn(torch.randn(8, 12), r, w1, b1, w2, b2)
    with pytest.raises(TypeError, match="w1"):
        moe_ffn(x, r, w1.half(), b1, w2, b2)
    with pytest.raises(ValueError, match="rows"):
        moe_ffn(torch.randn(9, 16), r, w1, b1, w2, b2)
    with pytest.raises(ValueError, match="device"):
        moe_ffn(x, r, w1.to("meta"), b1, w2, b2)
    with pytest.raises(ValueError, match="activation"):
        moe_ffn(x, r, w1, b1, w2, b2, activation="relu")
    with pytest.raises(ValueError, match="group_offsets"):
        grouped_gemm(x, torch.randn(3, 4, 16), torch.tensor([0, 8]))
    with pytest.raises(ValueError, match="k must be in"):
        MoE(16, PhiMLP(16, 8), num_experts=2, k=3)
    with pytest.raises(ValueError, match="capacity_factor"):
        MoE(16, PhiMLP(16, 8), num_experts=2, capacity_factor=0.0)
    with pytest.raises(ValueError, match="unsupported expert module"):
        MoE(16, nn.Sequential(nn.Linear(16, 8), nn.Linear(8, 16)), num_experts=2)
    with pytest.raises(ValueError, match="activation"):
        bad = PhiMLP(16, 8)
        bad.act = nn.ReLU()
        MoE(16, bad, num_experts=2)
    with pytest.raises(ValueError, match="ep_size=2 > 1 needs an initialised torch.distributed"):
        MoE(16, PhiMLP(16, 8), num_experts=4, ep_size=2)   # expert parallelism: test_moe_expert_parallel.py
    for kw, name in ((dict(use_residual=True), "use_residual"),
                     (dict(noisy_gate_policy="Jitter"), "noisy_gate_policy"), (dict(use_tutel=True), "use_tutel"),
                     (dict(enable_expert_tensor_parallelism=True), "enable_expert_tensor_parallelism")):
        with pytest.raises(NotImplementedError, match=name):
            MoE(16, PhiMLP(16, 8), num_experts=4, **kw)


# ------------------------------------------------------------------------------------------ registration

@pytest.mark.parametrize("device", KERNEL_DEVICES)
def test_opcheck(device):
    S, H, F_, E, k = 20, 32, 16, 4, 2
    x = torch.randn(S, H, device=device)
    r = moe_route(torch.randn(S, E, device=device), k)  # dropless: every row of z/h/o is written
    w1, b1, w2, b2 = make_weights(E, H, F_, "gelu_tanh", torch.float32, device)
    weights = r.weights.detach().clone().requires_grad_()
    xt = torch.randn(H, S, device=device).t().requires_grad_()  # permuted strides
    for xx in (x.requires_grad_(), xt):
        torch.library.opcheck(moe_ffn_forward_op, (xx, weights, r.keep, r.sorted_slots, r.expert_offsets,
                                                   w1.requires_grad_(), b1, w2.requires_grad_(), b2, "gelu_tanh"))
    a = torch.randn(S, H, device=device, requires_grad=True)
    b = torch.randn(3, 16, H, device=device).transpose(1, 2).contiguous().transpose(1, 2).requires_grad_()
    torch.library.opcheck(grouped_gemm_forward_op, (a, b, None, torch.tensor([0, 5, 5, 20], dtype=torch.int32,
                                                                                device=device)))
    if launch.NATIVE_ROUTE_OP.runs_on(torch.device(device)):
        torch.library.opcheck(torch.ops.mmkernels.moe_route.default,
                              (torch.randn(S, E, device=device), 2, 8, torch.randn(S, E, device=device), None))


@pytest.mark.parametrize("device", KERNEL_DEVICES)
def test_torch_compile_fullgraph(device):
    S, H, F_, E = 24, 32, 16, 4
    x = torch.randn(S, H, device=device)
    wg = torch.randn(E, H, device=device)
    w1, b1, w2, b2 = make_weights(E, H, F_, "gelu_tanh", torch.float32, device)
    noise = gumbel(S, E, device)

    def layer(x, wg, w1, b1, w2, b2):
        r = moe_route(F.linear(x, wg), 2, 12, noise)
        return moe_ffn(x, r, w1, b1, w2, b2), r.l_aux

    with use_backend("triton"):
        want = layer(x, wg, w1, b1, w2, b2)
        if not launch.NATIVE_ROUTE_OP.runs_on(x.device):
            pytest.skip("the torch routing fallback has data-dependent shapes (bincount); build mmkernels._C")
        got = torch.compile(layer, fullgraph=True, backend="aot_eager")(x, wg, w1, b1, w2, b2)
    torch.testing.assert_close(got[0], want[0])
    torch.testing.assert_close(got[1], want[1])


def test_from_deepspeed_leaves_the_random_stream_alone():
    """Converting a layer draws nothing from torch's generator: a converted model's dropout and Gumbel
    samples continue where the unconverted model's would."""
    ds = FakeDeepSpeedMoE(24, FORMS["phi"](24, 32), 4, 2, 1.5, 2.0, 0)
    state = torch.get_rng_state()
    moe = MoE.from_deepspeed(ds)
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(moe.gate_weight, ds.deepspeed_moe.gate.wg.weight)
