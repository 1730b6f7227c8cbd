"""Loading of the native extension ``mmkernels._C`` and build information.

``mmkernels._C`` registers operators with the PyTorch dispatcher
(``torch.ops.mmkernels.<name>``).  It links libtorch's C++ API, which has no stable ABI: a ``_C``
works only with the torch release it was compiled against (and, if it holds CUDA kernels, a torch
with the same CUDA major version).  The build records what it was compiled against in
``mmkernels/_build_meta.json`` (written next to ``_C`` by CMakeLists.txt), and that record is
compared with the running torch *before* ``_C`` is imported: loading a ``_C`` built for another
torch can fail with an obscure missing-library error or, worse, load and misbehave.

If ``_C`` is missing (a source checkout that was never built), was built for another torch, or
fails to load, importing mmkernels still works: ONE :class:`MMKernelsWarning` says why, and the
ops fall back to their Python/Triton implementations.
"""

from __future__ import annotations

import functools
import importlib
import json
import os
import warnings
from pathlib import Path
from typing import Any

import torch

__all__ = ["HAS_C", "MMKernelsWarning", "build_info", "has_op", "load_error"]


class MMKernelsWarning(RuntimeWarning):
    """Warnings from mmkernels about its native extension."""


_LIB = "mmkernels"
_META_PATH = Path(__file__).with_name("_build_meta.json")
_FALLBACK = "native ops fall back to their Python/Triton implementations"


def _read_build_meta() -> dict[str, Any] | None:
    """The build record written next to ``_C`` (None if there is none, e.g. an old build)."""
    try:
        meta = json.loads(_META_PATH.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        return {"error": f"cannot read {_META_PATH.name}: {type(e).__name__}: {e}"}
    return meta if isinstance(meta, dict) else {"error": f"{_META_PATH.name} is not a JSON object"}


def torch_label(version: str, cuda: str | None) -> str:
    """``2.14.1+cu130`` style label: the version, plus ``+cuXY``/``+cpu`` unless it has a local part."""
    if "+" in version:
        return version
    return f"{version}+cu{cuda.replace('.', '')}" if cuda else f"{version}+cpu"


def _release(version: str) -> str:
    return version.split("+", 1)[0]


def abi_mismatch(meta: dict[str, Any], torch_version: str, torch_cuda: str | None,
                 cxx11_abi: bool | None) -> str | None:
    """Why a ``_C`` described by ``meta`` cannot be loaded into this torch, or None if it can.

    The C++ ABI ties ``_C`` to its torch *release* (``2.14.1``; the local part such as ``+cu130``
    only names the CUDA variant), to the ``_GLIBCXX_USE_CXX11_ABI`` setting and, when ``_C``
    holds CUDA kernels (it then links libc10_cuda and libcudart), to the CUDA major version.
    """
    built = meta.get("torch_version")
    if not built:
        return None
    built_cuda = meta.get("torch_cuda") or None
    reasons = []
    if _release(built) != _release(torch_version):
        reasons.append("another torch release")
    if meta.get("cuda"):
        if not torch_cuda:
            reasons.append("its CUDA kernels need a CUDA build of torch")
        elif built_cuda and built_cuda.split(".")[0] != torch_cuda.split(".")[0]:
            reasons.append(f"CUDA {built_cuda} vs {torch_cuda}")
    abi = meta.get("cxx11_abi")
    if abi is not None and cxx11_abi is not None and bool(abi) != bool(cxx11_abi):
        reasons.append(f"_GLIBCXX_USE_CXX11_ABI={int(bool(abi))} vs {int(bool(cxx11_abi))}")
    if not reasons:
        return None
    return (
        f"native extension _C was built for torch {torch_label(built, built_cuda)}, running "
        f"{torch_label(torch_version, torch_cuda)} ({'; '.join(reasons)}); {_FALLBACK}; rebuild with "
        f"`pip install --no-build-isolation --force-reinstall --no-deps <mmkernels source>` against this "
        f"torch, or install torch=={_release(built)}"
    )


def _running_cxx11_abi() -> bool | None:
    try:
        return bool(torch._C._GLIBCXX_USE_CXX11_ABI)
    except AttributeError:  # pragma: no cover - very old torch
        return None


_META = _read_build_meta()


def _load() -> tuple[bool, str | None]:
    if _META is not None and "error" not in _META:
        why = abi_mismatch(_META, torch.__version__, torch.version.cuda, _running_cxx11_abi())
        if why:
            return False, why
    try:
        importlib.import_module("mmkernels._C")
    except ModuleNotFoundError as e:
        if e.name not in ("mmkernels._C", "mmkernels"):
            return False, f"native extension unavailable, {_FALLBACK} ({type(e).__name__}: {e})"
        return False, (
            f"mmkernels._C is not built, {_FALLBACK} "
            "(build it with `pip install --no-build-isolation -e .` or `make build`)"
        )
    except (ImportError, OSError) as e:  # e.g. undefined symbol, missing libc10_cuda.so
        return False, f"native extension unavailable, {_FALLBACK} ({type(e).__name__}: {e})"
    try:
        getattr(getattr(torch.ops, _LIB), "build_config")
    except (AttributeError, RuntimeError) as e:
        return False, f"mmkernels._C loaded but registered no operators, {_FALLBACK} ({e})"
    return True, None


HAS_C, _LOAD_ERROR = _load()

# `python -m mmkernels verify` re-executes itself (to switch on Triton's interpreter before the
# kernels are defined); the warning was already shown by the first process.
if not HAS_C and os.environ.get("_MMKERNELS_REEXEC") != "1":
    warnings.warn(f"mmkernels: {_LOAD_ERROR}", MMKernelsWarning, stacklevel=2)


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


def native_ops() -> list[str]:
    """Names of the ops ``_C`` declares (``torch.ops.mmkernels.<name>`` with a C++ schema)."""
    if not HAS_C:
        return []
    try:
        schemas = torch._C._jit_get_all_schemas()
    except Exception:  # pragma: no cover - defensive
        return []
    names = sorted({s.name.split("::", 1)[1] for s in schemas if s.name.startswith(f"{_LIB}::")})
    return [n for n in names if _native_registration(f"{_LIB}::{n}", None)]


def build_info() -> dict[str, Any]:
    """How mmkernels was built (``*_built``) and what this process runs and can use.

    ``torch_version_built`` / ``torch_cuda_version_built`` come from ``_build_meta.json`` (or
    ``_C`` itself), so they are reported even when ``_C`` was not loaded because they differ from
    the running ``torch_version`` / ``torch_cuda_version``.  ``cuda_version_built`` is the nvcc
    that compiled the CUDA kernels (None without CUDA kernels).
    """
    cfg = _build_config() or (_META if _META and "error" not in _META else {})
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
    meta = _META or {}
    return {
        "torch_version": torch.__version__,
        "torch_cuda_version": torch.version.cuda,
        "triton_version": triton_version,
        "torch_version_built": cfg.get("torch_version") or meta.get("torch_version"),
        "torch_cuda_version_built": cfg.get("torch_cuda", meta.get("torch_cuda")),
        "c_extension_loaded": HAS_C,
        "cuda_kernels": bool(HAS_C and cfg.get("cuda", False)),
        "cuda_archs": list(cfg.get("archs", [])) if HAS_C else [],
        "cuda_version_built": cfg.get("cuda_version") if HAS_C else None,
        "cuda_available": cuda_available,
        "device_name": device_name,
        "load_error": _LOAD_ERROR,
        # Extra: why the CUDA kernels were left out of this build (None if they weren't).
        "cuda_skip_reason": cfg.get("cuda_skip_reason"),
    }
