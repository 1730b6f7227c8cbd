"""``apply_mmkernels`` on InternLM-XComposer2: every PLoRA linear becomes a ``PLoRALinear`` in place.

A tiny faithful mirror of XComposer2's InternLM2 decoder (``tests/mirrors/internlm2_plora.py``: 2 layers,
hidden 64, 10 PLoRA projections, ``im_mask`` threaded through every layer) runs patched against unpatched:
logits, loss and every parameter gradient on both backends, greedy generation, 20 AdamW steps, state-dict
round trips both ways, and the patch-time errors.
"""
import copy

import pytest
import torch
from torch import nn

import mmkernels
from mmkernels import PLoRALinear
from mmkernels.patching import apply_mmkernels, xcomposer2
from mmkernels.testing import assert_close

from conftest import BACKEND_DEVICES
from mirrors.internlm2_plora import PLoRA, build, image_mask

V, B, N = 61, 2, 7
PROJECTIONS = ("attention.wqkv", "attention.wo", "feed_forward.w1", "feed_forward.w2", "feed_forward.w3")


def _patch(model, **kwargs):
    # the other kinds' patchers are separate modules; this file tests the PLoRA one alone
    return apply_mmkernels(model, moe=False, hyper_attention=False, **kwargs)


def _batch():
    ids = torch.randint(0, V, (B, N))
    return ids, image_mask(B, N, [(1, 5), None])       # an image span in sample 0, sample 1 text only


def _loss_and_grads(model, ids, mask, backend):
    model.zero_grad(set_to_none=True)
    with mmkernels.use_backend(backend):
        logits, loss = model(ids, mask, labels=ids)
    loss.backward()
    return logits.detach(), loss.detach(), {n: p.grad for n, p in model.named_parameters()}


@pytest.mark.parametrize("backend, device", BACKEND_DEVICES)
def test_patched_matches_unpatched(backend, device):
    model = build(lora_dropout=0.0).to(device).train()        # p = 0: XComposer2's identity ``lambda x: x``
    ids, mask = (t.to(device) for t in _batch())
    logits, loss, grads = _loss_and_grads(model, ids, mask, backend)
    params = dict(model.named_parameters())
    shapes = {k: v.shape for k, v in model.state_dict().items()}
    assert _patch(model) == {"plora": 10}
    for i, layer in enumerate(model.model.layers):
        for proj in PROJECTIONS:
            assert type(layer.get_submodule(proj)) is PLoRALinear, f"layers.{i}.{proj}"
    assert type(model.output) is nn.Linear                # the LM head is not PLoRA
    # the same Parameter objects, the same state-dict keys and shapes
    assert all(p is params[n] for n, p in model.named_parameters()) and len(params) == len(list(model.parameters()))
    assert {k: v.shape for k, v in model.state_dict().items()} == shapes
    logits2, loss2, grads2 = _loss_and_grads(model, ids, mask, backend)
    assert_close("logits", logits2, logits.double(), torch.float32)
    assert_close("loss", loss2, loss.double(), torch.float32)
    for name, g in grads.items():
        assert g is not None and grads2[name] is not None, name
        assert_close(f"grad {name}", grads2[name], g.double(), torch.float32)


@pytest.mark.parametrize("backend, device", BACKEND_DEVICES)
def test_greedy_generate_identical(backend, device):
    """Eval mode with XComposer2's dropout 0.05 (inactive); the prompt holds an image span, the decode
    steps are text only (PLoRA's no-visual-token path) and reuse a K/V cache."""
    model = build().to(device).eval()
    ids, mask = torch.randint(0, V, (B, 5), device=device), image_mask(B, 5, [(1, 4), (0, 2)]).to(device)
    expected = model.generate(ids, mask, max_new_tokens=3)
    _patch(model)
    with mmkernels.use_backend(backend):
        got = model.generate(ids, mask, max_new_tokens=3)
    assert torch.equal(got, expected)


def test_convergence_20_adamw_steps():
    """20 AdamW steps from one seed: the loss at every step and the final parameters agree.  The
    patched model's optimizer is built *before* patching (the parameters are shared, so it keeps
    training the model); text-only batches on odd steps take PLoRA's no-visual-token path (zero
    gradients for Plora_A/B, which AdamW still decays).  Reference backend: 20 Triton-interpreter steps
    would cost ~50 s; the Triton kernels train for 2 steps in the next test."""
    original = build(lora_dropout=0.0).train()
    patched = copy.deepcopy(original)
    opts = [torch.optim.AdamW(m.parameters(), lr=1e-2, weight_decay=0.1) for m in (original, patched)]
    _patch(patched)
    batches = [(torch.randint(0, V, (B, N)), image_mask(B, N, spans)) for spans in ([(1, 5), (2, 3)], [None, None])]
    first = None
    for step in range(20):
        ids, mask = batches[step % 2]
        losses = []
        for model, opt in zip((original, patched), opts):
            opt.zero_grad()
            with mmkernels.use_backend("reference"):
                loss = model(ids, mask, labels=ids)[1]
            loss.backward()
            opt.step()
            losses.append(loss.detach())
        assert_close(f"loss at step {step}", losses[1], losses[0].double(), torch.float32)
        first = losses[0] if first is None else first
    assert losses[0] < 0.5 * first                            # it trained (on two fixed batches)
    for (name, p), q in zip(original.named_parameters(), patched.parameters()):
        assert_close(f"final {name}", q, p.double(), torch.float32)


@pytest.mark.parametrize("backend, device", [c for c in BACKEND_DEVICES if c.values[0] == "triton"])
def test_training_steps_on_triton_kernels(backend, device):
    """2 AdamW steps with the PLoRA kernels (one layer, to keep the interpreter cheap) against the
    unpatched model.  ``bias=False`` (as InternLM2-7B): the key part of the wqkv bias has a pure
    rounding-noise gradient (softmax ignores it), which AdamW turns into lr-sized random steps."""
    original = build(lora_dropout=0.0, num_hidden_layers=1, bias=False).to(device).train()
    patched = copy.deepcopy(original)
    _patch(patched)
    opts = [torch.optim.AdamW(m.parameters(), lr=1e-2, weight_decay=0.1) for m in (original, patched)]
    for step in range(2):
        ids, mask = (t.to(device) for t in _batch())
        losses = []
        for model, opt, be in ((original, opts[0], "reference"), (patched, opts[1], backend)):
            opt.zero_grad()
            with mmkernels.use_backend(be):
                loss = model(ids, mask, labels=ids)[1]
            loss.backward()
            opt.step()
            losses.append(loss.detach())
        assert_close(f"loss at step {step}", losses[1], losses[0].double(), torch.float32)
    for (name, p), q in zip(original.named_parameters(), patched.parameters()):
        assert_close(f"final {name}", q, p.double(), torch.float32)


def test_state_dict_round_trips_both_ways():
    original = build(seed=1).eval()
    patched = build(seed=2).eval()
    _patch(patched)
    sd_original, sd_patched = original.state_dict(), patched.state_dict()
    assert {k: v.shape for k, v in sd_original.items()} == {k: v.shape for k, v in sd_patched.items()}
    ids, mask = _batch()
    patched.load_state_dict(sd_original, strict=True)           # original -> patched
    with torch.no_grad():
        assert torch.equal(patched(ids, mask)[0], original(ids, mask)[0])
    fresh = build(seed=3).eval()
    donor = build(seed=4).eval()
    _patch(donor)
    fresh.load_state_dict(donor.state_dict(), strict=True)      # patched -> original
    with torch.no_grad():
        assert torch.equal(fresh(ids, mask)[0], donor(ids, mask)[0])


def test_nothing_to_patch_names_what_it_looked_for():
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU())
    with pytest.raises(ValueError, match="Plora_A / Plora_B"):
        _patch(model)
    assert _patch(model, strict=False) == {"plora": 0}
    assert xcomposer2.plan(model) == []
    with pytest.raises(ValueError, match="wrap it in a parent module"):   # nothing to replace it in
        _patch(PLoRA(8, 8, lora_r=2))


def test_applying_twice_does_not_double_patch():
    model = build()
    assert _patch(model) == {"plora": 10}
    modules = dict(model.named_modules())
    assert _patch(model, strict=False) == {"plora": 0}
    assert xcomposer2.plan(model) == []
    with pytest.raises(ValueError, match="wrap it in a parent module"):   # nothing to replace it in
        _patch(PLoRA(8, 8, lora_r=2))
    assert dict(model.named_modules()) == modules


def test_module_registered_twice_is_replaced_once():
    model = build()
    shared = model.model.layers[0].feed_forward.w1
    model.model.layers[1].feed_forward.w1 = shared             # tied under two names
    assert _patch(model) == {"plora": 9}
    assert model.model.layers[0].feed_forward.w1 is model.model.layers[1].feed_forward.w1
    assert isinstance(model.model.layers[1].feed_forward.w1, PLoRALinear)


def test_without_im_mask_the_lora_stays_out_of_the_graph():
    """``PLoRA(x)`` with no mask is the base linear alone in the original: no gradient for A/B."""
    layer = build().model.layers[0].attention.wo
    holder = nn.Module()
    holder.wo = layer
    x = torch.randn(2, 3, 64)
    expected = layer(x)
    _patch(holder)
    assert isinstance(holder.wo, PLoRALinear)
    y = holder.wo(x)
    y.sum().backward()
    assert torch.equal(y, expected)
    assert holder.wo.Plora_A.weight.grad is None and holder.wo.Plora_B.weight.grad is None


@pytest.mark.parametrize("backend, device", BACKEND_DEVICES)
def test_autocast_runs_in_the_autocast_dtype(backend, device):
    """Mixed-precision training (fp32 weights under ``torch.autocast(bfloat16)``): like the original's
    ``nn.Linear`` calls, every GEMM and the output are bfloat16; gradients reach the fp32 parameters."""
    holder = nn.Module()
    holder.wqkv = build(lora_dropout=0.0).model.layers[0].attention.wqkv.to(device)
    patched = copy.deepcopy(holder)
    _patch(patched)
    x, mask = torch.randn(B, N, 64, device=device), image_mask(B, N, [(1, 5), (0, 2)]).to(device)
    results = []
    for model in (holder, patched):
        model.zero_grad(set_to_none=True)
        with torch.autocast(device, dtype=torch.bfloat16), mmkernels.use_backend(backend):
            y = model.wqkv(x, mask)
        y.float().pow(2).sum().backward()
        results.append([y] + [p.grad for p in model.parameters()])
    assert results[1][0].dtype == results[0][0].dtype == torch.bfloat16
    for i, (got, expected) in enumerate(zip(results[1], results[0])):
        assert got.dtype == expected.dtype, i
        assert_close(f"output/grad {i}", got, expected.double(), torch.bfloat16)


def _break(model, case):
    """Make layer 1's ``wo`` something the fused op cannot run exactly; returns the words the error names."""
    wo = model.model.layers[1].attention.wo
    if case == "lora_bias":
        wo.Plora_B = nn.Linear(8, 64, bias=True)
        return "Plora_B has a bias"
    if case == "alpha_dropout":
        wo.lora_dropout = nn.AlphaDropout(0.1)
        return "lora_dropout"
    if case == "custom_dropout":
        del wo.lora_dropout                                      # the nn.Dropout child
        wo.lora_dropout = lambda x: x * 0.5
        return "lora_dropout"
    if case == "no_scaling":
        del wo.lora_scaling
        return "no lora_scaling"
    if case == "forward_hook":
        wo.register_forward_hook(lambda m, i, o: o * 2)
        return "hooks"
    if case == "child_hook":
        wo.Plora_A.register_forward_pre_hook(lambda m, i: None)
        return "Plora_A has hooks"
    if case == "wrapped_lora":
        wo.Plora_A = nn.Sequential(nn.Linear(64, 8, bias=False))
        return "Plora_A is a Sequential"
    if case == "mixed_dtype":
        wo.Plora_B.double()
        return "Plora_B.weight has dtype"
    if case == "extra_parameter":
        wo.magnitude = nn.Parameter(torch.ones(64))
        return "magnitude"
    if case == "nonfinite_scaling":
        wo.lora_scaling = float("inf")
        return "lora_scaling must be finite"
    if case == "plain_tensor_weight":
        del wo.weight
        wo.weight = torch.randn(64, 64)
        return "weight is a Tensor, not an nn.Parameter"
    if case == "parametrized":
        torch.nn.utils.parametrize.register_parametrization(wo, "weight", nn.Identity())
        return "parametrizations"
    if case == "rank_mismatch":
        wo.Plora_B = nn.Linear(4, 64, bias=False)
        return "Plora_B.weight must have shape"
    raise KeyError(case)


@pytest.mark.parametrize("case", ["lora_bias", "alpha_dropout", "custom_dropout", "no_scaling", "forward_hook",
                                  "child_hook", "wrapped_lora", "mixed_dtype", "extra_parameter", "rank_mismatch",
                                  "nonfinite_scaling", "plain_tensor_weight", "parametrized"])
def test_unsupported_option_raises_at_patch_time(case):
    model = build()
    needle = _break(model, case)
    before = dict(model.named_modules())
    with pytest.raises((ValueError, TypeError, NotImplementedError)) as err:
        _patch(model)
    assert "model.layers.1.attention.wo" in str(err.value) and needle in str(err.value), str(err.value)
    assert dict(model.named_modules()) == before                 # nothing was patched, not even layer 0


def test_dropout_probability_is_carried_over():
    model = build(lora_dropout=0.25)
    original = model.model.layers[0].feed_forward.w3
    _patch(model)
    new = model.model.layers[0].feed_forward.w3
    assert new.lora_dropout_p == 0.25 and new.lora_scaling == original.lora_scaling == 2.0
    assert new.training == original.training and new.lora_len == 5
    assert new.Plora_A is original.Plora_A and new.weight is original.weight and new.bias is original.bias


def test_mirror_is_the_published_plora():
    """The mirror's projections are the published class (so the patcher is tested on the real structure)."""
    model = build()
    assert isinstance(model.model.layers[0].attention.wqkv, PLoRA)
    assert callable(model.model.layers[0].attention.wqkv.lora_dropout)
