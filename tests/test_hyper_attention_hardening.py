"""Hyper attention hardening: double backward, meta tensors, named errors for bad module
input, both backends agreeing on which inputs are in the graph, every requires_grad combination,
left-padded and per-token-gated split-K decoding, strided metadata and int64 offsets.

Tiny shapes throughout (the Triton kernels run under the interpreter on CPU)."""
import dataclasses
import itertools
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import mmkernels
from mmkernels import (HyperAttention, hyper_attention, hyper_attention_reference, use_backend, visual_kv,
                       visual_kv_reference)
from mmkernels.ops.hyper_attention import launch
from mmkernels.ops.hyper_attention.function import text_rope
from mmkernels.ops.hyper_attention.reference import apply_rope
from mmkernels.testing import assert_close

from conftest import BACKEND_DEVICES, KERNEL_DEVICES
from test_hyper_attention import layout, make_inputs, run_both

NEEDS_KERNELS = pytest.mark.skipif(not KERNEL_DEVICES, reason="no Triton device")
INT = dict(dtype=torch.int32)


def _ints(values, device):
    return torch.tensor(values, dtype=torch.int32, device=device)


# --------------------------------------------------------------------------- double backward

@pytest.mark.parametrize("device", KERNEL_DEVICES)
def test_double_backward_raises_on_triton_and_works_on_reference(device):
    """Second-order gradients through hyper_attention: the triton backward has no derivative of its own
    and says so (it used to return zeros silently); the reference differentiates twice."""
    B, L, H, Hkv, D, T = 1, 17, 1, 1, 16, 2
    q, k, v, kv, vv = make_inputs(B, L, L, H, Hkv, D, 1, T, torch.float32, device)
    pos, cu = _ints([3], device), _ints([0, 1], device)
    gate = torch.randn(H * D, device=device)
    for backend in ("reference", "triton"):
        leaf = q.clone().requires_grad_()
        with use_backend(backend):
            out = hyper_attention(leaf, k, v, kv, vv, pos, cu, gate=gate)
        (dq,) = torch.autograd.grad((out * out).sum(), leaf, create_graph=True)
        if backend == "triton":
            with pytest.raises(RuntimeError, match="hyper_attention"):
                torch.autograd.grad(dq.square().sum(), leaf)
        else:
            (ddq,) = torch.autograd.grad(dq.square().sum(), leaf)
            assert torch.isfinite(ddq).all() and ddq.abs().sum() > 0


def _visual_kv_second_order(fn, tensors, probes, pos, Hkv):
    """First- and second-order gradients of visual_kv: ``L = <k, gk> + <v, gv>``, first = dL/d(x, w, W, b)
    (create_graph), second = d<first, probes>/d(x, w, W, b, gk, gv)."""
    leaves = [t.clone().requires_grad_() for t in tensors]
    k, v = fn(*leaves[:4], pos, num_kv_heads=Hkv, rope_theta=1e4, position_offset=1)
    first = torch.autograd.grad((k * leaves[4]).sum() + (v * leaves[5]).sum(), leaves[:4], create_graph=True)
    second = torch.autograd.grad(sum((g * p).sum() for g, p in zip(first, probes)), leaves, allow_unused=True)
    return first, [torch.zeros_like(t) if s is None else s for s, t in zip(second, leaves)]


@pytest.mark.parametrize("device", KERNEL_DEVICES)
def test_visual_kv_double_backward_matches_reference(device):
    """visual_kv_rope_bwd is linear (the inverse rotation of the incoming gradient); its derivative is the
    forward rotation, so visual_kv differentiates twice on the triton backend and matches the reference
    (second order through the RMSNorm scale and the rotation of the upstream gradient)."""
    N, T, Dm, Hkv, D = 2, 3, 8, 1, 16
    C = 2 * Hkv * D
    tensors = [torch.randn(N, T, Dm, device=device), torch.rand(Dm, device=device) + 0.5,
               torch.randn(C, Dm, device=device) / Dm ** 0.5, torch.randn(C, device=device),
               torch.randn(N, T, Hkv, D, device=device), torch.randn(N, T, Hkv, D, device=device)]
    probes = [torch.randn_like(t) for t in tensors[:4]]
    pos = torch.tensor([3, 7], device=device)
    with use_backend("triton"):
        first, second = _visual_kv_second_order(visual_kv, tensors, probes, pos, Hkv)
    first_ref, second_ref = _visual_kv_second_order(visual_kv_reference, [t.double() for t in tensors],
                                                    [p.double() for p in probes], pos, Hkv)
    names = ["image_embeds", "norm_weight", "v_kv_weight", "v_kv_bias", "grad_k_vis", "grad_v_vis"]
    for name, a, b in zip(names, first, first_ref):
        assert_close("d " + name, a, b, torch.float32)
    for name, a, b in zip(names, second, second_ref):
        assert_close("d2 " + name, a, b, torch.float32)
    assert second[4].abs().sum() > 0          # the path through visual_kv_rope_bwd's own derivative
    from mmkernels.ops.hyper_attention.reference import rope_inv_freq
    dk, dv = (torch.randn(N * T, Hkv, D, device=device, requires_grad=True) for _ in range(2))
    torch.library.opcheck(torch.ops.mmkernels.visual_kv_rope_bwd.default,
                          (dk, dv, pos, rope_inv_freq(D, 1e4, device), T, 1))


@pytest.mark.parametrize("device", KERNEL_DEVICES)
def test_text_rope_double_backward_matches_reference(device):
    """The text RoPE op's backward is the op itself (inverse rotation), hence differentiable again."""
    x = torch.randn(2, 5, 3, 16, device=device)
    pid = torch.randint(0, 100, (2, 5), device=device)
    g, w = torch.randn_like(x), torch.randn_like(x)

    def grads(fn, x, g, w):
        x, g = x.clone().requires_grad_(), g.clone().requires_grad_()
        (gx,) = torch.autograd.grad(fn(x), x, g, create_graph=True)
        (gg,) = torch.autograd.grad((gx * w).sum(), g)
        return gx, gg

    with use_backend("triton"):
        got = grads(lambda t: text_rope(t, pid, 1e4), x, g, w)
    ref = grads(lambda t: apply_rope(t, pid[..., None], 1e4), x.double(), g.double(), w.double())
    for name, a, b in zip(("dx", "d(dx)/d(grad)"), got, ref):
        assert_close(name, a, b, torch.float32)


# --------------------------------------------------------------------------- meta tensors

@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("mode", ["gated", "joint"])
def test_functional_ops_on_meta(backend, mode):
    """Shape inference on meta tensors through the ops' fake kernels (no "Cannot copy out of meta
    tensor"), forward and backward, whatever the backend."""
    B, L, H, Hkv, D, N, T, Dm = 2, 7, 4, 2, 16, 3, 5, 24
    meta = dict(device="meta")
    q, k, v = (torch.empty(B, L, h, D, requires_grad=True, **meta) for h in (H, Hkv, Hkv))
    kv, vv = (torch.empty(N, T, Hkv, D, requires_grad=True, **meta) for _ in range(2))
    pos, cu = torch.empty(N, dtype=torch.int32, **meta), torch.empty(B + 1, dtype=torch.int32, **meta)
    gate = torch.empty(H * D, requires_grad=True, **meta) if mode == "gated" else None
    with use_backend(backend):
        out = hyper_attention(q, k, v, kv, vv, pos, cu, mode=mode, gate=gate,
                              key_padding_mask=torch.empty(B, L, dtype=torch.bool, **meta))
        assert out.shape == (B, L, H, D) and out.device.type == "meta"
        out.sum().backward()
        assert q.grad.shape == q.shape and kv.grad.shape == kv.shape
        img = torch.empty(N, T, Dm, requires_grad=True, **meta)
        k_vis, v_vis = visual_kv(img, torch.empty(Dm, **meta), torch.empty(2 * Hkv * D, Dm, **meta),
                                 torch.empty(2 * Hkv * D, **meta), pos, num_kv_heads=Hkv, rope_theta=1e6,
                                 position_offset=1)
        assert k_vis.shape == v_vis.shape == (N, T, Hkv, D) and k_vis.device.type == "meta"
        (k_vis.sum() + v_vis.sum()).backward()
        assert img.grad.shape == img.shape
        assert text_rope(q, torch.empty(B, L, dtype=torch.int64, **meta), 1e6).shape == q.shape


@pytest.mark.parametrize("mode", ["gated", "joint"])
def test_module_built_on_meta_infers_shapes_then_loads(mode):
    """``with torch.device("meta")``: construction, prefill and a cached decode step give shapes; then
    ``to_empty`` + ``load_state_dict`` give a working layer equal to one built on CPU."""
    hidden, H, Hkv, B, L, T = 32, 2, 1, 2, 6, 3
    with torch.device("meta"):
        layer = HyperAttention(hidden, H, Hkv, rope_theta=1e4, mode=mode)
        x, img = torch.empty(B, L, hidden), torch.empty(2, T, hidden)
        pos, cu = torch.empty(2, **INT), torch.empty(B + 1, **INT)
        y, cache = layer(x, torch.arange(L), img, pos, cu, use_cache=True)
        assert y.shape == (B, L, hidden) and cache.k_vis.shape == (2, T, Hkv, hidden // H)
        y, cache = layer(torch.empty(B, 1, hidden), torch.full((B, 1), L), past_key_value=cache, use_cache=True)
        assert y.shape == (B, 1, hidden) and cache.seq_len == L + 1
    cpu = HyperAttention(hidden, H, Hkv, rope_theta=1e4, mode=mode)
    if mode == "gated":
        torch.nn.init.normal_(cpu.gate)
    layer = layer.to_empty(device="cpu")
    layer.load_state_dict(cpu.state_dict())
    x, img = torch.randn(B, L, hidden), torch.randn(2, T, hidden)
    pos, cu = torch.tensor([1, 2], **INT), torch.tensor([0, 1, 2], **INT)
    with torch.no_grad(), use_backend("reference"):
        torch.testing.assert_close(layer(x, torch.arange(L), img, pos, cu)[0], cpu(x, torch.arange(L), img, pos, cu)[0])


# --------------------------------------------------------------------------- named errors

CONSTRUCTOR_ERRORS = [
    ("odd head dim", (60, 4, 2), {}, ValueError, "even"),
    ("odd explicit head dim", (64, 4, 2), {"head_dim": 15}, ValueError, "even"),
    ("zero head dim", (64, 4, 2), {"head_dim": 0}, ValueError, "head_dim"),
    ("zero kv heads", (64, 4, 0), {}, ValueError, "num_kv_heads"),
    ("zero heads", (64, 0, 1), {}, ValueError, "num_heads"),
    ("float heads", (64, 4.0, 2), {}, TypeError, "num_heads must be an int, got float"),
    ("hidden not a multiple of heads", (62, 4, 2), {}, ValueError, "multiple of num_heads"),
    ("kv heads not dividing heads", (64, 4, 3), {}, ValueError, "multiple of num_kv_heads"),
    ("rope theta", (64, 4, 2), {"rope_theta": 0.0}, ValueError, "rope_theta"),
]


@pytest.mark.parametrize("args,kwargs,exc,match", [c[1:] for c in CONSTRUCTOR_ERRORS],
                         ids=[c[0] for c in CONSTRUCTOR_ERRORS])
def test_module_constructor_rejects_bad_config(args, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        HyperAttention(*args, **kwargs)


def _forward_error_cases():
    def other_layer_cache(layer, x, pid, cache):   # a cache of a layer with 2 K/V heads
        return layer(x[:, :1], pid[:, :1], past_key_value=dataclasses.replace(
            cache, k=cache.k.repeat(1, 1, 2, 1), v=cache.v.repeat(1, 1, 2, 1)))

    return [
        ("2-D hidden states", lambda layer, x, pid, cache: layer(x[0], pid[0]), ValueError, "hidden_states"),
        ("hidden size", lambda layer, x, pid, cache: layer(x[..., :30], pid), ValueError, "hidden_states"),
        ("hidden dtype", lambda layer, x, pid, cache: layer(x.double(), pid), TypeError, "hidden_states"),
        ("hidden device", lambda layer, x, pid, cache: layer(x.to("meta"), pid.to("meta")), ValueError,
         "hidden_states"),
        ("position_ids length", lambda layer, x, pid, cache: layer(x, pid[:, :3]), ValueError, "position_ids"),
        ("1-D position_ids length", lambda layer, x, pid, cache: layer(x, pid[0, :3]), ValueError, "position_ids"),
        ("float position_ids", lambda layer, x, pid, cache: layer(x, pid.float()), TypeError, "position_ids"),
        ("cache batch size", lambda layer, x, pid, cache: layer(x[:1, :1], pid[:1, :1], past_key_value=cache),
         ValueError, "past_key_value"),
        ("cache of another layer", other_layer_cache, ValueError, "past_key_value.k"),
        ("cache dtype", lambda layer, x, pid, cache: layer(x[:, :1], pid[:, :1], past_key_value=dataclasses.replace(
            cache, k=cache.k.double(), v=cache.v.double())), TypeError, "past_key_value"),
        ("not a cache", lambda layer, x, pid, cache: layer(x[:, :1], pid[:, :1], past_key_value=(cache.k, cache.v)),
         TypeError, "HyperAttentionCache"),
        ("layout without images", lambda layer, x, pid, cache: layer(x, pid, None, cache.image_positions,
                                                                     cache.cu_images), ValueError, "image_embeds"),
    ]


FORWARD_ERRORS = _forward_error_cases()


@pytest.mark.parametrize("call,exc,match", [c[1:] for c in FORWARD_ERRORS], ids=[c[0] for c in FORWARD_ERRORS])
def test_module_forward_names_bad_input(call, exc, match):
    """Bad hidden states, positions and caches get a named error, not a raw unpack/expand/cat error."""
    layer = HyperAttention(32, 2, 1, rope_theta=1e4)
    B, L = 2, 5
    x, pid = torch.randn(B, L, 32), torch.arange(L)[None].expand(B, L)
    with torch.no_grad(), use_backend("reference"):
        _, cache = layer(x, pid, torch.randn(1, 3, 32), torch.tensor([1], **INT), torch.tensor([0, 1, 1], **INT),
                         use_cache=True)
        with pytest.raises(exc, match=match):
            call(layer, x, pid, cache)


def test_module_can_check_a_hand_built_cache():
    """Decode steps trust the cached image layout (checked when the module built it); a cache built
    or edited by hand is checked with check_metadata=True (a named error instead of an out-of-range
    read in the kernels)."""
    layer = HyperAttention(32, 2, 1, rope_theta=1e4)
    B, L = 2, 5
    x, pid = torch.randn(B, L + 1, 32), torch.arange(L + 1)
    with torch.no_grad(), use_backend("reference"):
        _, cache = layer(x[:, :L], pid[:L], torch.randn(1, 3, 32), torch.tensor([1], **INT),
                         torch.tensor([0, 1, 1], **INT), use_cache=True)
        bad = dataclasses.replace(cache, cu_images=torch.tensor([0, 5, 1], **INT))
        with pytest.raises(ValueError, match="cu_images"):
            layer(x[:, L:], pid[L:], past_key_value=bad, check_metadata=True)
        layer(x[:, L:], pid[L:], past_key_value=cache, check_metadata=True)     # a valid cache passes


@pytest.mark.parametrize("backend", ["reference", pytest.param("triton", marks=NEEDS_KERNELS)])
def test_position_ids_shared_by_the_batch(backend):
    """``[L]`` and ``[1, L]`` position_ids broadcast over the batch like ``[B, L]`` (the triton RoPE
    kernel used to index a ``[1, L]`` tensor with the batch index, past its end)."""
    layer = HyperAttention(32, 2, 1, rope_theta=1e4)
    x = torch.randn(2, 5, 32)
    with torch.no_grad(), use_backend(backend):
        full = layer(x, torch.arange(5)[None].expand(2, 5))[0]
        torch.testing.assert_close(layer(x, torch.arange(5))[0], full, rtol=0, atol=0)
        torch.testing.assert_close(layer(x, torch.arange(5)[None])[0], full, rtol=0, atol=0)


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
@pytest.mark.parametrize("images", [True, False], ids=["images", "no images"])
def test_module_under_autocast(backend, device, images):
    """An fp32 layer under bf16 autocast: the projections give bf16, so the fp32 gate and the empty
    visual K/V of an image-less batch follow q's dtype, and bf16 image embeddings meet the fp32
    v_kv_proj as in F.linear (each used to be a dtype-mix TypeError); the prefill and a cached decode
    step stay within bf16 tolerance of the fp32 layer."""
    torch.manual_seed(0)
    layer = HyperAttention(32, 2, 1, rope_theta=1e4, device=device)
    torch.nn.init.normal_(layer.gate)
    B, L = 2, 6
    x, pid = torch.randn(B, L + 1, 32, device=device), torch.arange(L + 1, device=device)
    img = (torch.randn(2, 3, 32, device=device), _ints([1, 3], device), _ints([0, 1, 2], device)) if images else ()
    norm = torch.rand(32, device=device) + 0.5 if images else None    # the RMSNorm of the images, in fp32
    outs = {}
    for cast in (False, True):
        with torch.no_grad(), use_backend(backend), torch.autocast(torch.device(device).type, torch.bfloat16,
                                                                     enabled=cast):
            imgs = (img[0].to(torch.bfloat16), *img[1:]) if (cast and images) else img
            y, cache = layer(x[:, :L], pid[:L], *imgs, use_cache=True, norm_weight=norm)
            y1, _ = layer(x[:, L:], pid[L:], past_key_value=cache)
        outs[cast] = torch.cat([y, y1], 1)
    assert outs[True].dtype == torch.bfloat16
    assert_close("autocast", outs[True], outs[False].double(), torch.bfloat16)


@pytest.mark.parametrize("backend", ["reference", pytest.param("triton", marks=NEEDS_KERNELS)])
def test_joint_mode_rejects_a_gate(backend):
    """The joint (v2) softmax has no gate: passing one is an error, not silently ignored."""
    q, k, v, kv, vv = make_inputs(1, 4, 4, 2, 1, 16, 1, 3, torch.float32, "cpu")
    with use_backend(backend), pytest.raises(ValueError, match="gate must be None in mode='joint'"):
        hyper_attention(q, k, v, kv, vv, torch.tensor([1], **INT), torch.tensor([0, 1], **INT), mode="joint",
                        gate=torch.zeros(2 * 16))


def test_zero_head_dim_is_a_named_error():
    z = torch.randn(1, 2, 1, 0)
    with pytest.raises(ValueError, match="head dim"):
        hyper_attention(z, z, z, torch.randn(0, 1, 1, 0), torch.randn(0, 1, 1, 0), torch.zeros(0, **INT),
                        torch.zeros(2, **INT), mode="joint")


# --------------------------------------------------------------------------- gradients: which inputs take part

@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
@pytest.mark.parametrize("mode", ["gated", "joint"])
@pytest.mark.parametrize("case", ["no images, only k_vis", "no images, only v_vis", "empty batch"])
def test_inputs_without_influence_get_zero_gradients(backend, device, mode, case):
    """Both backends keep every input that requires grad in the graph: with no images (k_vis/v_vis
    empty) or an empty batch the output still has a grad_fn and those inputs get zero gradients
    (the reference used to return an output without grad_fn while Triton gave zeros)."""
    H, Hkv, D, T = 2, 1, 16, 3
    B, L = (0, 4) if case == "empty batch" else (2, 4)
    q, k, v, kv, vv = make_inputs(B, L, L, H, Hkv, D, 0, T, torch.float32, device)
    gate = torch.randn(H * D, device=device) if mode == "gated" else None
    inputs = {"q": q, "k": k, "v": v, "k_vis": kv, "v_vis": vv, "gate": gate}
    wanted = {"no images, only k_vis": ["k_vis"], "no images, only v_vis": ["v_vis"],
              "empty batch": [n for n, t in inputs.items() if t is not None]}[case]
    for name in wanted:
        inputs[name].requires_grad_()
    with use_backend(backend):
        out = hyper_attention(q, k, v, kv, vv, torch.zeros(0, dtype=torch.int32, device=device),
                              torch.zeros(B + 1, dtype=torch.int32, device=device), mode=mode, gate=gate)
    assert out.grad_fn is not None
    out.backward(torch.randn_like(out))
    for name in wanted:
        grad = inputs[name].grad
        assert grad is not None and grad.shape == inputs[name].shape and torch.count_nonzero(grad) == 0, name


NAMES = ("q", "k", "v", "k_vis", "v_vis", "gate")


@pytest.mark.parametrize("device", KERNEL_DEVICES)
@pytest.mark.parametrize("mode", ["gated", "joint"])
def test_every_requires_grad_combination(device, mode):
    """Every subset of (q, k, v, k_vis, v_vis[, gate]) requiring grad: the inputs in the subset get the
    float64 reference's gradient, the others none.  Gated mode (all six inputs) runs every subset on
    both backends; joint mode (the same autograd glue without the gate) every subset on the reference
    and, to keep the interpreter time down, the empty, single-input and full subsets on triton."""
    B, L, H, Hkv, D, T = 1, 17, 1, 1, 16, 2          # > 16 rows: the fused (not split-K) path
    pos, cu = _ints([3], device), _ints([0, 1], device)
    tensors = list(make_inputs(B, L, L, H, Hkv, D, 1, T, torch.float32, device))
    names = NAMES if mode == "gated" else NAMES[:5]
    if mode == "gated":
        tensors.append(torch.randn(H * D, device=device))
    dout = torch.randn(B, L, H, D, device=device)
    refs = [t.double().requires_grad_() for t in tensors]
    out_ref = hyper_attention_reference(*refs[:5], pos, cu, mode=mode, gate=refs[5] if mode == "gated" else None)
    out_ref.backward(dout.double())
    every = [c for n in range(len(names) + 1) for c in itertools.combinations(range(len(names)), n)]
    few = [c for c in every if len(c) in (0, 1, len(names))]
    for backend in ("triton", "reference"):
        for subset in (every if backend == "reference" or mode == "gated" else few):
            leaves = [t.clone().requires_grad_(i in subset) for i, t in enumerate(tensors)]
            with use_backend(backend):
                out = hyper_attention(*leaves[:5], pos, cu, mode=mode,
                                      gate=leaves[5] if mode == "gated" else None)
            assert out.requires_grad == bool(subset), subset
            if subset:
                out.backward(dout)
            for i, (leaf, ref) in enumerate(zip(leaves, refs)):
                tag = f"{backend} {[names[j] for j in subset]}: d{names[i]}"
                if i in subset:
                    assert_close(tag, leaf.grad, ref.grad, torch.float32)
                else:
                    assert leaf.grad is None, tag


# --------------------------------------------------------------------------- split-K decode paths

def _left_padded(B, L, device, pads):
    kpm = torch.ones(B, L, dtype=torch.bool, device=device)
    for b, p in enumerate(pads):
        kpm[b, :p] = False
    return kpm


@pytest.mark.parametrize("device", KERNEL_DEVICES)
@pytest.mark.parametrize("mode", ["gated", "joint"])
def test_left_padded_batched_decode_matches_reference(device, mode):
    """Left-padded batched decoding (the realistic serving case) through the split-K path, 1 and 3 rows:
    the padded text keys must stay masked in every split."""
    B, L, H, Hkv, D, T = 3, 14, 2, 1, 16, 5
    pads = [0, 4, 7]
    kpm = _left_padded(B, L, device, pads)
    pos, cu = _ints([2, 6, 5, 9], device), _ints([0, 2, 3, 4], device)     # images after each sample's padding
    q, k, v, kv, vv = make_inputs(B, L, L, H, Hkv, D, 4, T, torch.float32, device)
    gate = torch.randn(H * D, device=device)
    for Lq in (1, 3):
        assert launch.use_decode_path(Lq, H // Hkv)
        run_both((q[:, -Lq:], k, v, kv, vv), gate, pos, cu, torch.float32, mode, "strict", kpm,
                 check_grads=Lq == 3)


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
@pytest.mark.parametrize("mode", ["gated", "joint"])
def test_module_left_padded_decode_matches_full_forward(backend, device, mode):
    """The layer on a left-padded batch: prefill + cached decode steps (split-K on triton) give the
    rows of one forward over the whole sequence (17 rows: the fused path), on both backends."""
    torch.manual_seed(0)
    hidden, H, Hkv, B, L, steps, T = 32, 2, 1, 3, 15, 2, 3
    assert not launch.use_decode_path(L + steps, H // Hkv) and launch.use_decode_path(1, H // Hkv)
    layer = HyperAttention(hidden, H, Hkv, rope_theta=1e4, mode=mode, device=device)
    if mode == "gated":
        torch.nn.init.normal_(layer.gate)
    pads = [0, 3, 5]
    kpm = _left_padded(B, L + steps, device, pads)
    pid = (kpm.long().cumsum(-1) - 1).clamp(min=0)                 # HF-style positions after left padding
    x = torch.randn(B, L + steps, hidden, device=device)
    img = torch.randn(3, T, hidden, device=device)
    pos, cu = _ints([1, 4, 6], device), _ints([0, 1, 2, 3], device)
    with torch.no_grad(), use_backend(backend):
        full, _ = layer(x, pid, img, pos, cu, key_padding_mask=kpm)
        y, cache = layer(x[:, :L], pid[:, :L], img, pos, cu, key_padding_mask=kpm[:, :L], use_cache=True)
        rows = [y]
        for s in range(steps):
            sl = slice(L + s, L + s + 1)
            y, cache = layer(x[:, sl], pid[:, sl], past_key_value=cache, use_cache=True,
                             key_padding_mask=kpm[:, :L + s + 1])
            rows.append(y)
    valid = kpm[..., None]
    torch.testing.assert_close(torch.where(valid, torch.cat(rows, 1), 0), torch.where(valid, full, 0),
                               rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
def test_per_token_gate_chunks_equal_full_forward(backend, device):
    """A per-token gate ``[B, L_q, H, D]`` with L_q < L_k: a chunked-prefill chunk (17 rows, fused
    path) and a 3-row chunk (split-K decode path, whose merge reads each row's own gate) equal the
    full forward's rows, on both backends."""
    B, L, H, Hkv, D, T = 3, 20, 2, 1, 16, 3
    pos, cu = layout(L, device)
    q, k, v, kv, vv = make_inputs(B, L, L, H, Hkv, D, 5, T, torch.float32, device)
    gate = torch.randn(B, L, H, D, device=device)
    with use_backend(backend):
        full = hyper_attention(q, k, v, kv, vv, pos, cu, gate=gate)
        for Lq in (17, 3):
            assert launch.use_decode_path(Lq, H // Hkv) == (Lq == 3)
            part = hyper_attention(q[:, -Lq:], k, v, kv, vv, pos, cu, gate=gate[:, -Lq:])
            assert_close(f"rows[-{Lq}:]", part, full[:, -Lq:].double(), torch.float32)


@pytest.mark.parametrize("device", KERNEL_DEVICES)
def test_per_token_gate_decode_matches_reference(device):
    """Per-token gate with L_q = 3 < L_k (split-K decode path): output and gradients (d gate
    included) against the float64 reference."""
    B, L, H, Hkv, D, T = 3, 20, 2, 1, 16, 3
    pos, cu = layout(L, device)
    q, k, v, kv, vv = make_inputs(B, L, L, H, Hkv, D, 5, T, torch.float32, device)
    assert launch.use_decode_path(3, H // Hkv)
    run_both((q[:, -3:], k, v, kv, vv), torch.randn(B, 3, H, D, device=device), pos, cu, torch.float32,
             "gated", "strict")


# --------------------------------------------------------------------------- strided metadata, empty shapes

@pytest.mark.parametrize("device", KERNEL_DEVICES)
@pytest.mark.parametrize("mode", ["gated", "joint"])
def test_strided_metadata_matches_reference(device, mode):
    """Non-contiguous image_positions / cu_images (e.g. every other entry of a bigger tensor): the
    kernels index them with unit stride, so they must be made contiguous (used to give NaN)."""
    B, L, H, Hkv, D, T = 2, 9, 2, 1, 16, 3
    pos = _ints([1, -7, 4, -7, 2, -7], device)[::2]
    cu = _ints([0, 9, 2, 9, 3, 9], device)[::2]
    assert not pos.is_contiguous() and not cu.is_contiguous()
    tensors = make_inputs(B, L, L, H, Hkv, D, 3, T, torch.float32, device)
    for Lq in (L, 1):                      # fused path (with gradients), split-K decode path
        run_both((tensors[0][:, -Lq:], *tensors[1:]), torch.randn(H * D, device=device), pos, cu, torch.float32,
                 mode, "strict", check_grads=Lq == L)


@pytest.mark.parametrize("device", KERNEL_DEVICES)
def test_visual_kv_strided_vectors_and_empty_hidden(device):
    """visual_kv on triton with strided image_positions and bias, and with hidden size 0 (the
    projection is then just the bias; the folded RMSNorm scale used to be rsqrt(0/0) = NaN)."""
    N, T, Dm, Hkv, D = 3, 2, 8, 1, 16
    C = 2 * Hkv * D
    pos = torch.tensor([5, 0, 9, 0, 2000, 0], device=device)[::2]
    bias = torch.randn(2 * C, device=device)[::2]
    for dm in (Dm, 0):
        x = torch.randn(N, T, dm, device=device)
        w, W = torch.rand(dm, device=device) + 0.5, torch.randn(C, dm, device=device)
        with use_backend("triton"):
            k, v = visual_kv(x, w, W, bias, pos, num_kv_heads=Hkv, rope_theta=1e6, position_offset=1)
        rk, rv = visual_kv_reference(x.double(), w.double(), W.double(), bias.double(), pos, num_kv_heads=Hkv,
                                     rope_theta=1e6, position_offset=1)
        assert_close(f"k_vis (Dm={dm})", k, rk, torch.float32)
        assert_close(f"v_vis (Dm={dm})", v, rv, torch.float32)


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
def test_module_empty_shapes(backend, device):
    """L = 0 prefill followed by a decode step, an empty batch with an (empty) image layout, and images
    of zero tokens: shapes are right and the results equal the reference backend's."""
    layer = HyperAttention(32, 2, 1, rope_theta=1e4, device=device)
    torch.nn.init.normal_(layer.gate)
    x = torch.randn(2, 1, 32, device=device)
    empty_img = (torch.randn(0, 3, 32, device=device), _ints([], device), _ints([0], device))
    zero_tokens = (torch.randn(2, 0, 32, device=device), _ints([0, 0], device), _ints([0, 1, 2], device))
    results = {}
    for name in (backend, "reference"):
        with torch.no_grad(), use_backend(name):
            y0, cache = layer(x[:, :0], torch.zeros(2, 0, dtype=torch.long, device=device), use_cache=True)
            y1, cache = layer(x, torch.zeros(2, 1, dtype=torch.long, device=device), past_key_value=cache,
                              use_cache=True)
            yb, _ = layer(torch.randn(0, 4, 32, device=device), torch.arange(4, device=device), *empty_img)
            yt, _ = layer(torch.randn(2, 3, 32, device=device).copy_(x.expand(2, 3, 32)),
                          torch.arange(3, device=device), *zero_tokens)
        assert y0.shape == (2, 0, 32) and y1.shape == (2, 1, 32) and cache.seq_len == 1
        assert yb.shape == (0, 4, 32) and yt.shape == (2, 3, 32)
        results[name] = (y1, yt)
    for a, b in zip(results[backend], results["reference"]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


# --------------------------------------------------------------------------- int64 offsets

_INT64_SCRIPT = """
import torch
from mmkernels import hyper_attention, hyper_attention_reference, use_backend
from mmkernels.testing import assert_close
from mmkernels.ops.hyper_attention.function import text_rope
from mmkernels.ops.hyper_attention.reference import apply_rope
# Head-major views [B, L, H, D] of one fp16 storage whose head stride HS is just over 2^30 elements,
# so h * HS passes 2^31 at h = 2 (int32 offsets wrap to a negative address).  The storage is a
# lazily-mapped 4 GiB allocation; only the few elements written here are ever touched.
B, L, H, D, T = 1, 4, 3, 16, 2
HS = (1 << 30) + 1024
big = torch.empty(2 * HS + 1024, dtype=torch.float16)
lanes = iter(range(0, 1024, L * D))
def view(rows):
    off = next(lanes)
    t = big.as_strided((1, rows, H, D), (0, D, HS, 1), off)
    t.copy_(torch.randn(1, rows, H, D, dtype=torch.float16))
    return t
q, k, v, gate, do = view(L), view(L), view(L), view(L), view(L)
kv, vv = view(T), view(T)
pos, cu = torch.tensor([1], dtype=torch.int32), torch.tensor([0, 1], dtype=torch.int32)
dense = lambda t: t.detach().clone().double()
for Lq in (L, 1):                                  # fused path, then split-K decode
    leaves = [t[:, -Lq:] if i in (0, 3, 4) else t for i, t in enumerate((q, k, v, gate, do))]
    qq = leaves[0].detach().requires_grad_()
    with use_backend("triton"):
        out = hyper_attention(qq, leaves[1], leaves[2], kv, vv, pos, cu, gate=leaves[3])
    out.backward(leaves[4])
    qr = dense(leaves[0]).requires_grad_()
    ref = hyper_attention_reference(qr, dense(leaves[1]), dense(leaves[2]), dense(kv), dense(vv), pos, cu,
                                    gate=dense(leaves[3]))
    ref.backward(dense(leaves[4]))
    assert_close(f"out Lq={Lq}", out, ref, torch.float16)
    assert_close(f"dq Lq={Lq}", qq.grad, qr.grad, torch.float16)
pid = torch.arange(L)[None]
with use_backend("triton"):
    y = text_rope(q, pid, 1e4)
assert_close("text rope", y, apply_rope(dense(q), pid[..., None], 1e4), torch.float16)
print("int64 ok")
"""


@pytest.mark.skipif("cpu" not in KERNEL_DEVICES, reason="needs the Triton interpreter")
def test_head_offsets_past_int32_on_head_major_views():
    """``h * stride_qh`` (and the other head-stride products) on head-major views whose head stride
    times the head index passes 2^31 elements.  Run in a subprocess: with int32 offsets the kernel
    reads before the start of the buffer, which can abort the process."""
    env = dict(os.environ, TRITON_INTERPRET="1", MMKERNELS_POISON_OUTPUTS="1")
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).resolve().parent.parent), env.get("PYTHONPATH", "")])
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(_INT64_SCRIPT)], env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0 and "int64 ok" in proc.stdout, (proc.returncode, proc.stdout[-3000:],
                                                                 proc.stderr[-3000:])


def test_layer_dtype_mismatch_on_meta_is_a_type_error():
    """The autocast query behind the dtype check raised torch's "unknown device type for autocast" for
    meta tensors (a model being shape-checked under torch.device("meta")): now the named TypeError."""
    layer = mmkernels.HyperAttention(64, 4, 2, device="meta")
    with pytest.raises(TypeError, match="hidden_states has dtype torch.bfloat16 but the layer's parameters"):
        layer(torch.randn(2, 3, 64, device="meta", dtype=torch.bfloat16), torch.arange(3, device="meta"))
