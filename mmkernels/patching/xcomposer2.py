"""InternLM-XComposer2: every ``PLoRA`` linear becomes a :class:`~mmkernels.PLoRALinear` (``plora=True``).

XComposer2's ``PLoRA`` (``build_mlp.py``) is an ``nn.Linear`` with two bias-free ``nn.Linear`` children
``Plora_A`` (``in -> r``) and ``Plora_B`` (``r -> out``), a float ``lora_scaling`` and a ``lora_dropout``
(``nn.Dropout(p)``, or ``lambda x: x`` when ``p == 0``); its ``forward(x, im_mask=None)`` adds
``lora_scaling * Plora_B(Plora_A(lora_dropout(x[im_mask])))`` to the visual rows.  It is used for the five
projections of every InternLM2 decoder layer (``attention.wqkv``, ``attention.wo``, ``feed_forward.w1/w2/w3``),
and the model already threads ``im_mask`` through its layers into each call.

The replacement keeps the module's *own* ``Parameter`` objects (``weight``, ``bias``) and its ``Plora_A`` /
``Plora_B`` child modules, so ``state_dict()`` keys and shapes are unchanged and an optimizer built before
patching still trains the model.  It accepts the same call ``(x, im_mask=None)``.

Differences from the original, all deliberate:

* Dropout.  The original draws ``nn.Dropout``'s mask from torch's generator; the fused op draws its own
  (Philox, keyed by one seed per call).  Same distribution (keep with probability ``1 - p``, scale by
  ``1 / (1 - p)``, visual rows only, an independent mask per projection), different masks: patched and
  unpatched agree exactly only with ``p == 0`` or in ``eval()`` mode.
* No visual row.  The original runs the LoRA on the first token(s) and multiplies by 0 (to keep
  ``Plora_A``/``Plora_B`` in the autograd graph); the op gives the same zero gradients without touching
  any row, so a non-finite LoRA output on the first token no longer turns the output into NaN.
* No host synchronisation (the original's ``torch.sum(im_mask) > 0``).

Anything the replacement could not run exactly is refused by :func:`plan`, naming the module and the
option, before anything is changed: a bias on ``Plora_A``/``Plora_B``, a ``lora_dropout`` that is neither
``nn.Dropout`` nor the identity, hooks (the patched forward does not call the children, and a replaced
module loses its own hooks), an instance-level ``forward``, parametrizations, extra parameters, buffers
or children, mismatched shapes, dtypes or devices, and a class whose forward does not compute
XComposer2's PLoRA (verified on a small float64 probe, so a look-alike with a forward of its own is
refused by name).
"""
from __future__ import annotations

from typing import Callable, List

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from .._validation import check_float
from ..ops.plora.module import PLoRALinear
from ..ops.plora.reference import plora_linear_reference
from ._common import RUN_HOOKS, find_modules, hooks, set_child

LOOKS_FOR = ("InternLM-XComposer2 PLoRA linears (nn.Linear with Plora_A / Plora_B linear children, "
             "lora_scaling and lora_dropout)")

# what a PLoRA module may hold; anything else would be lost (or ignored) by the replacement
_CHILDREN = {"Plora_A", "Plora_B", "lora_dropout"}

# The probe of what a candidate's forward computes: small float64 CPU tensors in place of its
# parameters (its own may be large, low-precision, sharded or on another device), a batch of 2 x 3
# rows with visual rows in both samples, none at all, and no mask.
_PROBE_SEED = 20240131
_PROBE_SHAPE = (2, 3, 5, 4, 3)   # B, L, in, out, r


def _is_candidate(module: nn.Module) -> bool:
    """Looks like a PLoRA linear (the checks of :func:`_validate` then decide whether it can be run)."""
    return (isinstance(module, nn.Linear) and not isinstance(module, PLoRALinear)
            and (hasattr(module, "Plora_A") or hasattr(module, "Plora_B")))


def _dropout_p(name: str, dropout) -> float:
    """The dropout probability of ``lora_dropout``: ``nn.Dropout`` or the identity, never guessed."""
    if type(dropout) is nn.Dropout:
        return float(dropout.p)
    if type(dropout) is nn.Identity:
        return 0.0
    if not isinstance(dropout, nn.Module) and callable(dropout):
        probe = torch.zeros(1)
        try:
            identity = dropout(probe) is probe   # XComposer2's ``lambda x: x`` (lora_dropout == 0)
        except Exception:  # noqa: BLE001 -- any failure means "not provably the identity"
            identity = False
        if identity:
            return 0.0
    raise NotImplementedError(
        f"{name}.lora_dropout is {dropout!r}; the fused PLoRA op runs nn.Dropout(p) or the identity "
        "only (a subclass, another dropout kind or a custom function is not assumed to be either)")


def _verify_forward(name: str, module: nn.Linear) -> None:
    """The candidate's own forward (for the real modules XComposer2's ``PLoRA.forward``, defined by its
    class) must compute what :class:`PLoRALinear` computes: ``NotImplementedError`` naming the class
    otherwise.  Run on a probe through ``torch.func.functional_call`` in eval mode (dropout off; its
    probability is checked separately), under a forked generator: the module's parameters, mode and
    torch's random stream are left as they were."""
    cls = type(module)
    what = f"{name}'s forward ({cls.__module__}.{cls.__qualname__}.forward)"
    B, L, in_f, out_f, r = _PROBE_SHAPE
    gen = torch.Generator().manual_seed(_PROBE_SEED)
    probe = {"weight": torch.randn(out_f, in_f, generator=gen, dtype=torch.float64),
             "Plora_A.weight": torch.randn(r, in_f, generator=gen, dtype=torch.float64),
             "Plora_B.weight": torch.randn(out_f, r, generator=gen, dtype=torch.float64)}
    if module.bias is not None:
        probe["bias"] = torch.randn(out_f, generator=gen, dtype=torch.float64)
    x = torch.randn(B, L, in_f, generator=gen, dtype=torch.float64)
    masks = (torch.tensor([[False, True, True], [True, False, False]]), torch.zeros(B, L, dtype=torch.bool), None)
    modes = [(m, m.training) for m in module.modules()]
    try:
        module.eval()
        with torch.no_grad(), torch.random.fork_rng(devices=[]):
            for mask in masks:
                if mask is None:
                    want = F.linear(x, probe["weight"], probe.get("bias"))
                else:
                    want = plora_linear_reference(x, probe["weight"], probe.get("bias"), probe["Plora_A.weight"],
                                                  probe["Plora_B.weight"], mask, float(module.lora_scaling))
                try:
                    got = torch.func.functional_call(module, probe, (x,) if mask is None else (x, mask))
                except Exception as e:  # noqa: BLE001 -- any failure means "not verified"
                    raise NotImplementedError(
                        f"cannot verify {what}: it failed on a float64 probe of shape {tuple(x.shape)} "
                        f"({type(e).__name__}: {e}); the patch replaces only a forward that computes XComposer2's "
                        "PLoRA") from e
                same = isinstance(got, torch.Tensor) and got.shape == want.shape and bool(
                    torch.allclose(got, want, rtol=1e-10, atol=1e-12))
                if not same:
                    called = "without im_mask" if mask is None else ("with im_mask" + (
                        "" if mask.any() else " all False"))
                    raise NotImplementedError(
                        f"{what} does not compute XComposer2's PLoRA (called {called} on a probe it differs from "
                        "the base linear plus lora_scaling * Plora_B(Plora_A(x)) on the rows where im_mask is "
                        "True); the patched module would compute something else")
    finally:
        for m, training in modes:
            m.training = training


def _validate(name: str, module: nn.Linear) -> float:
    """Raise for anything the replacement would not reproduce exactly; returns the dropout p."""
    if "forward" in module.__dict__:
        raise NotImplementedError(f"{name} has an instance-level forward (e.g. an offloading or "
                                  "quantisation wrapper); the patched module would bypass it")
    for attr in ("Plora_A", "Plora_B", "lora_scaling", "lora_dropout"):
        if not hasattr(module, attr):
            raise ValueError(f"{name} has Plora_A/Plora_B but no {attr}: it is not an XComposer2 PLoRA "
                             "linear, and its missing option is not assumed")
    if parametrize.is_parametrized(module):
        raise NotImplementedError(f"{name} has parametrizations on {sorted(module.parametrizations)}")
    extra = sorted(set(module._modules) - _CHILDREN)
    extra += sorted(set(module._parameters) - {"weight", "bias"}) + sorted(module._buffers)
    if extra:
        raise NotImplementedError(f"{name} holds {extra}, which XComposer2's PLoRA does not have; the "
                                  "patched module would drop it")
    in_f, out_f = module.in_features, module.out_features
    weight, bias = module.weight, module.bias
    for what, t in (("weight", weight), ("bias", bias)):
        if t is not None and not isinstance(t, nn.Parameter):
            raise NotImplementedError(f"{name}.{what} is a {type(t).__name__}, not an nn.Parameter; the "
                                      "replacement shares the module's Parameters")
    if not isinstance(weight, torch.Tensor) or tuple(weight.shape) != (out_f, in_f):
        raise ValueError(f"{name}.weight must have shape ({out_f}, {in_f}), got "
                         f"{tuple(getattr(weight, 'shape', ()))} (a sharded or offloaded weight is not supported)")
    if bias is not None and tuple(bias.shape) != (out_f,):
        raise ValueError(f"{name}.bias must have shape ({out_f},), got {tuple(bias.shape)}")
    for child in ("Plora_A", "Plora_B"):
        sub = getattr(module, child)
        if type(sub) is not nn.Linear:
            raise NotImplementedError(f"{name}.{child} is a {type(sub).__name__}, not a plain nn.Linear (a "
                                      "wrapper such as a PEFT LoRA layer changes its forward)")
        if sub.bias is not None:
            raise NotImplementedError(f"{name}.{child} has a bias; the fused PLoRA op has none on A or B")
        if parametrize.is_parametrized(sub) or sub._buffers or "forward" in sub.__dict__:
            raise NotImplementedError(f"{name}.{child} has parametrizations, buffers or an instance-level "
                                      "forward")
    a, b = module.Plora_A.weight, module.Plora_B.weight
    r = a.shape[0] if a.dim() == 2 else 0
    if a.dim() != 2 or r < 1 or tuple(a.shape) != (r, in_f):
        raise ValueError(f"{name}.Plora_A.weight must have shape (r, {in_f}) with r >= 1, got {tuple(a.shape)}")
    if tuple(b.shape) != (out_f, r):
        raise ValueError(f"{name}.Plora_B.weight must have shape ({out_f}, {r}) (rank r={r} from Plora_A), "
                         f"got {tuple(b.shape)}")
    tensors = [("weight", weight), ("bias", bias), ("Plora_A.weight", a), ("Plora_B.weight", b)]
    for what, t in tensors[1:]:
        if t is not None and t.dtype != weight.dtype:
            raise TypeError(f"{name}.{what} has dtype {t.dtype} but {name}.weight has {weight.dtype}; the "
                            "original fails on mixed dtypes too (cast the model to one dtype first)")
        if t is not None and t.device != weight.device:
            raise ValueError(f"{name}.{what} is on {t.device} but {name}.weight is on {weight.device}")
    if not weight.is_floating_point():
        raise TypeError(f"{name}.weight must be floating point, got {weight.dtype}")
    check_float(f"{name}.lora_scaling", module.lora_scaling)
    dropout = module.lora_dropout
    found = hooks(dropout) if isinstance(dropout, nn.Module) else []
    if found:
        raise NotImplementedError(f"{name}.lora_dropout has hooks ({', '.join(found)})")
    p = _dropout_p(name, dropout)
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"{name}.lora_dropout has p={p}; expected 0 <= p <= 1")
    found = hooks(module)
    if found:
        raise NotImplementedError(f"{name} has hooks ({', '.join(found)}); the replacement module "
                                  "would not have them")
    for child in ("Plora_A", "Plora_B"):   # kept as they are, so only their forward/backward hooks matter
        found = hooks(getattr(module, child), RUN_HOOKS)
        if found:
            raise NotImplementedError(f"{name}.{child} has hooks ({', '.join(found)}); the fused op does not "
                                      "call the child modules, so they would not run")
    _verify_forward(name, module)
    return p


def _replacement(module: nn.Linear, p: float) -> PLoRALinear:
    """A PLoRALinear holding ``module``'s own Parameters and its Plora_A / Plora_B children."""
    r = module.Plora_A.weight.shape[0]
    alpha = getattr(module, "lora_alpha", None)   # only shown in the repr; the forward uses lora_scaling
    try:
        check_float("lora_alpha", alpha)
    except (TypeError, ValueError):
        alpha = module.lora_scaling * r
    # built on the meta device (no allocation), then handed the original's tensors
    new = PLoRALinear(module.in_features, module.out_features, bias=module.bias is not None, lora_r=r,
                      lora_alpha=alpha, lora_dropout=p, device="meta", dtype=module.weight.dtype)
    new.weight = module.weight
    new.bias = module.bias
    new.Plora_A = module.Plora_A
    new.Plora_B = module.Plora_B
    new.lora_scaling = module.lora_scaling   # the original's exact value, not alpha / r recomputed
    if hasattr(module, "lora_len"):          # stored, unused by the forward; kept for code that reads it
        new.lora_len = module.lora_len
    new.training = module.training           # the children keep their own flags
    return new


def count_patched(model: nn.Module) -> int:
    """How many modules of ``model`` already are mmkernels' ``PLoRALinear``."""
    return sum(isinstance(m, PLoRALinear) for m in model.modules())


def plan(model: nn.Module) -> List[Callable[[], None]]:
    """Validate every PLoRA linear of ``model`` and return the swaps (nothing is changed here).

    A module already patched is a :class:`PLoRALinear` and is not planned again.  A module registered
    under several names is replaced by one new module under all of them.
    """
    found = find_modules(model, _is_candidate)
    if model in (m for m, _ in found):
        raise ValueError("the model itself is a PLoRA linear; apply_mmkernels replaces submodules in place, "
                         "so wrap it in a parent module first")
    swaps = []
    for module, qualified in found:
        p = _validate(qualified[0], module)

        def swap(module=module, qualified=qualified, p=p):
            new = _replacement(module, p)
            for name in qualified:
                set_child(model, name, new)

        swaps.append(swap)
    return swaps
