"""Partial-LoRA hardening: dropout RNG counters, double backward, 1-D / K = 0 / meta inputs,
int64 offsets, every requires_grad combination, and the raw ops' argument checks.

Every test runs the Triton kernels on CPU through the interpreter (tiny shapes) and, where the
behaviour is shared, the reference backend too.
"""
import itertools
import os
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from mmkernels import PLoRALinear, plora_linear, plora_linear_reference, use_backend
from mmkernels.ops.plora import launch
from mmkernels.ops.plora.function import plora_backward_op, plora_forward_op
from mmkernels.testing import assert_close

from conftest import HAS_CUDA, KERNEL_DEVICES

DEVICE = "cuda" if HAS_CUDA else "cpu"
BACKENDS = ["reference"] + (["triton"] if KERNEL_DEVICES else [])
NAMES = ("x", "weight", "bias", "lora_a", "lora_b")


def make_inputs(lead, K, N, r, dtype=torch.float32, device=DEVICE, bias=True):
    x = torch.randn(*lead, K, dtype=dtype, device=device)
    w = (torch.randn(N, K, device=device) / max(K, 1) ** 0.5).to(dtype)
    b = torch.randn(N, dtype=dtype, device=device) if bias else None
    a = (torch.randn(r, K, device=device) / max(K, 1) ** 0.5).to(dtype)
    lb = (torch.randn(N, r, device=device) / r**0.5).to(dtype)  # nonzero B: the LoRA path is live
    return x, w, b, a, lb


def mixed_mask(M, device=DEVICE):
    """Visual rows in both 16-row tiles, text rows in both, and a fully text tile when M > 32."""
    m = torch.zeros(M, dtype=torch.bool, device=device)
    m[1:5] = True
    m[13:19] = True
    return m


def reference_grads(inputs, mask, gy, scaling, **kw):
    refs = [t.detach().double().requires_grad_() if t is not None else None for t in inputs]
    y = plora_linear_reference(*refs, mask, scaling=scaling, **kw)
    y.backward(gy.double())
    return y, [t.grad if t is not None else None for t in refs]


# --------------------------------------------------------------------------- dropout RNG

@pytest.mark.parametrize("device", KERNEL_DEVICES)
@pytest.mark.parametrize("K", [64, 16384])
def test_dropout_rows_2_pow_32_over_k_apart_draw_different_masks(device, K):
    """A flat ``row*K + col`` counter wraps in 32 bits: rows r and r + 2**32/K drew identical masks
    (K = 16384: rows 5 and 262,149).  Rows 2**32 apart (the counter's high word) differ too."""
    seed = torch.tensor([20240917], dtype=torch.int64, device=device)
    p = 0.5
    near = launch.dropout_keep_mask(seed, 1, K, p, row_offset=5)
    for far_row in (5 + 2**32 // K, 5 + 2**32):
        far = launch.dropout_keep_mask(seed, 1, K, p, row_offset=far_row)
        assert not torch.equal(near, far), f"rows 5 and {far_row} share a dropout mask"
        agree = (near == far).float().mean().item()
        assert abs(agree - 0.5) < (0.2 if K == 64 else 0.03), agree  # independent draws agree ~50%


@pytest.mark.parametrize("device", KERNEL_DEVICES)
def test_dropout_mask_row_offset_is_the_same_stream(device):
    """``row_offset`` shifts the window, not the stream: the far-row test checks the kernels' mask."""
    seed = torch.tensor([99], dtype=torch.int64, device=device)
    full = launch.dropout_keep_mask(seed, 45, 40, 0.3)
    window = launch.dropout_keep_mask(seed, 30, 40, 0.3, row_offset=15)
    assert torch.equal(full[15:], window)
    assert abs(full.float().mean().item() - 0.7) < 0.05
    with pytest.raises(ValueError, match="row_offset"):
        launch.dropout_keep_mask(seed, 1, 4, 0.3, row_offset=-1)


def _philox4x32_10(key: int, counters):
    """Philox4x32-10 (Salmon et al., SC'11), written out in numpy: the four uint32 words of each
    counter row ``[n, 4]`` under the 64-bit ``key``; Triton's ``tl.philox`` constants and key schedule."""
    import numpy as np
    c = [counters[:, i].astype(np.uint64) for i in range(4)]
    k0, k1 = np.uint64(key & 0xFFFFFFFF), np.uint64(key >> 32)
    m32 = np.uint64(0xFFFFFFFF)
    for _ in range(10):
        p0, p1 = np.uint64(0xCD9E8D57) * c[2], np.uint64(0xD2511F53) * c[0]    # exact: 32 x 32 bits
        c = [(p0 >> np.uint64(32)) ^ c[1] ^ k0, p0 & m32, (p1 >> np.uint64(32)) ^ c[3] ^ k1, p1 & m32]
        k0, k1 = (k0 + np.uint64(0x9E3779B9)) & m32, (k1 + np.uint64(0xBB67AE85)) & m32
    return np.stack(c, axis=1).astype(np.uint32)


def _uniform(words):
    """Triton's ``uint_to_uniform_float`` of uint32 words, in float32 (numpy)."""
    import numpy as np
    x = words.view(np.int32)
    return np.where(x < 0, ~x, x).astype(np.float32) * np.float32(4.6566127342e-10)


@pytest.mark.parametrize("device", KERNEL_DEVICES)
@pytest.mark.parametrize("p", [0.0, 0.3, 1.0])
def test_dropout_mask_is_the_documented_philox_stream(device, p):
    """The contract in ``_gemm.kernels.dropout_keep``: keep[m, k] = uniform(word k % 4 of
    Philox4x32-10(key=seed, counter=(k // 4, m_lo, m_hi, 0))) >= p, checked against a numpy Philox
    (rows across the 2**32 boundary, so the row's high counter word is exercised; a ragged K)."""
    import numpy as np
    seed, K, row0 = 0x1234_5678_9ABC_DEF0 % 2**62, 37, 2**32 - 3
    keep = launch.dropout_keep_mask(torch.tensor([seed], dtype=torch.int64, device=device), 6, K, p,
                                    row_offset=row0).cpu().numpy()
    rows = np.arange(row0, row0 + 6, dtype=np.uint64)
    groups = np.arange((K + 3) // 4, dtype=np.uint64)
    ctr = np.stack(np.broadcast_arrays(groups[None, :], (rows & np.uint64(0xFFFFFFFF))[:, None],
                                       (rows >> np.uint64(32))[:, None], np.uint64(0)), axis=-1).reshape(-1, 4)
    words = _philox4x32_10(seed, ctr).reshape(6, -1)[:, :K]      # [m, 4 j + i] = word i of group j
    expected = _uniform(words) >= np.float32(p)
    assert np.array_equal(keep, expected) and expected.all() == (p == 0.0) and expected.any() == (p < 1.0)


@pytest.mark.parametrize("p", [0.0, 1e-12, 2.0**-31, 0.05, 0.1, 1 / 3, 0.5, 0.7, 0.999999, 1.0])
def test_dropout_threshold_is_the_float_rule(p):
    """``uniform(word) >= p`` (float32) is ``x >= dropout_threshold(p)`` for x = the word's 31-bit value
    (the kernels compare integers): exact at the threshold and its neighbours, and on random words."""
    import numpy as np
    from mmkernels.ops._gemm.launch import dropout_threshold
    t = dropout_threshold(p)
    assert 0 <= t <= 2**31 and (t == 2**31) == (p == 1.0)     # p = 1 keeps nothing
    xs = np.array([t - 2, t - 1, t, t + 1, t + 2], dtype=np.int64)
    xs = xs[(xs >= 0) & (xs < 2**31)]
    rng = np.random.default_rng(17)
    words = np.concatenate([xs, ~xs, rng.integers(-2**31, 2**31, 4096)]).astype(np.int32).view(np.uint32)
    x = words.view(np.int32)
    x = np.where(x < 0, ~x, x).astype(np.int64)
    assert np.array_equal(_uniform(words) >= np.float32(p), x >= t)


# --------------------------------------------------------------------------- double backward

def _second_order(backend, dtype):
    x, w, b, a, lb = make_inputs((20,), 12, 10, 4, dtype=dtype)
    leaves = [t.requires_grad_() for t in (x, w, b, a, lb)]
    mask = mixed_mask(20)
    with use_backend(backend):
        y = plora_linear(*leaves, mask, scaling=0.7)
        (gx,) = torch.autograd.grad((y * y).sum(), leaves[0], create_graph=True)
        return leaves, gx


@pytest.mark.skipif(not KERNEL_DEVICES, reason="no Triton device")
def test_double_backward_on_triton_raises_naming_plora_linear():
    leaves, gx = _second_order("triton", torch.float32)
    with pytest.raises(RuntimeError, match="plora_linear"):
        torch.autograd.grad(gx.sum(), leaves[1])
    leaves, gx = _second_order("triton", torch.float32)
    with pytest.raises(RuntimeError, match="plora_linear"):
        gx.sum().backward()


def test_double_backward_on_reference_is_a_real_second_derivative():
    leaves, gx = _second_order("reference", torch.float64)
    (gw,) = torch.autograd.grad(gx.sum(), leaves[1])
    assert gw.abs().max() > 0
    x, w, b, a, lb = make_inputs((2, 5), 6, 4, 3, dtype=torch.float64, device="cpu")
    mask = torch.tensor([[1, 0, 1, 1, 0], [0, 0, 1, 0, 1]], dtype=torch.bool)
    inputs = [t.requires_grad_() for t in (x, w, b, a, lb)]
    with use_backend("reference"):
        assert torch.autograd.gradgradcheck(lambda *t: plora_linear(*t, mask, scaling=0.7), inputs)


# --------------------------------------------------------------------------- every requires_grad combination

COMBOS = list(itertools.product([False, True], repeat=5))


@pytest.mark.parametrize("backend", BACKENDS)
def test_every_requires_grad_combination_matches_float64_reference(backend):
    """32 combinations of which of (x, weight, bias, lora_a, lora_b) require grad.  Kills the mutants
    'dS computed only when dX is needed' (x and W0 frozen: dA wrong) and 'db0 skipped when W0 is
    frozen' (db0 garbage)."""
    M, K, N, r = 37, 20, 18, 6
    base = make_inputs((M,), K, N, r)
    mask = mixed_mask(M)
    gy = torch.randn(M, N, device=DEVICE)
    _, ref = reference_grads(base, mask, gy, 0.5)
    for combo in COMBOS:
        leaves = [t.clone().requires_grad_(flag) for t, flag in zip(base, combo)]
        with use_backend(backend):
            y = plora_linear(*leaves, mask, scaling=0.5)
        assert y.requires_grad == any(combo)
        if any(combo):
            y.backward(gy)
        for name, t, flag, want in zip(NAMES, leaves, combo, ref):
            if not flag:
                assert t.grad is None, f"{combo}: {name} is frozen but got a gradient"
                continue
            assert t.grad is not None, f"{combo}: no gradient for {name}"
            assert_close(f"{combo} d{name}", t.grad, want, torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
def test_frozen_base_with_trainable_bias_and_lora(backend):
    """W0 and x frozen, bias and LoRA trainable, no bias on one call: values, not just not-None."""
    M, K, N, r = 40, 24, 20, 8
    x, w, b, a, lb = make_inputs((M,), K, N, r)
    mask = mixed_mask(M)
    gy = torch.randn(M, N, device=DEVICE)
    for bias in (b, None):
        leaves = [x, w, bias.clone().requires_grad_() if bias is not None else None,
                  a.clone().requires_grad_(), lb.clone().requires_grad_()]
        with use_backend(backend):
            y = plora_linear(*leaves, mask, scaling=1.5)
        y.backward(gy)
        _, ref = reference_grads(leaves, mask, gy, 1.5)
        for name, t, want in list(zip(NAMES, leaves, ref))[2:]:
            if t is not None:
                assert_close(f"d{name}", t.grad, want, torch.float32)


# --------------------------------------------------------------------------- shapes: 1-D, K = 0, N = 0

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("visual", [True, False])
def test_one_dimensional_x(backend, visual):
    """A single token ``x [K]`` with a 0-d mask: both backends agree with the 2-D form."""
    x, w, b, a, lb = make_inputs((), 24, 20, 8)
    mask = torch.tensor(visual, device=DEVICE)
    leaves = [t.clone().requires_grad_() for t in (x, w, b, a, lb)]
    with use_backend(backend):
        y = plora_linear(*leaves, mask, scaling=2.0)
    assert y.shape == (20,)
    gy = torch.randn(20, device=DEVICE)
    y.backward(gy)
    y_ref, ref = reference_grads((x[None], w, b, a, lb), mask.reshape(1), gy[None], 2.0)
    assert_close("y", y, y_ref[0], torch.float32)
    for name, t, want in zip(NAMES, leaves, ref):
        assert_close(f"d{name}", t.grad, want[0] if name == "x" else want, torch.float32)
    with pytest.raises(ValueError, match=r"im_mask must have shape \(\).*0-d"):
        plora_linear(x, w, b, a, lb, mask.reshape(1))


@pytest.mark.parametrize("backend", BACKENDS)
def test_module_one_dimensional_x(backend):
    layer = PLoRALinear(16, 12, bias=True, lora_r=4, lora_alpha=8, lora_dropout=0.0, device=DEVICE)
    torch.nn.init.normal_(layer.Plora_B.weight)
    x = torch.randn(16, device=DEVICE)
    with use_backend(backend):
        y_text, y_vis = layer(x), layer(x, torch.tensor(True, device=DEVICE))
        y_rows = layer(x[None], torch.tensor([True], device=DEVICE))
    torch.testing.assert_close(y_text, F.linear(x, layer.weight, layer.bias))
    torch.testing.assert_close(y_vis, y_rows[0])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bias", [True, False])
def test_zero_in_features(backend, bias):
    """K = 0: y is the bias (or zeros); dx/dW0/dA are empty, db0 sums dY, dB is zero."""
    M, N, r = 21, 10, 4
    x, w, b, a, lb = make_inputs((3, 7), 0, N, r, bias=bias)
    mask = mixed_mask(M).view(3, 7)
    leaves = [t.clone().requires_grad_() if t is not None else None for t in (x, w, b, a, lb)]
    with use_backend(backend):
        y = plora_linear(*leaves, mask, scaling=1.0)
    expect = (b if bias else torch.zeros(N, device=DEVICE)).expand(3, 7, N)
    torch.testing.assert_close(y, expect)
    gy = torch.randn(3, 7, N, device=DEVICE)
    y.backward(gy)
    assert leaves[0].grad.shape == (3, 7, 0) and leaves[1].grad.shape == (N, 0) and leaves[3].grad.shape == (r, 0)
    if bias:
        torch.testing.assert_close(leaves[2].grad, gy.sum((0, 1)))
    assert torch.count_nonzero(leaves[4].grad) == 0


@pytest.mark.skipif(not KERNEL_DEVICES, reason="no Triton device")
def test_zero_in_features_frozen_weight_trainable_bias():
    """K = 0 with only db0 wanted launched the dW0/db0 kernel, whose column index wraps % K: an integer
    division by zero (a RuntimeWarning in the interpreter, undefined on a GPU)."""
    x, w, b, a, lb = make_inputs((5,), 0, 6, 3)
    b.requires_grad_()
    with use_backend("triton"), warnings.catch_warnings():
        warnings.simplefilter("error")
        y = plora_linear(x, w, b, a, lb, mixed_mask(5), scaling=1.0)
        gy = torch.randn(5, 6, device=DEVICE)
        y.backward(gy)
    torch.testing.assert_close(b.grad, gy.sum(0))


@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_out_features(backend):
    x, w, b, a, lb = make_inputs((9,), 12, 0, 4)
    leaves = [t.clone().requires_grad_() for t in (x, w, b, a, lb)]
    with use_backend(backend):
        y = plora_linear(*leaves, mixed_mask(9), scaling=1.0)
    assert y.shape == (9, 0)
    y.sum().backward()
    assert torch.count_nonzero(leaves[0].grad) == 0 and torch.count_nonzero(leaves[3].grad) == 0


# --------------------------------------------------------------------------- meta device

@pytest.mark.parametrize("backend", BACKENDS)
def test_meta_tensors_infer_the_output_shape(backend):
    x, w, b, a, lb = (t.to("meta") for t in make_inputs((2, 5), 16, 12, 4, device="cpu"))
    mask = torch.zeros(2, 5, dtype=torch.bool, device="meta")
    with use_backend(backend):
        y = plora_linear(x, w, b, a, lb, mask, dropout_p=0.1, training=True)
        y1 = plora_linear(x[0, 0], w, b, a, lb, mask[0, 0])
    assert y.shape == (2, 5, 12) and y.device.type == "meta" and y.dtype == torch.float32
    assert y1.shape == (12,) and y1.device.type == "meta"


@pytest.mark.parametrize("backend", BACKENDS)
def test_module_builds_and_runs_on_meta(backend):
    with torch.device("meta"):
        layer = PLoRALinear(16, 12, bias=True, lora_r=4, dtype=torch.bfloat16)
    x = torch.randn(3, 16, device="meta", dtype=torch.bfloat16)
    with use_backend(backend):
        y = layer(x, torch.ones(3, dtype=torch.bool, device="meta"))
        y_none = layer(x)
    assert y.shape == y_none.shape == (3, 12) and y.device.type == "meta" and y.dtype == torch.bfloat16
    layer = layer.to_empty(device=DEVICE).to(torch.float32)  # materialise, as checkpoint loaders do
    layer.reset_parameters()
    layer.reset_lora_parameters()
    assert layer(torch.randn(3, 16, device=DEVICE)).shape == (3, 12)


# --------------------------------------------------------------------------- strided bias, validation

@pytest.mark.skipif(not KERNEL_DEVICES, reason="no Triton device")
def test_strided_bias_view():
    """The forward read the bias as contiguous: a ``bias[::2]`` view got the wrong elements."""
    x, w, _, a, lb = make_inputs((20,), 16, 12, 4)
    b = torch.randn(24, device=DEVICE)[::2].requires_grad_()
    mask = mixed_mask(20)
    with use_backend("triton"):
        y = plora_linear(x, w, b, a, lb, mask, scaling=1.0)
    y_ref, ref = reference_grads((x, w, b, a, lb), mask, torch.ones_like(y), 1.0)
    assert_close("y", y, y_ref, torch.float32)


def _op_args():
    x, w, b, a, lb = make_inputs((20,), 16, 12, 4)
    mask = mixed_mask(20)
    return dict(x=x, weight=w, bias=b, lora_a=a, lora_b=lb, im_mask=mask, tile_flags=launch.tile_flags(mask),
                scaling=1.0, dropout_p=0.0, dropout_seed=None)


RAW_OP_BAD = [  # (change, exception, words the message must contain)
    ("flags_short", ValueError, "tile_flags"),
    ("flags_dtype", TypeError, "tile_flags"),
    ("mask_strided", ValueError, "im_mask must be contiguous"),
    ("mask_2d", ValueError, "im_mask"),
    ("p_without_seed", ValueError, "dropout_seed"),
    ("seed_dtype", TypeError, "dropout_seed"),
    ("x_3d", ValueError, "x must be 2-D"),
    ("mixed_dtype", TypeError, "lora_b"),
    ("dropout_range", ValueError, "dropout_p"),
]


@pytest.mark.skipif(not KERNEL_DEVICES, reason="no Triton device")
@pytest.mark.parametrize("case,exc,words", RAW_OP_BAD, ids=[c[0] for c in RAW_OP_BAD])
def test_raw_op_checks_its_arguments(case, exc, words):
    """The ops read the mask and flags as flat arrays and the seed as one int64: a wrong one was read
    out of place (or, for a missing seed, dropout was silently off)."""
    kw = _op_args()
    if case == "flags_short":
        kw["tile_flags"] = kw["tile_flags"][:1]
    elif case == "flags_dtype":
        kw["tile_flags"] = kw["tile_flags"].long()
    elif case == "mask_strided":
        kw["im_mask"] = torch.stack([kw["im_mask"], kw["im_mask"]], 1)[:, 0]
    elif case == "mask_2d":
        kw["im_mask"] = kw["im_mask"].view(4, 5)
    elif case == "p_without_seed":
        kw["dropout_p"] = 0.2
    elif case == "seed_dtype":
        kw["dropout_p"], kw["dropout_seed"] = 0.2, torch.tensor([3.0], device=DEVICE)
    elif case == "x_3d":
        kw["x"] = kw["x"].view(4, 5, 16)
    elif case == "mixed_dtype":
        kw["lora_b"] = kw["lora_b"].half()
    elif case == "dropout_range":
        kw["dropout_p"] = 1.5
    with pytest.raises(exc, match=words):
        plora_forward_op(*kw.values())


_EMPTY_SEED = textwrap.dedent("""
    import torch, mmkernels
    from mmkernels.ops.plora import launch
    from mmkernels.ops.plora.function import plora_forward_op
    x, w, a, lb = torch.randn(20, 16), torch.randn(12, 16), torch.randn(4, 16), torch.randn(12, 4)
    mask = torch.zeros(20, dtype=torch.bool); mask[3:9] = True
    try:
        plora_forward_op(x, w, None, a, lb, mask, launch.tile_flags(mask), 1.0, 0.2, torch.zeros(0, dtype=torch.int64))
    except ValueError as e:
        assert "dropout_seed" in str(e), e
        print("EMPTY-SEED-REJECTED", flush=True)
""")


@pytest.fixture(scope="module")
def isolated_run():
    """One fresh interpreter-mode Python for the crash-prone checks (an out-of-bounds read aborts the
    process: it must fail a test, not kill pytest).  Each check prints its marker when it passes."""
    code = _EMPTY_SEED + _BIG_STRIDES.replace("SEED", str(torch.initial_seed() % 2**31))
    env = dict(os.environ, TRITON_INTERPRET="1", MMKERNELS_BACKEND="",
               PYTHONPATH=os.pathsep.join([str(Path(__file__).resolve().parent.parent), os.environ.get("PYTHONPATH", "")]))
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)


def assert_isolated(proc, marker):
    assert marker in proc.stdout, f"rc={proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"


def test_raw_op_rejects_an_empty_seed(isolated_run):
    """An empty dropout_seed was read out of bounds (the interpreter crashed)."""
    assert_isolated(isolated_run, "EMPTY-SEED-REJECTED")


@pytest.mark.skipif(not KERNEL_DEVICES, reason="no Triton device")
def test_raw_ops_verify_tile_flags_values():
    """Flags of the right shape but wrong values made the kernels skip visual rows' LoRA term
    silently; the ops compare them with the mask unless told not to (check_metadata=False)."""
    kw = _op_args()
    good = kw["tile_flags"]
    kw["tile_flags"] = torch.zeros_like(good)
    with pytest.raises(ValueError, match="tile_flags do not match im_mask"):
        plora_forward_op(*kw.values())
    y_unchecked, _ = plora_forward_op(*kw.values(), False)  # the opt-out trusts them (and skips the LoRA)
    kw["tile_flags"] = good
    y, s = plora_forward_op(*kw.values())
    assert not torch.equal(y, y_unchecked)
    args = [torch.ones_like(y), kw["x"], kw["weight"], kw["lora_a"], kw["lora_b"], s, kw["im_mask"],
            torch.zeros_like(good), 1.0, 0.0, None, [True] * 5]
    with pytest.raises(ValueError, match="tile_flags do not match im_mask"):
        plora_backward_op(*args)


@pytest.mark.skipif(not KERNEL_DEVICES, reason="no Triton device")
def test_raw_backward_op_checks_grad_and_hidden_shapes():
    kw = _op_args()
    y, s = plora_forward_op(*kw.values())
    args = [y, kw["x"], kw["weight"], kw["lora_a"], kw["lora_b"], s, kw["im_mask"], kw["tile_flags"], 1.0, 0.0, None,
            [True] * 5]
    with pytest.raises(ValueError, match="grad_y"):
        plora_backward_op(y[:-1], *args[1:])
    with pytest.raises(ValueError, match="lora_hidden"):
        plora_backward_op(*args[:5], s[:, :-1], *args[6:])


def test_reference_checks_its_dropout_mask():
    """The reference's explicit keep-mask gave a raw indexing error when its shape was wrong."""
    x, w, b, a, lb = make_inputs((6,), 8, 5, 2, device="cpu")
    mask = torch.ones(6, dtype=torch.bool)
    for bad, exc in ((torch.ones(6, 7, dtype=torch.bool), ValueError), (torch.ones(6, 8), TypeError)):
        with pytest.raises(exc, match="dropout_mask"):
            plora_linear_reference(x, w, b, a, lb, mask, dropout_p=0.5, training=True, dropout_mask=bad)


@pytest.mark.parametrize("kwargs,words", [(dict(lora_alpha="8"), "lora_alpha"), (dict(lora_dropout="x"), "lora_dropout"),
                                          (dict(lora_dropout=float("nan")), "lora_dropout")])
def test_module_constructor_names_bad_float_args(kwargs, words):
    with pytest.raises((TypeError, ValueError), match=words):
        PLoRALinear(8, 8, lora_r=4, **kwargs)


# --------------------------------------------------------------------------- int64 offsets

_BIG_STRIDES = textwrap.dedent(r"""
    import os, resource, torch
    os.environ["MMKERNELS_POISON_OUTPUTS"] = "1"
    import mmkernels
    from mmkernels import plora_linear, plora_linear_reference, use_backend
    from mmkernels.ops.plora import launch
    from mmkernels.ops.plora.function import plora_forward_op, plora_backward_op
    from mmkernels.testing import assert_close

    torch.manual_seed(SEED)
    # One 4.3 GB *virtual* fp16 buffer; only the few elements the views use are ever touched, so
    # the resident memory stays small.  Views place elements more than 2**31 elements apart while
    # every stride is < 2**31 (an int32 kernel argument): index * stride overflows in int32.
    buf = torch.empty(2**31 + 2**22, dtype=torch.float16)
    S1, S2 = 2**30 + 64, 2**27
    M, K, N, R = 20, 3, 12, 3
    def view(shape, stride, offset, scale):
        t = buf.as_strided(shape, stride, offset)
        t.copy_(torch.randn(shape) * scale)
        return t
    w = view((N, K), (1, S1), 0, 0.5)          # transposed W0: k * stride_wk reaches 2**31
    a = view((R, K), (1, S1), 1000, 0.5)       # transposed A
    lb = view((N, R), (1, S1), 2000, 0.5)      # transposed B: r * stride_br reaches 2**31
    x_cm = view((M, K), (1, S1), 3000, 1.0)    # column-major x (raw op): k * stride_xk
    x_rm = view((17, K), (S2, 1), 4000, 1.0)   # rows 2**27 apart: BLOCK_M * stride_xm steps
    mask = torch.zeros(M, dtype=torch.bool); mask[2:9] = True; mask[15:18] = True

    def check(x, mask, tag):
        flags = launch.tile_flags(mask)
        y, s = plora_forward_op(x, w, None, a, lb, mask, flags, 0.5, 0.0, None)
        gy = torch.randn(y.shape).half()
        grads = plora_backward_op(gy, x, w, a, lb, s, mask, flags, 0.5, 0.0, None, [True, True, False, True, True])
        refs = [t.detach().double().contiguous().requires_grad_() for t in (x, w, a, lb)]
        y_ref = plora_linear_reference(refs[0], refs[1], None, refs[2], refs[3], mask, scaling=0.5)
        y_ref.backward(gy.double())
        assert_close(tag + " y", y, y_ref, torch.float16)
        for name, got, ref in zip(("dx", "dW0", "dA", "dB"), (grads[0], grads[1], grads[3], grads[4]), refs):
            assert_close(tag + " " + name, got, ref.grad, torch.float16)

    check(x_cm, mask, "column-major x")
    check(x_rm, mask[:17], "row-strided x")
    with use_backend("triton"):   # the public path with the transposed weights
        x = torch.randn(M, K).half()
        y = plora_linear(x, w, None, a, lb, mask, scaling=0.5)
    y_ref = plora_linear_reference(x.double(), w.double(), None, a.double(), lb.double(), mask, scaling=0.5)
    assert_close("plora_linear y", y, y_ref, torch.float16)
    rss_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    assert rss_gb < 2.0, f"resident memory {rss_gb:.2f} GB: the buffer was touched"
    print("BIG-STRIDES-OK", round(rss_gb, 2))
""")


def test_offsets_past_2_pow_31_use_int64(isolated_run):
    """Strides < 2**31 whose products with an index pass 2**31 (transposed W0, A, B; strided x; the
    pointer steps of the K/N/M loops).  Isolated: an int32 wrap reads out of bounds."""
    assert_isolated(isolated_run, "BIG-STRIDES-OK")


@pytest.mark.skipif(not KERNEL_DEVICES, reason="no Triton device")
def test_raw_op_lora_hidden_is_not_differentiable():
    """The op's second output S has no term in the backward formula: a loss through it got a silently
    wrong gradient for lora_a and x.  It is now marked non-differentiable."""
    kw = _op_args()
    for name in ("x", "weight", "lora_a", "lora_b"):
        kw[name] = kw[name].requires_grad_()
    y, s = plora_forward_op(*kw.values())
    assert y.requires_grad and not s.requires_grad
    with pytest.raises(RuntimeError, match="does not require grad"):
        s.sum().backward()


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_functional_plora_linear_under_autocast(backend):
    """fp32 tensors under ``torch.autocast(bfloat16)``: both backends compute in bf16 and return bf16, as
    the original's nn.Linear calls do (the Triton path used to return fp32), with fp32 gradients."""
    x = torch.randn(2, 9, 24, requires_grad=True)
    w, a, b = torch.randn(20, 24), torch.randn(8, 24), torch.randn(20, 8)
    w.requires_grad_()
    m = torch.rand(2, 9) < 0.5
    with torch.autocast("cpu", dtype=torch.bfloat16), use_backend(backend):
        y = plora_linear(x, w, None, a, b, m, scaling=0.5)
    assert y.dtype == torch.bfloat16
    expected = plora_linear_reference(x.bfloat16().double(), w.bfloat16().double(), None, a.bfloat16().double(),
                                      b.bfloat16().double(), m, 0.5)
    assert_close("y", y, expected, torch.bfloat16)
    y.float().sum().backward()
    assert x.grad.dtype == torch.float32 and w.grad.dtype == torch.float32


def test_ops_reject_keep_bits_of_the_wrong_shape_or_dtype():
    """The packed dropout keep-mask the ops trust must be launch.dropout_keep_bits's int32 [M, cdiv(K, 32)]."""
    x, w, a, lb = torch.randn(20, 40), torch.randn(12, 40), torch.randn(4, 40), torch.randn(12, 4)
    mask = torch.zeros(20, dtype=torch.bool)
    mask[3:9] = True
    flags, seed = launch.tile_flags(mask), torch.tensor([5], dtype=torch.int64)
    bits = launch.dropout_keep_bits(mask, flags, seed, 20, 40, 0.2)
    y, s = plora_forward_op(x, w, None, a, lb, mask, flags, 1.0, 0.2, seed, True, bits)
    for bad in (bits[:, :1], bits.to(torch.int64), bits[:-1]):
        with pytest.raises((ValueError, TypeError), match="dropout_keep_bits"):
            plora_forward_op(x, w, None, a, lb, mask, flags, 1.0, 0.2, seed, True, bad)
        with pytest.raises((ValueError, TypeError), match="dropout_keep_bits"):
            plora_backward_op(torch.randn(20, 12), x, w, a, lb, s, mask, flags, 1.0, 0.2, seed, [True] * 5, True, bad)
