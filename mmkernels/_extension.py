"""Loading of the native extension ``mmkernels._C`` and build information.

``mmkernels._C`` registers operators with the PyTorch dispatcher
(``torch.ops.mmkernels.<name>``).  If it is missing (e.g. a source checkout
that was never built) or fails to load (e.g. built against another torch),
importing mmkernels still works: one :class:`MMKernelsWarning` is emitted and
the ops fall back to their Python/Triton implementations.
"""

from __future__ import annotations

import functools
import importlib
import json
import warnings
from typing import Any

import torch

__all__ = ["HAS_C", "MMKernelsWarning", "build_info", "has_op", "load_error"]


class MMKernelsWarning(RuntimeWarning):
    """Warnings from mmkernels about its native extension."""


_LIB = "mmkernels"


def _load() -> tuple[bool, str | None]:
    try:
        importlib.import_module("mmkernels._C")
    except ModuleNotFoundError as e:
        if e.name not in ("mmkernels._C", "mmkernels"):
            return False, f"{type(e).__name__}: {e}"
        return False, (
            "mmkernels._C is not built (run `pip install --no-build-isolation -e .` or `make test`)"
        )
    except (ImportError, OSError) as e:  # e.g. undefined symbol: built against another torch
        return False, f"{type(e).__name__}: {e}"
    try:
        getattr(getattr(torch.ops, _LIB), "build_config")
    except (AttributeError, RuntimeError) as e:
        return False, f"mmkernels._C loaded but registered no operators: {e}"
    return True, None


HAS_C, _LOAD_ERROR = _load()

if not HAS_C:
    warnings.warn(
        f"mmkernels: native extension unavailable, ops fall back to Python/Triton ({_LOAD_ERROR})",
        MMKernelsWarning,
        stacklevel=2,
    )


def load_error() -> str | None:
    """Why ``mmkernels._C`` could not be loaded, or None if it was."""
    return _LOAD_ERROR


@functools.lru_cache(maxsize=1)
def _build_config() -> dict[str, Any]:
    if not HAS_C:
        return {}
    try:
        return json.loads(torch.ops.mmkernels.build_config())
    except Exception as e:  # pragma: no cover - defensive
        return {"error": f"{type(e).__name__}: {e}"}


def _native_registration(qualname: str, key: str | None) -> bool | None:
    """Whether ``qualname``'s schema (key None) or its ``key`` kernel was registered from C++.

    Parses ``torch._C._dispatch_dump``: C++ registrations point at a .cpp/.cu file, Python ones
    (torch.library) at a .py file.  None if the dump cannot be read.
    """
    try:
        dump = torch._C._dispatch_dump(qualname)
    except Exception:
        return None
    prefixes = ("debug: registered at ",) if key is None else (f"{key}: registered at ", f"{key}[alias]: registered at ")
    for line in dump.splitlines():
        for prefix in prefixes:
            if line.startswith(prefix):
                where = line[len(prefix):].split(" :: ")[0].rsplit(":", 1)[0]
                return not where.endswith(".py")
    return False


def has_op(name: str, device: str | torch.device | None = None) -> bool:
    """Whether ``_C`` provides the native op ``torch.ops.mmkernels.<name>``.

    Ops that only exist through Python registrations (torch.library) don't count.  With
    ``device`` ("cpu", "cuda", a torch.device), also require a native kernel for that device
    type (e.g. False for "cuda" in a CPU-only build).
    """
    if not HAS_C:
        return False
    qualname = f"{_LIB}::{name}"
    try:
        if not torch._C._dispatch_has_kernel(qualname):
            return False
    except Exception:
        return False
    native = _native_registration(qualname, None)
    if native is False:
        return False
    if device is None:
        return True
    key = {"cpu": "CPU", "cuda": "CUDA"}.get(torch.device(device).type)
    if key is None:
        return False
    for k in (key, "CompositeImplicitAutograd", "CompositeExplicitAutograd"):
        try:
            if not torch._C._dispatch_has_kernel_for_dispatch_key(qualname, k):
                continue
        except Exception:
            return False
        if _native_registration(qualname, k) is not False:
            return True
    return False


def build_info() -> dict[str, Any]:
    """How mmkernels was built and what this process can use."""
    cfg = _build_config()
    try:
        import triton

        triton_version: str | None = triton.__version__
    except Exception:
        triton_version = None
    cuda_available = bool(torch.cuda.is_available())
    device_name = None
    if cuda_available:
        try:
            device_name = torch.cuda.get_device_name()
        except Exception:
            device_name = None
    return {
        "torch_version": torch.__version__,
        "triton_version": triton_version,
        "c_extension_loaded": HAS_C,
        "cuda_kernels": bool(cfg.get("cuda", False)),
        "cuda_archs": list(cfg.get("archs", [])),
        "cuda_version_built": cfg.get("cuda_version"),
        "cuda_available": cuda_available,
        "device_name": device_name,
        "load_error": _LOAD_ERROR,
        # Extra: why the CUDA kernels were left out of this build (None if they weren't).
        "cuda_skip_reason": cfg.get("cuda_skip_reason"),
    }
