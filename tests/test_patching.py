"""The patching core shared by the three seed-model patchers (``mmkernels.patching``).

What each patcher recognises and swaps is tested in ``test_patch_<model>.py``; here: the arguments of
``apply_mmkernels``, plan-then-swap (a model is patched wholly or not at all), the error for a model
with nothing to patch, the guard on parameters a patch retired, and ``MoE(state_dict_layout=...)``.
"""
import sys
import types

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import mmkernels
from mmkernels import patching
from mmkernels.patching._common import RetiredParameterError, retire_parameters, set_child


def _fake_patcher(monkeypatch, kind, looks_for, plan):
    name = f"fake_{kind}"
    module = types.ModuleType(f"mmkernels.patching.{name}")
    module.LOOKS_FOR, module.plan = looks_for, plan
    monkeypatch.setitem(sys.modules, module.__name__, module)
    monkeypatch.setitem(patching.PATCHERS, kind, name)


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(plora=1), TypeError, "plora must be a bool"),
    (dict(strict="no"), TypeError, "strict must be a bool"),
    (dict(plora=False, moe=False, hyper_attention=False), ValueError, "all False"),
])
def test_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        patching.apply_mmkernels(nn.Linear(2, 2), **kwargs)
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        patching.apply_mmkernels(object())


def test_nothing_to_patch_names_what_it_looked_for():
    model = nn.Sequential(nn.Linear(4, 4), nn.GELU())
    with pytest.raises(ValueError) as info:
        patching.apply_mmkernels(model)
    for kind in patching.PATCHERS:
        assert f"{kind}: " in str(info.value)
    assert "Sequential" in str(info.value) and "strict=False" in str(info.value)
    assert patching.apply_mmkernels(model, strict=False) == {kind: 0 for kind in patching.PATCHERS}
    import mmkernels.transformers as mkt   # the documented public name
    assert mkt.apply_mmkernels is patching.apply_mmkernels


def test_plans_all_kinds_before_any_swap(monkeypatch):
    model = nn.Sequential(nn.Linear(4, 4))
    swapped = []

    def plan_ok(m):
        return [lambda: swapped.append("ok")]

    def plan_bad(m):
        raise NotImplementedError("fake option 'x' of layer 0")

    _fake_patcher(monkeypatch, "plora", "A", plan_ok)
    _fake_patcher(monkeypatch, "moe", "B", plan_bad)
    with pytest.raises(NotImplementedError, match="fake option"):
        patching.apply_mmkernels(model, hyper_attention=False)
    assert swapped == []                       # the failing plan left the other kind unswapped
    assert patching.apply_mmkernels(model, moe=False, hyper_attention=False) == {"plora": 1}
    assert swapped == ["ok"]


def test_set_child():
    model = nn.Sequential(nn.Sequential(nn.Linear(2, 2)))
    set_child(model, "0.0", nn.Identity())
    assert isinstance(model[0][0], nn.Identity)
    set_child(model, "0", nn.ReLU())
    assert isinstance(model[0], nn.ReLU)


def test_optimizer_holding_a_retired_parameter_fails_at_step():
    old, kept = nn.Linear(3, 3), nn.Linear(3, 3)
    early = torch.optim.AdamW([*old.parameters(), *kept.parameters()])
    retire_parameters(old.named_parameters(prefix="layers.1.mlp"), "layers.1.mlp (mmkernels.MoE)")
    with pytest.raises(RetiredParameterError, match=r"AdamW holds 'layers.1.mlp.weight' \(3, 3\).*before building"):
        early.step()
    late = torch.optim.AdamW(kept.parameters())   # built after the patch: unaffected
    kept(torch.randn(2, 3)).sum().backward()
    late.step()


class _PhiMLP(nn.Module):
    def __init__(self, h, f):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(h, f), nn.Linear(f, h)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


def test_moe_state_dict_layouts(tmp_path):
    safetensors = pytest.importorskip("safetensors.torch")
    ds = mmkernels.MoE(8, _PhiMLP(8, 12), num_experts=3, k=2, state_dict_layout="deepspeed")
    packed = mmkernels.MoE(8, _PhiMLP(8, 12), num_experts=3, k=2)
    sd = ds.state_dict()
    assert sorted(sd) == sorted(ds.deepspeed_state_dict())
    assert sd["deepspeed_moe.experts.deepspeed_experts.2.fc1.weight"].shape == (12, 8)
    safetensors.save_file(sd, tmp_path / "moe.safetensors")   # no shared storage between the experts
    packed.load_state_dict(safetensors.load_file(tmp_path / "moe.safetensors"))
    for name in ("w1", "b1", "w2", "b2", "gate_weight"):
        assert torch.equal(getattr(packed, name), getattr(ds, name)), name
    assert sorted(packed.state_dict()) == ["b1", "b2", "gate_weight", "w1", "w2"]
    ds.load_state_dict(packed.state_dict())                  # either layout loads into either
    kept = ds.state_dict(keep_vars=True)
    assert kept["deepspeed_moe.experts.deepspeed_experts.1.fc2.weight"].grad_fn is not None
    with pytest.raises(ValueError, match="state_dict_layout must be one of"):
        mmkernels.MoE(8, _PhiMLP(8, 12), num_experts=3, state_dict_layout="megatron")


def test_applying_twice_is_not_an_error():
    model = nn.Sequential(mmkernels.MoE(8, _PhiMLP(8, 12), num_experts=2, k=1))
    assert patching.apply_mmkernels(model) == {kind: 0 for kind in patching.PATCHERS}   # already mmkernels
