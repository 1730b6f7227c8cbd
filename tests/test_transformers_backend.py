"""The ``"mmkernels"`` transformers experts backend (``import mmkernels.transformers``).

Tiny random Hugging Face MoE models (2 layers, hidden 32, 4 experts, vocab 64) run with the backend
against transformers' own ``eager`` experts: logits, loss and every parameter gradient agree (fp32
tolerances), on the reference backend and on the Triton kernels (the CPU interpreter here), and greedy
``generate()`` gives the same tokens; 20 AdamW steps train the same (loss at every step, final
parameters); state dicts move both ways between ``"mmkernels"`` and ``"eager"`` models.  Unsupported
expert modules fall back with one named warning.
"""
import copy
import subprocess
import sys
import warnings

import pytest
import torch
from torch import nn

import mmkernels
from mmkernels.testing import assert_close

transformers = pytest.importorskip("transformers", minversion="5.0",
                                   reason="the experts backend needs transformers >= 5 (pip install "
                                          "'transformers>=5,<6')")
import mmkernels.transformers as mkt  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402
from transformers.integrations.moe import use_experts_implementation  # noqa: E402

V, H = 64, 32
COMMON = dict(vocab_size=V, hidden_size=H, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              max_position_embeddings=64, tie_word_embeddings=False)


def _config(family, **extra):
    if family == "qwen2_moe":   # a shared expert next to the routed ones
        cfg = transformers.Qwen2MoeConfig(intermediate_size=24, moe_intermediate_size=16,
                                          shared_expert_intermediate_size=24, num_experts=4, num_experts_per_tok=2,
                                          decoder_sparse_step=1, **COMMON)
    elif family == "qwen3_moe":
        cfg = transformers.Qwen3MoeConfig(intermediate_size=24, moe_intermediate_size=16, head_dim=8, num_experts=4,
                                          num_experts_per_tok=2, decoder_sparse_step=1, norm_topk_prob=True,
                                          **COMMON)
    elif family == "mixtral":
        cfg = transformers.MixtralConfig(intermediate_size=16, num_local_experts=4, num_experts_per_tok=2, **COMMON)
    elif family == "olmoe":
        cfg = transformers.OlmoeConfig(intermediate_size=16, num_experts=4, num_experts_per_tok=2, **COMMON)
    elif family == "deepseek_v3":  # shared expert, grouped sigmoid routing, MLA attention
        cfg = transformers.DeepseekV3Config(intermediate_size=24, moe_intermediate_size=16, n_routed_experts=4,
                                            n_shared_experts=1, num_experts_per_tok=2, n_group=1, topk_group=1,
                                            first_k_dense_replace=0, kv_lora_rank=16, q_lora_rank=None,
                                            qk_rope_head_dim=4, qk_nope_head_dim=4, v_head_dim=8, **COMMON)
    else:
        raise KeyError(family)
    for key, value in extra.items():
        setattr(cfg, key, value)
    return cfg


def _model(family, implementation="eager", **extra):
    torch.manual_seed(1234)
    model = AutoModelForCausalLM.from_config(_config(family, **extra), experts_implementation=implementation,
                                             dtype=torch.float32)
    # a random router so the tokens spread over the experts (the default init is tiny but not zero)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.08)
    return model.train()


# where the Triton kernels run: CPU tensors under the interpreter (make test here), CUDA on a GPU machine
TRITON_DEVICE = "cpu" if mmkernels.interpreter_enabled() else "cuda"


def _device(backend):
    return TRITON_DEVICE if backend == "triton" else "cpu"


def _run(model, ids, implementation, backend=None):
    model.set_experts_implementation(implementation)
    model.to(_device(backend)).zero_grad(set_to_none=True)
    ids = ids.to(_device(backend))
    if backend is None:
        out = model(ids, labels=ids)
    else:
        with mmkernels.use_backend(backend):
            out = model(ids, labels=ids)
    out.loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return out.logits.detach(), out.loss.detach(), grads


FAMILIES = ["qwen2_moe", "qwen3_moe", "mixtral", "olmoe", "deepseek_v3"]


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("family", FAMILIES)
def test_family_matches_eager(family, backend):
    model = _model(family)
    ids = torch.randint(0, V, (2, 5))
    logits, loss, grads = _run(model, ids, "eager")
    with warnings.catch_warnings():
        warnings.simplefilter("error", mkt.MMKernelsFallbackWarning)   # every family here runs fused
        logits2, loss2, grads2 = _run(model, ids, "mmkernels", backend)
    assert model.config._experts_implementation == "mmkernels"
    assert_close("logits", logits2, logits.double(), torch.float32)
    assert_close("loss", loss2, loss.double(), torch.float32)
    assert grads.keys() == grads2.keys()
    for name, g in grads.items():
        assert_close(f"grad {name}", grads2[name], g.double(), torch.float32)


def test_multimodal_moe_backbone_qwen3_vl_moe():
    """Qwen3-VL-MoE: the name reaches the text sub-config; its MoE text backbone matches eager (Triton)."""
    text = dict(vocab_size=V, hidden_size=H, intermediate_size=24, moe_intermediate_size=16, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, head_dim=8, num_experts=4, num_experts_per_tok=2,
                decoder_sparse_step=1, max_position_embeddings=64,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [1, 1, 2]})
    vision = dict(depth=1, hidden_size=32, intermediate_size=32, num_heads=2, out_hidden_size=H, patch_size=4,
                  spatial_merge_size=1, temporal_patch_size=1, deepstack_visual_indexes=[0])
    config = transformers.Qwen3VLMoeConfig(text_config=text, vision_config=vision)
    torch.manual_seed(0)
    model = transformers.Qwen3VLMoeForConditionalGeneration._from_config(config, experts_implementation="mmkernels")
    assert model.model.language_model.config._experts_implementation == "mmkernels"
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.08)
    ids = torch.randint(0, V, (2, 5))
    logits, loss, grads = _run(model, ids, "eager")
    assert model.model.language_model.config._experts_implementation == "eager"
    logits2, loss2, grads2 = _run(model, ids, "mmkernels", "triton")
    assert model.model.language_model.config._experts_implementation == "mmkernels"
    assert_close("logits", logits2, logits.double(), torch.float32)
    assert grads.keys() == grads2.keys()
    for name, g in grads.items():
        assert_close(f"grad {name}", grads2[name], g.double(), torch.float32)


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_generate_matches_eager(family):
    model = _model(family).eval()
    ids = torch.randint(0, V, (1, 4))
    kwargs = dict(max_new_tokens=3, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        model.set_experts_implementation("eager")
        expected = model.generate(ids, **kwargs)
        model.set_experts_implementation("mmkernels")
        with mmkernels.use_backend("triton"):
            got = model.to(TRITON_DEVICE).generate(ids.to(TRITON_DEVICE), **kwargs)
    assert torch.equal(got.cpu(), expected)


def test_from_config_and_save_load_round_trip(tmp_path):
    model = AutoModelForCausalLM.from_config(_config("mixtral"), experts_implementation="mmkernels")
    assert model.config._experts_implementation == "mmkernels"
    model.save_pretrained(tmp_path)
    assert "mmkernels" not in (tmp_path / "config.json").read_text()   # the checkpoint stays portable
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, experts_implementation="mmkernels")
    assert loaded.config._experts_implementation == "mmkernels"
    eager = AutoModelForCausalLM.from_pretrained(tmp_path, experts_implementation="eager")
    assert loaded.state_dict().keys() == model.state_dict().keys()
    ids = torch.randint(0, V, (1, 6))
    with torch.no_grad(), mmkernels.use_backend("reference"):
        assert_close("logits", loaded(ids).logits, eager(ids).logits.double(), torch.float32)


def _adamw_steps(model, implementation, backend, batches, steps=20):
    """``steps`` AdamW steps over ``batches`` (cycled) with one experts implementation; the losses."""
    model.set_experts_implementation(implementation)
    model.to(_device(backend))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    losses = []
    for step in range(steps):
        ids = batches[step % len(batches)].to(_device(backend))
        opt.zero_grad()
        with mmkernels.use_backend(backend):
            loss = model(ids, labels=ids).loss
        loss.backward()
        opt.step()
        losses.append(loss.detach())
    return losses


def _assert_same_training(family, backend, steps, **extra):
    batches = [torch.randint(0, V, (2, 5)) for _ in range(2)]
    eager, ours = _model(family, **extra), _model(family, **extra)          # one seed: the same weights
    for model in (eager, ours):
        # softmax ignores a key bias (it adds q.b to every score of a query), so its gradient is pure
        # rounding noise, which AdamW's normalisation turns into lr-sized steps in random directions
        for name, p in model.named_parameters():
            if name.endswith("k_proj.bias"):
                p.requires_grad_(False)
    expected = _adamw_steps(eager, "eager", "reference", batches, steps)
    with warnings.catch_warnings():
        warnings.simplefilter("error", mkt.MMKernelsFallbackWarning)
        got = _adamw_steps(ours, "mmkernels", backend, batches, steps)
    for step, (a, b) in enumerate(zip(got, expected)):
        assert_close(f"loss at step {step}", a, b.double(), torch.float32)
    for (name, p), q in zip(eager.named_parameters(), ours.parameters()):
        assert_close(f"final {name}", q, p.double(), torch.float32)
    return expected


@pytest.mark.parametrize("family", FAMILIES)
def test_convergence_20_adamw_steps(family):
    """20 AdamW steps from one seed, ``"mmkernels"`` (reference backend) against ``"eager"``: the loss at
    every step and the final parameters agree.  The reference backend runs mmkernels' own routing entry,
    permutation and grouped-GEMM path in PyTorch; 20 steps on the Triton interpreter would cost ~70 s
    per family, so the Triton kernels train for 3 steps on one family below."""
    losses = _assert_same_training(family, "reference", 20)
    assert losses[-1] < 0.85 * losses[0]                                    # it trained (two fixed batches)


def test_convergence_on_triton_kernels_shared_expert():
    """Qwen2-MoE (routed experts plus a shared expert), one layer, 3 AdamW steps on the Triton kernels."""
    _assert_same_training("qwen2_moe", "triton", 3, num_hidden_layers=1)


@pytest.mark.parametrize("family", FAMILIES)
def test_state_dict_round_trips_both_ways(family):
    """The backend swaps a function, not modules: a state dict saved by a model run with ``"mmkernels"``
    loads strictly into an ``"eager"`` one and the other way round, with the same keys and shapes."""
    ids = torch.randint(0, V, (1, 6))
    ours = _model(family, "mmkernels")
    with torch.no_grad(), mmkernels.use_backend("reference"):
        ours_logits = ours(ids).logits
    eager = AutoModelForCausalLM.from_config(_config(family), experts_implementation="eager", dtype=torch.float32)
    assert {k: v.shape for k, v in eager.state_dict().items()} == {k: v.shape for k, v in ours.state_dict().items()}
    eager.load_state_dict(ours.state_dict(), strict=True)                   # mmkernels -> eager
    with torch.no_grad():
        assert_close("logits mmkernels->eager", eager(ids).logits, ours_logits.double(), torch.float32)
    back = AutoModelForCausalLM.from_config(_config(family), experts_implementation="mmkernels",
                                            dtype=torch.float32)
    with torch.no_grad():
        for p in eager.parameters():
            p.mul_(1.5)                                                     # new values, so the load is visible
    back.load_state_dict(eager.state_dict(), strict=True)                   # eager -> mmkernels
    with torch.no_grad(), mmkernels.use_backend("reference"):
        assert_close("logits eager->mmkernels", back(ids).logits, eager(ids).logits.double(), torch.float32)
    assert back.config._experts_implementation == "mmkernels" and eager.config._experts_implementation == "eager"


@pytest.mark.parametrize("act,fused", [("relu", True), ("gelu", True), ("gelu_pytorch_tanh", True),
                                       ("quick_gelu", False)])
def test_activation_fused_or_named_fallback(act, fused):
    """ReLU, exact and tanh GELU run fused; an activation the kernels lack (QuickGELU) falls back to
    grouped_mm with one warning naming it, and the result still equals eager."""
    model = _model("mixtral", hidden_act=act, num_hidden_layers=1)
    assert type(model.model.layers[0].mlp.experts.act_fn).__name__ != "SiLUActivation"
    ids = torch.randint(0, V, (2, 5))
    logits, loss, grads = _run(model, ids, "eager")
    mkt._warned.clear()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        logits2, loss2, grads2 = _run(model, ids, "mmkernels", "triton")
        if not fused:
            _run(model, ids, "mmkernels", "triton")          # a second pass warns no more
    ours = [w for w in caught if issubclass(w.category, mkt.MMKernelsFallbackWarning)]
    if fused:
        assert not ours
    else:
        assert len(ours) == 1, [str(w.message) for w in ours]
        assert "QuickGELUActivation" in str(ours[0].message) and "grouped_mm" in str(ours[0].message)
    assert_close("logits", logits2, logits.double(), torch.float32)
    for name, g in grads.items():
        assert_close(f"grad {name}", grads2[name], g.double(), torch.float32)


# ------------------------------------------------------------------ layouts, via a synthetic experts class

class _Cfg:
    def __init__(self, impl):
        self._experts_implementation = impl


def _experts_class(**flags):
    """A transformers-style experts module with the decorator's layout flags and its own eager forward."""
    transposed, bias, gate = flags.get("is_transposed", False), flags.get("has_bias", False), \
        flags.get("has_gate", True)

    class Experts(nn.Module):
        def __init__(self, config, E=3, Hd=20, F=12, act=None):
            super().__init__()
            self.num_experts = E
            up = (2 * F if gate else F)
            shape_up, shape_down = ((E, Hd, up), (E, F, Hd)) if transposed else ((E, up, Hd), (E, Hd, F))
            name = "gate_up_proj" if gate else "up_proj"
            setattr(self, name, nn.Parameter(torch.randn(shape_up) * 0.3))
            self.down_proj = nn.Parameter(torch.randn(shape_down) * 0.3)
            if bias:
                setattr(self, name + "_bias", nn.Parameter(torch.randn(E, up) * 0.1))
                self.down_proj_bias = nn.Parameter(torch.randn(E, Hd) * 0.1)
            self.act_fn = act if act is not None else nn.SiLU()

        def forward(self, x, idx, w):
            out = torch.zeros_like(x)
            for s in range(x.shape[0]):
                for j in range(idx.shape[1]):
                    e = int(idx[s, j])
                    wu = getattr(self, "gate_up_proj" if gate else "up_proj")[e]
                    wd = self.down_proj[e]
                    z = x[s] @ wu if transposed else wu @ x[s]
                    if bias:
                        z = z + getattr(self, ("gate_up_proj" if gate else "up_proj") + "_bias")[e]
                    h = self._apply_gate(z) if gate else self.act_fn(z)
                    o = h @ wd if transposed else wd @ h
                    if bias:
                        o = o + self.down_proj_bias[e]
                    out[s] = out[s] + w[s, j] * o
            return out

    # the decorator without arguments (all 5.x releases take that form); the layout flags are set on the
    # instance after its __init__, under both names transformers has used for the transposed layout
    cls = use_experts_implementation(Experts)
    decorated_init = cls.__init__

    def __init__(self, config, **kwargs):
        decorated_init(self, config, **kwargs)
        self.is_transposed = self.experts_are_transposed = transposed
        self.has_bias, self.has_gate = bias, gate
        self.is_concatenated = flags.get("is_concatenated", True)

    cls.__init__ = __init__
    return cls


def _compare_module(mod, backend="triton", dense_weights=False):
    T, k = 9, 2
    x = torch.randn(T, mod.down_proj.shape[1 if not mod.is_transposed else 2])
    idx = torch.stack([torch.randperm(mod.num_experts)[:k] for _ in range(T)])
    w = torch.rand(T, k)
    wr = w
    if dense_weights:
        wr = torch.zeros(T, mod.num_experts).scatter(1, idx, w)
    mod.to(_device(backend))
    x, idx, wr = x.to(_device(backend)), idx.to(_device(backend)), wr.to(_device(backend))
    res = {}
    for impl in ("eager", "mmkernels"):
        mod.config._experts_implementation = impl
        mod.zero_grad(set_to_none=True)
        xi, wi = x.clone().requires_grad_(), wr.clone().requires_grad_()
        with mmkernels.use_backend(backend):
            y = mod(xi, idx, wi if impl == "mmkernels" else (wi.gather(1, idx) if dense_weights else wi))
        y.backward(torch.ones_like(y))
        res[impl] = [y, xi.grad, wi.grad] + [p.grad for p in mod.parameters()]
    for i, (a, b) in enumerate(zip(res["mmkernels"], res["eager"])):
        assert_close(f"output/grad {i}", a, b.double(), torch.float32)


@pytest.mark.parametrize("flags", [dict(), dict(is_transposed=True), dict(has_bias=True),
                                   dict(is_transposed=True, has_bias=True), dict(has_gate=False)],
                         ids=["plain", "transposed", "bias", "transposed_bias", "no_gate"])
def test_layouts_run_fused(flags):
    mod = _experts_class(**flags)(_Cfg("eager"), act=nn.GELU() if not flags.get("has_gate", True) else None)
    with warnings.catch_warnings():
        warnings.simplefilter("error", mkt.MMKernelsFallbackWarning)
        _compare_module(mod)


def test_dense_top_k_weights():
    """``top_k_weights`` given as ``[T, E]`` router weights is read at the chosen experts."""
    _compare_module(_experts_class()(_Cfg("eager")), backend="reference", dense_weights=True)


class _SiLUSubclass(nn.SiLU):
    def forward(self, x):
        return 2 * super().forward(x)


@pytest.mark.parametrize("case", ["custom_gate", "instance_gate", "interleaved", "lambda_act", "subclass_act",
                                  "instance_forward", "hooked_act", "backward_hooked_act", "post_norm",
                                  "expert_parallel"])
def test_unsupported_falls_back_with_one_named_warning(case):
    flags, act = {}, None
    if case == "interleaved":
        flags = dict(is_concatenated=False)
    if case == "lambda_act":
        act = lambda z: torch.sigmoid(z) * z  # noqa: E731  (SiLU in effect, but not provably so)
    if case == "subclass_act":
        act = _SiLUSubclass()
    if case in ("instance_forward", "hooked_act", "backward_hooked_act"):
        act = nn.SiLU()
        if case == "instance_forward":
            act.forward = lambda z: z * 3
        elif case == "hooked_act":
            act.register_forward_hook(lambda m, i, o: o * 3)
        else:   # grouped_mm and eager call act_fn, so its backward hooks run there
            act.register_full_backward_hook(lambda m, gi, go: (gi[0] * 2,))
    cls = _experts_class(**flags)
    if case == "custom_gate":
        cls._apply_gate = lambda self, gu: torch.relu(gu[..., ::2]) * gu[..., 1::2]
    mod = cls(_Cfg("eager"), act=act)
    if case == "instance_gate":   # set on the instance, e.g. by a quantisation or clamping wrapper
        mod._apply_gate = lambda gu: torch.relu(gu[..., ::2]) * gu[..., 1::2]
    if case == "post_norm":
        mod.has_post_expert_norm = True
    if case == "expert_parallel":
        mod._is_expert_parallel = True
    needle = {"custom_gate": "_apply_gate", "interleaved": "is_concatenated", "lambda_act": "act_fn <function",
              "subclass_act": "_SiLUSubclass", "instance_forward": "instance-level forward",
              "hooked_act": "with hooks (_forward_hooks)", "backward_hooked_act": "with hooks (_backward_hooks)",
              "instance_gate": "instance-level", "post_norm": "has_post_expert_norm",
              "expert_parallel": "_is_expert_parallel"}[case]
    mkt._warned.clear()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fallback = mkt._ExpertsInterface._global_mapping.pop("grouped_mm", None) if case == "post_norm" else None
        try:
            if case in ("post_norm", "expert_parallel"):   # the synthetic eager forward has neither feature:
                mod.config._experts_implementation = "mmkernels"   # just check the dispatch decision
                activation, reason = mkt._plan(mod)
                assert activation is None and needle in reason
                return
            _compare_module(mod, backend="reference")
            _compare_module(mod, backend="reference")
        finally:
            if fallback is not None:
                mkt._ExpertsInterface._global_mapping["grouped_mm"] = fallback
    ours = [str(w.message) for w in caught if issubclass(w.category, mkt.MMKernelsFallbackWarning)]
    assert len(ours) == 1 and needle in ours[0], ours


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("case", ["bf16_experts_fp32_input", "bf16_experts_under_autocast",
                                  "fp32_experts_under_autocast"])
def test_mixed_precision_equals_transformers_grouped_mm(case, backend):
    """bf16 experts fed fp32 hidden states (a norm's output under autocast), and fp32 experts under autocast:
    what transformers' own grouped_mm backend computes (autocast does not cast grouped_mm: the experts run
    in their weights' dtype on the input cast to it, the result comes back in the input's dtype).  The
    output and every gradient have grouped_mm's dtypes and are held to the weights' dtype tolerance
    against that computation in float64 (as is grouped_mm's own output; its bf16 weight gradients, summed
    in bf16, can miss that tolerance themselves)."""
    mod = _experts_class(has_bias=True)(_Cfg("grouped_mm"), Hd=32, F=16)   # grouped_mm: 16-byte strides
    if case.startswith("bf16"):
        mod.to(torch.bfloat16)
    dtype = mod.down_proj.dtype
    dev = _device(backend)
    T, k = 9, 2
    x = torch.randn(T, 32)
    idx = torch.stack([torch.randperm(mod.num_experts)[:k] for _ in range(T)])
    w = torch.rand(T, k)
    ref = copy.deepcopy(mod).double()                      # the weights' values, exactly
    ref.config._experts_implementation = "eager"
    x64 = x.to(dtype).double().requires_grad_()            # grouped_mm's input.to(weight.dtype)
    (ref(x64, idx, w.double()).square().sum()).backward()
    want = [ref(x64, idx, w.double()).detach(), x64.grad] + [p.grad for p in ref.parameters()]
    mod.to(dev)
    autocast = torch.autocast(dev, dtype=torch.bfloat16, enabled=case.endswith("autocast"))
    res = {}
    for impl in ("grouped_mm", "mmkernels"):
        mod.config._experts_implementation = impl
        mod.zero_grad(set_to_none=True)
        xi = x.to(dev, copy=True).requires_grad_()
        with autocast, mmkernels.use_backend(backend):
            y = mod(xi, idx.to(dev), w.to(dev))
        y.float().square().sum().backward()
        res[impl] = [y, xi.grad] + [p.grad for p in mod.parameters()]
    assert res["mmkernels"][0].dtype == res["grouped_mm"][0].dtype == torch.float32
    assert_close("grouped_mm output", res["grouped_mm"][0], want[0], dtype)
    for i, (a, b) in enumerate(zip(res["mmkernels"], want)):
        assert a.dtype == res["grouped_mm"][i].dtype, i
        assert_close(f"output/grad {i}", a, b, dtype)


def test_expert_activation_is_never_guessed():
    from transformers.activations import ACT2FN
    assert mkt.expert_activation(ACT2FN["silu"])[0] == "silu"
    assert mkt.expert_activation(ACT2FN["gelu"])[0] == "gelu"
    assert mkt.expert_activation(ACT2FN["gelu_pytorch_tanh"])[0] == "gelu_tanh"
    assert mkt.expert_activation(ACT2FN["gelu_new"])[0] == "gelu_tanh"
    assert mkt.expert_activation(ACT2FN["relu"])[0] == "relu"
    assert mkt.expert_activation(nn.GELU(approximate="tanh"))[0] == "gelu_tanh"
    for unknown in (ACT2FN["quick_gelu"], ACT2FN["relu2"], ACT2FN["mish"], nn.Tanh(), _SiLUSubclass(),
                    torch.nn.functional.gelu, lambda z: z, None):
        name, why = mkt.expert_activation(unknown)
        assert name is None and why


def test_registered_name():
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS
    assert ALL_EXPERTS_FUNCTIONS["mmkernels"] is mkt.experts_forward


def test_import_without_transformers_names_the_extra():
    code = ("import sys; sys.modules['transformers'] = None\n"
            "try:\n    import mmkernels.transformers\nexcept ImportError as e:\n    print('IMPORTERROR', e)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "IMPORTERROR" in proc.stdout and "pip install 'transformers>=5,<6'" in proc.stdout
