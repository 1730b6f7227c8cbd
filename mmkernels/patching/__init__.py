"""In-place patching of the seed models: ``apply_mmkernels(model)`` (also ``mmkernels.transformers.apply_mmkernels``).

One patcher per model family, each a module here with ``LOOKS_FOR`` (what it recognises, for error
messages), ``count_patched(model)`` (how many of its modules already run mmkernels) and
``plan(model) -> list of swaps`` (zero-argument callables).  ``plan`` validates every
candidate and raises for an option it cannot run; it changes nothing.  ``apply_mmkernels`` plans every
chosen kind first and only then runs the swaps, so a model is patched wholly or not at all:

* :mod:`.xcomposer2` (``plora``): InternLM-XComposer2's ``PLoRA`` linears -> :class:`~mmkernels.PLoRALinear`,
  sharing the same ``Parameter`` objects.
* :mod:`.moe_llava` (``moe``): MoE-LLaVA's DeepSpeed ``MoE`` layers -> :class:`~mmkernels.MoE` (same weights,
  same ``(output, l_aux, exp_counts)``, DeepSpeed's state-dict keys).
* :mod:`.mplug_owl3` (``hyper_attention``): mPLUG-Owl3's hyper attention layers get a forward running
  :func:`~mmkernels.visual_kv` and :func:`~mmkernels.hyper_attention`.

``model.state_dict()`` keeps its keys and shapes, so checkpoints move both ways between the patched and
the original model.  Patch before building the optimizer (see :mod:`._common`).
"""
from __future__ import annotations

import importlib

from torch import nn

from ._common import RetiredParameterError

__all__ = ["apply_mmkernels", "RetiredParameterError", "PATCHERS"]

# kind (the keyword of apply_mmkernels) -> module of this package that patches it
PATCHERS = {"plora": "xcomposer2", "moe": "moe_llava", "hyper_attention": "mplug_owl3"}


def apply_mmkernels(model: nn.Module, *, plora: bool = True, moe: bool = True, hyper_attention: bool = True,
                    strict: bool = True) -> dict:
    """Swap mmkernels' operators into ``model`` in place; returns ``{kind: number replaced}``.

    ``plora`` / ``moe`` / ``hyper_attention`` choose the kinds.  A model in which the chosen kinds find
    nothing to patch raises ``ValueError`` naming what was looked for, unless ``strict=False``; a model
    whose modules of those kinds are all patched already is not an error (applying twice patches nothing
    twice and returns zeros).  An option
    a patcher cannot run (e.g. DeepSpeed's noisy gating) raises here, before anything is changed.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    chosen = {"plora": plora, "moe": moe, "hyper_attention": hyper_attention, "strict": strict}
    for name, value in chosen.items():
        if not isinstance(value, bool):
            raise TypeError(f"{name} must be a bool, got {type(value).__name__}")
    kinds = [kind for kind in PATCHERS if chosen[kind]]
    if not kinds:
        raise ValueError("apply_mmkernels: plora, moe and hyper_attention are all False; nothing to patch")
    patchers = {kind: importlib.import_module(f".{PATCHERS[kind]}", __name__) for kind in kinds}
    plans = {kind: list(patcher.plan(model)) for kind, patcher in patchers.items()}   # may raise: nothing changed
    for swaps in plans.values():
        for swap in swaps:
            swap()
    counts = {kind: len(swaps) for kind, swaps in plans.items()}
    if strict and not any(counts.values()) and not any(p.count_patched(model) for p in patchers.values()):
        looked = "; ".join(f"{kind}: {patcher.LOOKS_FOR}" for kind, patcher in patchers.items())
        raise ValueError(f"apply_mmkernels found nothing to patch in {type(model).__name__}. It looked for "
                         f"{looked}. Pass strict=False to allow a model without any.")
    return counts
