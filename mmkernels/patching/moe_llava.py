"""MoE-LLaVA: every DeepSpeed ``MoE`` layer becomes :class:`mmkernels.MoE` (the ``moe`` kind of
:func:`~mmkernels.patching.apply_mmkernels`).

MoE-LLaVA's ``initialize_moe_modules`` puts a ``deepspeed.moe.layer.MoE(hidden, expert=<dense MLP>, ...)``
in place of the MLP of every other decoder layer, and the decoder layer unpacks its ``(output, l_aux,
exp_counts)``.  The replacement is built by :meth:`mmkernels.MoE.from_deepspeed` with
``state_dict_layout="deepspeed"``: same configuration, same weights, the same 3-tuple, and
``state_dict()`` writes DeepSpeed's own keys (``<layer>.deepspeed_moe.gate.wg.weight``,
``<layer>.deepspeed_moe.experts.deepspeed_experts.{i}.<linear>.{weight,bias}``), so checkpoints move
both ways between the patched and the original model.  The decoder layers are not touched.

What carries over from each DeepSpeed layer: train/eval mode (its gate's, which is what DeepSpeed's
capacity factor reads), device and dtype (the router ``Parameter`` itself is reused; the packed expert
weights take the experts' dtype and device), ``requires_grad`` (MoE-LLaVA's stage III freezes all but
the experts and the router), and DeepSpeed's ``allreduce`` / ``group_name`` marks on the expert
parameters (so ``split_params_into_different_moe_groups_for_optimizer`` still sees them as expert
parameters).  The packed ``[E, ...]`` expert weights cannot share DeepSpeed's per-expert ``Parameter``
objects: those are retired (:func:`._common.retire_parameters`), so an optimizer built before patching
raises at its next ``step()``.  Patch first, then build the optimizer.

Refused at plan time, before anything changes, with the layer's qualified name: every option
``mmkernels.MoE`` would compute differently (``noisy_gate_policy='Jitter'``, ``use_residual``, expert
tensor parallelism, ... as ``from_deepspeed`` names them), ``ep_size > 1`` (the state-dict keys would
change on ranks > 0; ``MoE.from_deepspeed`` converts such a layer), an expert whose forward
is not a supported FFN form, ZeRO-3 partitioned parameters, hooks on the layer or inside it (they would
be dropped), a ``forward`` overridden on the layer or its DeepSpeed parts, and experts frozen unevenly.

DeepSpeed itself is not imported: its layers are recognised by class (``deepspeed.moe.layer.MoE`` and
subclasses) and structure.
"""
from __future__ import annotations

from typing import Callable, Dict, List

from torch import nn

from .._validation import check_no_hooks
from ._common import find_modules, retire_parameters, set_child

__all__ = ["LOOKS_FOR", "plan", "is_deepspeed_moe"]

LOOKS_FOR = ("DeepSpeed MoE layers (deepspeed.moe.layer.MoE with deepspeed_moe.gate.wg and "
             "deepspeed_moe.experts.deepspeed_experts, as MoE-LLaVA builds them)")

_DS_PARAM_MARKS = ("allreduce", "group_name")   # set by deepspeed.moe.experts.Experts on every expert parameter


def is_deepspeed_moe(module: nn.Module) -> bool:
    """Whether ``module`` is a ``deepspeed.moe.layer.MoE`` (or a subclass), without importing DeepSpeed."""
    from ..ops.moe.module import DEEPSPEED_PARTS, deepspeed_class
    return deepspeed_class(type(module), DEEPSPEED_PARTS[""]) is not None


def _check_forward(qualname: str, module: nn.Module, ident, what: str) -> None:
    """``module`` (DeepSpeed's ``ident`` class or a subclass) must run DeepSpeed's own forward."""
    from ..ops.moe.module import deepspeed_class, deepspeed_forward_problem
    if deepspeed_class(type(module), ident) is None:
        raise ValueError(f"cannot patch DeepSpeed MoE layer {qualname!r}: its {what} is a "
                         f"{type(module).__module__}.{type(module).__qualname__}, not DeepSpeed's {ident[1]}")
    problem = deepspeed_forward_problem(module, ident)
    if problem:
        raise ValueError(f"cannot patch DeepSpeed MoE layer {qualname!r}: its {what} {problem}; mmkernels.MoE "
                         "reproduces DeepSpeed's own forward only")


def _check_layer(qualname: str, ds: nn.Module) -> None:
    """What ``from_deepspeed`` cannot see: the layer must compute exactly DeepSpeed's forward."""
    if qualname == "":
        raise ValueError("the model itself is a DeepSpeed MoE layer; apply_mmkernels replaces layers inside a "
                         "model: use mmkernels.MoE.from_deepspeed(layer, state_dict_layout='deepspeed') instead")
    from ..ops.moe.module import DEEPSPEED_PARTS
    _check_forward(qualname, ds, DEEPSPEED_PARTS[""], "layer")
    ep_size = getattr(ds, "ep_size", 1)
    if ep_size != 1:
        # mmkernels.MoE(ep_size > 1) names a rank's experts by global id (DeepSpeed's EP checkpoint files);
        # DeepSpeed's module names them 0..L-1, so the model's state-dict keys would change on ranks > 0
        raise NotImplementedError(
            f"cannot patch DeepSpeed MoE layer {qualname!r}: ep_size={ep_size} (expert parallelism) is not patched "
            "in place, because the patched layer's state dict would name each rank's experts by global id where "
            "DeepSpeed's names them 0..L-1; build the layer with mmkernels.MoE.from_deepspeed(layer) instead "
            "(MoE-LLaVA uses ep_size=1)")
    for path, ident in DEEPSPEED_PARTS.items():
        if not path:
            continue
        try:
            part = ds.get_submodule(path)
        except AttributeError:
            raise ValueError(f"cannot patch DeepSpeed MoE layer {qualname!r}: it has no {path} (not the structure "
                             "deepspeed.moe.layer.MoE builds)") from None
        _check_forward(qualname, part, ident, path)
    try:
        check_no_hooks(qualname, ds, "the replacement")
    except ValueError as e:
        raise ValueError(f"cannot patch DeepSpeed MoE layer {qualname!r}: {e}") from None
    for name, p in ds.named_parameters():
        if hasattr(p, "ds_id") or hasattr(p, "ds_tensor"):
            raise ValueError(f"cannot patch DeepSpeed MoE layer {qualname!r}: parameter {name!r} is partitioned by "
                             "DeepSpeed ZeRO-3 (its local tensor is not the weight); patch before "
                             "deepspeed.initialize / deepspeed.zero.Init")


def _expert_param_state(qualname: str, ds: nn.Module) -> Dict[str, tuple]:
    """linear parameter name (e.g. ``fc1.weight``) -> (requires_grad, DeepSpeed marks), one per name:
    a packed parameter holds that name for every expert, so the experts must agree."""
    state: Dict[str, tuple] = {}
    for i, expert in enumerate(ds.deepspeed_moe.experts.deepspeed_experts):
        for name, p in expert.named_parameters():
            marks = tuple((m, getattr(p, m)) for m in _DS_PARAM_MARKS if hasattr(p, m))
            got = (p.requires_grad, marks)
            if state.setdefault(name, got) != got:
                raise ValueError(
                    f"cannot patch DeepSpeed MoE layer {qualname!r}: expert {i}'s {name} has requires_grad="
                    f"{p.requires_grad} and marks {dict(marks)}, expert 0's has requires_grad={state[name][0]} and "
                    f"marks {dict(state[name][1])}; mmkernels.MoE packs {name} of all experts into one Parameter")
    return state


def _build(qualname: str, ds: nn.Module, param_state: Dict[str, tuple]) -> nn.Module:
    """``mmkernels.MoE.from_deepspeed(ds)``, re-raising with the layer's name, with ``ds``'s mode, router
    Parameter, requires_grad and DeepSpeed marks; torch's random generators are left as they were."""
    from ..ops.moe.module import MoE

    gate = ds.deepspeed_moe.gate
    wg = gate.wg.weight
    try:   # from_deepspeed leaves torch's random generators as they were
        new = MoE.from_deepspeed(ds, state_dict_layout="deepspeed")
    except (NotImplementedError, ValueError, TypeError) as e:
        raise type(e)(f"cannot patch DeepSpeed MoE layer {qualname!r}: {e}") from e
    if new.gate_weight.shape != wg.shape:   # from_deepspeed built the router from wg's shape: cannot differ
        raise AssertionError(f"{qualname}: router shape {tuple(new.gate_weight.shape)} != {tuple(wg.shape)}")
    new.gate_weight = wg   # the router keeps its Parameter (dtype, device, optimizer state, requires_grad)
    for pname, (packed, sources) in _packed_sources(new).items():
        states = {param_state[src] for src in sources}
        if len(states) != 1:   # e.g. a frozen gate_proj next to a trained up_proj: one packed w1
            raise ValueError(f"cannot patch DeepSpeed MoE layer {qualname!r}: the expert parameters "
                             f"{sorted(sources)} differ in requires_grad or DeepSpeed marks "
                             f"({sorted(map(str, states))}); mmkernels.MoE packs them into one Parameter {pname}")
        (requires_grad, marks), = states
        packed.requires_grad_(requires_grad)
        for mark, value in marks:
            setattr(packed, mark, value)
    new.train(gate.training)   # DeepSpeed's capacity factor follows the gate's mode
    return new


def _packed_sources(new: nn.Module) -> Dict[str, tuple]:
    """packed parameter name -> (it, the expert linear parameter names packed into it)."""
    out = {}
    for key, (pname, _, _) in new._deepspeed_expert_keys().items():
        local = key.split(".", 4)[4]   # deepspeed_moe.experts.deepspeed_experts.{i}.<linear>.<kind>
        out.setdefault(pname, (getattr(new, pname), set()))[1].add(local)
    return out


class _Swap:
    """One layer's swap: builds the replacement again from the (unchanged) DeepSpeed layer, so only one
    layer's copy exists at a time, installs it under every name the layer has, retires the old expert
    parameters, and drops its reference to the old layer."""

    def __init__(self, model: nn.Module, names: List[str], ds: nn.Module, param_state: Dict[str, tuple]):
        self._model, self._names, self._ds, self._param_state = model, names, ds, param_state

    def __call__(self) -> None:
        if self._ds is None:
            raise RuntimeError(f"the swap of {self._names[0]!r} already ran")
        ds, qualname = self._ds, self._names[0]
        new = _build(qualname, ds, self._param_state)
        for name in self._names:
            set_child(self._model, name, new)
        experts = ds.deepspeed_moe.experts
        retire_parameters(((f"{qualname}.deepspeed_moe.experts.{n}", p) for n, p in experts.named_parameters()),
                          f"the packed weights of mmkernels.MoE {qualname!r}")
        self._model = self._ds = None

    def __repr__(self) -> str:
        return f"<swap DeepSpeed MoE {self._names[0]!r} -> mmkernels.MoE>"


def count_patched(model: nn.Module) -> int:
    """How many modules of ``model`` already are ``mmkernels.MoE`` layers."""
    from ..ops.moe.module import MoE
    return sum(isinstance(m, MoE) for m in model.modules())


def plan(model: nn.Module) -> List[Callable[[], None]]:
    """One swap per DeepSpeed ``MoE`` layer of ``model``; raises (changing nothing) for a layer that
    ``mmkernels.MoE`` cannot reproduce, naming the layer and the reason."""
    swaps: List[Callable[[], None]] = []
    # a layer reachable under two names is one swap; a DeepSpeed MoE inside another goes with it
    for ds, names in find_modules(model, is_deepspeed_moe, outermost=True):
        qualname = names[0]
        _check_layer(qualname, ds)
        param_state = _expert_param_state(qualname, ds)
        _build(qualname, ds, param_state)   # validation only: the swap builds it again (peak memory: one layer)
        swaps.append(_Swap(model, names, ds, param_state))
    return swaps
