"""``apply_mmkernels`` on mPLUG-Owl3: every hyper attention layer runs ``visual_kv`` + ``hyper_attention``.

A tiny faithful mirror of the HyperQwen2 language model (``tests/mirrors/qwen2_hyper.py``: transformers'
Qwen2 with 2 layers of hidden 64, layer 1 a hyper layer; v1 gated with the ``[B, S, 2]`` media_offset, v2
joint with the per-sample index lists) runs patched against unpatched.  The expected values come from
the unpatched model in float64; the patched one runs in float32 and is held to the float32 tolerances.
The batch has a left-padded sample, two images in one sample and one in the other, images starting
mid-sequence.
"""
import copy
import inspect

import pytest
import torch
import torch.nn.functional as F
from transformers import DynamicCache, Qwen2Config, Qwen2ForCausalLM
from transformers.models.qwen2.modeling_qwen2 import Qwen2Model

import mmkernels
from mmkernels.patching import apply_mmkernels, mplug_owl3
from mmkernels.testing import assert_close, compare

from conftest import HAS_CUDA
from mirrors.qwen2_hyper import build, v1_media_offset

V, B, L, T, HID = 61, 2, 8, 3, 64
HYPER = "model.layers.1.self_attn"
# transformers 5.24 calls the cache argument ``cache`` (5.17: ``past_key_values``)
CACHE = "cache" if "cache" in inspect.signature(Qwen2Model.forward).parameters else "past_key_values"


def _triton_cases(*rest):
    """The triton backend where its kernels run: CPU under the interpreter, CUDA on a GPU machine."""
    cases = []
    if mmkernels.interpreter_enabled():
        cases += [("triton", "cpu") + r for r in rest]
    if HAS_CUDA:
        cases += [pytest.param("triton", "cuda", *r, marks=pytest.mark.gpu) for r in rest]
    return cases


def _patch(model, **kwargs):
    # the other kinds' patchers are separate modules; this file tests the hyper attention one alone
    return apply_mmkernels(model, plora=False, moe=False, **kwargs)


def _inputs(version, n_pad=2):
    """ids, attention_mask (sample 1 left-padded), image_embeds [3, T, HID], media_offset."""
    ids = torch.randint(1, V, (B, L))
    mask = torch.ones(B, L, dtype=torch.long)
    mask[1, :n_pad] = 0
    images = torch.randn(3, T, HID)
    idx = [[1, 4], [n_pad + 1]]                # <|image|> token indices; sample 1's after its padding
    if version == "v1":
        media_offset = torch.stack([v1_media_offset(idx[0], L, 0), v1_media_offset(idx[1], L, 2)])
    else:
        media_offset = [torch.tensor(i) for i in idx]
    return ids, mask, images, media_offset


def _on(inputs, device):
    ids, mask, images, media_offset = inputs
    if isinstance(media_offset, torch.Tensor):
        media_offset = media_offset.to(device)
    return ids.to(device), mask.to(device), images.to(device), media_offset


def _run(model, inputs, backend="reference", dtype=torch.float32, device="cpu"):
    ids, mask, images, media_offset = _on(inputs, device)
    model.zero_grad(set_to_none=True)
    with mmkernels.use_backend(backend):
        out = model(input_ids=ids, attention_mask=mask, image_embeds=images.to(dtype), media_offset=media_offset,
                    labels=ids)
        out.loss.backward()
    return (out.logits.detach().cpu(), out.loss.detach().cpu(),
            {n: p.grad.cpu() if p.grad is not None else None for n, p in model.named_parameters()})


@pytest.mark.parametrize("backend, device, version, attn, dtype",
                         [("reference", "cpu", "v1", "sdpa", torch.float32),
                          ("reference", "cpu", "v2", "eager", torch.float32),
                          ("reference", "cpu", "v1", "eager", torch.bfloat16)]
                         + _triton_cases(("v1", "sdpa", torch.float32), ("v2", "sdpa", torch.float32)))
def test_patched_matches_unpatched(backend, device, version, attn, dtype):
    inputs = _inputs(version)
    expected = build(version, attn=attn).double().train()
    logits, loss, grads = _run(expected, inputs, dtype=torch.float64)
    model = build(version, attn=attn, dtype=dtype).to(device).train()
    params = dict(model.named_parameters())
    shapes = {k: v.shape for k, v in model.state_dict().items()}
    assert _patch(model) == {"hyper_attention": 1}
    attn_layer = model.get_submodule(HYPER)
    assert attn_layer._mmkernels_hyper.mode == ("gated" if version == "v1" else "joint")
    assert "forward" not in vars(model.get_submodule("model.layers.0.self_attn"))    # not a hyper layer
    # the same Parameter objects, the same state-dict keys and shapes
    assert all(p is params[n] for n, p in model.named_parameters()) and len(params) == len(list(model.parameters()))
    assert {k: v.shape for k, v in model.state_dict().items()} == shapes
    logits2, loss2, grads2 = _run(model, inputs, backend, dtype=dtype, device=device)
    assert_close("logits", logits2, logits, dtype)
    assert_close("loss", loss2, loss, dtype)
    assert grads2.keys() == grads.keys()
    # bfloat16: the q/k bias gradients sum terms that nearly cancel (softmax shift invariance), so their
    # error after a whole bfloat16 forward and backward can exceed the one-operation tolerance, in the
    # unpatched model too, by an amount that varies with the seed; such a gradient must then be within
    # twice the larger of that tolerance and the unpatched bfloat16 model's own error.
    own = _run(build(version, attn=attn, dtype=dtype).train(), inputs, dtype=dtype)[2] if dtype != torch.float32 else {}
    for name, g in grads.items():
        assert grads2[name] is not None, name
        c = compare(f"grad {name}", grads2[name], g, dtype)
        if not c.ok and name in own:
            u = compare(name, own[name], g, dtype)
            assert c.rms_err <= 2 * max(u.rms_err, c.tolerance.rms_err) and \
                c.max_err <= 2 * max(u.max_err, c.tolerance.max_err), f"{c}; unpatched {dtype}: {u}"
        else:
            assert c.ok, str(c)
    assert grads2[f"{HYPER}.v_kv_proj.weight"].abs().sum() > 0
    if version == "v1":
        assert grads2[f"{HYPER}.gate"].abs().sum() > 0


@pytest.mark.parametrize("version, layout", [("v1", "no images"), ("v1", "gathered"), ("v2", "no images")])
def test_other_layouts_match_unpatched(version, layout):
    """A sample without images (v1: -1000000 rows, v2: an empty list) and v1 image ranges that are not
    sample-major (sample 0 uses images 1..2, sample 1 image 0: the patch gathers them)."""
    ids, mask, images, _ = _inputs(version)
    if version == "v2":
        media_offset = [torch.tensor([1, 4]), torch.tensor([], dtype=torch.long)]
    elif layout == "no images":
        media_offset = torch.stack([v1_media_offset([1, 4], L, 0), v1_media_offset([], L)])
    else:
        media_offset = torch.stack([v1_media_offset([1, 4], L, 1), v1_media_offset([3], L, 0)])
    inputs = ids, mask, images, media_offset
    logits, loss, grads = _run(build(version).double().train(), inputs, dtype=torch.float64)
    model = build(version).train()
    _patch(model)
    logits2, loss2, grads2 = _run(model, inputs)
    assert_close("logits", logits2, logits, torch.float32)
    for name, g in grads.items():
        assert_close(f"grad {name}", grads2[name], g, torch.float32)


def _count_visual_kv(monkeypatch):
    calls = []
    real = mplug_owl3.visual_kv

    def counting(*args, **kwargs):
        calls.append(args[0].shape[0])
        return real(*args, **kwargs)

    monkeypatch.setattr(mplug_owl3, "visual_kv", counting)
    return calls


@pytest.mark.parametrize("backend, device, version, cache",
                         [("reference", "cpu", "v1", "dynamic"), ("reference", "cpu", "v1", "static"),
                          ("reference", "cpu", "v2", "dynamic")] + _triton_cases(("v2", "dynamic")))
def test_generate_greedy_matches_and_computes_visual_kv_once(backend, device, version, cache, monkeypatch):
    inputs = _inputs(version)
    ids, mask, images, media_offset = inputs
    kw = dict(input_ids=ids, attention_mask=mask, image_embeds=images, media_offset=media_offset,
              max_new_tokens=3, do_sample=False)
    if cache == "static":
        kw["cache_implementation"] = "static"
    expected = build(version).generate(**kw)
    model = build(version).to(device)
    _patch(model)
    calls = _count_visual_kv(monkeypatch)
    d_ids, d_mask, d_images, d_media_offset = _on(inputs, device)
    with mmkernels.use_backend(backend):
        tokens = model.generate(**dict(kw, input_ids=d_ids, attention_mask=d_mask, image_embeds=d_images,
                                       media_offset=d_media_offset))
    assert torch.equal(tokens.cpu(), expected)
    assert calls == [3], calls          # one prompt, one hyper layer: the producer ran once, on the 3 images
    # an explicit cache reused for a new prompt (its layer empty again) recomputes; decode steps reuse it
    if backend == "reference" and cache == "dynamic":
        past = DynamicCache(config=model.config)
        with torch.no_grad(), mmkernels.use_backend(backend):
            out = model(input_ids=ids, attention_mask=mask, image_embeds=images, media_offset=media_offset,
                        use_cache=True, **{CACHE: past})
            nxt = out.logits[:, -1:].argmax(-1)
            mask2 = torch.cat([mask, torch.ones(B, 1, dtype=mask.dtype)], 1)
            elsewhere = copy.deepcopy(past)      # a cache the patch has no visual K/V for (filled elsewhere)
            step = model(input_ids=nxt, attention_mask=mask2, image_embeds=images, media_offset=media_offset,
                         use_cache=True, **{CACHE: past})
            assert calls == [3, 3]
            rebuilt = model(input_ids=nxt, attention_mask=mask2, image_embeds=images, media_offset=media_offset,
                            use_cache=True, **{CACHE: elsewhere})
            assert calls == [3, 3, 3]           # rebuilt from image_embeds and the prompt's media_offset
            exp = build(version)(input_ids=torch.cat([ids, nxt], 1), attention_mask=mask2, image_embeds=images,
                                 media_offset=media_offset if version == "v2" else
                                 torch.cat([media_offset, media_offset[:, -1:]], 1))
        assert_close("decode step logits", step.logits[:, -1], exp.logits[:, -1].double(), torch.float32)
        assert torch.equal(rebuilt.logits, step.logits)


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_convergence_20_adamw_steps(version):
    """20 AdamW steps from one seed, patched against unpatched: the loss at every step and the final
    parameters agree.  The patched model's optimizer is built *before* patching: the patch keeps the
    Parameter objects, so that optimizer trains the patched layers.

    Reference backend in float64: the Triton interpreter costs seconds per forward + backward (20 steps
    would take minutes), and one Triton step is checked with every gradient in
    test_patched_matches_unpatched; the patch's own code (media_offset conversion, masks, RoPE, cache,
    parameter wiring) is the same on both backends.  float64, because 20 AdamW steps amplify float32
    rounding chaotically (two float32 runs of the *same* model drift apart by more than float32's
    one-operation tolerance), while in float64 any difference the patch made would stand out against
    the float64 tolerances.  The loss is computed here in float64 too: transformers' causal-LM loss
    casts the logits to float32, which would hold a float32-rounded loss to float64's tolerance."""
    ids, mask, images, media_offset = _inputs(version)
    original, patched = (build(version, dtype=torch.float64).train() for _ in range(2))
    opts = [torch.optim.AdamW(m.parameters(), lr=1e-2, weight_decay=0.01) for m in (original, patched)]
    _patch(patched)
    first = None
    for step in range(20):
        losses = []
        for model, opt in zip((original, patched), opts):
            opt.zero_grad()
            with mmkernels.use_backend("reference"):
                logits = model(input_ids=ids, attention_mask=mask, image_embeds=images.double(),
                               media_offset=media_offset).logits
            assert logits.dtype == torch.float64
            loss = F.cross_entropy(logits[:, :-1].reshape(-1, V), ids[:, 1:].reshape(-1))   # next-token loss
            loss.backward()
            opt.step()
            losses.append(loss.detach())
        assert_close(f"loss at step {step}", losses[1], losses[0], torch.float64)
        first = losses[0] if first is None else first
    assert losses[0] < 0.5 * first                            # it trained
    for (name, p), q in zip(original.named_parameters(), patched.parameters()):
        assert_close(f"final {name}", q, p, torch.float64)


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_state_dict_round_trips(version):
    inputs = _inputs(version)
    original, patched = build(version, seed=1), build(version, seed=2)
    _patch(patched)
    with torch.no_grad():
        patched.load_state_dict(original.state_dict())            # original -> patched
        exp = _run_nograd(original, inputs)
        assert_close("original -> patched", _run_nograd(patched, inputs), exp.double(), torch.float32)
        fresh = build(version, seed=3)
        fresh.load_state_dict(patched.state_dict())               # patched -> original
        assert_close("patched -> original", _run_nograd(fresh, inputs), exp.double(), torch.float32)
    assert patched.state_dict().keys() == original.state_dict().keys()


def _run_nograd(model, inputs):
    ids, mask, images, media_offset = inputs
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask, image_embeds=images, media_offset=media_offset).logits


# --------------------------------------------------------------------------- bad input

def test_nothing_to_patch_names_what_it_looked_for():
    plain = Qwen2ForCausalLM(Qwen2Config(vocab_size=V, hidden_size=32, intermediate_size=40, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1))
    with pytest.raises(ValueError, match="v_kv_proj"):
        _patch(plain)
    assert _patch(plain, strict=False) == {"hyper_attention": 0}
    model = build("v1")
    _patch(model)
    assert _patch(model, strict=False) == {"hyper_attention": 0}     # already patched: not patched twice


@pytest.mark.parametrize("change, option, error", [
    ("dropout", "attention_dropout", NotImplementedError),
    ("gate", "gate", NotImplementedError),
    ("sliding", "use_sliding_window", NotImplementedError),
    ("v_kv_proj", "v_kv_proj", ValueError),
])
def test_unsupported_option_raises_at_patch_time_and_changes_nothing(change, option, error):
    kw = {"dropout": dict(attention_dropout=0.1), "sliding": dict(use_sliding_window=True)}.get(change, {})
    model = build("v1", **kw)
    layer = model.get_submodule(HYPER)
    if change == "gate":
        layer.gate = torch.nn.Parameter(torch.zeros(1))                # a scalar gate: not the v1 checkpoints'
    if change == "v_kv_proj":
        layer.v_kv_proj = torch.nn.Linear(HID, 3 * 16)
    with pytest.raises(error, match=rf"{HYPER}.*{option}"):
        _patch(model)
    assert "forward" not in vars(layer) and not hasattr(layer, "_mmkernels_hyper")


def _bad_media_offsets():
    good = torch.stack([v1_media_offset([1, 4], L, 0), v1_media_offset([3], L, 2)])
    jump = good.clone()
    jump[0, 2:, 1] += 1                                   # two images at one token (token 1)
    first = good.clone()
    first[0, 0, 1] = 1                                    # the first token sees an image
    mixed = good.clone()
    mixed[1, :3, 1] = -1000000                            # a sample both with and without images
    outside = good.clone()
    outside[1, :, 0] += 5                                 # an image range past image_embeds
    outside[1, :, 1] += 5
    return [
        ("v1", good.float(), TypeError, "integer"),
        ("v1", good[:, :-1], ValueError, "one row per token"),
        ("v1", jump, ValueError, "grow by 0 or 1"),
        ("v1", first, ValueError, "first token cannot see"),
        ("v1", mixed, ValueError, "mixes negative"),
        ("v1", outside, ValueError, "inside image_embeds"),
        ("v1", None, ValueError, "needs media_offset"),
        ("v2", [torch.tensor([1, 4])], ValueError, "one entry per sample"),
        ("v2", [torch.tensor([4, 1]), torch.tensor([3])], ValueError, "strictly increasing"),
        ("v2", [torch.tensor([1, L]), torch.tensor([3])], ValueError, "inside the sequence"),
        ("v2", [torch.tensor([1, 4]), torch.tensor([3, 5])], ValueError, "image_embeds holds N=3"),
        ("v2", "1,4", TypeError, "media_offset must be"),
    ]


@pytest.mark.parametrize("version, media_offset, error, match", _bad_media_offsets())
def test_bad_media_offset_gets_a_clear_error(version, media_offset, error, match):
    model = build(version)
    _patch(model)
    ids, mask, images, _ = _inputs(version)
    with pytest.raises(error, match=match), mmkernels.use_backend("reference"):
        model(input_ids=ids, attention_mask=mask, image_embeds=images, media_offset=media_offset)


def test_unsupported_calls_raise():
    model = build("v1")
    _patch(model)
    layer = model.get_submodule(HYPER)
    h = torch.randn(B, L, HID)
    with pytest.raises(NotImplementedError, match="output_attentions"):
        layer(h, output_attentions=True)
    # a sliding-window style 4-D mask cannot be expressed as causal + key padding
    window = torch.ones(L, L, dtype=torch.bool).tril() & ~torch.ones(L, L, dtype=torch.bool).tril(-3)
    with pytest.raises(ValueError, match="not a causal mask with key padding"), mmkernels.use_backend("reference"):
        layer(h, attention_mask=window.expand(B, 1, L, L))
    bias = torch.zeros(B, 1, L, L).masked_fill(~torch.ones(L, L, dtype=torch.bool).tril(), float("-inf"))
    bias[..., 0] = -1.5                                   # an additive bias, not a mask
    with pytest.raises(ValueError, match="other than 0 and -inf"), mmkernels.use_backend("reference"):
        layer(h, attention_mask=bias)
    # a multi-token step after the prompt, with images: the original's masks are undefined there
    ids, mask, images, media_offset = _inputs("v1")
    past = DynamicCache(config=model.config)
    with torch.no_grad(), mmkernels.use_backend("reference"):
        model(input_ids=ids, image_embeds=images, media_offset=media_offset, use_cache=True, **{CACHE: past})
        with pytest.raises(NotImplementedError, match="2-token step after 8 cached tokens"):
            model(input_ids=ids[:, :2], image_embeds=images, media_offset=media_offset[:, :2], use_cache=True,
                  **{CACHE: past})
