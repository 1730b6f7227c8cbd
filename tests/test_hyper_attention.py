"""Hyper Attention (mPLUG-Owl3): Triton kernels (interpreter on CPU) against the float64 reference."""
import pytest
import torch

import mmkernels
from mmkernels import HyperAttention, hyper_attention, hyper_attention_reference, use_backend, visual_kv
from mmkernels.ops.hyper_attention import launch
from mmkernels.ops.hyper_attention.baseline import Owl3HyperAttentionBaseline
from mmkernels.ops.hyper_attention.function import hyper_attention_fwd_op
from mmkernels.testing import assert_close

from conftest import BACKEND_DEVICES, KERNEL_DEVICES

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
DT_IDS = ["float32", "float16", "bfloat16"]


def layout(Lk, device):
    """3 samples: images at 0 (position 0) and at 9, 10 (consecutive, like video frames); no image;
    images at 5 and at the last position Lk - 1."""
    pos = torch.tensor([0, 9, 10, 5, Lk - 1], dtype=torch.int32, device=device)
    cu = torch.tensor([0, 3, 3, 5], dtype=torch.int32, device=device)
    return pos, cu


def make_inputs(B, Lq, Lk, H, Hkv, D, N, T, dtype, device):
    q = torch.randn(B, Lq, H, D, dtype=dtype, device=device)
    k = torch.randn(B, Lk, Hkv, D, dtype=dtype, device=device)
    v = torch.randn(B, Lk, Hkv, D, dtype=dtype, device=device)
    kv = torch.randn(N, T, Hkv, D, dtype=dtype, device=device)
    vv = torch.randn(N, T, Hkv, D, dtype=dtype, device=device)
    return q, k, v, kv, vv


def run_both(tensors, gate, pos, cu, dtype, mode, visibility, kpm=None, check_grads=True):
    """Triton backend vs the float64 reference on the same inputs: output and every gradient."""
    names = ["q", "k", "v", "k_vis", "v_vis"] + (["gate"] if mode == "gated" else [])
    inputs = list(tensors) + ([gate] if mode == "gated" else [])
    leaves = [t.clone().requires_grad_(check_grads) for t in inputs]
    kw = dict(mode=mode, visibility=visibility, key_padding_mask=kpm)
    with use_backend("triton"):
        out = hyper_attention(*leaves[:5], pos, cu, gate=leaves[5] if mode == "gated" else None, **kw)
    refs = [t.detach().double().requires_grad_(check_grads) for t in inputs]
    out_ref = hyper_attention_reference(*refs[:5], pos, cu, gate=refs[5] if mode == "gated" else None, **kw)
    assert_close("out", out, out_ref, dtype)
    if check_grads:
        dout = torch.randn_like(out)
        out.backward(dout)
        out_ref.backward(dout.double())
        for name, got, ref in zip(names, leaves, refs):
            assert got.grad is not None, name
            assert_close("d" + name, got.grad, ref.grad, dtype)
    return out


@pytest.mark.parametrize("device", KERNEL_DEVICES)
@pytest.mark.parametrize("visibility", ["strict", "inclusive"])
@pytest.mark.parametrize("mode", ["gated", "joint"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
def test_matches_reference(device, dtype, mode, visibility):
    """GQA 2, 3 samples (one without images), image at 0 / consecutive / last position; the
    inclusive cases also carry a key padding mask."""
    B, L, H, Hkv, D, T = 3, 37, 4, 2, 32, 20
    pos, cu = layout(L, device)
    tensors = make_inputs(B, L, L, H, Hkv, D, 5, T, dtype, device)
    gate = torch.randn(H * D, dtype=dtype, device=device)
    kpm = None
    if visibility == "inclusive":
        kpm = torch.rand(B, L, device=device) > 0.25
        kpm[:, 0] = True
    run_both(tensors, gate, pos, cu, dtype, mode, visibility, kpm)


@pytest.mark.parametrize("device", KERNEL_DEVICES)
@pytest.mark.parametrize("mode,D", [("gated", 64), ("joint", 128)])
def test_gqa1_model_head_dims(device, mode, D):
    """GQA ratio 1 at the models' head dims (64 and 128)."""
    B, L, H, T = 2, 24, 2, 17
    pos = torch.tensor([3, 4, 20], dtype=torch.int32, device=device)
    cu = torch.tensor([0, 2, 3], dtype=torch.int32, device=device)
    tensors = make_inputs(B, L, L, H, H, D, 3, T, torch.float16, device)
    run_both(tensors, torch.randn(H * D, dtype=torch.float16, device=device), pos, cu, torch.float16, mode, "strict")


@pytest.mark.parametrize("device", KERNEL_DEVICES)
@pytest.mark.parametrize("mode", ["gated", "joint"])
def test_left_padding_rows_without_visible_keys(device, mode):
    """Left padding: sample 0's first 3 text keys are masked, so rows 0..2 see no text key (row 0 sees
    nothing at all and gets 0; rows 1, 2 see only the image at position 0)."""
    B, L, H, Hkv, D, T = 3, 21, 2, 1, 16, 18
    pos, cu = layout(L, device)
    tensors = make_inputs(B, L, L, H, Hkv, D, 5, T, torch.float32, device)
    kpm = torch.ones(B, L, dtype=torch.bool, device=device)
    kpm[0, :3] = False
    kpm[1, :5] = False
    out = run_both(tensors, torch.randn(H * D, device=device), pos, cu, torch.float32, mode, "strict", kpm)
    assert torch.count_nonzero(out[0, 0]) == 0 and torch.count_nonzero(out[0, 1]) > 0


@pytest.mark.parametrize("device", KERNEL_DEVICES)
def test_per_token_gate(device):
    """The paper's input-dependent gate: any tensor broadcastable to [B, L_q, H, D]; d(gate) is reduced."""
    B, L, H, Hkv, D, T = 3, 21, 4, 1, 16, 9
    pos, cu = layout(L, device)
    tensors = make_inputs(B, L, L, H, Hkv, D, 5, T, torch.float32, device)
    gate = torch.randn(B, L, 1, D, device=device)
    run_both(tensors, gate, pos, cu, torch.float32, "gated", "strict")


@pytest.mark.parametrize("device", KERNEL_DEVICES)
@pytest.mark.parametrize("mode", ["gated", "joint"])
def test_chunked_prefill_and_decode(device, mode):
    """L_q < L_k: the last rows (a prefill chunk, a 3-row chunk and a 1-row decode step through the
    split-K path) equal the full forward's rows, and their gradients match the reference."""
    B, L, H, Hkv, D, T = 3, 40, 4, 2, 16, 12
    pos, cu = layout(L, device)
    q, k, v, kv, vv = make_inputs(B, L, L, H, Hkv, D, 5, T, torch.float32, device)
    gate = torch.randn(H * D, device=device)
    g = gate if mode == "gated" else None
    with use_backend("triton"):
        full = hyper_attention(q, k, v, kv, vv, pos, cu, mode=mode, gate=g)
        for Lq in (19, 3, 1):
            assert launch.use_decode_path(Lq, H // Hkv) == (Lq < 19)
            part = hyper_attention(q[:, -Lq:], k, v, kv, vv, pos, cu, mode=mode, gate=g)
            assert_close(f"rows[-{Lq}:]", part, full[:, -Lq:].double(), torch.float32)
    for Lq in (19, 1):
        run_both((q[:, -Lq:], k, v, kv, vv), gate, pos, cu, torch.float32, mode, "strict")


@pytest.mark.parametrize("device", KERNEL_DEVICES)
@pytest.mark.parametrize("mode", ["gated", "joint"])
def test_rows_before_first_image_are_plain_causal_attention(device, mode):
    """Bit-identical to the same kernel without any image (sample 2's rows up to its first image)."""
    B, L, H, Hkv, D, T = 3, 37, 4, 2, 32, 20
    pos, cu = layout(L, device)
    q, k, v, kv, vv = make_inputs(B, L, L, H, Hkv, D, 5, T, torch.bfloat16, device)
    gate = torch.randn(H * D, dtype=torch.bfloat16, device=device) if mode == "gated" else None
    no_img = torch.zeros(B + 1, dtype=torch.int32, device=device)
    with use_backend("triton"):
        out = hyper_attention(q, k, v, kv, vv, pos, cu, mode=mode, gate=gate)
        plain = hyper_attention(q, k, v, kv[:0], vv[:0], pos[:0], no_img, mode=mode, gate=gate)
    assert torch.equal(out[1], plain[1])           # the sample without images
    assert torch.equal(out[2, :6], plain[2, :6])   # sample 2: first image at 5, strict -> rows 0..5
    assert not torch.equal(out[2, 6:], plain[2, 6:])
    ref = torch.nn.functional.scaled_dot_product_attention(
        q.double().transpose(1, 2), k.double().repeat_interleave(2, 2).transpose(1, 2),
        v.double().repeat_interleave(2, 2).transpose(1, 2), is_causal=True).transpose(1, 2)
    assert_close("plain", plain, ref, torch.bfloat16)


@pytest.mark.parametrize("device", KERNEL_DEVICES)
def test_backward_is_deterministic(device):
    B, L, H, Hkv, D, T = 3, 37, 4, 2, 32, 20
    pos, cu = layout(L, device)
    tensors = make_inputs(B, L, L, H, Hkv, D, 5, T, torch.float16, device)
    gate = torch.randn(H * D, dtype=torch.float16, device=device)
    dout = torch.randn(B, L, H, D, dtype=torch.float16, device=device)
    grads = []
    for _ in range(2):
        leaves = [t.clone().requires_grad_() for t in (*tensors, gate)]
        with use_backend("triton"):
            hyper_attention(*leaves[:5], pos, cu, gate=leaves[5]).backward(dout)
        grads.append([t.grad for t in leaves])
    for a, b in zip(*grads):
        assert torch.equal(a, b)


@pytest.mark.parametrize("device", KERNEL_DEVICES)
def test_empty_inputs(device):
    H, Hkv, D, T = 2, 1, 16, 4
    with use_backend("triton"):
        # no query row
        q, k, v, kv, vv = make_inputs(2, 0, 5, H, Hkv, D, 1, T, torch.float32, device)
        pos = torch.tensor([1], dtype=torch.int32, device=device)
        cu = torch.tensor([0, 1, 1], dtype=torch.int32, device=device)
        leaves = [t.requires_grad_() for t in (q, k, v, kv, vv)]
        out = hyper_attention(*leaves, pos, cu, mode="joint")
        assert out.shape == (2, 0, H, D)
        out.sum().backward()
        assert all(t.grad is not None and torch.count_nonzero(t.grad) == 0 for t in leaves)
        # no image in the whole batch equals the reference (plain causal attention)
        q, k, v, kv, vv = make_inputs(2, 6, 6, H, Hkv, D, 0, T, torch.float32, device)
        cu0 = torch.zeros(3, dtype=torch.int32, device=device)
        pos0 = torch.zeros(0, dtype=torch.int32, device=device)
        out = hyper_attention(q, k, v, kv, vv, pos0, cu0, gate=torch.zeros(H * D, device=device))
    assert_close("no images", out, hyper_attention_reference(q.double(), k.double(), v.double(), kv.double(),
                                                             vv.double(), pos0, cu0, mode="joint"), torch.float32)


def _bad_case(device):
    B, L, H, Hkv, D, T = 2, 8, 4, 2, 16, 3
    q, k, v, kv, vv = make_inputs(B, L, L, H, Hkv, D, 2, T, torch.float32, device)
    pos = torch.tensor([1, 4], dtype=torch.int32, device=device)
    cu = torch.tensor([0, 2, 2], dtype=torch.int32, device=device)
    return dict(q=q, k=k, v=v, k_vis=kv, v_vis=vv, image_positions=pos, cu_images=cu,
                gate=torch.zeros(H * D, device=device))


BAD_INPUTS = [
    ("heads", lambda a: a.update(q=a["q"][:, :, :3]), ValueError, "multiple"),
    ("head dim", lambda a: a.update(k=a["k"][..., :8], v=a["v"][..., :8]), ValueError, "k must"),
    ("vis head dim", lambda a: a.update(k_vis=a["k_vis"][..., :8]), ValueError, "k_vis"),
    ("cu not monotone", lambda a: a.update(cu_images=a["cu_images"].flip(0)), ValueError, "cu_images"),
    ("cu end", lambda a: a.update(cu_images=a["cu_images"].clone().fill_(1).index_fill_(0, torch.tensor([0]), 0)),
     ValueError, "cu_images must end"),
    ("cu length", lambda a: a.update(cu_images=a["cu_images"][:2]), ValueError, "cu_images"),
    ("position outside", lambda a: a.update(image_positions=a["image_positions"] + 5), ValueError, "image_positions"),
    ("positions not increasing", lambda a: a.update(image_positions=a["image_positions"].flip(0)), ValueError,
     "increasing"),
    ("gate shape", lambda a: a.update(gate=a["gate"][:5]), ValueError, "gate"),
    ("gate missing", lambda a: a.update(gate=None), ValueError, "gate"),
    ("mixed dtypes", lambda a: a.update(v=a["v"].half()), TypeError, "v has dtype"),
    ("float positions", lambda a: a.update(image_positions=a["image_positions"].float()), TypeError,
     "image_positions"),
    ("q longer than k", lambda a: a.update(k=a["k"][:, :4], v=a["v"][:, :4]), ValueError, "L_q"),
    ("bad mode", lambda a: a.update(mode="fused"), ValueError, "mode"),
    ("bad visibility", lambda a: a.update(visibility="all"), ValueError, "visibility"),
    ("padding mask shape", lambda a: a.update(key_padding_mask=torch.ones(2, 3, dtype=torch.bool)), ValueError,
     "key_padding_mask"),
]


@pytest.mark.parametrize("name,mutate,exc,match", BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS])
def test_bad_inputs(name, mutate, exc, match):
    args = _bad_case("cpu")
    args.setdefault("mode", "gated")
    mutate(args)
    with pytest.raises(exc, match=match):
        hyper_attention(args.pop("q"), args.pop("k"), args.pop("v"), args.pop("k_vis"), args.pop("v_vis"),
                        args.pop("image_positions"), args.pop("cu_images"), **args)


def test_reference_gradcheck_float64():
    B, L, H, Hkv, D, T = 3, 7, 2, 1, 4, 2
    pos = torch.tensor([0, 3, 6], dtype=torch.int32)
    cu = torch.tensor([0, 2, 2, 3], dtype=torch.int32)
    inputs = [t.requires_grad_() for t in make_inputs(B, L, L, H, Hkv, D, 3, T, torch.float64, "cpu")]
    gate = torch.randn(H * D, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda *t: hyper_attention_reference(*t[:5], pos, cu, gate=t[5], mode="gated"), inputs + [gate])
    assert torch.autograd.gradcheck(lambda *t: hyper_attention_reference(*t, pos, cu, mode="joint"), inputs)


@pytest.mark.parametrize("device", KERNEL_DEVICES)
def test_opcheck(device):
    B, L, H, Hkv, D, T = 2, 16, 2, 1, 16, 8
    pos = torch.tensor([2, 9, 0], dtype=torch.int32, device=device)
    cu = torch.tensor([0, 2, 3], dtype=torch.int32, device=device)
    q, k, v, kv, vv = [t.requires_grad_() for t in make_inputs(B, L, L, H, Hkv, D, 3, T, torch.float32, device)]
    gate = torch.randn(H * D, device=device, requires_grad=True)
    kpm = torch.rand(B, L, device=device) > 0.3
    k_perm = k.detach().transpose(1, 2).contiguous().transpose(1, 2).requires_grad_()  # permuted strides
    op = torch.ops.mmkernels.hyper_attention_fwd.default
    layout_ = torch.ops.mmkernels.hyper_attention_layout.default(pos, cu, L, L, T, False)
    for args in ((q, k, v, kv, vv, pos, cu, gate, kpm, True, False, D ** -0.5, True),
                 (q, k_perm, v, kv, vv, pos, cu, None, None, False, True, 0.3, False),
                 (q, k, v, kv, vv, pos, cu, gate, None, True, False, D ** -0.5, True, layout_)):
        torch.library.opcheck(op, args)


@pytest.mark.parametrize("device", KERNEL_DEVICES)
def test_torch_compile_fullgraph(device):
    B, L, H, Hkv, D, T = 2, 16, 2, 1, 16, 8
    pos = torch.tensor([2, 9, 0], dtype=torch.int32, device=device)
    cu = torch.tensor([0, 2, 3], dtype=torch.int32, device=device)
    q, k, v, kv, vv = [t.requires_grad_() for t in make_inputs(B, L, L, H, Hkv, D, 3, T, torch.float32, device)]
    gate = torch.randn(H * D, device=device, requires_grad=True)

    def fn(q, k, v, kv, vv, gate):
        return hyper_attention(q, k, v, kv, vv, pos, cu, gate=gate) * 2

    with use_backend("triton"):
        eager = fn(q, k, v, kv, vv, gate)
        compiled = torch.compile(fn, fullgraph=True)(q, k, v, kv, vv, gate)
    torch.testing.assert_close(compiled, eager)
    compiled.sum().backward()
    assert gate.grad is not None and kv.grad is not None


# --------------------------------------------------------------------------- producer

@pytest.mark.parametrize("device", KERNEL_DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
def test_visual_kv_matches_reference(device, dtype):
    N, T, Dm, Hkv, D = 3, 7, 40, 2, 32
    x = torch.randn(N, T, Dm, dtype=dtype, device=device)
    w = (torch.rand(Dm, device=device) + 0.5).to(dtype)
    W = (torch.randn(2 * Hkv * D, Dm, device=device) / Dm ** 0.5).to(dtype)
    bias = torch.randn(2 * Hkv * D, dtype=dtype, device=device)
    pos = torch.tensor([3, 100, 2000], device=device)
    leaves = [t.clone().requires_grad_() for t in (x, w, W, bias)]
    with use_backend("triton"):
        k, v = visual_kv(*leaves, pos, num_kv_heads=Hkv, rope_theta=1e6, position_offset=1)
    gk, gv = torch.randn_like(k), torch.randn_like(v)
    (k * gk + v * gv).sum().backward()
    refs = [t.detach().double().requires_grad_() for t in (x, w, W, bias)]
    rk, rv = mmkernels.visual_kv_reference(*refs, pos, num_kv_heads=Hkv, rope_theta=1e6, position_offset=1)
    (rk * gk.double() + rv * gv.double()).sum().backward()
    assert_close("k_vis", k, rk, dtype)
    assert_close("v_vis", v, rv, dtype)
    for name, a, b in zip(("dimage_embeds", "dnorm_weight", "dv_kv_weight", "dv_kv_bias"), leaves, refs):
        assert_close(name, a.grad, b.grad, dtype)


@pytest.mark.parametrize("device", KERNEL_DEVICES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["float16", "bfloat16"])
def test_visual_kv_one_channel_norm_runs_the_reference(device, dtype):
    """Dm = 1 with a norm: x / sqrt(x^2 + eps) has a gradient of ~eps, all cancellation, which the folded
    Triton form cannot resolve in half precision (relative errors of 2-3 were measured): the triton
    backend runs the reference there, so both backends give the same numbers."""
    x = torch.randn(2, 3, 1, device=device).to(dtype)
    w, W = (1 + 0.1 * torch.randn(1, device=device)).to(dtype), torch.randn(64, 1, device=device).to(dtype)
    pos = torch.tensor([3, 7], device=device)
    g = torch.randn(2, 3, 2, 32, device=device).to(dtype)
    grads = []
    for backend in ("triton", "reference"):
        leaves = [t.clone().requires_grad_() for t in (x, w, W)]
        with use_backend(backend):
            k, v = visual_kv(*leaves, None, pos, num_kv_heads=2, rope_theta=1e4, position_offset=0)
        (torch.cat([k, v], -1).float() * g.float()).sum().backward()
        grads.append([k, v] + [t.grad for t in leaves])
    for a, b in zip(*grads):
        assert torch.equal(a, b)


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
def test_visual_kv_layout(backend, device):
    """Channels are (kv_head, {K, V}, D); at MI-RoPE position 0 K is not rotated; at p the rotation
    is rotate-half by p * inv_freq."""
    N, T, Hkv, D = 2, 3, 2, 16
    C = 2 * Hkv * D
    x = torch.eye(C, device=device)[:T].expand(N, T, C).contiguous()   # image_embeds = identity rows
    W = torch.arange(C, dtype=torch.float32, device=device).diag()      # projection output channel c = c * x[c]
    with use_backend(backend):
        k, v = visual_kv(x, None, W, None, torch.zeros(N, dtype=torch.int64, device=device), num_kv_heads=Hkv,
                         rope_theta=1e4, position_offset=0)
        proj = x @ W.T
        kv = proj.view(N, T, Hkv, 2, D)
        torch.testing.assert_close(k, kv[..., 0, :])
        torch.testing.assert_close(v, kv[..., 1, :])
        pos = torch.tensor([0, 6], device=device)
        k1, _ = visual_kv(x, None, W, None, pos, num_kv_heads=Hkv, rope_theta=1e4, position_offset=1)
    inv = 1.0 / (1e4 ** (torch.arange(0, D, 2, device=device).float() / D))
    ang = torch.cat([inv, inv]) * 7.0                            # image 1 at 6 + 1
    kk = kv[1, ..., 0, :]
    rot = torch.cat([-kk[..., D // 2:], kk[..., :D // 2]], -1)
    torch.testing.assert_close(k1[1], kk * ang.cos() + rot * ang.sin(), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("device", KERNEL_DEVICES)
def test_rope_ops_match_reference_and_opcheck(device):
    """The module's text RoPE and the producer's split + MI-RoPE ops: values, gradients, opcheck."""
    from mmkernels.ops.hyper_attention.function import text_rope
    from mmkernels.ops.hyper_attention.reference import apply_rope, rope_inv_freq

    B, L, Hx, D = 2, 19, 3, 32
    x = torch.randn(B, L + 2, Hx, D, device=device)[:, 2:].requires_grad_()      # non-contiguous
    pid = torch.randint(0, 5000, (B, L), device=device)
    with use_backend("triton"):
        y = text_rope(x, pid, 1e6)
    g = torch.randn_like(y)
    (y * g).sum().backward()
    xr = x.detach().double().requires_grad_()
    yr = apply_rope(xr, pid[..., None], 1e6)
    (yr * g.double()).sum().backward()
    assert_close("rope", y, yr, torch.float32)
    assert_close("drope", x.grad, xr.grad, torch.float32)
    inv = rope_inv_freq(D, 1e6, device)
    torch.library.opcheck(torch.ops.mmkernels.hyper_attention_rope.default, (x, pid, inv, False))
    kv = torch.randn(2 * 7, 2 * 2 * D, device=device, requires_grad=True)
    pos = torch.tensor([3, 9], device=device)
    rstd = torch.rand(2 * 7, device=device, requires_grad=True)
    bias = torch.randn(2 * 2 * D, device=device, requires_grad=True)
    for args in ((kv, None, None, pos, inv, 7, 2, 1), (kv, rstd, bias, pos, inv, 7, 2, 0)):
        torch.library.opcheck(torch.ops.mmkernels.visual_kv_rope.default, args)


# --------------------------------------------------------------------------- module

def _module_pair(mode, device):
    hidden, H, Hkv, D = 64, 4, 2, 16
    base = Owl3HyperAttentionBaseline(hidden, H, Hkv, D, rope_theta=1e4, mode=mode, device=device)
    if mode == "gated":
        torch.nn.init.normal_(base.gate)
    ours = HyperAttention(hidden, H, Hkv, D, rope_theta=1e4, mode=mode, device=device)
    ours.load_state_dict(base.state_dict())                       # same parameter names
    return base, ours


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
@pytest.mark.parametrize("mode", ["gated", "joint"])
def test_module_matches_baseline_with_cache(mode, backend, device):
    """Prefill with the visual K/V cache, then decode steps reusing it, equal the mPLUG-Owl3-style
    baseline (which recomputes the producer every step) and the full forward's last rows."""
    torch.manual_seed(0)
    base, ours = _module_pair(mode, device)
    B, L, T, hidden, steps = 2, 14, 6, 64, 2
    x = torch.randn(B, L + steps, hidden, device=device)
    img = torch.randn(3, T, hidden, device=device)
    media = [[2, 7], [4]]
    pos = torch.tensor([2, 7, 4], dtype=torch.int32, device=device)
    cu = torch.tensor([0, 2, 3], dtype=torch.int32, device=device)
    pid = torch.arange(L + steps, device=device)[None].expand(B, -1)
    with torch.no_grad(), use_backend(backend):
        y_full, _ = ours(x, pid, img, pos, cu)
        y_base_full, _ = base(x, pid, img, media)
        torch.testing.assert_close(y_full, y_base_full, rtol=1e-4, atol=1e-4)
        y, cache = ours(x[:, :L], pid[:, :L], img, pos, cu, use_cache=True)
        yb, bcache = base(x[:, :L], pid[:, :L], img, media, use_cache=True)
        torch.testing.assert_close(y, yb, rtol=1e-4, atol=1e-4)
        for s in range(steps):
            sl = slice(L + s, L + s + 1)
            y, cache = ours(x[:, sl], pid[:, sl], past_key_value=cache, use_cache=True)
            yb, bcache = base(x[:, sl], pid[:, sl], img, media, past_key_value=bcache, use_cache=True)
            torch.testing.assert_close(y, yb, rtol=1e-4, atol=1e-4)
            torch.testing.assert_close(y, y_full[:, sl], rtol=1e-4, atol=1e-4)
        assert cache.seq_len == L + steps and cache.k_vis.shape == (3, T, 2, 16)


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
def test_module_multi_turn_appends_images(backend, device):
    """Turn 1 (prefill + a decode step) then turn 2 with new images, through the cache, equals one
    forward over the whole sequence with all images."""
    torch.manual_seed(0)
    _, ours = _module_pair("gated", device)
    B, T, hidden = 2, 5, 64
    L1, L2 = 10, 9
    L = L1 + 1 + L2
    x = torch.randn(B, L, hidden, device=device)
    pid = torch.arange(L, device=device)[None].expand(B, -1)
    img1, img2 = torch.randn(2, T, hidden, device=device), torch.randn(2, T, hidden, device=device)
    ints = dict(dtype=torch.int32, device=device)
    # turn 1: sample 0 has an image at 3, sample 1 at 1; turn 2: sample 0 none, sample 1 two (13, 15)
    pos1, cu1 = torch.tensor([3, 1], **ints), torch.tensor([0, 1, 2], **ints)
    pos2, cu2 = torch.tensor([13, 15], **ints), torch.tensor([0, 0, 2], **ints)
    all_img = torch.cat([img1[:1], img1[1:], img2])
    all_pos = torch.tensor([3, 1, 13, 15], **ints)
    all_cu = torch.tensor([0, 1, 4], **ints)
    with torch.no_grad(), use_backend(backend):
        y_full, _ = ours(x, pid, all_img, all_pos, all_cu)
        y1, cache = ours(x[:, :L1], pid[:, :L1], img1, pos1, cu1, use_cache=True)
        y_step, cache = ours(x[:, L1:L1 + 1], pid[:, L1:L1 + 1], past_key_value=cache, use_cache=True)
        y2, cache = ours(x[:, L1 + 1:], pid[:, L1 + 1:], img2, pos2, cu2, past_key_value=cache, use_cache=True)
    torch.testing.assert_close(torch.cat([y1, y_step, y2], 1), y_full, rtol=1e-4, atol=1e-4)
    assert cache.cu_images.tolist() == [0, 1, 4] and cache.image_positions.tolist() == [3, 1, 13, 15]


@pytest.mark.parametrize("device", KERNEL_DEVICES)
def test_unsupported_head_dim(device):
    """D outside 16..256 powers of two: a clear error on the triton backend, the reference path on auto."""
    q, k, v, kv, vv = make_inputs(1, 4, 4, 2, 1, 24, 1, 3, torch.float32, device)
    pos = torch.tensor([1], dtype=torch.int32, device=device)
    cu = torch.tensor([0, 1], dtype=torch.int32, device=device)
    with use_backend("triton"), pytest.raises(ValueError, match="head dims"):
        hyper_attention(q, k, v, kv, vv, pos, cu, mode="joint")
    out = hyper_attention(q, k, v, kv, vv, pos, cu, mode="joint")
    torch.testing.assert_close(out, hyper_attention_reference(q, k, v, kv, vv, pos, cu, mode="joint"))


# --------------------------------------------------------------------------- block classification

def _dense_visibility(pos, cu, b, Lq, Lk, T, visibility):
    """The reference's masks of sample b: ``(visual [L_q, n_b*T], text [L_q, L_k])``, True = visible."""
    from mmkernels.ops.hyper_attention.reference import visible_image_counts

    t = torch.arange(Lk - Lq, Lk)
    counts = visible_image_counts(pos.cpu(), cu.cpu(), b, t, visibility)
    n_b = int(cu[b + 1] - cu[b])
    vis = (torch.arange(n_b * T) // max(T, 1))[None, :] < counts[:, None]
    text = torch.arange(Lk)[None, :] <= t[:, None]
    return vis, text


def _check_tile(cls, mask, rows, keys, n_rows, n_keys, bounded, where):
    """A full tile: every pair of a valid row and a valid key is visible, and the loop that runs it
    unmasked does not bound-check ``bounded`` ("keys" in the row-block view, "rows" in the key-block
    view), so those must all be valid.  An empty tile: no visible pair.  Returns the mask's own class."""
    r = torch.arange(rows.start, rows.stop)
    k = torch.arange(keys.start, keys.stop)
    valid = (r[:, None] < n_rows) & (k[None, :] < n_keys)
    seen = torch.zeros(len(r), len(k), dtype=torch.bool)
    if n_rows and n_keys:
        seen = mask[r.clamp(max=n_rows - 1)][:, k.clamp(max=n_keys - 1)] & valid
    in_bounds = bool((k < n_keys).all()) if bounded == "keys" else bool((r < n_rows).all())
    if cls == launch.BLOCK_FULL:
        assert in_bounds and bool(seen[valid].all()), f"{where}: classified full, but not every pair is visible"
    elif cls == launch.BLOCK_EMPTY:
        assert not bool(seen.any()), f"{where}: classified empty, but a pair is visible"
    else:
        assert cls == launch.BLOCK_PARTIAL, f"{where}: class {cls}"
    return "empty" if not seen.any() else "full" if (in_bounds and seen[valid].all()) else "partial"


def _classes(pos, cu, Lq, Lk, T, visibility, device):
    from mmkernels.ops.hyper_attention.function import hyper_attention_layout_op

    layout = hyper_attention_layout_op(pos, cu, Lq, Lk, T, visibility == "inclusive")
    fwd = launch._config("fwd", torch.device(device), torch.float32, 16)
    bwd = launch._config("bwd", torch.device(device), torch.float32, 16)
    rows, keys = launch.block_classes(layout, cu, Lq, Lk, T, pos.shape[0], fwd, bwd)
    return rows.cpu(), keys.cpu(), fwd, bwd


@pytest.mark.parametrize("device", KERNEL_DEVICES)
@pytest.mark.parametrize("Lq", [37, 22])
@pytest.mark.parametrize("visibility", ["strict", "inclusive"])
def test_block_classification_matches_dense_mask(device, visibility, Lq):
    """Every tile the kernels run unmasked is fully visible and every tile they skip is fully hidden,
    against the reference's dense mask, in both the row-block view (forward, dQ) and the key-block view
    (dK/dV); each class occurs; no more tiles are partial than the mask makes partial plus the short
    last one (the classification is exact up to that)."""
    Lk, T = 37, 20
    pos, cu = layout(Lk, device)
    N, B = pos.shape[0], cu.shape[0] - 1
    rows, keys, fwd, bwd = _classes(pos, cu, Lq, Lk, T, visibility, device)
    BM, BN, BM_KV, BN_KV = fwd["BLOCK_M"], fwd["BLOCK_N"], bwd["BLOCK_M_KV"], bwd["BLOCK_N_KV"]
    n_vis = -(-N * T // BN)
    seen = set()
    for b in range(B):
        vis, text = _dense_visibility(pos, cu, b, Lq, Lk, T, visibility)
        n_b = int(cu[b + 1] - cu[b])
        for i in range(rows.shape[1]):
            r = range(i * BM, (i + 1) * BM)
            for part, mask, n_keys, tiles in (("visual", vis, n_b * T, rows[b, i, :n_vis]),
                                              ("text", text, Lk, rows[b, i, n_vis:])):
                extra = 0
                for j, cls in enumerate(tiles.tolist()):
                    truth = _check_tile(cls, mask, r, range(j * BN, (j + 1) * BN), Lq, n_keys, "keys",
                                        f"sample {b} row block {i} {part} tile {j}")
                    seen.add(("rows", cls))
                    extra += cls == launch.BLOCK_PARTIAL and truth != "partial"
                assert extra <= 1, f"sample {b} row block {i} {part}: {extra} tiles needlessly masked"
    n_text_blocks = -(-Lk // BN_KV) * B
    for kb_all in range(keys.shape[0]):
        if kb_all < n_text_blocks:
            kb, b = divmod(kb_all, B)
            mask = _dense_visibility(pos, cu, b, Lq, Lk, T, visibility)[1]
            k, n_keys = range(kb * BN_KV, (kb + 1) * BN_KV), Lk
        else:
            n, kb = divmod(kb_all - n_text_blocks, -(-T // BN_KV))
            b = int(torch.searchsorted(cu[1:].cpu(), torch.tensor(n), right=True))
            vis = _dense_visibility(pos, cu, b, Lq, Lk, T, visibility)[0]
            local = n - int(cu[b])
            mask = vis[:, local * T:(local + 1) * T]
            k, n_keys = range(kb * BN_KV, (kb + 1) * BN_KV), T
        extra = 0
        for j, cls in enumerate(keys[kb_all].tolist()):
            truth = _check_tile(cls, mask, range(j * BM_KV, (j + 1) * BM_KV), k, Lq, n_keys, "rows",
                                f"key block {kb_all} row tile {j}")
            seen.add(("keys", cls))
            extra += cls == launch.BLOCK_PARTIAL and truth != "partial"
        assert extra <= 1, f"key block {kb_all}: {extra} row tiles needlessly masked"
    assert seen == {(v, c) for v in ("rows", "keys") for c in (0, 1, 2)}, f"classes seen: {sorted(seen)}"


@pytest.mark.parametrize("device", KERNEL_DEVICES)
@pytest.mark.parametrize("mode,visibility,Lq", [("gated", "strict", 45), ("joint", "inclusive", 29),
                                                ("joint", "strict", 45), ("gated", "inclusive", 29)])
def test_every_block_class_at_odd_sizes(device, mode, visibility, Lq):
    """Forward and every gradient where the tiles of both views are full, partial and empty (checked
    first), at sizes no block divides: GQA 2, one sample with three images (one at position 0), one
    with one image, chunked prefill (L_q < L_k), and a key padding mask in the inclusive cases."""
    B, Lk, H, Hkv, D, T = 2, 45, 4, 2, 16, 19
    pos = torch.tensor([0, 17, 30, 40], dtype=torch.int32, device=device)
    cu = torch.tensor([0, 3, 4], dtype=torch.int32, device=device)
    rows, keys, _, _ = _classes(pos, cu, Lq, Lk, T, visibility, device)
    for view in (rows, keys):
        assert set(view.unique().tolist()) == {0, 1, 2}, view
    tensors = make_inputs(B, Lq, Lk, H, Hkv, D, 4, T, torch.float32, device)
    kpm = None
    if visibility == "inclusive":
        kpm = torch.rand(B, Lk, device=device) > 0.2
        kpm[:, -1] = True
    run_both(tensors, torch.randn(H * D, device=device), pos, cu, torch.float32, mode, visibility, kpm)


@pytest.mark.parametrize("device", KERNEL_DEVICES)
def test_layout_computed_once_per_training_step(device, monkeypatch):
    """The public function computes the block classification once; the backward reuses the forward's."""
    calls = []
    real = launch.hyper_layout
    monkeypatch.setattr(launch, "hyper_layout", lambda *a: calls.append(a) or real(*a))
    B, L, H, Hkv, D, T = 3, 21, 2, 1, 16, 9
    pos, cu = layout(L, device)
    leaves = [t.requires_grad_() for t in make_inputs(B, L, L, H, Hkv, D, 5, T, torch.float32, device)]
    with use_backend("triton"):
        hyper_attention(*leaves, pos, cu, mode="joint").sum().backward()
    assert len(calls) == 1


@pytest.mark.parametrize("device", KERNEL_DEVICES)
def test_layout_op_opcheck(device):
    pos, cu = layout(23, device)
    op = torch.ops.mmkernels.hyper_attention_layout.default
    for inclusive, Lq in ((False, 23), (True, 5)):
        torch.library.opcheck(op, (pos, cu, Lq, 23, 7, inclusive))


@pytest.mark.parametrize("device", KERNEL_DEVICES)
@pytest.mark.parametrize("mode", ["gated", "joint"])
def test_backward_with_gpu_like_row_tiles(device, mode, monkeypatch):
    """The GPU's backward geometry at interpreter scale: dK/dV row tiles of 32 with the partial ones
    masked in steps of 16, dQ tiles of 32 x 16; every gradient still matches (odd sizes, GQA, padding)."""
    real = launch._config

    def config(name, dev, dt, head_dim):
        cfg = real(name, dev, dt, head_dim)
        if name == "bwd":
            cfg.update(BLOCK_M=32, BLOCK_N=16, BLOCK_N_KV=32, BLOCK_M_KV=32, BLOCK_M_KV_MASKED=16)
        return cfg
    monkeypatch.setattr(launch, "_config", config)
    B, Lk, Lq, H, Hkv, D, T = 2, 45, 41, 4, 2, 16, 19
    pos = torch.tensor([0, 17, 30, 40], dtype=torch.int32, device=device)
    cu = torch.tensor([0, 3, 4], dtype=torch.int32, device=device)
    tensors = make_inputs(B, Lq, Lk, H, Hkv, D, 4, T, torch.float32, device)
    kpm = torch.rand(B, Lk, device=device) > 0.2
    kpm[:, -1] = True
    run_both(tensors, torch.randn(H * D, device=device), pos, cu, torch.float32, mode, "inclusive", kpm)
