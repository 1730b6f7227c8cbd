"""Input checks shared by every public function.

Each check raises ``TypeError`` (wrong kind of object or dtype) or ``ValueError`` (wrong shape,
range or device) with a message that names the argument and says what was expected and what was
given.
"""
from __future__ import annotations

import numbers
from typing import Iterable, List, Sequence, Tuple

import torch
from torch import nn

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_tensor(name: str, value, *, ndim: int | None = None, min_ndim: int | None = None,
                 dtypes: Sequence[torch.dtype] | None = None) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if ndim is not None and value.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(value.shape)}")
    if min_ndim is not None and value.dim() < min_ndim:
        raise ValueError(f"{name} must have at least {min_ndim} dimension(s), got shape {tuple(value.shape)}")
    if dtypes is not None and value.dtype not in dtypes:
        names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"{name} must have dtype in ({names}), got {str(value.dtype).replace('torch.', '')}")
    return value


def check_shape(name: str, value: torch.Tensor, expected: Sequence[int], why: str = "") -> None:
    if tuple(value.shape) != tuple(expected):
        extra = f" ({why})" if why else ""
        raise ValueError(f"{name} must have shape {tuple(expected)}{extra}, got {tuple(value.shape)}")


def check_same_dtype(named: Iterable[tuple[str, torch.Tensor | None]]) -> torch.dtype:
    named = [(n, t) for n, t in named if t is not None]
    first_name, first = named[0]
    for n, t in named[1:]:
        if t.dtype != first.dtype:
            raise TypeError(f"{n} has dtype {t.dtype} but {first_name} has dtype {first.dtype}; "
                            "all floating inputs must share one dtype")
    return first.dtype


def check_same_device(named: Iterable[tuple[str, torch.Tensor | None]]) -> torch.device:
    named = [(n, t) for n, t in named if t is not None]
    first_name, first = named[0]
    for n, t in named[1:]:
        if t.device != first.device:
            raise ValueError(f"{n} is on {t.device} but {first_name} is on {first.device}; "
                             "all inputs must be on one device")
    return first.device


def check_int(name: str, value, *, low: int | None = None, high: int | None = None) -> int:
    """An integer (a Python or numpy int, not a bool) in ``[low, high]``: ``TypeError`` / ``ValueError``
    naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    value = int(value)
    if low is not None and value < low:
        raise ValueError(f"{name} must be >= {low}, got {value}")
    if high is not None and value > high:
        raise ValueError(f"{name} must be <= {high}, got {value}")
    return value


def check_float(name: str, value, *, low: float | None = None, high: float | None = None,
                high_inclusive: bool = True) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):  # numpy scalars are Real too
        raise TypeError(f"{name} must be a float, got {type(value).__name__}")
    value = float(value)
    if value != value or value in (float("inf"), float("-inf")):
        raise ValueError(f"{name} must be finite, got {value}")
    if low is not None and value < low:
        raise ValueError(f"{name} must be >= {low}, got {value}")
    if high is not None and (value > high or (not high_inclusive and value == high)):
        bound = "<=" if high_inclusive else "<"
        raise ValueError(f"{name} must be {bound} {high}, got {value}")
    return value


# A module's hook dicts: the ones that run when it is called (forward and backward), and the state-dict ones.
RUN_HOOKS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")
STATE_DICT_HOOKS = ("_state_dict_hooks", "_state_dict_pre_hooks", "_load_state_dict_pre_hooks",
                    "_load_state_dict_post_hooks")


def module_hooks(module: nn.Module, kinds: Tuple[str, ...] = RUN_HOOKS + STATE_DICT_HOOKS) -> List[str]:
    """The names of ``module``'s non-empty hook dicts among ``kinds``."""
    return [kind for kind in kinds if getattr(module, kind, None)]


def check_no_hooks(name: str, module: nn.Module, why: str, kinds: Tuple[str, ...] = RUN_HOOKS,
                   error: type = ValueError) -> None:
    """Raise ``error`` naming the first submodule of ``module`` (itself included; ``name`` is its name)
    that has hooks among ``kinds``: code that reads ``module``'s weights instead of calling it would
    silently skip them.  ``why`` names what would skip them."""
    for sub_name, sub in module.named_modules(remove_duplicate=False):
        found = module_hooks(sub, kinds)
        if found:
            where = f"{name}.{sub_name}" if sub_name else name
            raise error(f"module {where!r} has hooks ({', '.join(found)}) that {why} would not run; remove "
                        "them first")
