"""Partial-LoRA: Triton kernels (interpreter on CPU, compiled on GPU) against the float64 reference."""
import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import mmkernels
from mmkernels import PLoRALinear, plora_linear, plora_linear_reference, use_backend
from mmkernels.ops.plora import launch
from mmkernels.ops.plora.baseline import XComposerPLoRA
from mmkernels.ops.plora.function import plora_forward_op
from mmkernels.testing import assert_close

from conftest import HAS_CUDA, KERNEL_DEVICES

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def make_mask(kind: str, lead: tuple) -> torch.Tensor:
    """Visual-token masks: none, all, one row, scattered, and a span crossing tile boundaries."""
    M = 1
    for d in lead:
        M *= d
    m = torch.zeros(M, dtype=torch.bool)
    if kind == "all":
        m[:] = True
    elif kind == "single":
        m[M // 2] = True
    elif kind == "scattered":
        m = torch.rand(M) < 0.35
        m[0] = True
    elif kind == "span":  # one image block from row 13 to row 13 + 40 (crosses 16/32-row tiles)
        m[13:min(M, 53)] = True
    return m.view(lead)


def make_inputs(lead, K, N, r, dtype, device, bias=True):
    x = torch.randn(*lead, K, dtype=dtype, device=device)
    w = (torch.randn(N, K, device=device) / K**0.5).to(dtype)
    b = torch.randn(N, dtype=dtype, device=device) if bias else None
    a = (torch.randn(r, K, device=device) / K**0.5).to(dtype)
    lb = (torch.randn(N, r, device=device) / r**0.5).to(dtype)  # nonzero B, or the LoRA path is untested
    return x, w, b, a, lb


def run_both(x, w, b, a, lb, mask, scaling, dtype, backend="triton"):
    """Run the chosen backend and the float64 reference on the same inputs; compare y and all grads."""
    leaves = [t.clone().requires_grad_() if t is not None else None for t in (x, w, b, a, lb)]
    with use_backend(backend):
        y = plora_linear(*leaves, mask, scaling=scaling)
    gy = torch.randn_like(y)
    y.backward(gy)
    refs = [t.detach().double().requires_grad_() if t is not None else None for t in (x, w, b, a, lb)]
    y_ref = plora_linear_reference(*refs, mask, scaling=scaling)
    y_ref.backward(gy.double())
    assert_close("y", y, y_ref, dtype)
    for name, got, ref in zip(("dx", "dW0", "db0", "dA", "dB"), leaves, refs):
        if got is not None:
            assert got.grad is not None, f"{name} is None"
            assert_close(name, got.grad, ref.grad, dtype)
    return y, leaves


SHAPES = [  # (leading dims, K, N, r): none of K, N, r, M a multiple of the interpreter blocks
    pytest.param((2, 37), 48, 40, 16, id="B2-L37-K48-N40-r16"),
    pytest.param((70,), 40, 45, 20, id="M70-K40-N45-r20"),
]


@pytest.mark.parametrize("device", KERNEL_DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("mask_kind", ["none", "all", "single", "scattered", "span"])
@pytest.mark.parametrize("lead,K,N,r", SHAPES)
def test_triton_matches_reference(device, dtype, mask_kind, lead, K, N, r):
    x, w, b, a, lb = make_inputs(lead, K, N, r, dtype, device, bias=mask_kind != "single")
    mask = make_mask(mask_kind, lead).to(device)
    run_both(x, w, b, a, lb, mask, 0.5, dtype)


@pytest.mark.parametrize("device", KERNEL_DEVICES)
def test_text_rows_are_exactly_the_base_linear(device):
    x, w, b, a, lb = make_inputs((64,), 48, 40, 16, torch.float16, device)
    mask = make_mask("scattered", (64,)).to(device)
    with use_backend("triton"):
        y = plora_linear(x, w, b, a, lb, mask)
        y_base = plora_linear(x, w, b, a, lb, torch.zeros_like(mask))
    assert torch.equal(y[~mask], y_base[~mask])
    assert not torch.equal(y[mask], y_base[mask])
    assert_close("base", y_base, F.linear(x.double(), w.double(), b.double()), torch.float16)


@pytest.mark.parametrize("backend", ["reference", pytest.param("triton", marks=pytest.mark.skipif(
    not KERNEL_DEVICES, reason="no Triton device"))])
def test_no_visual_rows_gives_zero_lora_grads(backend):
    device = "cuda" if HAS_CUDA else "cpu"
    x, w, b, a, lb = make_inputs((3, 11), 32, 24, 16, torch.float32, device)
    leaves = [t.requires_grad_() for t in (x, w, b, a, lb)]
    mask = torch.zeros(3, 11, dtype=torch.bool, device=device)
    with use_backend(backend):
        y = plora_linear(*leaves, mask, scaling=2.0)
    torch.testing.assert_close(y, F.linear(x, w, b))
    y.sum().backward()
    for t in (leaves[3], leaves[4]):
        assert t.grad is not None and torch.count_nonzero(t.grad) == 0


def _assert_dropout_reference(y, gy, leaves, inputs, mask, p, keep, dtype):
    """``y`` (scaling 0.5, dropout ``p``) and its leaves' gradients after ``y.backward(gy)`` against the
    float64 reference given the keep-mask ``keep``."""
    refs = [t.detach().double().requires_grad_() for t in inputs]
    y_ref = plora_linear_reference(*refs, mask, scaling=0.5, dropout_p=p, training=True, dropout_mask=keep)
    y_ref.backward(gy.double())
    assert_close("y", y, y_ref, dtype)
    for name, got, ref in zip(("dx", "dW0", "db0", "dA", "dB"), leaves, refs):
        assert_close(name, got.grad, ref.grad, dtype)


@pytest.mark.parametrize("device", KERNEL_DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_dropout_matches_reference_with_shared_mask(device, dtype):
    """The kernels' seeded dropout equals the reference given the same keep-mask, forward and backward."""
    M, K, N, r, p = 50, 40, 36, 16, 0.3
    x, w, b, a, lb = make_inputs((M,), K, N, r, dtype, device)
    mask = make_mask("span", (M,)).to(device)
    seed = torch.tensor([1234567], dtype=torch.int64, device=device)
    keep = launch.dropout_keep_mask(seed, M, K, p)
    flags = launch.tile_flags(mask)
    leaves = [t.clone().requires_grad_() for t in (x, w, b, a, lb)]
    y, _ = plora_forward_op(leaves[0], leaves[1], leaves[2], leaves[3], leaves[4], mask, flags, 0.5, p, seed)
    gy = torch.randn_like(y)
    y.backward(gy)
    _assert_dropout_reference(y, gy, leaves, (x, w, b, a, lb), mask, p, keep, dtype)


@pytest.mark.parametrize("device", KERNEL_DEVICES)
def test_dropout_statistics(device):
    """Keep rate ~ 1 - p; text rows untouched; a new mask on every call."""
    M, K, p = 256, 64, 0.25
    seed = torch.tensor([42], dtype=torch.int64, device=device)
    keep = launch.dropout_keep_mask(seed, M, K, p)
    rate = keep.float().mean().item()
    assert abs(rate - (1 - p)) < 0.02, rate
    assert torch.equal(keep, launch.dropout_keep_mask(seed, M, K, p))
    assert not torch.equal(keep, launch.dropout_keep_mask(seed + 1, M, K, p))

    x, w, b, a, lb = make_inputs((64,), 48, 40, 16, torch.float32, device)
    mask = make_mask("scattered", (64,)).to(device)
    with use_backend("triton"):
        y1 = plora_linear(x, w, b, a, lb, mask, dropout_p=0.5, training=True)
        y2 = plora_linear(x, w, b, a, lb, mask, dropout_p=0.5, training=True)
        y_eval = plora_linear(x, w, b, a, lb, mask, dropout_p=0.5, training=False)
    assert torch.equal(y1[~mask], y_eval[~mask]) and torch.equal(y2[~mask], y_eval[~mask])
    assert not torch.equal(y1[mask], y2[mask])


@pytest.mark.parametrize("device", KERNEL_DEVICES)
@pytest.mark.parametrize("p", [0.05, 0.5])
def test_dropout_keep_bits_match_keep_mask(device, p):
    """The packed keep bits (drawn once per step) hold ``dropout_keep_mask`` on visual rows, 0 on text rows
    and past K; M and K are not multiples of 32 or of the block sizes."""
    for M, K in ((53, 75), (37, 33), (1, 5)):
        mask = make_mask("scattered", (M,)).to(device)
        seed = torch.randint(0, 2**31 - 1, (1,), dtype=torch.int64, device=device)
        bits = launch.dropout_keep_bits(mask, launch.tile_flags(mask), seed, M, K, p)
        assert bits.dtype == torch.int32 and bits.shape == (M, (K + 31) // 32)
        cols = torch.arange(bits.shape[1] * 32, device=device)
        unpacked = ((bits[:, cols // 32] >> (cols % 32)) & 1).bool()
        assert not unpacked[:, K:].any()
        assert torch.equal(unpacked[:, :K], launch.dropout_keep_mask(seed, M, K, p) & mask[:, None])


@pytest.mark.parametrize("device", KERNEL_DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_dropout_mask_drawn_once_per_step(device, dtype, monkeypatch):
    """plora_linear draws the keep-mask once (one launch of the mask kernel) for its forward and backward, and
    the result equals the reference under the mask of the seed it drew."""
    from mmkernels.ops.plora import kernels
    launches = []
    bits_kernel = kernels._dropout_bits_kernel

    class Counting:
        def __getitem__(self, grid):
            launches.append(grid)
            return bits_kernel[grid]

    monkeypatch.setattr(kernels, "_dropout_bits_kernel", Counting())
    M, K, N, r, p = 45, 71, 36, 16, 0.3
    x, w, b, a, lb = make_inputs((M,), K, N, r, dtype, device)
    mask = make_mask("span", (M,)).to(device)
    leaves = [t.clone().requires_grad_() for t in (x, w, b, a, lb)]
    state = torch.random.get_rng_state() if device == "cpu" else torch.cuda.get_rng_state()
    with use_backend("triton"):
        y = plora_linear(*leaves, mask, scaling=0.5, dropout_p=p, training=True)
    gy = torch.randn_like(y)
    y.backward(gy)
    assert len(launches) == 1
    # the seed plora_linear drew: the same draw from the same generator state
    if device == "cpu":
        torch.random.set_rng_state(state)
    else:
        torch.cuda.set_rng_state(state)
    seed = torch.randint(0, 2**31 - 1, (1,), dtype=torch.int64, device=device)
    keep = launch.dropout_keep_mask(seed, M, K, p)
    _assert_dropout_reference(y, gy, leaves, (x, w, b, a, lb), mask, p, keep, dtype)


def test_reference_gradcheck_float64():
    x, w, b, a, lb = make_inputs((2, 5), 6, 4, 3, torch.float64, "cpu")
    mask = torch.tensor([[1, 0, 1, 1, 0], [0, 0, 1, 0, 1]], dtype=torch.bool)
    inputs = [t.requires_grad_() for t in (x, w, b, a, lb)]
    assert torch.autograd.gradcheck(lambda *t: plora_linear_reference(*t, mask, scaling=0.7), inputs)


@pytest.mark.parametrize("device", KERNEL_DEVICES)
def test_tile_flags(device):
    for M in (0, 1, 15, 16, 17, 100):
        mask = (torch.rand(M) < 0.3).to(device)
        flags = launch.tile_flags(mask)
        assert flags.dtype == torch.int32 and flags.device == mask.device
        torch.testing.assert_close(flags.cpu(), launch._tile_flags_torch(mask.cpu()))


@pytest.mark.parametrize("device", KERNEL_DEVICES)
def test_opcheck(device):
    x, w, b, a, lb = make_inputs((40,), 32, 24, 16, torch.float32, device)
    mask = make_mask("span", (40,)).to(device)
    flags = launch.tile_flags(mask)
    seed = torch.tensor([7], dtype=torch.int64, device=device)
    base = [t.requires_grad_() for t in (x, w, b, a, lb)]
    permuted_w = w.detach().t().contiguous().t().requires_grad_()  # same values, column-major strides
    for args in (
        (*base, mask, flags, 0.5, 0.0, None),
        (base[0], permuted_w, None, base[3], base[4], mask, flags, 1.0, 0.2, seed),
        (*base, mask, flags, 0.5, 0.2, seed, True, launch.dropout_keep_bits(mask, flags, seed, 40, 32, 0.2)),
    ):
        torch.library.opcheck(torch.ops.mmkernels.plora_forward.default, args)
    torch.library.opcheck(torch.ops.mmkernels.plora_dropout_keep_bits.default, (mask, flags, seed, 32, 0.2))


@pytest.mark.parametrize("device", KERNEL_DEVICES)
def test_torch_compile_fullgraph(device):
    layer = PLoRALinear(32, 24, bias=True, lora_r=16, lora_alpha=8, lora_dropout=0.0, device=device)
    nn.init.normal_(layer.Plora_B.weight)
    x = torch.randn(2, 20, 32, device=device, requires_grad=True)
    mask = make_mask("span", (2, 20)).to(device)
    with use_backend("triton"):
        eager = layer(x, mask)
        compiled = torch.compile(layer, fullgraph=True)(x, mask)
    torch.testing.assert_close(compiled, eager)
    compiled.sum().backward()
    assert layer.Plora_A.weight.grad is not None and x.grad is not None


@pytest.mark.parametrize("device", KERNEL_DEVICES)
def test_torch_compile_fullgraph_with_dropout(device):
    """Training with LoRA dropout compiles in one graph (the packed keep-mask op and its fake included);
    text rows equal eager's exactly, visual rows get a fresh mask."""
    layer = PLoRALinear(32, 24, bias=True, lora_r=16, lora_alpha=8, lora_dropout=0.25, device=device).train()
    nn.init.normal_(layer.Plora_B.weight)
    x = torch.randn(2, 20, 32, device=device, requires_grad=True)
    mask = make_mask("span", (2, 20)).to(device)
    with use_backend("triton"):
        eager = layer(x, mask)
        compiled = torch.compile(layer, fullgraph=True)(x, mask)
    torch.testing.assert_close(compiled[~mask], eager[~mask])
    compiled.sum().backward()
    assert layer.Plora_A.weight.grad is not None and x.grad is not None


def test_state_dict_roundtrip_with_xcomposer_keys():
    original = XComposerPLoRA(48, 40, bias=True, lora_r=16, lora_alpha=16).eval()
    nn.init.normal_(original.Plora_B.weight)
    sd = original.state_dict()
    assert set(sd) == {"weight", "bias", "Plora_A.weight", "Plora_B.weight"}
    ours = PLoRALinear(48, 40, bias=True, lora_r=16, lora_alpha=16).eval()
    assert set(ours.state_dict()) == set(sd)
    ours.load_state_dict(sd)
    x = torch.randn(2, 9, 48)
    mask = make_mask("scattered", (2, 9))
    torch.testing.assert_close(ours(x, mask), original(x, mask))
    reloaded = PLoRALinear(48, 40, bias=True, lora_r=16, lora_alpha=16).eval()
    reloaded.load_state_dict(copy.deepcopy(ours.state_dict()))
    torch.testing.assert_close(reloaded(x, mask), ours(x, mask))


def test_from_linear_shares_parameters():
    linear = nn.Linear(32, 24, bias=True)
    layer = PLoRALinear.from_linear(linear, lora_r=8, lora_alpha=16, lora_dropout=0.0)
    assert layer.weight is linear.weight and layer.bias is linear.bias
    x = torch.randn(5, 32)
    torch.testing.assert_close(layer(x, torch.zeros(5, dtype=torch.bool)), linear(x))
    assert layer.lora_scaling == 2.0
    with pytest.raises(TypeError, match="linear"):
        PLoRALinear.from_linear(nn.Conv1d(3, 3, 1))


@pytest.mark.parametrize("backend", ["reference"] + (["triton"] if KERNEL_DEVICES else []))
def test_module_takes_xcomposer25_flat_mask(backend):
    """XComposer2.5's PLoRA flattens im_mask (``im_mask.view(-1)``): a [B*N] mask with x [B, N, K] is the
    [B, N] mask; one of any other length is still an error."""
    device = "cuda" if HAS_CUDA else "cpu"
    layer = PLoRALinear(32, 24, bias=True, lora_r=8, lora_alpha=16, lora_dropout=0.0, device=device)
    nn.init.normal_(layer.Plora_B.weight)
    x = torch.randn(2, 7, 32, device=device)
    mask = make_mask("span", (2, 7)).to(device)
    with use_backend(backend):
        torch.testing.assert_close(layer(x, mask.reshape(-1)), layer(x, mask), rtol=0, atol=0)
        with pytest.raises(ValueError, match="im_mask"):
            layer(x, mask.reshape(-1)[:-1])


@pytest.mark.parametrize("backend", ["reference"] + (["triton"] if KERNEL_DEVICES else []))
def test_empty_input(backend):
    device = "cuda" if HAS_CUDA else "cpu"
    x, w, b, a, lb = make_inputs((0,), 32, 24, 16, torch.float32, device)
    leaves = [t.requires_grad_() for t in (x, w, b, a, lb)]
    with use_backend(backend):
        y = plora_linear(*leaves, torch.zeros(0, dtype=torch.bool, device=device))
    assert y.shape == (0, 24)
    y.sum().backward()
    assert leaves[0].grad.shape == (0, 32)
    for t in leaves[1:]:
        assert t.grad is not None and torch.count_nonzero(t.grad) == 0


@pytest.mark.parametrize("device", KERNEL_DEVICES)
def test_non_contiguous_inputs(device):
    base = torch.randn(3, 30, 96, device=device)
    x = base[:, ::2, 10:58]  # strided in both dims
    w = torch.randn(48, 40, device=device).t()  # [40, 48] transposed view
    a = torch.randn(48, 16, device=device).t()
    lb = torch.randn(16, 40, device=device).t()
    mask = torch.rand(3, 15, device=device) < 0.5
    run_both(x, w, None, a, lb, mask, 1.0, torch.float32)


@pytest.mark.parametrize("device", KERNEL_DEVICES)
def test_frozen_base_weight_skips_its_gradient(device):
    """x and W0 frozen (bias frozen, then trainable): the LoRA and bias gradients are *values* that
    match the float64 reference, not just present (dA depends on dS, which dX alone used to gate)."""
    x, w, b, a, lb = make_inputs((40,), 32, 24, 16, torch.float32, device)
    mask = make_mask("span", (40,)).to(device)
    for bias_trainable in (False, True):
        leaves = [x, w, b.clone().requires_grad_(bias_trainable), a.clone().requires_grad_(),
                  lb.clone().requires_grad_()]
        with use_backend("triton"):
            y = plora_linear(*leaves, mask, scaling=0.5)
        gy = torch.randn_like(y)
        y.backward(gy)
        assert w.grad is None and x.grad is None
        assert (leaves[2].grad is not None) == bias_trainable
        refs = [t.detach().double().requires_grad_() for t in (x, w, b, a, lb)]
        plora_linear_reference(*refs, mask, scaling=0.5).backward(gy.double())
        for name, got, ref in zip(("db0", "dA", "dB"), leaves[2:], refs[2:]):
            if got.requires_grad:
                assert_close(name, got.grad, ref.grad, torch.float32)


BAD_INPUTS = [  # (what to change, exception, words the message must contain)
    ("mask_shape", ValueError, "im_mask"),
    ("mask_dtype", TypeError, "im_mask"),
    ("rank_mismatch", ValueError, "lora_b"),
    ("k_mismatch", ValueError, "weight"),
    ("a_k_mismatch", ValueError, "lora_a"),
    ("bias_shape", ValueError, "bias"),
    ("mixed_dtype", TypeError, "weight"),
    ("not_tensor", TypeError, "x"),
    ("dropout_range", ValueError, "dropout_p"),
    ("scaling_type", TypeError, "scaling"),
    ("int_x", TypeError, "x"),
]


@pytest.mark.parametrize("case,exc,words", BAD_INPUTS, ids=[c[0] for c in BAD_INPUTS])
def test_bad_input(case, exc, words):
    x, w, b, a, lb = make_inputs((4, 6), 32, 24, 8, torch.float32, "cpu")
    mask = torch.zeros(4, 6, dtype=torch.bool)
    kw = dict(scaling=1.0, dropout_p=0.0)
    if case == "mask_shape":
        mask = torch.zeros(4, 5, dtype=torch.bool)
    elif case == "mask_dtype":
        mask = torch.zeros(4, 6, dtype=torch.int64)
    elif case == "rank_mismatch":
        lb = torch.randn(24, 7)
    elif case == "k_mismatch":
        w = torch.randn(24, 31)
    elif case == "a_k_mismatch":
        a = torch.randn(8, 30)
    elif case == "bias_shape":
        b = torch.randn(23)
    elif case == "mixed_dtype":
        w = w.half()
    elif case == "not_tensor":
        x = x.tolist()
    elif case == "dropout_range":
        kw["dropout_p"] = 1.5
    elif case == "scaling_type":
        kw["scaling"] = "1.0"
    elif case == "int_x":
        x = x.long()
    with pytest.raises(exc, match=words):
        plora_linear(x, w, b, a, lb, mask, **kw)


def test_mixed_devices_rejected():
    """A second device without a GPU: 'meta' tensors are a device of their own."""
    x, w, b, a, lb = make_inputs((4,), 32, 24, 8, torch.float32, "cpu")
    with pytest.raises(ValueError, match="weight is on meta"):
        plora_linear(x, w.to("meta"), b, a, lb, torch.zeros(4, dtype=torch.bool))
    with pytest.raises(ValueError, match="im_mask is on meta"):
        plora_linear(x, w, b, a, lb, torch.zeros(4, dtype=torch.bool, device="meta"))


def test_module_validates_constructor_args():
    with pytest.raises(ValueError, match="lora_r"):
        PLoRALinear(8, 8, lora_r=0)
    with pytest.raises(TypeError, match="lora_r must be an int, got float"):
        PLoRALinear(8, 8, lora_r=4.0)
    assert PLoRALinear(8, 8, lora_r=np.int64(4)).lora_r == 4   # numpy ints are ints
    with pytest.raises(ValueError, match="lora_dropout"):
        PLoRALinear(8, 8, lora_dropout=2.0)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
def test_gpu_model_shapes(dtype):
    """InternLM2-7B wqkv slice at r = 256 on the GPU, one image span, plus determinism."""
    M, K, N, r = 1500, 1024, 1536, 256
    x, w, b, a, lb = make_inputs((M,), K, N, r, dtype, "cuda")
    mask = torch.zeros(M, dtype=torch.bool, device="cuda")
    mask[300:1100] = True
    y, leaves = run_both(x, w, None, a, lb, mask, 1.0, dtype)
    y2 = plora_linear(x, w, None, a, lb, mask)
    assert torch.equal(y.detach(), y2), "forward is not deterministic"
