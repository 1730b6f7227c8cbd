"""Hardening of the seed-model patchers, second pass.

* A patch never bypasses what the user's model does: a submodule whose call the patch replaces (mPLUG-Owl3's
  ``v_kv_proj``, and any other child the patched forward does not call) must have no hooks and run its
  class's plain forward; a layer or a PLoRA look-alike with a forward of its own is refused by name.
* mPLUG-Owl3's decode steps: an image-less sample in a v2 batch with images sees all its keys (a
  deliberate difference from the original, pinned here), a filled cache refuses another prompt's images,
  and 4-D masks whose fully-masked rows were unmasked (transformers' ``_unmask_unattended``) are accepted.
* Refusals and guards no test reached before: a ``nn.Dropout`` subclass and state-dict hooks on a PLoRA
  module, and a retired parameter in an optimizer's second param group.

Expected values come from the unpatched mirrors (``tests/mirrors/``); everything runs on tiny shapes.
"""
import types

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers import DynamicCache

import mmkernels
from mmkernels import PLoRALinear
from mmkernels.ops.plora.baseline import XComposerPLoRA
from mmkernels.patching import apply_mmkernels
from mmkernels.patching._common import RetiredParameterError, retire_parameters
from mmkernels.testing import assert_close

from conftest import BACKEND_DEVICES
from mirrors import internlm2_plora
from mirrors.qwen2_hyper import build as build_owl3
from test_patch_mplug_owl3 import CACHE, HID, HYPER, L, _inputs as owl3_inputs


def _patch_owl3(model):
    return apply_mmkernels(model, plora=False, moe=False)


def _patch_plora(model):
    return apply_mmkernels(model, moe=False, hyper_attention=False)


def _owl3_layer_call(model, layer, device, mask=None, version="v1"):
    """The hyper layer's own call (what the decoder layer passes), its output ``[B, L, hidden]``."""
    _, _, images, media_offset = owl3_inputs(version)
    hidden = torch.randn(2, L, HID, device=device)
    position_ids = torch.arange(L, device=device)[None].expand(2, L)
    cos_sin = model.model.rotary_emb(hidden, position_ids)
    if isinstance(media_offset, torch.Tensor):
        media_offset = media_offset.to(device)
    out, _, _ = layer(hidden, attention_mask=mask, position_ids=position_ids, image_embeds=images.to(device),
                      media_offset=media_offset, position_embeddings=cos_sin)
    return out


# ------------------------------------------------------------------ mPLUG-Owl3: calls the patch replaces

class _FakeQuantLinear(nn.Linear):
    """A fake-quantised linear (QAT): its forward rounds the weight to a 1/8 grid."""

    def forward(self, x):
        return F.linear(x, torch.round(self.weight * 8) / 8, self.bias)


def _owl3_break(layer, case):
    """Give the hyper layer something its patched forward would bypass; returns what the error names."""
    if case == "v_kv_forward_hook":
        layer.v_kv_proj.register_forward_hook(lambda m, i, o: o * 0.25)
        return "'model.layers.1.self_attn.v_kv_proj' has hooks (_forward_hooks)"
    if case == "v_kv_forward_pre_hook":
        layer.v_kv_proj.register_forward_pre_hook(lambda m, i: (i[0] * 2,))
        return "v_kv_proj' has hooks (_forward_pre_hooks)"
    if case == "v_kv_backward_hook":
        layer.v_kv_proj.register_full_backward_hook(lambda m, gi, go: None)
        return "v_kv_proj' has hooks (_backward_hooks)"
    if case == "uncalled_child_hook":     # e.g. the original's own rotary_emb, which the patch does not call
        layer.rotary_emb = nn.Identity()
        layer.rotary_emb.register_forward_hook(lambda m, i, o: o)
        return "'model.layers.1.self_attn.rotary_emb' has hooks"
    if case == "v_kv_subclass_forward":
        quant = _FakeQuantLinear(HID, layer.v_kv_proj.out_features)
        quant.load_state_dict(layer.v_kv_proj.state_dict())
        layer.v_kv_proj = quant
        return "v_kv_proj is a test_patch_hardening._FakeQuantLinear with its own forward"
    if case == "v_kv_instance_forward":
        layer.v_kv_proj.forward = lambda x: F.linear(x, layer.v_kv_proj.weight * 2, layer.v_kv_proj.bias)
        return "v_kv_proj is a torch.nn.modules.linear.Linear with its own forward"
    if case == "layer_instance_forward":  # e.g. an offloading wrapper's forward
        layer.forward = types.MethodType(type(layer).forward, layer)
        return "forward set on the instance"
    raise KeyError(case)


@pytest.mark.parametrize("case", ["v_kv_forward_hook", "v_kv_forward_pre_hook", "v_kv_backward_hook",
                                  "uncalled_child_hook", "v_kv_subclass_forward", "v_kv_instance_forward",
                                  "layer_instance_forward"])
def test_owl3_refuses_what_the_patched_forward_would_bypass(case):
    """Was patched silently: the hook or v_kv_proj's own forward then never ran (the patched layer reads
    v_kv_proj's weight into visual_kv), so the output ignored it."""
    model = build_owl3("v1")
    layer = model.get_submodule(HYPER)
    needle = _owl3_break(layer, case)
    with pytest.raises(NotImplementedError) as err:
        _patch_owl3(model)
    assert needle in str(err.value), str(err.value)
    assert getattr(layer, "_mmkernels_hyper", None) is None            # nothing was patched
    assert case == "layer_instance_forward" or "forward" not in vars(layer)


@pytest.mark.parametrize("backend, device", BACKEND_DEVICES)
def test_owl3_hooks_on_the_projections_it_calls_still_run(backend, device):
    """q/k/v/o_proj are called by the patched forward as by the original: their hooks are not refused and run."""
    model = build_owl3("v1").to(device)
    layer = model.get_submodule(HYPER)
    layer.q_proj.register_forward_hook(lambda m, i, o: o * 0.5)
    layer.o_proj.register_forward_pre_hook(lambda m, i: (i[0] * 3,))
    with torch.no_grad():
        torch.manual_seed(5)
        expected = _owl3_layer_call(model, layer, device)
        assert _patch_owl3(model) == {"hyper_attention": 1}
        torch.manual_seed(5)
        with mmkernels.use_backend(backend):
            got = _owl3_layer_call(model, layer, device)
    assert_close("hooked layer", got, expected.double(), torch.float32)


def test_owl3_rope_type_other_than_default_needs_the_models_tables():
    """The patched layer computes plain RoPE when the model passes no position_embeddings: with another
    rope type (e.g. linear scaling) it raises instead of silently computing plain RoPE."""
    model = build_owl3("v1", rope_scaling={"rope_type": "linear", "factor": 2.0})
    _patch_owl3(model)
    layer = model.get_submodule(HYPER)
    assert layer._mmkernels_hyper.rope_type == "linear"
    with pytest.raises(NotImplementedError, match="RoPE is 'linear' and no position_embeddings"), \
            mmkernels.use_backend("reference"):
        layer(torch.randn(2, L, HID))


# ------------------------------------------------------------------ XComposer2: a PLoRA look-alike

class _AllRowsLoRA(XComposerPLoRA):
    """A look-alike whose class overrides forward: the LoRA on every row, not just the visual ones."""

    def forward(self, x, im_mask=None):
        return F.linear(x, self.weight, self.bias) + self.Plora_B(self.Plora_A(x)) * self.lora_scaling


class _ScaledPLoRA(XComposerPLoRA):
    """XComposer2's PLoRA whose subclass changes the output."""

    def forward(self, x, im_mask=None):
        return super().forward(x, im_mask) * 0.5


class _LinearWithLoRAAttributes(nn.Linear):
    """Has the PLoRA attributes but nn.Linear's forward (the LoRA never runs)."""

    def __init__(self, fan_in, fan_out, bias):
        super().__init__(fan_in, fan_out, bias=bias)
        self.Plora_A = nn.Linear(fan_in, 8, bias=False)
        self.Plora_B = nn.Linear(8, fan_out, bias=False)
        self.lora_scaling, self.lora_dropout = 2.0, nn.Dropout(0.0)


@pytest.mark.parametrize("cls, needle", [(_AllRowsLoRA, "_AllRowsLoRA.forward) does not compute XComposer2's PLoRA"),
                                         (_ScaledPLoRA, "_ScaledPLoRA.forward) does not compute XComposer2's PLoRA"),
                                         (_LinearWithLoRAAttributes, "cannot verify")])
def test_plora_look_alike_with_its_own_forward_is_refused(cls, needle):
    """Was replaced without a word (only a forward set on the instance was looked for), and the model's
    output changed: what the class's forward computes is now verified."""
    model = internlm2_plora.build()
    wo = model.model.layers[1].attention.wo
    if cls is _LinearWithLoRAAttributes:
        other = cls(wo.in_features, wo.out_features, wo.bias is not None)
    else:
        other = cls(wo.in_features, wo.out_features, bias=wo.bias is not None, lora_r=8, lora_alpha=16,
                    lora_dropout=0.05)
    other.load_state_dict(wo.state_dict())
    model.model.layers[1].attention.wo = other
    before = dict(model.named_modules())
    with pytest.raises(NotImplementedError) as err:
        _patch_plora(model)
    assert "model.layers.1.attention.wo" in str(err.value) and needle in str(err.value), str(err.value)
    assert dict(model.named_modules()) == before                      # nothing was patched, not even layer 0


def test_plora_probe_leaves_the_module_and_the_random_stream_alone():
    model = internlm2_plora.build(lora_dropout=0.25).train()
    wo = model.model.layers[0].attention.wo
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    state = torch.get_rng_state()
    assert _patch_plora(model) == {"plora": 10}
    assert torch.equal(torch.get_rng_state(), state)
    assert all(torch.equal(p, params[n]) for n, p in model.named_parameters())
    assert model.model.layers[0].attention.wo.training and wo.lora_dropout.training and wo.Plora_A.training


# ------------------------------------------------------------------ XComposer2: refusals no test reached

class _HalvingDropout(nn.Dropout):
    def forward(self, x):
        return x * 0.5


@pytest.mark.parametrize("case", ["dropout_subclass", "state_dict_hook", "load_state_dict_pre_hook"])
def test_plora_refusals_an_isinstance_check_would_miss(case):
    """An nn.Dropout *subclass* with its own forward (an ``isinstance`` check would take it for
    nn.Dropout), and state-dict hooks on the PLoRA module (the replacement would drop them, changing
    what checkpoints hold: here fp16 values saved as fp32)."""
    model = internlm2_plora.build()
    wo = model.model.layers[1].attention.wo
    if case == "dropout_subclass":
        wo.lora_dropout = _HalvingDropout(0.1)
        needle = "lora_dropout"
    elif case == "state_dict_hook":
        def to_fp16(module, state_dict, prefix, local_metadata):
            for key in list(state_dict):
                state_dict[key] = state_dict[key].half()
        wo._register_state_dict_hook(to_fp16)
        needle = "has hooks (_state_dict_hooks)"
    else:
        wo.register_load_state_dict_pre_hook(lambda *args: None)
        needle = "has hooks (_load_state_dict_pre_hooks)"
    with pytest.raises(NotImplementedError) as err:
        _patch_plora(model)
    assert "model.layers.1.attention.wo" in str(err.value) and needle in str(err.value), str(err.value)
    assert not any(isinstance(m, PLoRALinear) for m in model.modules())


# ------------------------------------------------------------------ the retired-parameter guard

def test_retired_parameter_in_a_later_param_group_fails_at_step():
    """DeepSpeed puts the MoE expert parameters into param groups of their own, after the dense ones:
    exactly the parameters a MoE patch retires."""
    dense, experts = nn.Linear(3, 3), nn.Linear(3, 3)
    optimizer = torch.optim.AdamW([{"params": dense.parameters(), "name": "dense"},
                                   {"params": [], "name": "empty"},
                                   {"params": experts.parameters(), "lr": 1e-4, "moe": True,
                                    "name": "ep_size_1_moe"}])
    retire_parameters(experts.named_parameters(prefix="layers.0.mlp.deepspeed_moe.experts"), "layers.0.mlp")
    (dense(torch.randn(2, 3)).sum() + experts(torch.randn(2, 3)).sum()).backward()
    with pytest.raises(RetiredParameterError, match=r"'layers\.0\.mlp\.deepspeed_moe\.experts\.weight'"):
        optimizer.step()


# ------------------------------------------------------------------ mPLUG-Owl3: decode steps

@pytest.mark.parametrize("backend, device", BACKEND_DEVICES)
def test_owl3_v2_decode_step_of_an_image_less_sample_sees_all_its_keys(backend, device):
    """A deliberate difference from the original (README, mPLUG-Owl3): in a v2 batch where another sample
    has images, the original gives an image-less sample the top-left ``tril(1, kv_len)`` on a one-token
    decode step, so it attends to key 0 only; the patched layer gives it causal attention over all its
    keys, as the original does on the prompt and in a batch without images."""
    ids, mask, images, _ = owl3_inputs("v2")
    mask = torch.ones_like(mask)
    media_offset = [torch.tensor([1, 4]), torch.tensor([], dtype=torch.long)]   # sample 1: no images

    def decode_step(model, backend="reference", device="cpu"):
        past = DynamicCache(config=model.config)
        kw = dict(image_embeds=images.to(device), media_offset=media_offset, use_cache=True, **{CACHE: past})
        with torch.no_grad(), mmkernels.use_backend(backend):
            prompt = model(input_ids=ids.to(device), attention_mask=mask.to(device), **kw)
            nxt = prompt.logits[:, -1:].argmax(-1)
            step = model(input_ids=nxt, attention_mask=torch.ones(2, L + 1, dtype=mask.dtype, device=device), **kw)
        return nxt.cpu(), step.logits[:, -1].cpu()

    patched = build_owl3("v2").to(device)
    _patch_owl3(patched)
    nxt, got = decode_step(patched, backend, device)
    with torch.no_grad():   # the same L + 1 tokens as one causal prompt: what a decode step should give
        whole = build_owl3("v2")(input_ids=torch.cat([ids, nxt], 1), image_embeds=images,
                                 media_offset=media_offset).logits[:, -1]
    original = decode_step(build_owl3("v2", hyper_top_left_tril=True))[1]
    assert_close("decode step logits", got, whole.double(), torch.float32)
    assert_close("sample with images, as the original", got[0], original[0].double(), torch.float32)
    assert (got[1] - original[1]).abs().max() > 1e-2        # not the original's key-0-only attention


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_owl3_decode_on_a_filled_cache_with_another_prompts_images_raises(version):
    """The cache keeps the prompt's visual K/V: a decode step with image_embeds of another shape (another
    prompt's images) or another batch (the cache expanded after the prompt) must raise, not reuse them."""
    model = build_owl3(version)
    _patch_owl3(model)
    ids, mask, images, media_offset = owl3_inputs(version)

    def prompt_then(step_ids, step_images, expand=1):
        past = DynamicCache(config=model.config)
        with torch.no_grad(), mmkernels.use_backend("reference"):
            model(input_ids=ids, attention_mask=mask, image_embeds=images, media_offset=media_offset,
                  use_cache=True, **{CACHE: past})
            if expand > 1:
                past.batch_repeat_interleave(expand)
            n = step_ids.shape[0]
            return model(input_ids=step_ids, attention_mask=torch.ones(n, L + 1, dtype=mask.dtype),
                         image_embeds=step_images, media_offset=media_offset, use_cache=True, **{CACHE: past})

    nxt = torch.randint(1, 61, (2, 1))
    prompt_then(nxt, images)                                     # the same images: fine
    with pytest.raises(ValueError, match=r"built for batch 2 and image_embeds \(3, 3, 64\), this step has batch 2 "
                                         r"and \(2, 3, 64\); start a new cache"):
        prompt_then(nxt, images[:2])
    with pytest.raises(ValueError, match=r"built for batch 2 and image_embeds \(3, 3, 64\), this step has batch 4 "
                                         r"and \(3, 3, 64\); start a new cache"):
        prompt_then(nxt.repeat_interleave(2, 0), images, expand=2)


def _unmasked_4d_masks(keep, Lq):
    """Causal + key padding as 4-D bool and additive masks, with every fully-masked row unmasked (all keys
    attendable), as transformers' ``_unmask_unattended`` leaves left-padded rows for SDPA on CUDA."""
    B, Lk = keep.shape
    causal = torch.ones(Lq, Lk, dtype=torch.bool).tril(Lk - Lq)
    allowed = causal[None] & keep[:, None, :]
    dead = ~allowed.any(-1, keepdim=True)
    bool_mask = (allowed | dead)[:, None]
    additive = torch.zeros(B, 1, Lq, Lk).masked_fill(~allowed[:, None], torch.finfo(torch.float32).min)
    additive = additive.masked_fill(dead[:, None], 0.0)
    return bool_mask, additive, dead.squeeze(-1)


@pytest.mark.parametrize("backend, device", BACKEND_DEVICES)
@pytest.mark.parametrize("form", ["bool", "additive"])
def test_owl3_4d_mask_with_unmasked_padding_rows_is_accepted(form, backend, device):
    """transformers unmasks fully-masked rows of the SDPA mask on CUDA for left padding; the CPU suite never
    builds such a mask, so it is built here by hand: accepted, and equal to the plain mask on live rows."""
    model = build_owl3("v1").to(device)
    _patch_owl3(model)
    layer = model.get_submodule(HYPER)
    keep = torch.ones(2, L, dtype=torch.bool)
    keep[1, :3] = False                                            # sample 1 left-padded by 3
    bool_mask, additive, dead = _unmasked_4d_masks(keep, L)
    assert dead[1, :3].all() and bool_mask[1, 0, 0].all()         # the rows really were unmasked
    with torch.no_grad(), mmkernels.use_backend(backend):
        torch.manual_seed(11)
        plain = _owl3_layer_call(model, layer, device, mask=keep.long().to(device))
        torch.manual_seed(11)
        got = _owl3_layer_call(model, layer, device, mask=(bool_mask if form == "bool" else additive).to(device))
    live = ~dead
    assert_close(f"{form} mask, live rows", got.cpu()[live], plain.cpu()[live].double(), torch.float32)
