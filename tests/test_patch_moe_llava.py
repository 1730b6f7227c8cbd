"""``apply_mmkernels(model, moe=True)`` on MoE-LLaVA: every DeepSpeed ``MoE``
layer becomes ``mmkernels.MoE`` in place, and the model computes what it computed before.

The model is the tiny mirror of ``tests/mirrors/moe_llava.py`` (phi-2 / StableLM-2 decoders from
transformers, DeepSpeed 0.19.8's real ``MoE`` on every other layer, ``l_aux`` added to the loss with
``router_aux_loss_coef``), inside a one-process gloo group with DeepSpeed's expert-parallel groups set as
``deepspeed.initialize`` sets them.  The unpatched and the patched model are built from one seed.

DeepSpeed's randomness: k = 2 samples the second expert with Gumbel noise (in training and eval).  The
"sampled" configuration keeps that (DeepSpeed's default, what MoE-LLaVA runs) and makes both models draw
the same noise (:func:`~mirrors.moe_llava.same_gumbel_draws`, reseeding before each forward); the
"dropless" one turns it off (``top2_2nd_expert_sampling=False``).  k = 2 has no random token selection;
MoE-LLaVA's ``top_k_experts=1`` runs DeepSpeed's top-1 gating with it (``use_rts`` is DeepSpeed's default):
an ``[S, E]`` uniform drawn from torch's generator decides which tokens an over-full expert keeps, and the
patched layer draws the same numbers, keeps the same tokens and leaves the generator where DeepSpeed does,
so the residual dropout after it draws the same masks ("phi-top1-rts" and the test with dropout on).

Expected outputs are the unpatched (DeepSpeed) model's in the same dtype: both models compute in
float32 and route from bitwise-equal router inputs, so their difference is two float32 roundings,
checked at float32's tolerance (measured: ~4e-7).  Gradients are checked against the unpatched model in
float64 (see the test).
"""
import re

import pytest
import torch

pytest.importorskip("transformers", reason="the MoE-LLaVA mirror uses transformers' Phi / StableLM "
                                           "(pip install 'transformers>=5,<6')")
pytest.importorskip("deepspeed.moe.layer", reason="the MoE-LLaVA mirror uses DeepSpeed's MoE "
                                                  "(pip install deepspeed==0.19.8)")

import mmkernels  # noqa: E402
from mmkernels.patching import RetiredParameterError, apply_mmkernels  # noqa: E402
from mmkernels.patching import moe_llava  # noqa: E402
from mmkernels.testing import assert_close, compare  # noqa: E402
from mmkernels.ops.moe.reference import capacity_for  # noqa: E402

from mirrors import moe_llava as mirror  # noqa: E402

VOCAB = 97
# (backbone, DeepSpeed MoE options over MoE-LLaVA's released settings)
CONFIGS = {
    # DeepSpeed's defaults (drop_tokens, Gumbel-sampled 2nd expert); capacity_factor 0.5 instead of 1.5 so
    # that tokens really are dropped in training (C = ceil(S / E * 0.5 * 2) < the mean load S / 2)
    "phi-capacity-sampled": ("phi", dict(capacity_factor=0.5)),
    "stablelm-dropless": ("stablelm", dict(drop_tokens=False, top2_2nd_expert_sampling=False)),
    # MoE-LLaVA's top_k_experts=1: DeepSpeed's top1gating with random token selection, tokens dropped
    # (C = ceil(S / E * 0.5) < the mean load S / E)
    "phi-top1-rts": ("phi", dict(k=1, capacity_factor=0.5)),
}


@pytest.fixture(scope="module", autouse=True)
def _deepspeed_group():
    with mirror.deepspeed_process_group():
        yield


def patch(model):
    return apply_mmkernels(model, plora=False, hyper_attention=False)


def pair(config, train=True, **kw):
    """(unpatched, patched) from one seed, with DeepSpeed's expert-parallel groups set on the unpatched."""
    backbone, moe_args = CONFIGS[config]
    ref, pat = (mirror.build(backbone, **moe_args, **kw).train(train) for _ in range(2))
    mirror.set_expert_parallel_groups(ref)
    mirror.set_expert_parallel_groups(pat)
    assert patch(pat) == {"moe": 1}
    assert isinstance(pat.model.layers[0].mlp, mmkernels.MoE) and not isinstance(ref.model.layers[0].mlp,
                                                                                 mmkernels.MoE)
    return ref, pat


def run(model, ids, seed, backend, **kw):
    """One forward with the same Gumbel draws (seeded) whichever model it is."""
    with mirror.same_gumbel_draws(), mmkernels.use_backend(backend):
        torch.manual_seed(seed)
        return model(input_ids=ids, **kw)


def grads_by_key(model) -> dict:
    """Every parameter's gradient under its state-dict key (a packed MoE gradient split into DeepSpeed's
    per-expert keys, as the patched layer's state_dict() writes them)."""
    out = {}
    for qual, m in model.named_modules():
        if isinstance(m, mmkernels.MoE):
            out[f"{qual}.deepspeed_moe.gate.wg.weight"] = m.gate_weight.grad
            for key, (pname, i, rows) in m._deepspeed_expert_keys().items():
                out[f"{qual}.{key}"] = getattr(m, pname).grad[i, rows]
        else:
            out.update({f"{qual}.{n}" if qual else n: p.grad for n, p in m.named_parameters(recurse=False)})
    return out


# ------------------------------------------------------------------------------ patched == unpatched

@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("config", list(CONFIGS))
def test_logits_loss_and_every_gradient_match(config, backend):
    ref, pat = pair(config)
    ids = torch.randint(2, VOCAB, (2, 7))
    outs, returned = [], []
    for m in (ref, pat):   # the MoE layer's own (output, l_aux, exp_counts), as the decoder layer receives it
        m.model.layers[0].mlp.register_forward_hook(lambda mod, args, out: returned.append(out))
        out = run(m, ids, 1234, backend, labels=ids)
        out.loss.backward()
        outs.append(out)
    (y_ds, l_ds, counts_ds), (y, l_aux, counts) = returned
    assert_close("MoE output", y, y_ds.double(), torch.float32)
    assert_close("l_aux", l_aux, l_ds.double(), torch.float32)
    assert torch.equal(counts, counts_ds), (counts, counts_ds)
    if config.startswith(("phi-capacity", "phi-top1")):   # the case is what it says: tokens were dropped
        k = CONFIGS[config][1].get("k", 2)
        counts = ref.model.layers[0].mlp.deepspeed_moe.exp_counts
        assert int(counts.max()) > capacity_for(14, 4, 0.5, k, 0), counts
    f32 = torch.float32
    assert_close("logits", outs[1].logits, outs[0].logits.double(), f32)
    assert_close("moe_loss", outs[1].moe_loss, outs[0].moe_loss.double(), f32)   # 0.01 * l_aux
    assert_close("loss", outs[1].loss, outs[0].loss.double(), f32)               # LM loss + moe_loss
    want, got = grads_by_key(ref), grads_by_key(pat)
    assert got.keys() == want.keys() == ref.state_dict().keys()
    # Gradients against the unpatched model in float64: the router's passes through the softmax backward,
    # which cancels, so float32 evaluations of it are ~2e-6 from the truth (DeepSpeed's and ours alike)
    # and up to 1.1e-5 from each other (measured over seeds); one that misses float32's tolerance must be
    # within twice DeepSpeed's own float32 error.
    ref64 = mirror.build(CONFIGS[config][0], **CONFIGS[config][1]).train()
    ref64.load_state_dict(ref.state_dict())
    ref64.double()
    mirror.set_expert_parallel_groups(ref64)
    run(ref64, ids, 1234, "reference", labels=ids).loss.backward()
    truth = grads_by_key(ref64)
    failed = []
    for k in want:
        c = compare(k, got[k], truth[k], f32)
        if not c.ok:
            u = compare(k, want[k], truth[k], f32)
            if not (c.rms_err <= 2 * u.rms_err and c.max_err <= 2 * u.max_err):
                failed.append(f"{c}; DeepSpeed float32: {u}")
    assert not failed, failed


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_top1_random_token_selection_keeps_dropout_in_step(train, backend):
    """Top-1 MoE-LLaVA on four layers (MoE on 0 and 2) with phi-2's residual dropout on: DeepSpeed's random
    token selection draws an [S, E] uniform in training and eval; the patched layers draw the same, keep
    the same tokens (each layer's output, l_aux and counts match, with tokens dropped), and leave the
    generator where DeepSpeed does, so the dropout masks after the first MoE layer, the second layer's
    draw and the logits all stay in step."""
    ref, pat = (mirror.build("phi", num_layers=4, k=1, capacity_factor=0.5, eval_capacity_factor=0.5).train(train)
                for _ in range(2))
    for m in (ref, pat):
        mirror.set_expert_parallel_groups(m)
        for layer in m.model.layers:
            layer.resid_dropout.p = 0.25
    assert patch(pat) == {"moe": 2}
    ids = torch.randint(2, VOCAB, (2, 7))
    returned, outs, states = [], [], []
    for m in (ref, pat):
        got = []
        for i in (0, 2):
            m.model.layers[i].mlp.register_forward_hook(lambda mod, args, out, got=got: got.append(out))
        outs.append(run(m, ids, 4321, backend, labels=ids))
        states.append(torch.get_rng_state())
        returned.append(got)
    assert torch.equal(states[1], states[0]), "the patched model left torch's generator elsewhere"
    C = capacity_for(14, 4, 0.5, 1, 0)
    for (y_ds, l_ds, counts_ds), (y, l_aux, counts) in zip(*returned):
        assert torch.equal(counts, counts_ds) and int(counts.max()) > C, (counts, C)   # tokens were dropped
        assert_close("MoE output", y, y_ds.double(), torch.float32)
        assert_close("l_aux", l_aux, l_ds.double(), torch.float32)
    assert_close("logits", outs[1].logits, outs[0].logits.double(), torch.float32)
    assert_close("loss", outs[1].loss, outs[0].loss.double(), torch.float32)


@pytest.mark.parametrize("config,backend,new_tokens", [
    ("phi-capacity-sampled", "reference", 6), ("stablelm-dropless", "reference", 6),
    ("phi-capacity-sampled", "triton", 2), ("phi-top1-rts", "reference", 4)])
def test_greedy_generate_gives_identical_tokens(config, backend, new_tokens):
    ref, pat = pair(config, train=False)
    assert not pat.model.layers[0].mlp.training
    ids = torch.randint(2, VOCAB, (2, 5))
    got = []
    for m in (ref, pat):
        with torch.no_grad(), mirror.same_gumbel_draws(), mmkernels.use_backend(backend):
            torch.manual_seed(99)
            got.append(m.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                                  do_sample=False))
    assert got[0].shape == (2, 5 + new_tokens)
    assert torch.equal(got[0], got[1])


def test_convergence_20_adamw_steps(config="phi-capacity-sampled"):
    """20 AdamW steps from one seed, patched against unpatched, both in float64: the loss at every step
    and the final weights agree to float64's tolerance.

    AdamW over DeepSpeed's per-expert parameters and over the packed [E, ...] ones is the same
    elementwise arithmetic.  float64, because 20 AdamW steps amplify float32 rounding chaotically (Adam's
    1/sqrt(v) turns a gradient that is rounding noise into a full-size step): two float32 runs of the
    same model drift apart by more than float32's tolerance, by an amount that varies with the seed.
    Both models route in float32 from the same float32-rounded router inputs (DeepSpeed's
    ``x.float()``), with the same Gumbel draws.  The loss is computed here in float64 (transformers'
    causal-LM loss casts the logits to float32), plus the routers' auxiliary loss.  Key biases are
    frozen: their exact gradient is zero (softmax ignores a per-query constant), so AdamW would only
    normalise rounding noise into full-size steps."""
    backbone, moe_args = CONFIGS[config]
    ref, pat = (mirror.build(backbone, **moe_args).train().double() for _ in range(2))
    mirror.set_expert_parallel_groups(ref)
    mirror.set_expert_parallel_groups(pat)
    assert patch(pat) == {"moe": 1} and pat.model.layers[0].mlp.w1.dtype == torch.float64
    opts = []
    for m in (ref, pat):
        for n, p in m.named_parameters():
            if n.endswith("k_proj.bias"):
                p.requires_grad_(False)
        opts.append(torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-3))
    for step in range(20):
        ids = torch.randint(2, VOCAB, (2, 7))
        losses = []
        for m, opt in zip((ref, pat), opts):
            opt.zero_grad()
            out = run(m, ids, 1000 + step, "reference")
            assert out.logits.dtype == torch.float64
            loss = torch.nn.functional.cross_entropy(out.logits[:, :-1].reshape(-1, VOCAB), ids[:, 1:].reshape(-1))
            loss = loss + out["moe_loss"]
            loss.backward()
            opt.step()
            losses.append(loss.detach())
        assert_close(f"loss at step {step}", losses[1], losses[0], torch.float64)
    want, got = ref.state_dict(), pat.state_dict()
    assert got.keys() == want.keys()
    for k in want:
        assert_close(f"final {k}", got[k], want[k], torch.float64)


# ------------------------------------------------------------------------------ checkpoints both ways

def test_state_dict_round_trips_both_ways():
    ref, pat = pair("stablelm-dropless", train=False)
    sd_ref, sd_pat = ref.state_dict(), pat.state_dict()
    assert list(sd_pat) == list(sd_ref)                                     # same keys, same order
    assert {k: (v.shape, v.dtype) for k, v in sd_pat.items()} == {k: (v.shape, v.dtype) for k, v in sd_ref.items()}
    assert all(torch.equal(sd_pat[k], sd_ref[k]) for k in sd_ref)
    ids = torch.randint(2, VOCAB, (2, 7))
    want = run(ref, ids, 0, "reference").logits
    # patched -> original, and original -> patched, strictly, into models built from another seed
    backbone, moe_args = CONFIGS["stablelm-dropless"]
    original = mirror.build(backbone, seed=1, **moe_args).eval()
    patched = mirror.build(backbone, seed=1, **moe_args).eval()
    patch(patched)
    assert not torch.equal(run(patched, ids, 0, "reference").logits, want)
    original.load_state_dict(sd_pat, strict=True)   # patched -> original: DeepSpeed computes what it did
    assert torch.equal(run(original, ids, 0, "reference").logits, want)
    patched.load_state_dict(sd_ref, strict=True)    # original -> patched
    assert_close("logits", run(patched, ids, 0, "reference").logits, want.double(), torch.float32)
    assert all(torch.equal(patched.state_dict()[k], v) for k, v in sd_ref.items())
    # a DeepSpeed key missing from the checkpoint is reported under its DeepSpeed name
    del sd_ref["model.layers.0.mlp.deepspeed_moe.experts.deepspeed_experts.3.up_proj.weight"]
    with pytest.raises(RuntimeError, match=r"Missing key.*deepspeed_experts\.3\.up_proj\.weight"):
        patched.load_state_dict(sd_ref)


# ------------------------------------------------------------------------------ what carries over

def test_mode_dtype_device_requires_grad_marks_and_rng_carry_over():
    backbone, moe_args = CONFIGS["phi-capacity-sampled"]
    model = mirror.build(backbone, dtype=torch.bfloat16, **moe_args).eval()
    ds = model.model.layers[0].mlp
    ds.deepspeed_moe.gate.wg.weight.requires_grad_(False)     # e.g. a frozen router
    for e in ds.deepspeed_moe.experts.deepspeed_experts:
        e.fc2.bias.requires_grad_(False)
    ids = torch.randint(2, VOCAB, (2, 7))
    want = run(model, ids, 5, "reference").logits
    wg = ds.deepspeed_moe.gate.wg.weight
    rng = torch.get_rng_state()
    patch(model)
    assert torch.equal(torch.get_rng_state(), rng)             # patching draws nothing from torch's generator
    new = model.model.layers[0].mlp
    assert isinstance(new, mmkernels.MoE) and not new.training
    assert new.gate_weight is wg and not wg.requires_grad     # the router keeps its Parameter
    assert new.w1.dtype == new.w2.dtype == torch.bfloat16 and new.w1.device == wg.device
    assert new.w1.requires_grad and new.b1.requires_grad and not new.b2.requires_grad
    assert new.w1.allreduce is False and new.w1.group_name == "ep_size_1"   # DeepSpeed's expert-parameter marks
    assert {k: v.dtype for k, v in model.state_dict().items()}["model.layers.0.mlp.deepspeed_moe.gate.wg.weight"] \
        == torch.bfloat16
    assert_close("bf16 logits", run(model, ids, 5, "reference").logits, want.double(), torch.bfloat16)


# ------------------------------------------------------------------------------ bad input

def test_nothing_to_patch_names_what_it_looked_for():
    from transformers import PhiForCausalLM

    dense = PhiForCausalLM(mirror.tiny_config("phi"))
    with pytest.raises(ValueError, match=r"found nothing to patch in PhiForCausalLM.*moe: DeepSpeed MoE layers"):
        patch(dense)
    assert apply_mmkernels(dense, plora=False, hyper_attention=False, strict=False) == {"moe": 0}
    assert moe_llava.plan(dense) == []


@pytest.mark.parametrize("option,error", [
    (dict(noisy_gate_policy="Jitter"), "Jitter"), (dict(use_residual=True), "use_residual"),
    (dict(enable_expert_tensor_parallelism=True), "enable_expert_tensor_parallelism"),
    (dict(ep_size=2), "ep_size=2")])
def test_unsupported_option_raises_at_patch_time_naming_layer_and_option(option, error):
    """4 layers: layer 0 patchable, layer 2 not: nothing at all is replaced."""
    model = mirror.build("phi", num_layers=4, **CONFIGS["phi-capacity-sampled"][1])
    bad = mirror.build("phi", num_layers=4, **{**CONFIGS["phi-capacity-sampled"][1], **option})
    model.model.layers[2].mlp = bad.model.layers[2].mlp
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(NotImplementedError, match=rf"'model\.layers\.2\.mlp'.*{error}"):
        patch(model)
    assert not any(isinstance(m, mmkernels.MoE) for m in model.modules())
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)


def test_layers_it_cannot_reproduce_are_refused_by_name():
    model = mirror.build("stablelm", **CONFIGS["stablelm-dropless"][1])
    ds = model.model.layers[0].mlp
    handle = ds.deepspeed_moe.gate.register_forward_hook(lambda *a: None)
    with pytest.raises(ValueError, match=r"'model\.layers\.0\.mlp'.*'model\.layers\.0\.mlp\.deepspeed_moe\.gate' "
                                         r"has hooks \(_forward_hooks\)"):
        patch(model)
    handle.remove()
    ds.forward = lambda x, used_token=None: ds.deepspeed_moe(x)
    with pytest.raises(ValueError, match=r"'model\.layers\.0\.mlp'.*forward set on the instance"):
        patch(model)
    del ds.forward
    ds.deepspeed_moe.experts.deepspeed_experts[1].up_proj.weight.requires_grad_(False)
    with pytest.raises(ValueError, match=r"'model\.layers\.0\.mlp'.*expert 1's up_proj\.weight has requires_grad"):
        patch(model)
    ds.deepspeed_moe.experts.deepspeed_experts[1].up_proj.weight.requires_grad_(True)
    with torch.no_grad():   # an expert that is no longer the template's form: the ValueError of from_deepspeed
        ds.deepspeed_moe.experts.deepspeed_experts[2].act_fn = torch.nn.ReLU()
    with pytest.raises(ValueError, match=r"'model\.layers\.0\.mlp'.*expert 2.*relu"):
        patch(model)
    with pytest.raises(ValueError, match="the model itself is a DeepSpeed MoE layer"):
        moe_llava.plan(ds)
    assert not any(isinstance(m, mmkernels.MoE) for m in model.modules())


def test_optimizer_built_before_patching_fails_loudly_at_step():
    model = mirror.build("stablelm", **CONFIGS["stablelm-dropless"][1])
    stale = torch.optim.AdamW(model.parameters(), lr=1e-3)
    patch(model)
    fresh = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ids = torch.randint(2, VOCAB, (1, 5))
    run(model, ids, 0, "reference", labels=ids).loss.backward()
    with pytest.raises(RetiredParameterError, match=re.escape("'model.layers.0.mlp.deepspeed_moe.experts."
                                                              "deepspeed_experts.0.gate_proj.weight'")):
        stale.step()
    fresh.step()   # built after patching: fine


def test_plan_changes_nothing_and_a_layer_under_two_names_is_one_swap():
    model = mirror.build("phi", **CONFIGS["phi-capacity-sampled"][1])
    ds = model.model.layers[0].mlp
    model.alias = ds                                  # the same layer reachable under a second name
    swaps = moe_llava.plan(model)
    assert len(swaps) == 1 and model.model.layers[0].mlp is ds
    swaps[0]()
    assert isinstance(model.alias, mmkernels.MoE) and model.alias is model.model.layers[0].mlp
    with pytest.raises(RuntimeError, match="already ran"):
        swaps[0]()


def test_a_subclass_overriding_forward_is_refused():
    from deepspeed.moe.layer import MoE as DeepSpeedMoE

    class LoggingMoE(DeepSpeedMoE):
        def forward(self, hidden_states, used_token=None):
            return super().forward(hidden_states * 2, used_token)

    model = mirror.build("phi", **CONFIGS["phi-capacity-sampled"][1])
    model.model.layers[0].mlp.__class__ = LoggingMoE
    with pytest.raises(ValueError, match=r"'model\.layers\.0\.mlp'.*LoggingMoE overrides DeepSpeed's MoE\.forward"):
        patch(model)
