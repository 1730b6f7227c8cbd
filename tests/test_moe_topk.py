"""``moe_route_topk`` (routing from a router's own top-k) and the fused activations of ``moe_ffn``
(SiLU / GELU tanh / GELU exact / ReLU, plain and gated), Triton under the interpreter against the
float64 reference."""
import pytest
import torch

import mmkernels
from mmkernels import moe_ffn, moe_route, moe_route_topk, use_backend
from mmkernels.ops.moe.reference import ACTIVATIONS, GATED_ACTIVATIONS, expert_ffn
from mmkernels.testing import assert_close


def _topk(S, E, k):
    logits = torch.randn(S, E)
    w, idx = torch.softmax(logits, -1).topk(k, dim=-1)
    return idx, w


def test_routing_matches_moe_route_dropless():
    """Same choices as moe_route's dropless top-k: same slot grouping and offsets; sealed."""
    logits = torch.randn(23, 5)
    r = moe_route(logits, 2)
    t = moe_route_topk(r.indices, r.weights, 5)
    assert torch.equal(t.sorted_slots.long(), r.sorted_slots.long())
    assert torch.equal(t.expert_offsets.long(), r.expert_offsets.long())
    assert torch.equal(t.exp_counts, r.exp_counts) and torch.equal(t.top1_counts, r.top1_counts)
    assert t.keep.all() and t.capacity is None and t._is_sealed()
    assert t.weights.dtype == torch.float32 and float(t.l_aux) == 0.0
    assert torch.equal(t.probs.gather(1, t.indices), t.weights)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_weights_gradient_and_output_vs_float64(backend):
    S, Hd, F, E, k = 11, 24, 16, 4, 2
    idx, w = _topk(S, E, k)
    x, w1, w2 = torch.randn(S, Hd), torch.randn(E, 2 * F, Hd) * 0.3, torch.randn(E, Hd, F) * 0.3
    dy = torch.randn(S, Hd)
    out = {}
    for name, dt, be in (("test", torch.float32, backend), ("ref", torch.float64, "reference")):
        leaves = [t.clone().to(dt).requires_grad_() for t in (x, w, w1, w2)]
        with use_backend(be):
            y = moe_ffn(leaves[0], moe_route_topk(idx, leaves[1], E), leaves[2], None, leaves[3], None, "swiglu")
        y.backward(dy.to(dt))
        out[name] = [y] + [t.grad for t in leaves]
    # and the plain definition: y[s] = sum_j w[s, j] * expert_{idx[s, j]}(x[s])
    direct = torch.stack([sum(w[s, j].double() * expert_ffn(x[s:s + 1].double(), w1[idx[s, j]].double(), None,
                                                            w2[idx[s, j]].double(), None, "swiglu")[0]
                              for j in range(k)) for s in range(S)])
    assert_close("y vs definition", out["ref"][0], direct, torch.float64)
    for i, (a, b) in enumerate(zip(out["test"], out["ref"])):
        assert_close(f"y/grad {i}", a, b, torch.float32)
    assert out["test"][2].abs().sum() > 0      # the gradient reaches top_k_weights


def test_bad_input_is_named():
    idx, w = _topk(5, 4, 2)
    for bad_value in (4, -1):
        bad = idx.clone()
        bad[3, 1] = bad_value
        with pytest.raises(ValueError, match="top_k_index must lie in"):
            moe_route_topk(bad, w, 4)
    with pytest.raises(ValueError, match="top_k_weights must have shape"):
        moe_route_topk(idx, w[:, :1], 4)
    with pytest.raises(TypeError, match="top_k_index must have dtype"):
        moe_route_topk(idx.float(), w, 4)
    with pytest.raises(TypeError, match="top_k_weights must have dtype"):
        moe_route_topk(idx, idx, 4)
    with pytest.raises(ValueError, match="top_k_index must be 2-D"):
        moe_route_topk(idx[0], w[0], 4)
    with pytest.raises(TypeError, match="num_experts must be an int"):
        moe_route_topk(idx, w, 4.0)
    with pytest.raises(ValueError, match="num_experts must be >= 1"):
        moe_route_topk(idx[:0], w[:0], 0)
    with pytest.raises(ValueError, match="at least one choice"):
        moe_route_topk(idx[:, :0], w[:, :0], 4)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_unchecked_out_of_range_choices_are_dropped(backend):
    """check_metadata=False never reads past E: an out-of-range choice (an expert-parallel sentinel)
    contributes nothing, exactly like the same routing with that weight set to 0."""
    S, Hd, F, E = 9, 16, 16, 3
    idx, w = _topk(S, E, 2)
    bad = idx.clone()
    bad[2, 1], bad[5, 0] = E, -1
    x, w1, w2 = torch.randn(S, Hd), torch.randn(E, F, Hd), torch.randn(E, Hd, F)
    r = moe_route_topk(bad, w, E, check_metadata=False)
    assert not r.keep[2, 1] and not r.keep[5, 0] and int(r.expert_offsets[-1]) == 2 * S - 2
    w0 = w.clone()
    w0[2, 1] = w0[5, 0] = 0
    ok = idx.clone()
    ok[2, 1], ok[5, 0] = 0, 0
    with use_backend(backend):
        y = moe_ffn(x, r, w1, None, w2, None, "gelu")
    with use_backend("reference"):
        expected = moe_ffn(x.double(), moe_route_topk(ok, w0.double(), E), w1.double(), None, w2.double(), None,
                           "gelu")
    assert_close("y", y, expected, torch.float32)


def test_empty_rows():
    r = moe_route_topk(torch.zeros(0, 2, dtype=torch.int64), torch.zeros(0, 2), 3)
    y = moe_ffn(torch.zeros(0, 8), r, torch.randn(3, 8, 8), None, torch.randn(3, 8, 8), None, "gelu")
    assert y.shape == (0, 8) and r.expert_offsets.tolist() == [0, 0, 0, 0]


@pytest.mark.parametrize("activation", [a for a in ACTIVATIONS if a not in ("gelu_tanh", "swiglu")])
def test_new_fused_activations_vs_float64(activation):
    """The activations added to the kernels' epilogues (forward and backward), with biases.  (The
    activation lives in the first GEMM whatever k is; k = 1's fused combine is test_moe's.)"""
    S, Hd, F, E, k = 13, 24, 20, 3, 2
    F1 = 2 * F if activation in GATED_ACTIVATIONS else F
    idx, w = _topk(S, E, k)
    x, w1, b1 = torch.randn(S, Hd), torch.randn(E, F1, Hd) * 0.3, torch.randn(E, F1) * 0.1
    w2, b2 = torch.randn(E, Hd, F) * 0.3, torch.randn(E, Hd) * 0.1
    dy = torch.randn(S, Hd)
    out = {}
    for name, dt, be in (("triton", torch.float32, "triton"), ("ref", torch.float64, "reference")):
        leaves = [t.clone().to(dt).requires_grad_() for t in (x, w, w1, b1, w2, b2)]
        with use_backend(be):
            y = moe_ffn(leaves[0], moe_route_topk(idx, leaves[1], E), *leaves[2:], activation=activation)
        y.backward(dy.to(dt))
        out[name] = [y] + [t.grad for t in leaves]
    for i, (a, b) in enumerate(zip(out["triton"], out["ref"])):
        assert_close(f"{activation} y/grad {i}", a, b, torch.float32)


def test_exported():
    assert mmkernels.moe_route_topk is moe_route_topk and "moe_route_topk" in mmkernels.__all__


def test_unchecked_routing_and_triton_ffn_read_nothing_on_the_host():
    """Sync-free: under FakeTensorMode (tensors without data) any host read of a value raises, yet
    moe_route_topk(check_metadata=False) -> moe_ffn (Triton) -> backward runs through; the checked
    routing needs the data (that one host read)."""
    from torch._subclasses.fake_tensor import DataDependentOutputException, FakeTensorMode
    with FakeTensorMode():
        idx, w = torch.randint(0, 4, (7, 2)), torch.rand(7, 2, requires_grad=True)
        x, w1, w2 = torch.randn(7, 16, requires_grad=True), torch.randn(4, 32, 16), torch.randn(4, 16, 16)
        r = moe_route_topk(idx, w, 4, check_metadata=False)
        assert r._is_sealed()
        with use_backend("triton"):
            y = moe_ffn(x, r, w1, None, w2, None, "geglu")
        y.sum().backward()
        assert y.shape == (7, 16) and w.grad.shape == (7, 2)
        with pytest.raises(DataDependentOutputException):
            moe_route_topk(idx, w, 4)
