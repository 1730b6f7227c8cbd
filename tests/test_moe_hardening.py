"""MoE ops and routing hardening: metadata validation, DeepSpeed drop policies, symbolic
capacity under torch.compile, empty shapes, int64 offsets, double backward and frozen inputs.

External oracles: DeepSpeed's own ``TestTopkGate`` vectors (``tests/unit/moe/test_moe.py``,
``topkgating`` with ``drop_policy='probs'`` / ``'position'``) and DeepSpeed's ``_capacity`` formula
(float32 torch arithmetic).  Crash-prone cases (kernels reading out of bounds) run in one subprocess.
"""
import dataclasses
import itertools
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mmkernels import MoE, grouped_gemm, moe_ffn, moe_route, use_backend
from mmkernels._library import DoubleBackwardError
from mmkernels.ops.moe import function as moe_function
from mmkernels.ops.moe.function import MoERouting
from mmkernels.ops.moe.reference import capacity_for, moe_ffn_reference
from mmkernels.testing import assert_close

from conftest import KERNEL_DEVICES

needs_triton = pytest.mark.skipif(not KERNEL_DEVICES, reason="no Triton device")


def make_weights(E, H, F_, dtype=torch.float32, bias=True):
    w1 = torch.randn(E, F_, H, dtype=dtype) / H ** 0.5
    w2 = torch.randn(E, H, F_, dtype=dtype) / max(F_, 1) ** 0.5
    b1 = torch.randn(E, F_, dtype=dtype) * 0.1 if bias else None
    b2 = torch.randn(E, H, dtype=dtype) * 0.1 if bias else None
    return w1, b1, w2, b2


class Phi(nn.Module):
    def __init__(self, H, F_):
        super().__init__()
        self.fc1 = nn.Linear(H, F_)
        self.fc2 = nn.Linear(F_, H)
        self.act = nn.GELU(approximate="tanh")

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


# ------------------------------------------------------------------ crash-prone cases (subprocess)

_CRASH_SCRIPT = r'''
import torch
from mmkernels import grouped_gemm, moe_ffn, moe_route, use_backend
from mmkernels.ops.moe.function import MoERouting
import dataclasses

def expect_value_error(name, fn, word):
    try:
        fn()
    except ValueError as e:
        assert word in str(e), (name, str(e))
        print("OK", name, flush=True)
    else:
        print("NO-ERROR", name, flush=True)

a, b = torch.randn(10, 16), torch.randn(3, 32, 16)
for backend in ("triton", "reference"):
    with use_backend(backend):
        expect_value_error(f"gg-past-end-{backend}", lambda: grouped_gemm(a, b, torch.tensor([0, 4, 8, 14])),
                           "group_offsets")
        expect_value_error(f"gg-non-monotone-{backend}", lambda: grouped_gemm(a, b, torch.tensor([0, 6, 4, 10])),
                           "group_offsets")
        expect_value_error(f"gg-negative-{backend}", lambda: grouped_gemm(a, b, torch.tensor([0, -3, 4, 10])),
                           "group_offsets")
        expect_value_error(f"gg-nonzero-start-{backend}", lambda: grouped_gemm(a, b, torch.tensor([2, 4, 6, 10])),
                           "group_offsets")

S, H, F, E, k = 6, 16, 16, 4, 2
x = torch.randn(S, H)
w1, w2 = torch.randn(E, F, H), torch.randn(E, H, F)
r = moe_route(torch.randn(S, E), k, None)
slots = r.sorted_slots.clone()
slots[3] = 10 ** 6
bad_slots = dataclasses.replace(r, sorted_slots=slots)
neg = r.sorted_slots.clone()
neg[0] = -5
neg_slots = dataclasses.replace(r, sorted_slots=neg)
offs = r.expert_offsets.clone()
offs[-1] = S * k + 7
bad_offsets = dataclasses.replace(r, expert_offsets=offs)
for backend in ("triton", "reference"):
    with use_backend(backend):
        expect_value_error(f"ffn-slot-out-of-range-{backend}", lambda: moe_ffn(x, bad_slots, w1, None, w2, None),
                           "routing.sorted_slots")
        expect_value_error(f"ffn-negative-slot-{backend}", lambda: moe_ffn(x, neg_slots, w1, None, w2, None),
                           "routing.sorted_slots")
        expect_value_error(f"ffn-offsets-past-end-{backend}", lambda: moe_ffn(x, bad_offsets, w1, None, w2, None),
                           "routing.expert_offsets")

# int64 offsets: expert weights that are a strided view whose stride * column index passes 2**31
# elements (a 4 GB virtual buffer; only the few touched pages are ever written)
M, N, K = 16, 16, 16
s_n = 2 ** 31 // 8
big = torch.empty(s_n * (N - 1) + K, dtype=torch.float16)
bv = big.as_strided((1, N, K), (0, s_n, 1))
vals = torch.randn(1, N, K).half()
bv.copy_(vals)
a16 = torch.randn(M, K).half().requires_grad_()
bview = bv.detach().requires_grad_()
with use_backend("triton"):
    c = grouped_gemm(a16, bview, torch.tensor([0, M]))
    c.float().sum().backward()
want = a16.detach().float() @ vals[0].float().T
assert (c.float() - want).abs().max() < 0.05, (c.float() - want).abs().max()
want_da = torch.ones(M, N) @ vals[0].float()
assert (a16.grad.float() - want_da).abs().max() < 0.05, (a16.grad.float() - want_da).abs().max()
print("OK int64-strided-expert-weights", flush=True)

# 2**31 rows (an expanded view: no memory) would wrap the int32 device offsets
huge = torch.empty(1, 16).expand(2 ** 31, 16)
expect_value_error("gg-rows-past-int32", lambda: grouped_gemm(huge, b, torch.tensor([0, 1, 2, 3])), "2**31")
'''

_CRASH_CASES = ([f"gg-{c}-{b}" for b in ("triton", "reference")
                 for c in ("past-end", "non-monotone", "negative", "nonzero-start")]
                + [f"ffn-{c}-{b}" for b in ("triton", "reference")
                   for c in ("slot-out-of-range", "negative-slot", "offsets-past-end")]
                + ["int64-strided-expert-weights", "gg-rows-past-int32"])


@pytest.fixture(scope="module")
def crash_run():
    if not KERNEL_DEVICES:
        pytest.skip("no Triton device")
    env = dict(os.environ, TRITON_INTERPRET="1", MMKERNELS_POISON_OUTPUTS="1")
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).resolve().parent.parent), env.get("PYTHONPATH", "")])
    return subprocess.run([sys.executable, "-c", textwrap.dedent(_CRASH_SCRIPT)], env=env, capture_output=True,
                          text=True, timeout=600)


@pytest.mark.parametrize("case", _CRASH_CASES)
def test_crash_prone_metadata_is_rejected(crash_run, case):
    """Invalid group offsets / routing slots used to abort the interpreter ("double free or corruption",
    "free(): invalid size") or return rows from outside the input; a stride*index past 2**31 segfaulted.
    Now: a ValueError naming the argument, and int64 offsets."""
    assert f"OK {case}\n" in crash_run.stdout, (
        f"rc={crash_run.returncode}\n{crash_run.stdout[-3000:]}\n{crash_run.stderr[-3000:]}")


# ------------------------------------------------------------------ grouped_gemm / moe_ffn metadata

@needs_triton
def test_grouped_gemm_check_metadata_is_a_documented_opt_out(monkeypatch):
    a, b = torch.randn(10, 16), torch.randn(3, 8, 16)
    offs = torch.tensor([0, 4, 4, 10])
    calls = []
    real = moe_function._check_offset_list
    monkeypatch.setattr(moe_function, "_check_offset_list", lambda *args: (calls.append(args[0]), real(*args)))
    with use_backend("triton"):
        want = grouped_gemm(a, b, offs)
        assert calls == ["group_offsets"]
        got = grouped_gemm(a, b, offs, check_metadata=False)     # no host read of the offsets
        assert calls == ["group_offsets"]
    torch.testing.assert_close(got, want)
    with use_backend("reference"):                                # reads them anyway: always checked
        with pytest.raises(ValueError, match="group_offsets"):
            grouped_gemm(a, b, torch.tensor([0, 6, 4, 10]), check_metadata=False)


@pytest.mark.parametrize("backend", ["reference", pytest.param("triton", marks=needs_triton)])
def test_moe_ffn_trusts_only_an_unmodified_moe_route_result(backend, monkeypatch):
    S, H, F_, E, k = 7, 16, 16, 4, 2
    x = torch.randn(S, H)
    w1, b1, w2, b2 = make_weights(E, H, F_)
    r = moe_route(torch.randn(S, E), k, 3)
    checked = []
    real = moe_function._check_routing_values
    monkeypatch.setattr(moe_function, "_check_routing_values", lambda *a: (checked.append(1), real(*a)))
    with use_backend(backend):
        want = moe_ffn(x, r, w1, b1, w2, b2)
        assert not checked                                       # sealed by moe_route: no sync
        copy = dataclasses.replace(r, sorted_slots=r.sorted_slots.clone(), keep=r.keep.clone())
        torch.testing.assert_close(moe_ffn(x, copy, w1, b1, w2, b2), want)
        assert len(checked) == 1                                 # hand-built: checked (and valid)
        moe_ffn(x, copy, w1, b1, w2, b2, check_metadata=False)
        assert len(checked) == 1                                 # opted out
        r.keep[0, 0] = ~r.keep[0, 0]                             # in-place edit breaks the seal
        with pytest.raises(ValueError, match="routing.keep"):
            moe_ffn(x, r, w1, b1, w2, b2)


def _edit_in_place(r, field):
    """An in-place edit that leaves ``r`` inconsistent (a repeated kept slot, offsets past the slots, a
    dropped slot marked kept, a kept slot's expert changed)."""
    if field == "sorted_slots":
        r.sorted_slots[1] = r.sorted_slots[0]
    elif field == "expert_offsets":
        r.expert_offsets[2:] += r.indices.numel()            # past S*k: an out-of-bounds read if trusted
    elif field == "keep":
        r.keep[0, 0] = ~r.keep[0, 0]
    else:
        t = int(r.sorted_slots[0])
        r.indices.view(-1)[t] = (r.indices.view(-1)[t] + 1) % r.num_experts


@pytest.mark.parametrize("backend", ["reference", pytest.param("triton", marks=needs_triton)])
@pytest.mark.parametrize("field", ["sorted_slots", "expert_offsets", "keep", "indices"])
def test_routing_edited_in_place_under_inference_mode_is_checked(field, backend, monkeypatch):
    """Inference tensors have no version counter, so an in-place edit under torch.inference_mode() kept
    the seal: the edited routing was trusted (row 1 silently changed, the backends disagreed, edited
    offsets read out of bounds).  The seal now holds there, and the untouched path still has no check."""
    S, H, F_, E, k = 9, 16, 16, 4, 2
    w1, b1, w2, b2 = make_weights(E, H, F_)
    checked = []
    real = moe_function._check_routing_values
    monkeypatch.setattr(moe_function, "_check_routing_values", lambda *a: (checked.append(1), real(*a)))
    with torch.inference_mode(), use_backend(backend):
        x = torch.randn(S, H)
        r = moe_route(torch.randn(S, E) * 3, k, 4)
        while int(r.expert_offsets[-1]) < 2 or bool(r.keep.all()):
            r = moe_route(torch.randn(S, E) * 3, k, 4)
        moe_ffn(x, r, w1, b1, w2, b2)
        assert not checked                                       # sealed and untouched: no host sync
        _edit_in_place(r, field)
        with pytest.raises(ValueError, match=rf"routing\.{field}"):
            moe_ffn(x, r, w1, b1, w2, b2)
        assert checked


def test_module_under_inference_mode_checks_nothing(monkeypatch):
    """MoE's own routing stays trusted (no host sync) under torch.inference_mode(), and gives the same output."""
    checked = []
    monkeypatch.setattr(moe_function, "_check_routing_values", lambda *a: checked.append(1))
    moe = MoE(16, Phi(16, 24), num_experts=4, k=2, min_capacity=0).eval()
    x, noise = torch.randn(11, 16), torch.rand(11, 4)
    with use_backend("reference"):
        want = moe(x, second_expert_noise=noise)[0]
        with torch.inference_mode():
            got = moe(x, second_expert_noise=noise)[0]
    assert torch.equal(got, want) and not checked


def _route(S=9, E=4, k=2, cap=4):
    return moe_route(torch.randn(S, E) * 3, k, cap)


@pytest.mark.parametrize("case", ["duplicate_slot", "keep_mismatch", "indices_mismatch", "offsets_decrease",
                                  "offsets_start", "slots_shape", "keep_dtype", "offsets_shape", "weights_shape"])
def test_moe_ffn_rejects_inconsistent_routing(case):
    S, H, F_, E, k = 9, 8, 8, 4, 2
    r = _route(S, E, k, 4)
    while int(r.expert_offsets[-1]) < 3 or r.keep.all():
        r = _route(S, E, k, 4)
    n = int(r.expert_offsets[-1])
    slots, keep, idx, offs = r.sorted_slots.clone(), r.keep.clone(), r.indices.clone(), r.expert_offsets.clone()
    err, word = ValueError, None
    if case == "duplicate_slot":
        slots[1] = slots[0]
        word = "routing.sorted_slots"
    elif case == "keep_mismatch":
        keep.view(-1)[slots[n].long()] = True                     # a dropped slot claims to be kept
        word = "routing.keep"
    elif case == "indices_mismatch":
        t = int(slots[0])
        idx.view(-1)[t] = (idx.view(-1)[t] + 1) % E
        word = "routing.indices"
    elif case == "offsets_decrease":
        offs[1], offs[2] = offs[2] + 1, offs[2]
        word = "routing.expert_offsets"
    elif case == "offsets_start":
        offs[0] = 1
        word = "routing.expert_offsets"
    elif case == "slots_shape":
        slots = slots[:-1]
        word = "routing.sorted_slots"
    elif case == "keep_dtype":
        keep = keep.to(torch.uint8)
        err, word = TypeError, "routing.keep"
    elif case == "offsets_shape":
        offs = offs[:-1]
        word = "experts"
    elif case == "weights_shape":
        r = dataclasses.replace(r, weights=r.weights[:, :1])
        word = "routing.weights"
    bad = dataclasses.replace(r, sorted_slots=slots, keep=keep, indices=idx, expert_offsets=offs)
    w1, b1, w2, b2 = make_weights(E, H, F_)
    with use_backend("reference"), pytest.raises(err, match=word):
        moe_ffn(torch.randn(S, H), bad, w1, b1, w2, b2)


# ------------------------------------------------------------------ token_order

def test_token_order_must_be_a_permutation():
    """token_order = zeros(12), k = 1, capacity 2 over 4 experts would keep 9 slots (more than 4 * 2)
    with exp_counts disagreeing; it is a ValueError naming token_order."""
    logits = torch.randn(12, 4)
    for order in (torch.zeros(12, dtype=torch.long), torch.tensor([0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 10]),
                  torch.arange(12) + 1, torch.arange(12) - 1):
        with pytest.raises(ValueError, match="token_order"):
            moe_route(logits, 1, 2, token_order=order)
    good = torch.randperm(12)
    r = moe_route(logits, 1, 2, token_order=good)
    assert int(r.keep.sum()) <= 8 and int(r.expert_offsets[-1]) == int(r.keep.sum())
    r2 = moe_route(logits, 1, 2, token_order=good.int(), check_metadata=False)
    assert torch.equal(r.keep, r2.keep)


def test_module_forward_checks_token_order():
    moe = MoE(8, Phi(8, 16), num_experts=4, k=1, capacity_factor=0.5, min_capacity=0)
    with pytest.raises(ValueError, match="token_order"):
        moe(torch.randn(12, 8), token_order=torch.zeros(12, dtype=torch.long))


# ------------------------------------------------------------------ capacity_for and torch.compile

def _deepspeed_capacity(S, E, cf, k, min_capacity):
    """DeepSpeed's _capacity: ceil((S / E) * torch.tensor(cf * k)) in float32, then the minimum."""
    c = torch.ceil((S / E) * torch.tensor(cf * (k if k >= 2 else 1))).to(torch.int64)
    return max(int(c), min_capacity)


def test_capacity_for_is_deepspeeds_float32_formula():
    # cases where float32 rounding moves the ceiling away from the exact rational value
    assert capacity_for(30, 3, 1.1, 1, 0) == 11 == _deepspeed_capacity(30, 3, 1.1, 1, 0)
    gen = torch.Generator().manual_seed(0)
    for E, cf, k in itertools.product((1, 3, 4, 6, 7, 8, 64), (0.3, 0.5, 1.0, 1.1, 1.25, 1.5, 2.0, 1 / 3), (1, 2, 3)):
        sizes = list(range(0, 70)) + torch.randint(70, 3_000_000, (8,), generator=gen).tolist()
        for S in sizes:
            assert capacity_for(S, E, cf, k, 0) == _deepspeed_capacity(S, E, cf, k, 0), (S, E, cf, k)
        assert capacity_for(5, E, cf, k, 9 if k > 1 else 5) == max(_deepspeed_capacity(5, E, cf, k, 0),
                                                                     9 if k > 1 else 5)


def test_top1_min_capacity_larger_than_tokens_is_rejected():
    """DeepSpeed's top1gating asserts S >= min_capacity; mmkernels ran."""
    with pytest.raises(ValueError, match="min_capacity"):
        capacity_for(3, 4, 1.0, 1, 4)
    assert capacity_for(3, 4, 1.0, 2, 4) == 4          # top2gating has no such assertion
    moe = MoE(8, Phi(8, 16), num_experts=4, k=1, min_capacity=4)
    with pytest.raises(ValueError, match="min_capacity"):
        moe(torch.randn(3, 8))


def test_capacity_for_traces_with_symbolic_token_counts():
    """Dynamic shapes: capacity_for on a SymInt (the struct.pack rounding recursed forever)."""
    for E, cf, k, sizes in ((3, 1.1, 1, (30, 40)), (4, 1.5, 2, (29, 41))):   # general path; power-of-two E
        def f(x):   # the configuration is a constant (as in MoE); the token count is symbolic
            return x.new_full((1,), capacity_for(x.shape[0], E, cf, k, 0))

        torch._dynamo.reset()
        g = torch.compile(f, fullgraph=True, backend="eager")
        for S in sizes:
            x = torch.empty(S)
            torch._dynamo.mark_dynamic(x, 0)
            assert int(g(x)) == _deepspeed_capacity(S, E, cf, k, 0), (S, E, cf, k)


@needs_triton
def test_compiled_moe_handles_a_second_sequence_length():
    """torch.compile(MoE, fullgraph=True) with automatic dynamic shapes: the second length used to raise
    a RecursionError from struct.pack in capacity_for; both lengths must equal eager."""
    torch._dynamo.reset()
    moe = MoE(16, Phi(16, 16), num_experts=4, k=2, capacity_factor=1.0, min_capacity=0,
              top2_2nd_expert_sampling=False)
    compiled = torch.compile(moe, fullgraph=True, backend="eager")
    with use_backend("triton"):
        for T in (10, 13):
            x = torch.randn(1, T, 16)
            y, l_aux, counts = compiled(x)
            y_e, l_e, c_e = moe(x)
            assert moe.capacity(T) < T             # tokens are dropped
            torch.testing.assert_close(y, y_e)
            torch.testing.assert_close(l_aux, l_e)
            assert torch.equal(counts, c_e)


# ------------------------------------------------------------------ DeepSpeed parity

def _dispatch_triples(r):
    """DeepSpeed's sparse dispatch: (token, expert, location) for every kept choice; the location is the
    rank among the expert's kept slots, which moe_route lists in slot (= token) order."""
    k = r.k
    out = []
    bounds = r.expert_offsets.tolist()
    for e in range(r.num_experts):
        for loc, slot in enumerate(r.sorted_slots[bounds[e]:bounds[e + 1]].tolist()):
            out.append([slot // k, e, loc])
    return sorted(out)


# DeepSpeed tests/unit/moe/test_moe.py::TestTopkGate::test (world size 1), topkgating(logits, k, 1,
# min_capacity=1, drop_policy=...)[2] as sparse (token, expert, location) triples.
_DS_LOGITS_4x4 = [[0.11, 0.2, 0.1, 0.3], [0.3, 0.4, 0.11, 0.1], [0.11, 0.1, 0.6, 0.5], [0.1, 0.11, 0.7, 0.8]]
_DS_LOGITS_4x6 = [[0.5858, 0.4801, 0.6269, 0.5397, 0.9722, 0.7034], [0.5445, 0.6332, 0.4519, 0.6308, 0.0519, 0.6450],
                  [0.4874, 0.8110, 0.7467, 0.8474, 0.0277, 0.3068], [0.8570, 0.6714, 0.5310, 0.3274, 0.4836, 0.9892]]
_DS_LOGITS_DROPLESS = [[0.95, 0.85, 0.90, 0.80], [0.70, 0.65, 0.75, 0.60], [0.50, 0.55, 0.45, 0.40],
                       [0.35, 0.30, 0.25, 0.20]]
_DS_VECTORS = [
    (_DS_LOGITS_4x4, 2, "probs", [[0, 1, 0], [1, 0, 0], [1, 1, 1], [2, 2, 0], [2, 3, 0], [3, 2, 1], [3, 3, 1]]),
    (_DS_LOGITS_4x4, 2, "position", [[0, 1, 0], [0, 3, 0], [1, 0, 0], [1, 1, 1], [2, 2, 0], [2, 3, 1], [3, 2, 1]]),
    (_DS_LOGITS_4x6, 3, "probs", [[0, 2, 0], [0, 4, 0], [1, 1, 0], [1, 3, 0], [1, 5, 0], [2, 1, 1], [2, 2, 1],
                                  [2, 3, 1], [3, 0, 0], [3, 5, 1]]),
    (_DS_LOGITS_4x6, 3, "position", [[0, 2, 0], [0, 4, 0], [0, 5, 0], [1, 1, 0], [1, 3, 0], [1, 5, 1], [2, 1, 1],
                                     [2, 2, 1], [2, 3, 1], [3, 0, 0]]),
]


@pytest.mark.parametrize("logits,k,policy,want", _DS_VECTORS, ids=["4x4-k2-probs", "4x4-k2-position",
                                                                    "4x6-k3-probs", "4x6-k3-position"])
def test_deepspeed_topkgating_vectors(logits, k, policy, want):
    """DeepSpeed's own topkgating test vectors.  'position' counts all k choices together in token order
    (DeepSpeed keeps (token 0, expert 5) for 4x6/k=3, the old j-major rule kept (3, 5); for 4x4/k=2 it
    keeps (2, 3), the old rule (3, 3))."""
    logits = torch.tensor(logits)
    S, E = logits.shape
    cap = capacity_for(S, E, 1.0, k, 1)
    assert cap == 2
    for scale in (1.0, 2.0):                      # DeepSpeed scales by (rank + 1)
        r = moe_route(logits * scale, k, cap, drop_policy=policy)
        assert _dispatch_triples(r) == want
        if k >= 3 and policy == "probs":          # DeepSpeed's TopKGate default for k >= 3
            assert _dispatch_triples(moe_route(logits * scale, k, cap)) == want
        # weights renormalised over the kept experts, l_aux over all k choices divided by k
        p = torch.softmax(logits * scale, 1)
        kept = torch.zeros(S, E, dtype=torch.bool)
        for t, e, _ in want:
            kept[t, e] = True
        dense = torch.zeros(S, E).scatter(1, r.indices, r.weights)
        gm = p * kept
        torch.testing.assert_close(dense, gm / gm.sum(1, keepdim=True).clamp(min=torch.finfo(torch.float32).eps))
        ce = torch.zeros(S, E).scatter(1, r.indices, 1.0).mean(0)
        torch.testing.assert_close(r.l_aux, torch.mean(p.mean(0) * ce) * E * E / k)


def test_deepspeed_topkgating_dropless_vector():
    r = moe_route(torch.tensor(_DS_LOGITS_DROPLESS), 2, None, drop_policy="position")
    assert _dispatch_triples(r) == [[0, 0, 0], [0, 2, 0], [1, 0, 1], [1, 2, 1], [2, 0, 2], [2, 1, 0], [3, 0, 3],
                                    [3, 1, 1]]


def test_k2_default_is_top2gating_not_topkgating():
    """MoE k = 2 runs DeepSpeed's top2gating (first choices outrank second choices), which differs from
    topkgating's position rule on DeepSpeed's own 4x4 vector; the default keeps the top2gating rule."""
    logits = torch.tensor(_DS_LOGITS_4x4)
    default = moe_route(logits, 2, 2)
    choice = moe_route(logits, 2, 2, drop_policy="choice")
    assert torch.equal(default.keep, choice.keep) and torch.equal(default.sorted_slots, choice.sorted_slots)
    assert _dispatch_triples(moe_route(logits, 2, 2, drop_policy="position")) != _dispatch_triples(default)


def test_k1_without_rts_keeps_what_deepspeeds_topk_keeps():
    """top1gating(use_rts=False) keeps the rows torch.topk returns from the 0/1 mask (torch's tie order,
    not token order: mmkernels used to keep rows [0, 1, 2] where DeepSpeed kept others)."""
    S, E, C = 10, 4, 3
    logits = torch.randn(S, E)
    logits[:, 1] += 20.0                            # every row chooses expert 1
    r = moe_route(logits, 1, C)
    mask = F.one_hot(logits.argmax(1), E)           # DeepSpeed: topk over the int64 one-hot mask
    want = torch.zeros(S, dtype=torch.bool)
    want[torch.topk(mask, k=C, dim=0)[1][:, 1]] = True
    assert torch.equal(r.keep[:, 0], want)
    assert torch.equal(r.sorted_slots[:C].sort().values, want.nonzero()[:, 0].int())
    torch.testing.assert_close(r.weights[:, 0], torch.softmax(logits, 1)[:, 1] * want)
    # with a token order (random token selection) and with "choice", the first rows in that order win
    assert moe_route(logits, 1, C, drop_policy="choice").keep[:, 0].tolist() == [True] * C + [False] * (S - C)
    order = torch.randperm(S)
    kept = moe_route(logits, 1, C, token_order=order).keep[:, 0]
    assert kept[order[:C]].all() and int(kept.sum()) == C
    # dropless / roomy capacity: nothing to break ties over
    assert moe_route(logits, 1, S).keep.all() and moe_route(logits, 1, None).keep.all()


def test_route_slot_count_must_fit_int32():
    with pytest.raises(ValueError, match="2\\*\\*31"):
        moe_route(torch.empty(1, 4).expand(2 ** 30, 4), 2, None)


def test_route_integer_arguments_are_validated():
    logits = torch.randn(8, 4)
    with pytest.raises(TypeError, match="k must be an int, got float"):
        moe_route(logits, 2.0, 4)
    with pytest.raises(TypeError, match="capacity .*must be an int, got float"):
        moe_route(logits, 2, 4.0)
    with pytest.raises(ValueError, match="capacity .*must be >= 0, got -1"):
        moe_route(logits, 2, -1)
    # numpy integers (a capacity computed with numpy, say) are integers
    want = moe_route(logits, 2, 4, torch.zeros(8, 4))
    got = moe_route(logits, np.int64(2), np.int32(4), torch.zeros(8, 4))
    assert torch.equal(got.keep, want.keep) and got.capacity == 4 and type(got.capacity) is int


def test_drop_policy_arguments_are_validated():
    logits = torch.randn(8, 4)
    with pytest.raises(ValueError, match="drop_policy"):
        moe_route(logits, 2, 4, drop_policy="random")
    with pytest.raises(ValueError, match="topk_ties"):
        moe_route(logits, 2, 4, drop_policy="topk_ties")
    with pytest.raises(ValueError, match="second_expert_noise"):
        moe_route(logits, 3, 4, torch.randn(8, 4))                  # k >= 3 default is 'probs'
    with pytest.raises(ValueError, match="token_order"):
        moe_route(logits, 3, 4, token_order=torch.randperm(8), drop_policy="probs")
    r = moe_route(logits, 3, 4, token_order=torch.randperm(8), drop_policy="position")
    assert int(r.keep.sum()) <= 16


@pytest.mark.parametrize("policy", ["position", "probs", "topk_ties"])
def test_torch_route_path_needs_no_bincount(policy, monkeypatch):
    """The policies the native op does not implement run torch ops without a host sync (bincount syncs
    on CUDA), so they trace under torch.compile with fullgraph."""
    monkeypatch.setattr(torch, "bincount", None)
    k = 1 if policy == "topk_ties" else 3
    logits = torch.randn(13, 5)

    def f(x):
        r = moe_route(x, k, 4, drop_policy=policy)
        return r.keep, r.weights, r.sorted_slots, r.expert_offsets

    want = f(logits)
    got = torch.compile(f, fullgraph=True, backend="eager")(logits)
    for a, b in zip(got, want):
        assert torch.equal(a, b)


# ------------------------------------------------------------------ empty shapes

@needs_triton
@pytest.mark.parametrize("shape", ["H0", "H0-3d", "F0", "S0"])
def test_moe_ffn_empty_dims_match_reference(shape):
    """moe_ffn with H = 0 raised "cannot reshape tensor of 0 elements"."""
    S, H, F_, E, k = {"H0": (6, 0, 16, 4, 2), "H0-3d": (6, 0, 16, 4, 2), "F0": (6, 16, 0, 4, 2),
                      "S0": (0, 16, 16, 4, 2)}[shape]
    xs = (2, 3, H) if shape == "H0-3d" else (S, H)
    x = torch.randn(*xs)
    wts = make_weights(E, H, F_)
    r = moe_route(torch.randn(S, E), k, 3)
    grads = {}
    for backend in ("triton", "reference"):
        leaves = [t.clone().requires_grad_() for t in (x, *wts)]
        with use_backend(backend):
            y = moe_ffn(leaves[0], r, *leaves[1:])
        assert y.shape == x.shape
        (y * 1.5).sum().backward()
        grads[backend] = (y, *[t.grad for t in leaves])
    for a, b in zip(grads["triton"], grads["reference"]):
        assert a is not None and b is not None and a.shape == b.shape
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@needs_triton
def test_grouped_gemm_k0_matches_reference():
    a, b, bias = torch.randn(10, 0), torch.randn(3, 5, 0), torch.randn(3, 5)
    offs = torch.tensor([0, 4, 4, 9])
    outs = {}
    for backend in ("triton", "reference"):
        leaves = [t.clone().requires_grad_() for t in (a, b, bias)]
        with use_backend(backend):
            c = grouped_gemm(leaves[0], leaves[1], offs, leaves[2])
        (c * torch.arange(5.0)).sum().backward()
        outs[backend] = (c, *[t.grad for t in leaves])
    for x, y in zip(outs["triton"], outs["reference"]):
        torch.testing.assert_close(x, y)


# ------------------------------------------------------------------ double backward

def _ffn_problem(S=7, H=16, F_=16, E=3, k=2, dtype=torch.float32):
    x = torch.randn(S, H, dtype=dtype)
    wg = torch.randn(E, H)
    return x, wg, make_weights(E, H, F_, dtype), k


@pytest.mark.parametrize("op", ["moe_ffn", "grouped_gemm"])
@pytest.mark.parametrize("backend", ["reference", pytest.param("triton", marks=needs_triton)])
def test_double_backward(op, backend):
    """Triton: differentiating the gradient raises DoubleBackwardError naming the op (torch used to
    warn and return zeros).  Reference: a real second-order gradient."""
    dtype = torch.float64 if backend == "reference" else torch.float32
    if op == "moe_ffn":
        x, wg, wts, k = _ffn_problem(dtype=dtype)
        x.requires_grad_()
        w1 = wts[0].requires_grad_()
        r = moe_route(F.linear(x.detach().float(), wg), k, None)
        inputs = (x, w1)

        def fwd():
            return moe_ffn(x, r, w1, wts[1], wts[2], wts[3])
    else:
        a = torch.randn(9, 16, dtype=dtype, requires_grad=True)
        b = torch.randn(2, 8, 16, dtype=dtype, requires_grad=True)
        inputs = (a, b)

        def fwd():
            return grouped_gemm(a, b, torch.tensor([0, 4, 9]))
    with use_backend(backend):
        y = fwd()
        grads = torch.autograd.grad(y.square().sum(), inputs, create_graph=True)
        second = sum(g.square().sum() for g in grads)
        if backend == "triton":
            with pytest.raises(DoubleBackwardError, match=op):
                second.backward()
        else:
            second.backward()
            assert all(t.grad is not None and torch.isfinite(t.grad).all() for t in inputs)
            assert any(t.grad.abs().sum() > 0 for t in inputs)


# ------------------------------------------------------------------ every requires_grad combination

# (x, weights, w1, b1, w2, b2): the backward's launches depend on three independent groups of flags --
# {weights} (combine backward), {w2, b2} (one weight-gradient launch) and {x, w1, b1} (they share dZ,
# then dX and one weight-gradient launch) -- and these 8 runs take every state of every group.  (All
# 63 combinations cost ~45 s under the interpreter, past this file's budget.)
_FFN_GRAD_MASKS = [(False, True, False, False, False, False), (False, False, False, True, False, True),
                   (False, True, True, False, True, False), (False, False, True, True, True, True),
                   (True, False, False, False, False, False), (True, True, False, True, False, True),
                   (True, False, True, False, True, False), (True, True, True, True, True, True)]


@needs_triton
@pytest.mark.parametrize("activation", ["gelu_tanh", "swiglu"])
def test_moe_ffn_requires_grad_combinations(activation):
    """Frozen inputs must not make the Triton backward skip (or corrupt) another input's gradient."""
    S, H, F_, E, k = 5, 16, 16, 2, 2
    x, wg, wts, _ = _ffn_problem(S, H, F_, E, k)
    if activation == "swiglu":
        wts = (torch.randn(E, 2 * F_, H) / H ** 0.5, None, wts[2], None)
    r0 = moe_route(F.linear(x, wg), k, 4)
    gy = torch.randn(S, H)
    # float64 reference gradients of every input (each independent of which others require grad)
    ref_leaves = [t.double().requires_grad_() if t is not None else None for t in (x, r0.weights.detach(), *wts)]
    y_ref = moe_ffn_reference(ref_leaves[0], ref_leaves[1], r0.sorted_slots, r0.expert_offsets, *ref_leaves[2:],
                              activation)
    (y_ref * gy.double()).sum().backward()
    names = ("x", "weights", "w1", "b1", "w2", "b2")
    # swiglu has no biases and differs only in the dZ epilogue: the masks that change what dZ feeds
    for mask in _FFN_GRAD_MASKS if activation == "gelu_tanh" else [_FFN_GRAD_MASKS[i] for i in (2, 4, 6, 7)]:
        leaves = [t.detach().clone().requires_grad_(m) if t is not None else None
                  for t, m in zip((x, r0.weights, *wts), mask)]
        if not any(t is not None and t.requires_grad for t in leaves):
            continue                                        # swiglu has no biases
        r = dataclasses.replace(r0, weights=leaves[1])
        with use_backend("triton"):
            y = moe_ffn(leaves[0], r, *leaves[2:], activation=activation, check_metadata=False)
        (y * gy).sum().backward()
        for name, m, got, ref in zip(names, mask, leaves, ref_leaves):
            if got is None:
                continue
            if m:
                assert got.grad is not None, (mask, name)
                assert_close(f"d{name} {mask}", got.grad, ref.grad, torch.float32)
            else:
                assert got.grad is None, (mask, name)


@needs_triton
def test_grouped_gemm_every_requires_grad_combination():
    a, b, bias = torch.randn(13, 16), torch.randn(3, 11, 16), torch.randn(3, 11)
    offs = torch.tensor([0, 5, 5, 12])
    gc = torch.randn(13, 11)
    refs = [t.double().requires_grad_() for t in (a, b, bias)]
    with use_backend("reference"):
        (grouped_gemm(*refs[:2], offs, refs[2]) * gc.double()).sum().backward()
    for mask in itertools.product((False, True), repeat=3):
        if not any(mask):
            continue
        leaves = [t.clone().requires_grad_(m) for t, m in zip((a, b, bias), mask)]
        with use_backend("triton"):
            (grouped_gemm(leaves[0], leaves[1], offs, leaves[2]) * gc).sum().backward()
        for name, m, got, ref in zip(("da", "db", "dbias"), mask, leaves, refs):
            if m:
                assert_close(f"{name} {mask}", got.grad, ref.grad, torch.float32)
            else:
                assert got.grad is None
