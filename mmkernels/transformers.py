"""A transformers experts backend: ``import mmkernels.transformers`` registers ``"mmkernels"``.

transformers 5 routes the expert computation of its MoE models (Qwen2-MoE, Qwen3-MoE, Qwen3-VL-MoE,
Mixtral, OLMoE, DeepSeek-V2/V3, ...) through ``ExpertsInterface`` (``transformers.integrations.moe``).
After this module is imported, any of::

    AutoModelForCausalLM.from_pretrained(name, experts_implementation="mmkernels")
    AutoModelForCausalLM.from_config(config, experts_implementation="mmkernels")
    model.set_experts_implementation("mmkernels")

runs the experts with :func:`mmkernels.moe_route_topk` (the router's own top-k, dropless) and
:func:`mmkernels.moe_ffn` (gather -> grouped GEMM with the activation fused -> grouped GEMM ->
un-permute and weighted combine; no host synchronisation on the Triton backend).

What runs fused (the expert module's ``act_fn`` is recognised by its exact class, never guessed):

* gated experts (``gate_up_proj [E, 2F, H]``, gate rows first, ``act_fn(gate) * up``): SiLU
  (``swiglu``), GELU tanh (``geglu_tanh``), GELU exact (``geglu``), ReLU (``reglu``);
* experts without a gate (``up_proj [E, F, H]``, ``act_fn(up)``): SiLU, GELU tanh, GELU exact;
* transposed weights (``is_transposed``: ``[E, H, 2F]`` / ``[E, F, H]``, read through strides, no
  copy), biases (``gate_up_proj_bias`` / ``down_proj_bias``), ``top_k_weights`` as ``[T, k]`` or a
  dense ``[T, E]``.

What falls back to transformers' own ``grouped_mm`` backend, with one :class:`MMKernelsFallbackWarning`
per reason naming it: any other activation (or one that cannot be identified: a plain function, a
subclass, an instance with its own ``forward`` or with hooks), a custom ``_apply_gate`` (e.g. GPT-OSS's
clamped SwiGLU), the interleaved ``[gate0, up0, ...]`` layout (``is_concatenated=False``), a
post-expert norm, and expert parallelism.

``apply_mmkernels(model, plora=True, moe=True, hyper_attention=True, strict=True)`` (defined in
:mod:`mmkernels.patching`) patches the seed models in place: InternLM-XComposer2's PLoRA linears,
MoE-LLaVA's DeepSpeed MoE layers and mPLUG-Owl3's hyper attention layers.
"""
from __future__ import annotations

import contextlib
import warnings
from typing import Optional

import torch

try:
    import transformers as _hf
    from transformers.integrations import moe as _hf_moe
    from transformers.integrations.moe import ExpertsInterface as _ExpertsInterface
except ImportError as exc:  # pragma: no cover - exercised in a subprocess by the tests
    raise ImportError(
        "mmkernels.transformers needs transformers >= 5 (its ExpertsInterface): "
        "pip install 'transformers>=5,<6' (or, from the mmkernels source tree, pip install '.[transformers]')"
    ) from exc

from ._utils import autocast_dtype
from ._validation import RUN_HOOKS, module_hooks
from .ops.moe.function import moe_ffn, moe_route_topk
from .patching import RetiredParameterError, apply_mmkernels
from .ops.moe.reference import PLAIN_ACTIVATIONS

__all__ = ["BACKEND_NAME", "MMKernelsFallbackWarning", "experts_forward", "expert_activation", "apply_mmkernels",
           "RetiredParameterError"]

BACKEND_NAME = "mmkernels"


class MMKernelsFallbackWarning(UserWarning):
    """The ``"mmkernels"`` experts backend met an expert module it cannot run and used transformers'
    ``grouped_mm`` backend (or the module's own eager forward) instead."""


# ----------------------------------------------------------------------------- activation detection

def _exact_types() -> dict:
    """Activation module classes whose math is known exactly -> elementwise activation name."""
    from transformers import activations as act
    table = {torch.nn.SiLU: "silu", torch.nn.ReLU: "relu"}
    for cls_name, name in (("SiLUActivation", "silu"), ("GELUTanh", "gelu_tanh"), ("PytorchGELUTanh", "gelu_tanh"),
                           ("NewGELUActivation", "gelu_tanh"), ("FastGELUActivation", "gelu_tanh"),
                           ("GELUActivation", "gelu")):
        cls = getattr(act, cls_name, None)
        if isinstance(cls, type):
            table[cls] = name
    return table


_ACT_TYPES = _exact_types()
_ACT_FUNCTIONS = {torch.nn.functional.silu: "silu", torch.nn.functional.relu: "relu", torch.relu: "relu"}


def expert_activation(act_fn) -> tuple[Optional[str], str]:
    """``(name, description)``: the elementwise activation ``"silu"``, ``"gelu_tanh"``, ``"gelu"`` or
    ``"relu"`` that ``act_fn`` computes, or ``(None, why)`` when it is not one of them or cannot be
    told for sure (matched by exact class, so a subclass or an instance with its own ``forward`` or
    hooks is not assumed to be anything)."""
    if act_fn is None:
        return None, "no act_fn"
    if isinstance(act_fn, torch.nn.Module):
        desc = f"act_fn {type(act_fn).__module__}.{type(act_fn).__qualname__}"
        if "forward" in vars(act_fn):
            return None, f"{desc} with an instance-level forward"
        found = module_hooks(act_fn, RUN_HOOKS)   # the fused kernels never call act_fn: its hooks would not run
        if found:
            return None, f"{desc} with hooks ({', '.join(found)})"
        if type(act_fn) is torch.nn.GELU:
            approx = getattr(act_fn, "approximate", None)
            return {"none": "gelu", "tanh": "gelu_tanh"}.get(approx), f"{desc}(approximate={approx!r})"
        return _ACT_TYPES.get(type(act_fn)), desc
    try:
        return _ACT_FUNCTIONS.get(act_fn), f"act_fn {act_fn!r}"
    except TypeError:  # unhashable callable
        return None, f"act_fn {act_fn!r}"


_GATED = {"silu": "swiglu", "gelu_tanh": "geglu_tanh", "gelu": "geglu", "relu": "reglu"}


def _plan(module) -> tuple[Optional[str], str]:
    """``(moe_ffn activation, "")`` for an expert module this backend runs, else ``(None, reason)``."""
    cls = type(module).__qualname__
    if getattr(module, "_is_expert_parallel", False):
        return None, f"expert parallelism ({cls}._is_expert_parallel)"
    if getattr(module, "has_post_expert_norm", False):
        return None, f"a post-expert norm ({cls}.has_post_expert_norm)"
    has_gate = getattr(module, "has_gate", True)
    if has_gate:
        if not getattr(module, "is_concatenated", True):
            return None, f"the interleaved gate/up layout ({cls}.is_concatenated=False)"
        apply_gate = getattr(type(module), "_apply_gate", None)
        default_gate = getattr(_hf_moe, "_default_apply_gate", None)
        if apply_gate is not None and apply_gate is not default_gate:
            return None, f"a custom gate ({cls}._apply_gate)"
        if "_apply_gate" in vars(module):
            return None, f"a custom gate (instance-level {cls}._apply_gate)"
    name, desc = expert_activation(getattr(module, "act_fn", None))
    if name is None:
        return None, f"the activation ({desc} of {cls}; fused: SiLU, GELU tanh, GELU exact, ReLU)"
    if not has_gate and name not in PLAIN_ACTIVATIONS:
        return None, f"the activation ({desc} of {cls} without a gate; fused there: SiLU, GELU tanh, GELU exact)"
    return (_GATED[name] if has_gate else name), ""


# ----------------------------------------------------------------------------- the backend

_warned: set = set()


def _fallback(module, reason, hidden_states, top_k_index, top_k_weights):
    if reason not in _warned:
        _warned.add(reason)
        warnings.warn(f"mmkernels experts backend: {reason} is not supported; running transformers' grouped_mm "
                      "experts backend instead", MMKernelsFallbackWarning, stacklevel=3)
    grouped = _ExpertsInterface._global_mapping.get("grouped_mm")
    if grouped is not None:
        return grouped(module, hidden_states, top_k_index, top_k_weights)
    eager = getattr(type(module).forward, "__wrapped__", None)  # use_experts_implementation wraps it
    if eager is None:
        raise RuntimeError(f"mmkernels experts backend: {reason} is not supported, and neither transformers' "
                           f"grouped_mm backend nor {type(module).__qualname__}'s eager forward was found")
    return eager(module, hidden_states, top_k_index, top_k_weights)


def _as_ehk(weight: torch.Tensor, transposed: bool) -> torch.Tensor:
    """An expert weight as ``[E, out, in]`` (a strided view when stored ``[E, in, out]``)."""
    return weight.transpose(1, 2) if transposed else weight


def experts_forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                    top_k_weights: torch.Tensor) -> torch.Tensor:
    """The ``"mmkernels"`` entry of transformers' ``ExpertsInterface``: ``[T, H] -> [T, H]``.

    ``self`` is a transformers experts module (``@use_experts_implementation``); ``top_k_index`` is
    ``[T, k]``, ``top_k_weights`` ``[T, k]`` or ``[T, E]``.  Runs :func:`moe_route_topk` +
    :func:`moe_ffn` on the active mmkernels backend, or falls back (see the module docstring)."""
    activation, reason = _plan(self)
    if activation is None:
        return _fallback(self, reason, hidden_states, top_k_index, top_k_weights)
    # transformers >= 5.x names the layout flags is_transposed / has_bias (set by the decorator);
    # earlier 5.x releases read experts_are_transposed and the presence of the bias attributes
    transposed = bool(getattr(self, "is_transposed", False) or getattr(self, "experts_are_transposed", False))
    has_gate = getattr(self, "has_gate", True)
    w1 = _as_ehk(self.gate_up_proj if has_gate else self.up_proj, transposed)
    w2 = _as_ehk(self.down_proj, transposed)
    b1 = b2 = None
    if getattr(self, "has_bias", True):
        b1 = getattr(self, "gate_up_proj_bias" if has_gate else "up_proj_bias", None)
        b2 = getattr(self, "down_proj_bias", None)
    E = w1.shape[0]
    if top_k_weights.dim() == 2 and top_k_weights.shape[1] != top_k_index.shape[1] \
            and top_k_weights.shape[1] == E:
        top_k_weights = top_k_weights.gather(1, top_k_index.long())   # dense [T, E] router weights
    # the indices come from torch.topk over the E router logits: in range by construction, so no host
    # check (check_metadata=False drops an out-of-range choice, as grouped_mm does, never reads past E)
    routing = moe_route_topk(top_k_index, top_k_weights, E, check_metadata=False)
    # as grouped_mm, which autocast does not cast: the experts compute in their weights' dtype (under
    # autocast the input may be fp32 with bf16 weights, or the weights fp32), the result in the input's
    x = hidden_states.to(w1.dtype)
    off = autocast_dtype(x.device) is None
    with contextlib.nullcontext() if off else torch.autocast(x.device.type, enabled=False):
        y = moe_ffn(x, routing, w1, b1, w2, b2, activation)
    return y.to(hidden_states.dtype)


def register() -> None:
    """Register :func:`experts_forward` as ``"mmkernels"`` (idempotent; done on import)."""
    _ExpertsInterface.register(BACKEND_NAME, experts_forward)


register()
