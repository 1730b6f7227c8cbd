"""Hardening of ``mmkernels.MoE``: what the template expert computes is verified, DeepSpeed-layout
checkpoints load strictly, every constructor argument is checked, and the layer refuses DeepSpeed
configurations it would compute differently.

Module logic runs on the reference backend on CPU (tiny shapes).  The parity tests against the real
DeepSpeed run when ``deepspeed`` is importable (``pip install deepspeed==0.19.8``) and skip with that
reason otherwise; the mirror-based checks (``test_moe.py``, ``benchmarks/test_bench_moe.py``) always run.
"""
import copy
import math
import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mmkernels import MoE, moe_ffn, moe_route, use_backend
from mmkernels.ops.moe.module import _DS_EXPERT, _DS_GATE
from mmkernels.ops.moe.reference import capacity_for, combine_weights_and_aux, moe_ffn_reference
from mmkernels.testing import assert_close

from conftest import BACKEND_DEVICES
from test_moe import FakeDeepSpeedMoE, PhiMLP, QwenMLP, StableLMMLP, gumbel

H, F_, E = 16, 24, 4


class FnMLP(nn.Module):
    """fc1/fc2 expert whose activation is a plain function called in forward (no module attribute)."""

    def __init__(self, act, h=H, f=F_):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(h, f), nn.Linear(f, h)
        self.fn = act

    def forward(self, x):
        return self.fc2(self.fn(self.fc1(x)))


def new_gelu(x):  # HF's NewGELUActivation (phi-2's gelu_new), written out
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))))


def dense_check(moe, ffn, S=13):
    """No drops and identical experts: the layer is the dense FFN (the packed form is what ffn computes)."""
    moe = moe.double().eval()
    moe.gate_weight.data = moe.gate_weight.data.float()
    x = torch.randn(S, moe.hidden_size, dtype=torch.float64)
    with use_backend("reference"):
        y, _, _ = moe(x)
    torch.testing.assert_close(y, ffn.double()(x))


# ------------------------------------------------------------------------------ the expert's activation

@pytest.mark.parametrize("act,found", [(torch.relu, "relu"), (F.gelu, "gelu (exact erf)"), (F.silu, "silu"),
                                       (lambda z: z, "identity")], ids=["relu", "exact_gelu", "silu", "identity"])
def test_activation_called_in_forward_is_verified(act, found):
    """Was accepted as GELU-tanh (ReLU output off by 0.09): now a ValueError naming the class and what it is."""
    with pytest.raises(ValueError, match=rf"FnMLP.*differs from the packed form fc2\(gelu_tanh\(fc1 x\)\).*"
                                         rf"computes fc2\({re.escape(found)}\(fc1 x\)\)"):
        MoE(H, FnMLP(act), num_experts=E)


@pytest.mark.parametrize("act", [lambda z: F.gelu(z, approximate="tanh"), new_gelu], ids=["F.gelu_tanh", "new_gelu"])
def test_tanh_gelu_in_forward_is_accepted(act):
    ffn = FnMLP(act)
    dense_check(MoE(H, ffn, num_experts=E, k=2, eval_capacity_factor=2.0, min_capacity=0), ffn)


def test_activation_attribute_is_not_trusted():
    """An ``act`` attribute that forward() does not use neither accepts nor rejects the expert."""
    relu_attr = FnMLP(lambda z: F.gelu(z, approximate="tanh"))
    relu_attr.act = nn.ReLU()          # unused by forward
    MoE(H, relu_attr, num_experts=E)
    gelu_attr = FnMLP(torch.relu)
    gelu_attr.act = nn.GELU(approximate="tanh")   # unused: forward calls relu
    with pytest.raises(ValueError, match="relu"):
        MoE(H, gelu_attr, num_experts=E)


def test_swiglu_gate_is_verified_not_assumed():
    """Qwen-named linears with the other convention (silu on w1): recognised, packed gate-first, and round trips."""
    class SwappedQwen(QwenMLP):
        def forward(self, x):
            return self.c_proj(F.silu(self.w1(x)) * self.w2(x))

    ffn = SwappedQwen(H, F_)
    moe = MoE(H, ffn, num_experts=E, k=2, eval_capacity_factor=2.0, min_capacity=0)
    dense_check(moe, ffn)
    again = MoE(H, SwappedQwen(H, F_), num_experts=E, k=2)
    again.load_state_dict(moe.deepspeed_state_dict())
    for name, p in moe.named_parameters():
        assert torch.equal(p, getattr(again, name)), name

    class ReluGLU(StableLMMLP):
        def forward(self, x):
            return self.down_proj(F.relu(self.gate_proj(x)) * self.up_proj(x))

    with pytest.raises(ValueError, match=r"ReluGLU.*computes down_proj\(relu\(gate_proj x\) \* up_proj x\)"):
        MoE(H, ReluGLU(H, F_), num_experts=E)


def test_expert_structure_is_verified():
    class WithNorm(PhiMLP):
        def __init__(self):
            super().__init__(H, F_)
            self.ln = nn.LayerNorm(H)

        def forward(self, x):
            return super().forward(self.ln(x))

    with pytest.raises(ValueError, match=r"WithNorm.*ln\.weight.*outside"):
        MoE(H, WithNorm(), num_experts=E)

    class Residual(PhiMLP):
        def forward(self, x):
            return x + super().forward(x)

    with pytest.raises(ValueError, match="Residual.*matches none"):
        MoE(H, Residual(H, F_), num_experts=E)

    class Broken(PhiMLP):
        def forward(self, x):
            raise RuntimeError("boom")

    with pytest.raises(ValueError, match="cannot verify expert Broken.*boom"):
        MoE(H, Broken(H, F_), num_experts=E)

    class Megatron(PhiMLP):   # (output, bias) like Megatron / DeepSpeed experts: the first element counts
        def forward(self, x):
            return super().forward(x), None

    MoE(H, Megatron(H, F_), num_experts=E)
    with pytest.raises(ValueError, match="hidden_size=20"):
        MoE(20, PhiMLP(H, F_), num_experts=E)
    narrow = PhiMLP(H, F_)
    narrow.fc2 = nn.Linear(F_ - 1, H)
    with pytest.raises(ValueError, match="do not chain"):
        MoE(H, narrow, num_experts=E)


def test_meta_and_low_precision_experts_are_verified():
    """The probe does not need the expert's own values: meta and bf16 templates are verified too."""
    with torch.device("meta"):
        moe = MoE(H, FnMLP(lambda z: F.gelu(z, approximate="tanh")), num_experts=E, k=2)
        with pytest.raises(ValueError, match="relu"):
            MoE(H, FnMLP(torch.relu), num_experts=E)
    assert moe.w1.device.type == "meta"
    with pytest.raises(ValueError, match="exact erf"):
        MoE(H, FnMLP(F.gelu).to(torch.bfloat16), num_experts=E)
    zeros = PhiMLP(H, F_)
    torch.nn.init.zeros_(zeros.fc2.weight)   # degenerate weights do not hide the activation either
    zeros.act = nn.ReLU()
    with pytest.raises(ValueError, match="relu"):
        MoE(H, zeros, num_experts=E)


def test_from_deepspeed_verifies_the_template():
    ds = FakeDeepSpeedMoE(H, FnMLP(torch.relu), E, 2, 1.5, 2.0, 0)
    with pytest.raises(ValueError, match="FnMLP.*relu"):
        MoE.from_deepspeed(ds)
    ds = FakeDeepSpeedMoE(H, PhiMLP(H, F_), E, 2, 1.5, 2.0, 0)
    MoE.from_deepspeed(ds)
    ds.deepspeed_moe.experts.deepspeed_experts[2].act = nn.ReLU()   # one expert no longer a copy of the template
    with pytest.raises(ValueError, match=r"ds_moe's expert 2: unsupported expert PhiMLP.*relu"):
        MoE.from_deepspeed(ds)
    ds.deepspeed_moe.experts.deepspeed_experts[2].act = nn.GELU(approximate="tanh")   # equal, not identical
    MoE.from_deepspeed(ds)


# ------------------------------------------------------------------------------ strict DeepSpeed loading

def ds_checkpoint(form="phi"):
    cls = {"phi": PhiMLP, "stablelm": StableLMMLP, "qwen": QwenMLP}[form]
    src = MoE(H, cls(H, F_), num_experts=E, k=2)
    with torch.no_grad():
        for p in src.parameters():
            p.add_(torch.randn_like(p))
    return src, cls, src.deepspeed_state_dict()


def expert_key(i, name):
    return f"{_DS_EXPERT}{i}.{name}"


def test_unexpected_expert_key_is_reported():
    src, cls, sd = ds_checkpoint()
    sd[expert_key(0, "fc3.weight")] = torch.randn(F_, H)
    sd[expert_key(E, "fc1.weight")] = torch.randn(F_, H)       # an expert the layer does not have
    dst = MoE(H, cls(H, F_), num_experts=E, k=2)
    with pytest.raises(RuntimeError, match=r"Unexpected key\(s\).*experts\.0\.fc3\.weight"):
        dst.load_state_dict(sd)
    res = dst.load_state_dict(sd, strict=False)
    assert sorted(res.unexpected_keys) == sorted([expert_key(0, "fc3.weight"), expert_key(E, "fc1.weight")])
    assert res.missing_keys == []
    for name, p in src.named_parameters():
        assert torch.equal(p, getattr(dst, name)), name


@pytest.mark.parametrize("drop", ["1.fc1.weight", "2.fc2.bias", "3.fc1.bias"])
def test_missing_expert_key_is_reported(drop):
    """Was KeyError: 'weight' / a raw TypeError from torch.stack."""
    src, cls, sd = ds_checkpoint()
    del sd[expert_key(*drop.split(".", 1))]
    dst = MoE(H, cls(H, F_), num_experts=E, k=2)
    before = {n: p.detach().clone() for n, p in dst.named_parameters()}
    with pytest.raises(RuntimeError, match=rf"Missing key\(s\).*deepspeed_experts\.{drop.replace('.', '[.]')}"):
        dst.load_state_dict(sd)
    dst = MoE(H, cls(H, F_), num_experts=E, k=2)
    dst.load_state_dict({n: p for n, p in before.items()})
    res = dst.load_state_dict(sd, strict=False)
    assert res.missing_keys == [expert_key(*drop.split(".", 1))] and res.unexpected_keys == []
    # nn.Module semantics: the missing slice keeps its value, everything else is loaded
    i, name, kind = drop.split(".")
    packed = {"fc1.weight": "w1", "fc1.bias": "b1", "fc2.weight": "w2", "fc2.bias": "b2"}[f"{name}.{kind}"]
    for n, p in dst.named_parameters():
        want = getattr(src, n).detach().clone()
        if n == packed:
            want[int(i)] = before[n][int(i)]
        assert torch.equal(p, want), n


def test_wrong_expert_shape_names_the_key():
    """Was a raw torch.stack error."""
    _, cls, sd = ds_checkpoint()
    sd[expert_key(2, "fc1.weight")] = torch.randn(F_ + 1, H)
    for strict in (True, False):
        with pytest.raises(RuntimeError, match=r"size mismatch for deepspeed_moe\.experts\.deepspeed_experts\.2\."
                                               r"fc1\.weight.*\(25, 16\).*\(24, 16\)"):
            MoE(H, cls(H, F_), num_experts=E, k=2).load_state_dict(sd, strict=strict)


def test_gate_key_and_layout_mixups_are_reported():
    src, cls, sd = ds_checkpoint()
    del sd[_DS_GATE]
    with pytest.raises(RuntimeError, match=r"Missing key\(s\).*deepspeed_moe\.gate\.wg\.weight"):
        MoE(H, cls(H, F_), num_experts=E, k=2).load_state_dict(sd)
    res = MoE(H, cls(H, F_), num_experts=E, k=2).load_state_dict(sd, strict=False)
    assert res.missing_keys == [_DS_GATE]
    _, _, sd = ds_checkpoint()
    sd["w1"] = src.w1.detach()
    with pytest.raises(RuntimeError, match="one layout"):
        MoE(H, cls(H, F_), num_experts=E, k=2).load_state_dict(sd)
    _, _, sd = ds_checkpoint("stablelm")
    sd[expert_key(0, "gate_proj.bias")] = torch.randn(F_)    # the SwiGLU form has no biases
    with pytest.raises(RuntimeError, match=r"Unexpected key\(s\).*experts\.0\.gate_proj\.bias"):
        MoE(H, StableLMMLP(H, F_), num_experts=E, k=2).load_state_dict(sd)


@pytest.mark.parametrize("form", ["phi", "qwen"])
def test_deepspeed_layout_under_a_prefix_and_assign(form):
    src, cls, sd = ds_checkpoint(form)
    parent = nn.Module()
    parent.mlp = MoE(H, cls(H, F_), num_experts=E, k=2)
    sd = {f"mlp.{k}": v for k, v in sd.items()}
    sd["mlp." + expert_key(1, "extra.weight")] = torch.zeros(1)
    res = parent.load_state_dict(sd, strict=False)
    assert res.unexpected_keys == ["mlp." + expert_key(1, "extra.weight")] and res.missing_keys == []
    for name, p in src.named_parameters():
        assert torch.equal(p, getattr(parent.mlp, name)), name
    # a layer built on the meta device takes the checkpoint's tensors with assign=True
    with torch.device("meta"):
        meta = MoE(H, cls(H, F_), num_experts=E, k=2)
    meta.load_state_dict(src.deepspeed_state_dict(), assign=True)
    for name, p in src.named_parameters():
        assert torch.equal(p, getattr(meta, name)), name


# ------------------------------------------------------------------------------ constructor arguments

@pytest.mark.parametrize("kw,exc,match", [
    (dict(ep_size=0), ValueError, "ep_size must be >= 1"),
    (dict(ep_size=-1), ValueError, "ep_size must be >= 1"),
    (dict(ep_size=1.0), TypeError, "ep_size must be an int"),
    (dict(ep_size=3), ValueError, "divisible by ep_size"),
    (dict(ep_size=2), ValueError, "ep_size=2 > 1 needs an initialised torch.distributed default process group"),
    (dict(ep_size=2, ep_group="world"), TypeError, "ep_group must be None or a torch.distributed.ProcessGroup"),
    (dict(num_experts=0), ValueError, "num_experts must be >= 1"),
    (dict(k=0), ValueError, "k must be >= 1"),
    (dict(k=True), TypeError, "k must be an int"),
    (dict(k=5), ValueError, r"k must be in \[1, num_experts=4\]"),
    (dict(hidden_size=0), ValueError, "hidden_size must be >= 1"),
    (dict(min_capacity=-1), ValueError, "min_capacity must be >= 0"),
    (dict(min_capacity=2.0), TypeError, "min_capacity must be an int"),
    (dict(capacity_factor=float("nan")), ValueError, "capacity_factor must be finite"),
    (dict(eval_capacity_factor=float("inf")), ValueError, "eval_capacity_factor must be finite"),
    (dict(eval_capacity_factor=0.0), ValueError, "eval_capacity_factor must be > 0"),
    (dict(capacity_factor="1.5"), TypeError, "capacity_factor must be a float"),
    (dict(drop_tokens="False"), TypeError, "drop_tokens must be a bool"),
    (dict(use_rts=None), TypeError, "use_rts must be a bool"),
    (dict(use_residual=1), TypeError, "use_residual must be a bool"),
    (dict(top2_2nd_expert_sampling="yes"), TypeError, "top2_2nd_expert_sampling must be a bool"),
    (dict(use_tutel=0), TypeError, "use_tutel must be a bool"),
    (dict(enable_expert_tensor_parallelism=None), TypeError, "enable_expert_tensor_parallelism must be a bool"),
    (dict(noisy_gate_policy=1), TypeError, "noisy_gate_policy must be None or a str"),
    (dict(noisy_gate_policy="Gumbel"), ValueError, "noisy_gate_policy must be"),
    (dict(noisy_gate_policy="Jitter", k=2), NotImplementedError, "noisy_gate_policy='Jitter'"),
    (dict(noisy_gate_policy="RSample", k=1), NotImplementedError, "noisy_gate_policy='RSample' with k=1"),
    (dict(drop_policy="position", k=2), ValueError, "drop_policy='position' only applies to k >= 3"),
    (dict(drop_policy="random", k=3), ValueError, "drop_policy must be None, 'probs' or 'position'"),
    (dict(drop_policy=1, k=3), TypeError, "drop_policy must be None or a str"),
], ids=lambda v: str(v) if not isinstance(v, type) else v.__name__)
def test_constructor_arguments_are_checked(kw, exc, match):
    kw = {"hidden_size": H, "num_experts": E, **kw}
    with pytest.raises(exc, match=match):
        MoE(kw.pop("hidden_size"), PhiMLP(H, F_), **kw)


def test_forward_arguments_are_checked():
    moe = MoE(H, PhiMLP(H, F_), num_experts=E, k=2, min_capacity=0)
    with pytest.raises(TypeError, match="hidden_states has dtype torch.float64 but the expert weights are torch.float32"):
        moe(torch.randn(5, H, dtype=torch.float64))   # was a raw dtype error from the kernels' argument checks
    with pytest.raises(TypeError, match="hidden_states must have dtype"):
        moe(torch.ones(5, H, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"hidden_states must be a tensor \[\.\.\., 16\]"):
        moe(torch.randn(5, H + 1))
    with pytest.raises(ValueError, match="hidden_states is on meta but gate_weight is on cpu|gate_weight is on cpu "
                                         "but hidden_states is on meta"):
        moe(torch.randn(5, H, device="meta"))   # was a raw device error from the router's F.linear


def test_rsample_with_k2_is_what_deepspeed_computes():
    """DeepSpeed reads noisy_gate_policy only in top1gating: for k = 2 'RSample' changes nothing."""
    a = MoE(H, PhiMLP(H, F_), num_experts=E, k=2, min_capacity=0, noisy_gate_policy="RSample")
    b = MoE(H, PhiMLP(H, F_), num_experts=E, k=2, min_capacity=0)
    b.load_state_dict(a.state_dict())
    x, noise = torch.randn(20, H), gumbel(20, E)
    with use_backend("reference"):
        assert torch.equal(a(x, second_expert_noise=noise)[0], b(x, second_expert_noise=noise)[0])


def test_noise_only_for_k2():
    for k in (1, 3):
        moe = MoE(H, PhiMLP(H, F_), num_experts=E, k=k, min_capacity=0, drop_tokens=False)
        with pytest.raises(ValueError, match="second_expert_noise.*k=2"):
            moe(torch.randn(6, H), second_expert_noise=gumbel(6, E))


def test_k1_min_capacity_above_tokens_is_an_error():
    """DeepSpeed's top1gating asserts S >= min_capacity (with or without drops); this ran before."""
    for drop_tokens in (True, False):
        moe = MoE(H, PhiMLP(H, F_), num_experts=E, k=1, min_capacity=8, drop_tokens=drop_tokens)
        with pytest.raises(ValueError, match="min_capacity=8 tokens, got 5"):
            moe(torch.randn(5, H))
        moe(torch.randn(8, H))
        y, l_aux, counts = moe(torch.randn(0, H))   # nothing to route: an empty output, not an error
        assert y.shape == (0, H) and int(counts.sum()) == 0
    MoE(H, PhiMLP(H, F_), num_experts=E, k=2, min_capacity=8)(torch.randn(5, H))   # top2gating: no such rule


def test_k3_is_dropless_deepspeed_or_the_routing_ops_policy():
    """k >= 3 with drops runs DeepSpeed topkgating's policy through the routing op (or refuses, naming
    drop_policy); dropless k = 3 equals topkgating's formulas."""
    try:
        moe = MoE(H, PhiMLP(H, F_), num_experts=E, k=3, min_capacity=0)
    except NotImplementedError as e:
        assert "drop_policy='probs'" in str(e)
    else:
        assert moe.drop_policy is None
    moe = MoE(H, PhiMLP(H, F_), num_experts=E, k=3, min_capacity=0, drop_tokens=False).double()
    with torch.no_grad():
        moe.w1.add_(torch.randn_like(moe.w1) * 0.3)
    moe.gate_weight.data = moe.gate_weight.data.float()
    x = torch.randn(17, H, dtype=torch.float64)
    with use_backend("reference"):
        y, l_aux, counts = moe(x)
    # topkgating, drop_tokens=False (DeepSpeed 0.19.8 sharded_moe.py)
    gates = F.softmax(F.linear(x.float(), moe.gate_weight), dim=1)
    top_gate, top_idx = torch.topk(gates, k=3, dim=1)
    mask = torch.zeros_like(gates, dtype=torch.bool).scatter_(1, top_idx, 1)
    torch.testing.assert_close(l_aux, torch.mean(gates.mean(0) * mask.float().mean(0)) * E * E / 3)
    assert torch.equal(counts, mask.sum(0))
    w = gates * mask
    w = w / w.sum(1, keepdim=True).clamp(min=torch.finfo(torch.float32).eps)
    want = sum(w[:, e:e + 1].double() * F.linear(F.gelu(F.linear(x, moe.w1[e], moe.b1[e]), approximate="tanh"),
                                                 moe.w2[e], moe.b2[e]) for e in range(E))
    torch.testing.assert_close(y, want)


# ------------------------------------------------------------------------------ real DeepSpeed (when installed)

def deepspeed_moe_cls():
    return pytest.importorskip(
        "deepspeed.moe.layer", reason="DeepSpeed is not installed (pip install deepspeed==0.19.8); the parity "
        "tests against the in-package mirrors still run").MoE


def run_both(ds, ours, x, noise, monkeypatch):
    from deepspeed.moe import sharded_moe

    monkeypatch.setattr(sharded_moe, "gumbel_rsample", lambda shape, device: noise.clone())
    xd, xo = x.clone().requires_grad_(), x.clone().requires_grad_()
    state = torch.get_rng_state()
    y_ds, l_ds, c_ds = ds(xd)
    after_ds = torch.get_rng_state()
    torch.set_rng_state(state)   # k = 1 random token selection: both draw from the same generator state
    with use_backend("reference"):
        y, l_aux, counts = ours(xo, second_expert_noise=noise if ours.k == 2 and ours.top2_2nd_expert_sampling
                                else None)
    assert torch.equal(torch.get_rng_state(), after_ds), "the random stream must end where DeepSpeed's does"
    (y_ds.square().sum() + l_ds).backward()
    (y.square().sum() + l_aux).backward()
    torch.testing.assert_close(y, y_ds, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(l_aux, l_ds, rtol=1e-6, atol=1e-7)
    assert torch.equal(counts, c_ds.to(counts))
    torch.testing.assert_close(xo.grad, xd.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ours.gate_weight.grad, ds.deepspeed_moe.gate.wg.weight.grad, rtol=1e-4, atol=1e-6)
    return y


@pytest.mark.parametrize("form,k,kw,training", [
    ("phi", 2, dict(capacity_factor=0.5), True),             # MoE-LLaVA's layer, tokens dropped
    ("stablelm", 2, dict(eval_capacity_factor=2.0), False),  # eval, dropless by capacity
    ("qwen", 2, dict(top2_2nd_expert_sampling=False, capacity_factor=0.75), True),
    ("phi", 1, dict(use_rts=False, capacity_factor=0.5), True),   # top1gating's topk over the 0/1 mask
    ("phi", 1, dict(capacity_factor=0.5), True),             # top1gating, random token selection (the default)
    ("stablelm", 1, dict(eval_capacity_factor=0.5), False),  # ... in eval (DeepSpeed draws there too)
    ("phi", 1, dict(drop_tokens=False), True),               # ... dropless: the draw still happens
    ("phi", 2, dict(use_rts=True, capacity_factor=0.5), False),   # k = 2: top2gating has no RTS
    ("phi", 3, dict(capacity_factor=0.5), True),             # topkgating drop_policy='probs'
    ("phi", 3, dict(drop_tokens=False), True),
], ids=lambda v: str(v))
def test_from_real_deepspeed_matches_it(form, k, kw, training, monkeypatch):
    DeepSpeedMoE = deepspeed_moe_cls()
    cls = {"phi": PhiMLP, "stablelm": StableLMMLP, "qwen": QwenMLP}[form]
    torch.manual_seed(0)
    ds = DeepSpeedMoE(H, cls(H, F_), num_experts=E, k=k, min_capacity=0, **kw).train(training)
    with torch.no_grad():
        for p in ds.deepspeed_moe.experts.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    try:
        ours = MoE.from_deepspeed(ds)
    except NotImplementedError as e:   # allowed only where the option is named
        assert k >= 3 and "drop_policy" in str(e)
        return
    assert ours.training == training and ours.k == k
    S = 37
    run_both(ds, ours, torch.randn(S, H), gumbel(S, E), monkeypatch)


def test_real_deepspeed_options_are_refused_by_name():
    DeepSpeedMoE = deepspeed_moe_cls()
    for kw, name in ((dict(noisy_gate_policy="Jitter"), "Jitter"), (dict(use_residual=True), "use_residual"),
                     (dict(noisy_gate_policy="RSample", k=1), "RSample")):
        ds = DeepSpeedMoE(H, PhiMLP(H, F_), num_experts=E, **{"k": 2, **kw})
        with pytest.raises(NotImplementedError, match=name):
            MoE.from_deepspeed(ds)
    ds = DeepSpeedMoE(H, FnMLP(torch.relu), num_experts=E, k=2)
    with pytest.raises(ValueError, match="relu"):
        MoE.from_deepspeed(ds)


def test_real_deepspeed_k1_min_capacity_both_refuse():
    DeepSpeedMoE = deepspeed_moe_cls()
    ds = DeepSpeedMoE(H, PhiMLP(H, F_), num_experts=E, k=1, min_capacity=8)
    with pytest.raises(AssertionError, match="min_capacity"):
        ds(torch.randn(5, H))
    with pytest.raises(ValueError, match="min_capacity"):
        MoE.from_deepspeed(ds)(torch.randn(5, H))


def test_real_deepspeed_checkpoint_loads_strictly():
    DeepSpeedMoE = deepspeed_moe_cls()
    ds = DeepSpeedMoE(H, PhiMLP(H, F_), num_experts=E, k=2)
    sd = copy.copy(ds.state_dict())
    ours = MoE(H, PhiMLP(H, F_), num_experts=E, k=2)
    ours.load_state_dict(sd)
    assert set(ours.deepspeed_state_dict()) == set(sd)
    del sd[expert_key(3, "fc2.weight")]
    with pytest.raises(RuntimeError, match=r"deepspeed_experts\.3\.fc2\.weight"):
        ours.load_state_dict(sd)


def test_rts_token_order_skips_the_permutation_check_but_a_user_order_is_checked(monkeypatch):
    """MoE's own RTS order is a permutation by construction: its forward must not pay the host sync
    of the token_order check (sync-free on GPU); an order the caller passes is still checked."""
    from mmkernels.ops.moe import function

    calls = []
    real = function._check_token_order_values
    monkeypatch.setattr(function, "_check_token_order_values", lambda order, S: (calls.append(S), real(order, S)))
    moe = MoE(8, PhiMLP(8, 16), num_experts=4, k=1, use_rts=True, min_capacity=0)
    x = torch.randn(12, 8)
    with use_backend("reference"):
        moe(x)
        assert calls == []
        moe(x, token_order=torch.randperm(12))
        assert calls == [12]
        with pytest.raises(ValueError, match="token_order"):
            moe(x, token_order=torch.zeros(12, dtype=torch.int64))


# ------------------------------------------------------------------------------ second pass: every expert checked

def _fake_ds(seed=0):
    torch.manual_seed(seed)
    return FakeDeepSpeedMoE(H, PhiMLP(H, F_), E, 2, 1.5, 2.0, 0)


def _ds_break(ds, case):
    """Change one part of a (fake) DeepSpeed layer in a way the converted layer would not reproduce;
    returns what the error names."""
    experts = ds.deepspeed_moe.experts.deepspeed_experts
    if case == "hook_on_expert_1":
        experts[1].register_forward_hook(lambda m, i, o: o * 0.25)
        return "'ds_moe.deepspeed_moe.experts.deepspeed_experts.1' has hooks (_forward_hooks)"
    if case == "pre_hook_inside_expert_3":
        experts[3].fc2.register_forward_pre_hook(lambda m, i: (i[0] * 2,))
        return "'ds_moe.deepspeed_moe.experts.deepspeed_experts.3.fc2' has hooks (_forward_pre_hooks)"
    if case == "backward_hook_on_expert_2":
        experts[2].register_full_backward_hook(lambda m, gi, go: None)
        return "deepspeed_experts.2' has hooks (_backward_hooks)"
    if case == "hook_on_the_gate":
        ds.deepspeed_moe.gate.register_forward_hook(lambda m, i, o: o)
        return "'ds_moe.deepspeed_moe.gate' has hooks"
    if case == "extra_parameter_on_expert_1":
        experts[1].scale = nn.Parameter(torch.ones(H))
        return "ds_moe's expert 1: unsupported expert PhiMLP: parameters ['scale']"
    if case == "expert_2_in_another_dtype":
        experts[2].double()
        return "ds_moe's expert 2's fc1.weight is torch.float64 but expert 0's is torch.float32"
    if case == "forward_on_the_gate_instance":
        ds.deepspeed_moe.gate.forward = lambda *a: None
        return "ds_moe.deepspeed_moe.gate has a forward set on the instance"
    raise KeyError(case)


@pytest.mark.parametrize("case", ["hook_on_expert_1", "pre_hook_inside_expert_3", "backward_hook_on_expert_2",
                                  "hook_on_the_gate", "extra_parameter_on_expert_1", "expert_2_in_another_dtype",
                                  "forward_on_the_gate_instance"])
def test_from_deepspeed_checks_every_expert_and_the_whole_layer(case):
    """Was accepted: a forward hook on expert 1 (only expert 0 was probed, and the 'same structure'
    shortcut for the others ignored hooks, parameter layouts and dtypes): the converted layer's output
    differed from DeepSpeed's by 5.85."""
    ds = _fake_ds()
    MoE.from_deepspeed(ds)                              # as built: fine
    needle = _ds_break(ds, case)
    with pytest.raises(ValueError) as err:
        MoE.from_deepspeed(ds)
    assert needle in str(err.value), str(err.value)


def test_a_hooked_template_expert_is_refused():
    """DeepSpeed deep-copies the template with its hooks, which then run in every expert; the packed
    layer never calls the expert, so it refuses instead of dropping them."""
    template = PhiMLP(H, F_)
    handle = template.fc1.register_forward_hook(lambda m, i, o: o * 2)
    with pytest.raises(ValueError, match=r"module 'expert\.fc1' has hooks \(_forward_hooks\).*never calls it"):
        MoE(H, template, num_experts=E)
    handle.remove()
    MoE(H, template, num_experts=E)


def test_real_deepspeed_every_expert_and_part_is_checked():
    DeepSpeedMoE = deepspeed_moe_cls()
    from deepspeed.moe.sharded_moe import TopKGate

    torch.manual_seed(0)
    ds = DeepSpeedMoE(H, PhiMLP(H, F_), num_experts=E, k=2, min_capacity=0, top2_2nd_expert_sampling=False)
    x = torch.randn(9, H)
    plain = ds(x)[0]
    handle = ds.deepspeed_moe.experts.deepspeed_experts[1].register_forward_hook(lambda m, i, o: o * 0.25)
    assert not torch.allclose(ds(x)[0], plain)          # DeepSpeed runs the hook
    with pytest.raises(ValueError, match=r"deepspeed_experts\.1' has hooks"):
        MoE.from_deepspeed(ds)
    handle.remove()

    class ScaledGate(TopKGate):
        def forward(self, input, *args, **kwargs):
            return super().forward(input * 2, *args, **kwargs)

    ds.deepspeed_moe.gate.__class__ = ScaledGate
    with pytest.raises(ValueError, match=r"ds_moe\.deepspeed_moe\.gate class \S*ScaledGate overrides DeepSpeed's "
                                         r"TopKGate\.forward"):
        MoE.from_deepspeed(ds)


# ------------------------------------------------------------------------------ second pass: autocast

def _autocast_layer(k, seed=0):
    """fp32 weights with well-separated router logits (so the bf16-rounded logits decide as fp32 ones)."""
    torch.manual_seed(seed)
    moe = MoE(H, PhiMLP(H, F_), num_experts=E, k=k, capacity_factor=0.75, min_capacity=0,
              top2_2nd_expert_sampling=False, use_rts=False)
    with torch.no_grad():
        for p in moe.expert_parameters():
            p.add_(torch.randn_like(p) * 0.2)
        moe.gate_weight.copy_(torch.randn(E, H) * 0.05)
        moe.gate_weight[:, :E] += torch.eye(E)
    return moe


def _separated_input(S):
    x = torch.randn(S, H)
    x[:, :E] = torch.stack([torch.randperm(E).float() * 1.5 for _ in range(S)])   # logits ~1.5 apart
    return x.bfloat16()


@pytest.mark.parametrize("backend, device", BACKEND_DEVICES)
@pytest.mark.parametrize("k", [1, 2, 3])
def test_autocast_follows_deepspeeds_dtype_rules(k, backend, device):
    """A bf16 input (a preceding linear's output) into fp32 weights under torch.autocast raised a dtype
    TypeError; DeepSpeed runs it.  Its rules, reproduced: router logits F.linear(x.float(), wg.float())
    (autocast runs that in bf16), the experts' linears in bf16, the output bf16, l_aux float32, counts
    int64; gradients reach the fp32 parameters.  Checked against float64 with the bf16-rounded values."""
    S = 19
    moe = _autocast_layer(k).to(device).train()
    x = _separated_input(S).to(device).requires_grad_()
    dy = torch.randn(S, H, device=device)
    with torch.autocast(device, dtype=torch.bfloat16), use_backend(backend):
        y, l_aux, counts = moe(x)
        logits = F.linear(x.float(), moe.gate_weight.float())           # DeepSpeed's gate, under autocast
    (y.float() * dy).sum().backward()
    assert (y.dtype, l_aux.dtype, counts.dtype, logits.dtype) == (torch.bfloat16, torch.float32, torch.int64,
                                                                 torch.bfloat16)
    assert moe.w1.grad.dtype == torch.float32 and moe.gate_weight.grad.dtype == torch.float32
    r = moe_route(logits.detach().float(), k, moe.capacity(S), drop_policy="probs" if k == 3 else None)
    assert torch.equal(counts, r.exp_counts) and not bool(r.keep.all())   # tokens were dropped
    # float64 with the bf16-rounded input and expert weights; the router's path (combine weights) from
    # float64 logits, which differ from the bf16 ones by bf16 rounding only
    bf = [t.detach().bfloat16().double().requires_grad_() for t in (x, moe.w1, moe.b1, moe.w2, moe.b2)]
    wg = moe.gate_weight.detach().double().requires_grad_()
    _, weights, _ = combine_weights_and_aux(F.linear(bf[0], wg), r.indices, r.keep, r.top1_counts, r.exp_counts,
                                            topkgating=k >= 3)
    want = moe_ffn_reference(bf[0], weights.double(), r.sorted_slots, r.expert_offsets, *bf[1:], "gelu_tanh")
    (want * dy.double()).sum().backward()
    assert_close("y", y, want, torch.bfloat16)
    for name, got, ref in zip(("dx", "dw1", "db1", "dw2", "db2", "d gate"),
                              (x, moe.w1, moe.b1, moe.w2, moe.b2, moe.gate_weight), bf + [wg]):
        assert_close(name, got.grad, ref.grad, torch.bfloat16)


def test_autocast_fp32_input_gives_the_autocast_dtype_as_deepspeed():
    moe = _autocast_layer(2)
    x = torch.randn(7, H)
    with torch.autocast("cpu", dtype=torch.bfloat16), use_backend("reference"):
        y, _, _ = moe(x)
    assert y.dtype == torch.bfloat16
    with pytest.raises(TypeError, match="or run under torch.autocast"):
        moe(x.bfloat16())
    with pytest.raises(TypeError, match="hidden_states has dtype torch.bfloat16"):   # torch's autocast query
        moe.to("meta")(torch.randn(5, H, device="meta", dtype=torch.bfloat16))     # raised for meta tensors


@pytest.mark.parametrize("k,kw", [(1, dict(use_rts=False)), (2, dict(top2_2nd_expert_sampling=False)),
                                  (3, dict(drop_tokens=False))], ids=["k1", "k2", "k3"])
def test_real_deepspeed_under_autocast_matches_it(k, kw):
    """DeepSpeed itself under torch.autocast(bfloat16) on a bf16 input: the same dtypes, counts and (to
    bf16 rounding: DeepSpeed's gating arithmetic after the logits partly runs in bf16 there) values."""
    DeepSpeedMoE = deepspeed_moe_cls()
    torch.manual_seed(0)
    ds = DeepSpeedMoE(H, PhiMLP(H, F_), num_experts=E, k=k, min_capacity=0, capacity_factor=0.75, **kw).train()
    with torch.no_grad():
        for p in ds.deepspeed_moe.experts.parameters():
            p.add_(torch.randn_like(p) * 0.2)
        ds.deepspeed_moe.gate.wg.weight.copy_(torch.randn(E, H) * 0.05 + F.pad(torch.eye(E), (0, H - E)))
    ours = MoE.from_deepspeed(ds)
    x = _separated_input(18)
    xd, xo = x.clone().requires_grad_(), x.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y_ds, l_ds, c_ds = ds(xd)
        with use_backend("reference"):
            y, l_aux, counts = ours(xo)
    (y_ds.float().square().sum() + l_ds).backward()
    (y.float().square().sum() + l_aux).backward()
    assert (y.dtype, l_aux.dtype) == (y_ds.dtype, l_ds.dtype) == (torch.bfloat16, torch.float32)
    assert torch.equal(counts, c_ds.to(counts))
    assert_close("y", y, y_ds.double(), torch.bfloat16)
    assert_close("l_aux", l_aux, l_ds.double(), torch.bfloat16)
    assert_close("dx", xo.grad, xd.grad.double(), torch.bfloat16)
    assert_close("d gate", ours.gate_weight.grad, ds.deepspeed_moe.gate.wg.weight.grad.double(), torch.bfloat16)


# ------------------------------------------------------------------------------ second pass: DeepSpeed-free pins

def _layer(k, **kw):
    moe = MoE(H, PhiMLP(H, F_), num_experts=E, k=k, min_capacity=0, **kw)
    with torch.no_grad():
        for p in moe.expert_parameters():
            p.add_(torch.randn_like(p) * 0.3)
    return moe


def test_default_drop_policy_for_k3_is_topkgatings_probs():
    """DeepSpeed's MoE always runs topkgating's default drop_policy='probs' for k >= 3 (pinned by the
    DeepSpeed parity test too, which needs DeepSpeed)."""
    S = 23
    moe = _layer(3, capacity_factor=0.5)
    x = torch.randn(S, H)
    logits = F.linear(x, moe.gate_weight)
    cap = capacity_for(S, E, 0.5, 3, 0)
    probs, position = (moe_route(logits, 3, cap, drop_policy=p) for p in ("probs", "position"))
    assert not torch.equal(probs.keep, position.keep)          # the input tells the two policies apart
    r = moe.route(x)
    assert r.capacity == cap and torch.equal(r.indices, probs.indices) and torch.equal(r.keep, probs.keep)
    with use_backend("reference"):
        y, l_aux, counts = moe(x)
        want = moe_ffn(x, probs, moe.w1, moe.b1, moe.w2, moe.b2)
    assert torch.equal(y, want) and torch.equal(l_aux, probs.l_aux) and torch.equal(counts, probs.exp_counts)


def test_own_gumbel_draw_is_one_uniform_sample_from_torchs_generator():
    """k = 2 samples the second expert with -log(-log(u)), u = torch.rand(S, E) clamped to
    [1e-20, 1 - 1e-7], drawn from torch's generator (what the MoE-LLaVA parity tests feed DeepSpeed's
    gumbel_rsample): one draw of S*E uniforms, so the random stream after the layer is where DeepSpeed's is."""
    S = 40
    moe = _layer(2, capacity_factor=1.0)
    x = torch.randn(S, H)
    torch.manual_seed(123)
    with use_backend("reference"):
        y, _, counts = moe(x)
    after = torch.get_rng_state()
    torch.manual_seed(123)
    u = torch.rand(S, E).clamp(min=1e-20, max=1.0 - 1e-7)
    assert torch.equal(torch.get_rng_state(), after)
    noise = -torch.log(-torch.log(u))
    with use_backend("reference"):
        y_given, _, counts_given = moe(x, second_expert_noise=noise)
        y_other, _, _ = moe(x, second_expert_noise=gumbel(S, E))
    assert torch.equal(y, y_given) and torch.equal(counts, counts_given)
    assert not torch.equal(y, y_other)                          # the noise matters on this input


@pytest.mark.parametrize("k", [1, 2, 3])
def test_train_and_eval_capacity_factors(k):
    """capacity_factor in training, eval_capacity_factor in eval: DeepSpeed's capacity formula
    (capacity_for) with the factor of the current mode, in the routing the forward uses."""
    S, cf, ecf = 29, 0.5, 1.75
    moe = _layer(k, capacity_factor=cf, eval_capacity_factor=ecf, use_rts=False)
    x = torch.randn(S, H)
    logits = F.linear(x, moe.gate_weight)
    for training, factor in ((True, cf), (False, ecf)):
        moe.train(training)
        cap = capacity_for(S, E, factor, k, 0)
        assert moe.capacity(S) == cap
        noise = gumbel(S, E) if k == 2 else None
        r = moe.route(x, second_expert_noise=noise)
        want = moe_route(logits, k, cap, noise, drop_policy="probs" if k == 3 else None)
        assert r.capacity == cap and torch.equal(r.keep, want.keep), (training, k)
        with use_backend("reference"):
            y, _, _ = moe(x, second_expert_noise=noise)
            assert torch.equal(y, moe_ffn(x, want, moe.w1, moe.b1, moe.w2, moe.b2)), (training, k)
    assert capacity_for(S, E, cf, k, 0) != capacity_for(S, E, ecf, k, 0)
