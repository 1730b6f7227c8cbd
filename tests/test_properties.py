"""Property tests: hypothesis draws shapes, dtypes, strides and metadata for every public function
and compares the Triton backend (the interpreter here, the GPU where there is one) with the float64
reference on the same inputs.

Each run draws fresh examples from the run's seed, which pytest prints in its header
(``MMKERNELS_TEST_SEED=<n>`` replays it, see ``conftest.py``); a failure also prints hypothesis'
own ``@reproduce_failure`` blob.  The example counts and shapes are kept small so that the whole
file stays within ``make test``'s budget on a 2-core CPU.
"""
import os

import pytest
import torch

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, Phase, given, seed, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import mmkernels  # noqa: E402
from mmkernels import grouped_gemm, hyper_attention, moe_ffn, moe_route, plora_linear, use_backend, visual_kv  # noqa: E402
from mmkernels.ops.moe.reference import ACTIVATIONS, GATED_ACTIVATIONS  # noqa: E402
from mmkernels.testing import TOLERANCES, compare  # noqa: E402

from conftest import KERNEL_DEVICES, SESSION_SEED  # noqa: E402

DTYPES = st.sampled_from([torch.float32, torch.float16, torch.bfloat16])
# No shrinking phase: a failure prints its draws as found (shrinking interpreter runs takes minutes).
# MMKERNELS_PROPERTY_EXAMPLES raises the count for a longer hunt (e.g. on a GPU).
PROPERTY = settings(max_examples=int(os.environ.get("MMKERNELS_PROPERTY_EXAMPLES", "8")), deadline=None, print_blob=True, database=None,
                    phases=[Phase.explicit, Phase.reuse, Phase.generate],
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

pytestmark = pytest.mark.parametrize("device", KERNEL_DEVICES)


def _leaf(t: torch.Tensor, device, dtype, transposed: bool = False) -> torch.Tensor:
    """A leaf in ``dtype`` on ``device``; ``transposed`` stores it column-major (a strided view)."""
    t = t.to(device=device, dtype=dtype)
    if transposed and t.dim() >= 2:
        t = t.transpose(-1, -2).contiguous().transpose(-1, -2)
    return t.detach().requires_grad_()


def _check(name, got, want, dtype, torch_lowp):
    """``got`` in the test dtype vs ``want`` in float64, with that dtype's stated tolerance.

    Drawn shapes include degenerate ones (a contraction over 1 or 2 elements, a softmax over one key)
    where rounding the intermediates to fp16/bf16 alone costs more than the stated tolerance.  As in
    flash-attention's tests, such a tensor passes when its error is at most twice PyTorch's own error
    on the same math in the same dtype (``torch_lowp``: the reference backend run in ``dtype``).
    """
    y_scale = max(1.0, want[0].detach().abs().max().item()) if want[0].numel() else 1.0
    for i, (g, w, p) in enumerate(zip(got, want, torch_lowp)):
        if g is None or w is None:  # an unused input: the other backend may give None or zeros
            other = w if g is None else g
            assert other is None or not bool(other.detach().ne(0).any()), f"{name}[{i}]: None vs nonzero"
            continue
        result = compare(f"{name}[{i}]", g, w, dtype)
        if result.ok:
            continue
        ours = _abs_err(g, w)
        theirs = _abs_err(p, w) if p is not None else 0.0
        floor = TOLERANCES[dtype].max_err * 0.1 * y_scale
        assert ours <= 2 * theirs + floor, (f"{result}; |err| {ours:.2e} vs torch's own {dtype} error "
                                            f"{theirs:.2e}")


def _abs_err(a, b) -> float:
    return (a.detach().cpu().double() - b.detach().cpu()).abs().max().item() if b.numel() else 0.0


def _run(fn, leaves, backend):
    """Forward under ``backend`` and the gradient of every leaf that requires it (same upstream grad)."""
    with use_backend(backend):
        y = fn(*leaves)
    torch.manual_seed(1234)
    dy = torch.randn_like(y, dtype=torch.float32).to(y.dtype)
    needs = [t for t in leaves if isinstance(t, torch.Tensor) and t.requires_grad]
    grads = torch.autograd.grad(y, needs, dy, allow_unused=True) if needs and y.numel() else [None] * len(needs)
    return [y, *grads]


def _float64(leaves):
    return [t.detach().double().requires_grad_(t.requires_grad) if isinstance(t, torch.Tensor)
            and t.is_floating_point() else t for t in leaves]


def _compare_backends(name, fn, leaves, dtype):
    got = _run(fn, leaves, "triton")
    cpu_leaves = [t.detach().cpu().requires_grad_(t.requires_grad) if isinstance(t, torch.Tensor) else t
                  for t in leaves]
    want = _run(fn, _float64(cpu_leaves), "reference")
    torch_lowp = _run(fn, cpu_leaves, "reference")
    _check(name, got, want, dtype, torch_lowp)


# ------------------------------------------------------------------------------------------ PLoRA

@seed(SESSION_SEED)
@PROPERTY
@given(data=st.data(), dtype=DTYPES)
def test_plora_linear_matches_reference(device, data, dtype):
    lead = data.draw(st.lists(st.integers(0, 5), min_size=1, max_size=2), label="leading dims")
    K = data.draw(st.integers(1, 40), label="K")
    N = data.draw(st.integers(1, 40), label="N")
    r = data.draw(st.integers(1, 9), label="r")
    frac = data.draw(st.sampled_from([0.0, 0.3, 1.0]), label="visual fraction")
    bias = data.draw(st.booleans(), label="bias")
    w_t = data.draw(st.booleans(), label="weight column-major")
    scaling = data.draw(st.floats(0.25, 4.0), label="scaling")
    x = torch.randn(*lead, K)
    mask = torch.rand(*lead) < frac
    leaves = [_leaf(x, device, dtype), _leaf(torch.randn(N, K) / K**0.5, device, dtype, w_t),
              _leaf(torch.randn(N) * 0.1, device, dtype) if bias else None,
              _leaf(torch.randn(r, K) / K**0.5, device, dtype), _leaf(torch.randn(N, r) / r**0.5, device, dtype)]

    def fn(x, w, b, a, lb, m=mask.to(device)):
        return plora_linear(x, w, b, a, lb, m.to(x.device), scaling=scaling)

    _compare_backends("plora_linear", fn, leaves, dtype)


# ------------------------------------------------------------------------------------------ MoE

@st.composite
def group_offsets(draw, E, M):
    """E+1 valid offsets: non-decreasing from 0, ending at or before M (empty groups allowed)."""
    cuts = sorted(draw(st.lists(st.integers(0, M), min_size=E, max_size=E)))
    end = cuts[-1]
    return [0, *cuts[:-1], end] if E else [0]


@seed(SESSION_SEED)
@PROPERTY
@given(data=st.data(), dtype=DTYPES)
def test_grouped_gemm_matches_reference(device, data, dtype):
    E = data.draw(st.integers(1, 4), label="E")
    M = data.draw(st.integers(0, 40), label="M")
    K = data.draw(st.integers(1, 40), label="K")
    N = data.draw(st.integers(1, 40), label="N")
    offs = data.draw(group_offsets(E, M), label="group_offsets")
    bias = data.draw(st.booleans(), label="bias")
    b_t = data.draw(st.booleans(), label="b column-major")
    offsets = torch.tensor(offs, dtype=data.draw(st.sampled_from([torch.int32, torch.int64])), device=device)
    leaves = [_leaf(torch.randn(M, K), device, dtype), _leaf(torch.randn(E, N, K) / K**0.5, device, dtype, b_t),
              _leaf(torch.randn(E, N) * 0.1, device, dtype) if bias else None]

    def fn(a, b, bias):
        return grouped_gemm(a, b, offsets.to(a.device), bias)

    _compare_backends("grouped_gemm", fn, leaves, dtype)


@seed(SESSION_SEED)
@PROPERTY
@given(data=st.data(), dtype=DTYPES)
def test_moe_ffn_matches_reference(device, data, dtype):
    E = data.draw(st.integers(1, 4), label="E")
    k = data.draw(st.integers(1, E), label="k")
    S = data.draw(st.integers(0, 24), label="S")
    H = data.draw(st.integers(1, 24), label="H")
    Fd = data.draw(st.integers(1, 24), label="F")
    activation = data.draw(st.sampled_from(ACTIVATIONS), label="activation")
    dropless = data.draw(st.booleans(), label="dropless")
    capacity = None if dropless else data.draw(st.integers(0, max(1, S)), label="capacity")
    bias = activation not in GATED_ACTIVATIONS and data.draw(st.booleans(), label="bias")
    F1 = 2 * Fd if activation in GATED_ACTIVATIONS else Fd
    logits = torch.randn(S, E)
    leaves = [_leaf(torch.randn(S, H), device, dtype), _leaf(torch.randn(E, F1, H) / H**0.5, device, dtype),
              _leaf(torch.randn(E, F1) * 0.1, device, dtype) if bias else None,
              _leaf(torch.randn(E, H, Fd) / Fd**0.5, device, dtype),
              _leaf(torch.randn(E, H) * 0.1, device, dtype) if bias else None]

    def fn(x, w1, b1, w2, b2):
        routing = moe_route(logits.to(x.device), k, capacity)
        return moe_ffn(x, routing, w1, b1, w2, b2, activation=activation)

    _compare_backends("moe_ffn", fn, leaves, dtype)


@seed(SESSION_SEED)
@PROPERTY
@given(data=st.data())
def test_moe_route_invariants(device, data):
    """The native routing op: counts, offsets and the permutation agree with the decisions."""
    E = data.draw(st.integers(1, 6), label="E")
    k = data.draw(st.integers(1, min(E, 2)), label="k")
    S = data.draw(st.integers(0, 30), label="S")
    capacity = data.draw(st.one_of(st.none(), st.integers(0, S + 1)), label="capacity")
    r = moe_route(torch.randn(S, E, device=device), k, capacity)
    assert int(r.exp_counts.sum()) == k * S
    offs = r.expert_offsets.long().cpu()
    assert offs[0] == 0 and bool((offs[1:] >= offs[:-1]).all()) and offs[-1] == int(r.keep.sum())
    slots = r.sorted_slots.long().cpu()
    assert sorted(slots.tolist()) == list(range(S * k))                 # a permutation of the slots
    flat_idx, flat_keep = r.indices.reshape(-1).cpu(), r.keep.reshape(-1).cpu()
    for e in range(E):
        group = slots[offs[e]:offs[e + 1]]
        assert bool((flat_idx[group] == e).all()) and bool(flat_keep[group].all())
        if capacity is not None:
            assert group.numel() <= capacity
    assert not bool(flat_keep[slots[offs[-1]:]].any())


# ------------------------------------------------------------------------------------------ hyper attention

@st.composite
def image_layout(draw, B, Lk):
    """Per sample: sorted distinct image positions in [0, Lk); returns (positions, cu_images)."""
    positions, cu = [], [0]
    for _ in range(B):
        n = draw(st.integers(0, min(3, Lk)))
        pos = sorted(draw(st.lists(st.integers(0, Lk - 1), min_size=n, max_size=n, unique=True)))
        positions += pos
        cu.append(cu[-1] + n)
    return positions, cu


@seed(SESSION_SEED)
@PROPERTY
@given(data=st.data(), dtype=DTYPES)
def test_hyper_attention_matches_reference(device, data, dtype):
    B = data.draw(st.integers(1, 2), label="B")
    Lk = data.draw(st.integers(1, 20), label="L_k")
    Lq = data.draw(st.integers(1, Lk), label="L_q")
    Hkv = data.draw(st.sampled_from([1, 2]), label="H_kv")
    H = Hkv * data.draw(st.sampled_from([1, 2]), label="group")
    D = 16
    T = data.draw(st.integers(1, 9), label="T")
    mode = data.draw(st.sampled_from(["gated", "joint"]), label="mode")
    visibility = data.draw(st.sampled_from(["strict", "inclusive"]), label="visibility")
    positions, cu = data.draw(image_layout(B, Lk), label="layout")
    padded = data.draw(st.booleans(), label="left padding")
    N = len(positions)
    kpm = None
    if padded:
        lengths = [data.draw(st.integers(1, Lk)) for _ in range(B)]
        kpm = torch.stack([torch.arange(Lk) >= Lk - n for n in lengths]).to(device)
    q = _leaf(torch.randn(B, Lq, H, D), device, dtype)
    k, v = (_leaf(torch.randn(B, Lk, Hkv, D), device, dtype) for _ in range(2))
    kv, vv = (_leaf(torch.randn(N, T, Hkv, D), device, dtype) for _ in range(2))
    gate = _leaf(torch.randn(H * D), device, dtype) if mode == "gated" else None
    pos = torch.tensor(positions, dtype=torch.int64, device=device)
    cu_images = torch.tensor(cu, dtype=torch.int32, device=device)

    def fn(q, k, v, kv, vv, gate):
        return hyper_attention(q, k, v, kv, vv, pos.to(q.device), cu_images.to(q.device), mode=mode, gate=gate,
                               visibility=visibility,
                               key_padding_mask=None if kpm is None else kpm.to(q.device))

    _compare_backends(f"hyper_attention[{mode},{visibility}]", fn, [q, k, v, kv, vv, gate], dtype)


@seed(SESSION_SEED)
@PROPERTY
@given(data=st.data(), dtype=DTYPES)
def test_visual_kv_matches_reference(device, data, dtype):
    N = data.draw(st.integers(0, 3), label="N")
    T = data.draw(st.integers(1, 7), label="T")
    Dm = data.draw(st.integers(1, 24), label="Dm")
    Hkv = data.draw(st.sampled_from([1, 2]), label="H_kv")
    D = 16
    norm = data.draw(st.booleans(), label="norm")
    bias = data.draw(st.booleans(), label="bias")
    offset = data.draw(st.sampled_from([0, 1]), label="position_offset")
    pos = torch.randint(0, 50, (N,), device=device)
    leaves = [_leaf(torch.randn(N, T, Dm), device, dtype),
              _leaf(1 + 0.1 * torch.randn(Dm), device, dtype) if norm else None,
              _leaf(torch.randn(2 * Hkv * D, Dm) / Dm**0.5, device, dtype),
              _leaf(0.1 * torch.randn(2 * Hkv * D), device, dtype) if bias else None]

    def fn(x, nw, w, b):
        kv, vv = visual_kv(x, nw, w, b, pos.to(x.device), num_kv_heads=Hkv, rope_theta=1e4,
                           position_offset=offset)
        return torch.cat([kv, vv], -1)

    _compare_backends("visual_kv", fn, leaves, dtype)
