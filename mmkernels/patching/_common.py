"""What the in-place patchers share: finding the modules to patch, listing hooks a patch would drop,
replacing a child module, and guarding parameters a patch retired.

A patch that can keep the model's own ``Parameter`` objects does (PLoRA, hyper attention).  One that
cannot (a DeepSpeed ``MoE``'s per-expert linears become packed ``[E, ...]`` tensors) copies the values
and *retires* the old parameters: any optimizer that still holds one raises at its next ``step()``,
naming the parameter, instead of silently stepping a tensor the model no longer uses.  So: patch first,
then build the optimizer.
"""
from __future__ import annotations

from typing import Callable, Iterable, List, Tuple

from torch.optim.optimizer import register_optimizer_step_pre_hook
from torch import nn
from torch.utils.weak import WeakIdKeyDictionary

from .._validation import RUN_HOOKS, STATE_DICT_HOOKS, module_hooks as hooks  # noqa: F401  (shared by the patchers)

_RETIRED: "WeakIdKeyDictionary" = WeakIdKeyDictionary()   # retired Parameter -> "name (what replaced it)"
_HOOK = None


class RetiredParameterError(RuntimeError):
    """An optimizer holds a parameter that :func:`mmkernels.transformers.apply_mmkernels` replaced."""


def _check_optimizer(optimizer, args, kwargs) -> None:
    for group in optimizer.param_groups:
        for p in group["params"]:
            where = _RETIRED.get(p)
            if where is not None:
                raise RetiredParameterError(
                    f"{type(optimizer).__name__} holds {where}, a parameter that apply_mmkernels replaced; the "
                    "model no longer uses it, so this step would not train the patched layer. Patch the model "
                    "before building the optimizer (or rebuild the optimizer from model.parameters()).")


def retire_parameters(named: Iterable[Tuple[str, nn.Parameter]], replaced_by: str) -> None:
    """Record parameters whose values a patch copied into ``replaced_by``; see the module docstring."""
    global _HOOK
    for name, p in named:
        _RETIRED[p] = f"{name!r} {tuple(p.shape)} (now part of {replaced_by})"
    if _HOOK is None:
        _HOOK = register_optimizer_step_pre_hook(_check_optimizer)


def set_child(model: nn.Module, qualified_name: str, new: nn.Module) -> None:
    """Replace the submodule ``qualified_name`` (as ``named_modules`` gives it) by ``new``."""
    parent_name, _, child = qualified_name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def find_modules(model: nn.Module, predicate: Callable[[nn.Module], bool],
                 outermost: bool = False) -> List[Tuple[nn.Module, List[str]]]:
    """``(module, its qualified names)`` for every module of ``model`` matching ``predicate``, once each,
    in ``named_modules`` order: a module registered under several names is one entry with all of them.
    ``outermost``: skip matches inside an earlier match (they go with it)."""
    found: dict = {}   # id(module) -> (module, names)
    for name, module in model.named_modules(remove_duplicate=False):
        if not predicate(module):
            continue
        if outermost and any(name.startswith(n + ".") for _, names in found.values() for n in names):
            continue
        found.setdefault(id(module), (module, []))[1].append(name)
    return list(found.values())
