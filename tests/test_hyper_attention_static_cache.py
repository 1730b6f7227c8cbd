"""HyperAttention's static decode cache: fixed buffers, the position advanced on the device, so a decode
step has the same launches every time and can be captured in a CUDA graph (the capture itself is the
``-m gpu`` test at the end)."""
import dataclasses

import pytest
import torch

from mmkernels import HyperAttention, HyperAttentionCache, StaticHyperAttentionCache, use_backend

from conftest import BACKEND_DEVICES

hidden, H, Hkv, D, T = 64, 4, 2, 16, 5


def _layer(mode, device):
    layer = HyperAttention(hidden, H, Hkv, D, rope_theta=1e4, mode=mode, device=device)
    if mode == "gated":
        torch.nn.init.normal_(layer.gate)
    return layer


def _prompt(device, L=9):
    """Two samples: sample 1 left-padded by 2 (its images sit after the padding); 3 images in all."""
    x = torch.randn(2, L, hidden, device=device)
    img = torch.randn(3, T, hidden, device=device)
    ints = dict(dtype=torch.int32, device=device)
    pos, cu = torch.tensor([1, 5, 4], **ints), torch.tensor([0, 2, 3], **ints)
    kpm = torch.ones(2, L, dtype=torch.bool, device=device)
    kpm[1, :2] = False
    pid = (kpm.long().cumsum(1) - 1).clamp(min=0)   # positions as generate() builds them for left padding
    return x, img, pos, cu, kpm, pid


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
@pytest.mark.parametrize("mode", ["gated", "joint"])
def test_static_decode_matches_the_growing_cache(mode, backend, device):
    """Decode steps on a static cache equal the same steps on a growing cache (with the prompt's padding
    mask), and every buffer keeps its shape and storage, as a replayed CUDA graph needs."""
    torch.manual_seed(0)
    layer = _layer(mode, device)
    L, steps, spare = 9, 3, 2
    x, img, pos, cu, kpm, pid = _prompt(device, L)
    xs = torch.randn(2, steps, hidden, device=device)
    with torch.no_grad(), use_backend(backend):
        _, grow = layer(x, pid, img, pos, cu, key_padding_mask=kpm, use_cache=True)
        static = grow.to_static(L + steps + spare, key_padding_mask=kpm)
        assert isinstance(static, StaticHyperAttentionCache) and static.max_len == L + steps + spare
        storage = [t.data_ptr() for t in (static.k, static.v, static.valid, static.length)]
        mask = kpm
        for s in range(steps):
            step_pid = pid[:, -1:] + 1 + s
            mask = torch.cat([mask, torch.ones(2, 1, dtype=torch.bool, device=device)], 1)
            want, grow = layer(xs[:, s:s + 1], step_pid, past_key_value=grow, key_padding_mask=mask, use_cache=True)
            got, returned = layer(xs[:, s:s + 1], step_pid, past_key_value=static)
            assert returned is static
            torch.testing.assert_close(got, want, rtol=2e-5, atol=2e-5)
        assert [t.data_ptr() for t in (static.k, static.v, static.valid, static.length)] == storage
        assert static.seq_len == L + steps and static.filled == L + steps
        torch.testing.assert_close(static.k[:, :L + steps], grow.k, rtol=0, atol=0)
        torch.testing.assert_close(static.v[:, :L + steps], grow.v, rtol=0, atol=0)
        assert static.valid[:, :L + steps].tolist() == mask.tolist() and not static.valid[:, L + steps:].any()


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
def test_static_cache_full(backend, device):
    """An eager step past max_len raises; a replayed one (Python's counter no longer advancing) writes
    nothing and returns NaN, checked on the device."""
    torch.manual_seed(0)
    layer = _layer("joint", device)
    x, img, pos, cu, kpm, pid = _prompt(device)
    step = torch.randn(2, 1, hidden, device=device)
    with torch.no_grad(), use_backend(backend):
        _, grow = layer(x, pid, img, pos, cu, use_cache=True)
        static = grow.to_static(10)
        y, _ = layer(step, pid[:, -1:] + 1, past_key_value=static)
        assert torch.isfinite(y).all() and static.seq_len == 10
        with pytest.raises(ValueError, match="static cache is full: max_len=10"):
            layer(step, pid[:, -1:] + 2, past_key_value=static)
        before = static.k.clone(), static.v.clone()
        static.filled = 9            # what a graph replay looks like to Python: the counter did not move
        y, _ = layer(step, pid[:, -1:] + 2, past_key_value=static)
        assert torch.isnan(y).all() and static.seq_len == 10
        assert torch.equal(static.k, before[0]) and torch.equal(static.v, before[1])


def test_static_cache_bad_input():
    torch.manual_seed(0)
    layer = _layer("gated", "cpu")
    x, img, pos, cu, kpm, pid = _prompt("cpu")
    with torch.no_grad():
        _, grow = layer(x, pid, img, pos, cu, use_cache=True)
    with pytest.raises(ValueError, match="max_len must be >= 9"):
        grow.to_static(8)
    with pytest.raises(TypeError, match="max_len must be an int"):
        grow.to_static(12.0)
    with pytest.raises(ValueError, match="key_padding_mask must be a bool"):
        grow.to_static(12, key_padding_mask=kpm[:, 1:])
    with pytest.raises(TypeError, match="key_padding_mask"):
        grow.to_static(12, key_padding_mask=kpm.int())
    static = grow.to_static(12)
    with pytest.raises(TypeError, match="already static"):
        static.to_static(14)
    step, step_pid = torch.randn(2, 1, hidden), pid[:, -1:] + 1
    with torch.no_grad():
        with pytest.raises(ValueError, match="one token per sample"):
            layer(torch.randn(2, 2, hidden), torch.cat([step_pid, step_pid + 1], 1), past_key_value=static)
        with pytest.raises(ValueError, match="no image_embeds and no key_padding_mask"):
            layer(step, step_pid, img[:1], pos[:1], torch.tensor([0, 1, 1], dtype=torch.int32),
                  past_key_value=static)
        with pytest.raises(ValueError, match="no image_embeds and no key_padding_mask"):
            layer(step, step_pid, past_key_value=static, key_padding_mask=torch.ones(2, 12, dtype=torch.bool))
        with pytest.raises(ValueError, match="past_key_value"):
            layer(step[:1], step_pid[:1], past_key_value=static)              # another batch size
        for broken in (dataclasses.replace(static, length=static.length.int()),
                       dataclasses.replace(static, valid=static.valid[:, :-1]), dataclasses.replace(static, length=None)):
            with pytest.raises(ValueError, match="without a length"):
                layer(step, step_pid, past_key_value=broken)
    with pytest.raises(RuntimeError, match="torch.no_grad"):
        layer(step, step_pid, past_key_value=static)                         # autograd on
    assert static.seq_len == 9 and static.filled == 9                        # no bad call wrote anything
    assert isinstance(static, HyperAttentionCache)                          # a cache like any other to the checks


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
@pytest.mark.parametrize("needs_grad", ["hidden_states", "v_proj.weight", "gate", "past_key_value.k_vis"])
def test_static_step_with_grad_refuses_any_attention_input_that_requires_grad(needs_grad, backend, device):
    """A frozen layer, two decode steps with grad enabled and an input requiring grad: the guard looked only
    at q/k_proj's weights, so the steps ran and backward then failed with autograd's "modified by an
    inplace operation".  Any input of the in-place-written attention requiring grad is refused at the
    step now, naming it; with none, grad mode is fine."""
    torch.manual_seed(0)
    layer = _layer("gated", device).requires_grad_(False)
    x, img, pos, cu, kpm, pid = _prompt(device)
    with torch.no_grad(), use_backend("reference"):                        # the prompt (either backend's cache)
        _, grow = layer(x, pid, img, pos, cu, use_cache=True)
    static = grow.to_static(12)
    step, step_pid = torch.randn(2, 1, hidden, device=device), pid[:, -1:] + 1
    if needs_grad == "hidden_states":
        step.requires_grad_()
    elif needs_grad == "past_key_value.k_vis":
        static = dataclasses.replace(static, k_vis=static.k_vis.clone().requires_grad_())
    else:
        layer.get_parameter(needs_grad).requires_grad_()
    with use_backend(backend):
        with pytest.raises(RuntimeError, match=rf"{needs_grad} require grad: run decode steps under torch\.no_grad"):
            layer(step, step_pid, past_key_value=static)
        assert static.filled == 9                                            # nothing written
        layer.requires_grad_(False)
        fresh = grow.to_static(12)
        for s in range(2):                                                   # nothing requires grad: runs
            out, _ = layer(step.detach(), step_pid + s, past_key_value=fresh)
    assert not out.requires_grad and fresh.filled == 11


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need CUDA")
@pytest.mark.parametrize("mode", ["gated", "joint"])
def test_static_decode_step_replays_in_a_cuda_graph(mode):
    """Capture one decode step on a static cache, replay it for the following tokens (updating the
    captured inputs in place), and compare every replay with eager steps on a second static cache."""
    torch.manual_seed(0)
    dev, dtype = "cuda", torch.bfloat16
    layer = _layer(mode, dev).to(dtype)
    L, steps = 40, 6
    x, img, pos, cu, kpm, pid = _prompt(dev, L)
    x, img = x.to(dtype), img.to(dtype)
    xs = torch.randn(2, steps, hidden, device=dev, dtype=dtype)
    with torch.no_grad(), use_backend("triton"):
        _, grow = layer(x, pid, img, pos, cu, key_padding_mask=kpm, use_cache=True)
        graphed, eager = grow.to_static(L + steps, kpm), grow.to_static(L + steps, kpm)
        x_in, pid_in = xs[:, :1].clone(), pid[:, -1:] + 1
        # step 0, eagerly on a side stream (compiles the kernels; a real step of `graphed`)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            layer(x_in, pid_in, past_key_value=graphed)
        torch.cuda.current_stream().wait_stream(side)
        want, _ = layer(x_in, pid_in, past_key_value=eager)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):                    # recorded, not run: graphed.length stays L + 1
            out, _ = layer(x_in, pid_in, past_key_value=graphed)
        for s in range(1, steps):
            x_in.copy_(xs[:, s:s + 1])
            pid_in.copy_(pid[:, -1:] + 1 + s)
            graph.replay()
            want, _ = layer(x_in, pid_in, past_key_value=eager)
            torch.testing.assert_close(out, want, rtol=0, atol=0)
        torch.cuda.synchronize()
        assert int(graphed.length) == int(eager.length) == L + steps
        assert torch.equal(graphed.k, eager.k) and torch.equal(graphed.valid, eager.valid)
