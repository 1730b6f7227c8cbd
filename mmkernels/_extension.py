"""Loading of mmkernels' native libraries and build information.

Two libraries register native operators with the PyTorch dispatcher (``torch.ops.mmkernels.<name>``):

* ``mmkernels/_C.abi3.so``: every schema and the CPU kernels;
* ``mmkernels/_C_cuda.abi3.so`` (only in builds with CUDA kernels): the CUDA kernels.

Both use only the LibTorch stable ABI of the oldest supported torch and no Python C API, so they
load into every torch release from that one on and into every Python; they are loaded with
``torch.ops.load_library``.  The build records what they need in ``mmkernels/_build_meta.json``
(written next to them by CMakeLists.txt), and that record is compared with the running torch
*before* anything is loaded:

* the running torch must be at least the oldest torch the build targets (``torch_oldest``);
* ``_C_cuda`` also needs a CUDA build of torch with the CUDA major version it was compiled with (it
  links that version's ``libcudart``, which such a torch brings).

If ``_C`` is missing (a source checkout that was never built), targets a newer torch than the
running one, or fails to load, importing mmkernels still works: ONE :class:`MMKernelsWarning` says
why, and the ops fall back to their Python/Triton implementations.  Without ``_C_cuda`` (a CPU-only
build, a CPU build of torch, another CUDA major) the native ops run on CPU tensors only and CUDA
tensors take the Triton/torch path; :class:`NativeOp` answers per device (and per GPU arch), and
``python -m mmkernels info`` says which path each device takes.
"""

from __future__ import annotations

import functools
import json
import os
import re
import warnings
from pathlib import Path
from typing import Any

import torch

__all__ = ["HAS_C", "MMKernelsWarning", "NativeOp", "build_info", "has_op", "load_error"]


class MMKernelsWarning(RuntimeWarning):
    """Warnings from mmkernels about its native extension."""


_LIB = "mmkernels"
_DIR = Path(__file__).parent
_META_PATH = _DIR / "_build_meta.json"
_C_PATH = _DIR / "_C.abi3.so"
_C_CUDA_PATH = _DIR / "_C_cuda.abi3.so"
_FALLBACK = "native ops fall back to their Python/Triton implementations"
_CUDA_FALLBACK = "CUDA tensors take the Triton/torch path"


def _read_build_meta() -> dict[str, Any] | None:
    """The build record written next to ``_C`` (None if there is none)."""
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


def _release(version: str) -> tuple[int, ...]:
    """``(2, 14, 1)`` for ``2.14.1+cu130`` (and ``(2, 15, 0)`` for a pre-release such as ``2.15.0a0``)."""
    m = re.match(r"(\d+)\.(\d+)(?:\.(\d+))?", version)
    return tuple(int(x or 0) for x in m.groups()) if m else ()


def _dotted(release: tuple[int, ...]) -> str:
    return ".".join(map(str, release))


def torch_out_of_range(meta: dict[str, Any], torch_version: str) -> str | None:
    """Why the libraries described by ``meta`` cannot be loaded into torch ``torch_version``, or None.

    They use the LibTorch stable ABI of ``meta["torch_oldest"]``: every later torch release provides
    it, an earlier one does not (its libtorch lacks symbols they need)."""
    oldest = meta.get("torch_oldest")
    if not oldest:
        return (f"the native libraries' build record ({_META_PATH.name}) names no oldest supported torch "
                f"(built by an older mmkernels); {_FALLBACK}; rebuild with "
                "`pip install --no-build-isolation --force-reinstall --no-deps <mmkernels source>`")
    if _release(torch_version) >= _release(oldest):
        return None
    return (f"native extension _C needs torch >= {oldest} (it is built for the LibTorch stable ABI of "
            f"{_dotted(_release(oldest)[:2])}), running {torch_version}; {_FALLBACK}; "
            f"upgrade torch (pip install 'torch>={oldest}') to use them")


def cuda_unusable(meta: dict[str, Any], torch_cuda: str | None) -> str | None:
    """Why the CUDA kernels (``_C_cuda``) of the build ``meta`` cannot be loaded into a torch with CUDA
    version ``torch_cuda`` (None: a CPU build of torch), or None if they can."""
    if not meta.get("cuda"):
        return f"this build has no CUDA kernels ({meta.get('cuda_skip_reason') or 'CPU-only build'})"
    built = meta.get("cuda_version") or ""
    if not torch_cuda:
        return "torch is a CPU build"
    if built.split(".")[0] != torch_cuda.split(".")[0]:
        return (f"they are built with CUDA {built}, torch uses CUDA {torch_cuda} (the CUDA major versions must "
                f"match; install a CUDA {built.split('.')[0]} build of torch, or build mmkernels against this one)")
    return None


def _load_library(path: Path) -> None:
    torch.ops.load_library(str(path))


_META = _read_build_meta()


def _load() -> tuple[bool, str | None]:
    if not _C_PATH.exists():
        return False, (
            f"mmkernels._C is not built, {_FALLBACK} "
            "(build it with `pip install --no-build-isolation -e .` or `make build`)"
        )
    if _META is None or "error" in _META:
        why = _META["error"] if _META else f"{_META_PATH.name} is missing"
        return False, f"native extension _C not loaded: {why}; {_FALLBACK}"
    why = torch_out_of_range(_META, torch.__version__)
    if why:
        return False, why
    try:
        _load_library(_C_PATH)
    except (ImportError, OSError, RuntimeError) as e:  # e.g. undefined symbol, not a library
        return False, f"native extension unavailable, {_FALLBACK} ({type(e).__name__}: {e})"
    try:
        getattr(getattr(torch.ops, _LIB), "build_config")
    except (AttributeError, RuntimeError) as e:
        return False, f"mmkernels._C loaded but registered no operators, {_FALLBACK} ({e})"
    return True, None


def _load_cuda() -> tuple[bool, str | None, bool]:
    """(loaded, why not, whether the reason deserves a warning)."""
    if not HAS_C:
        return False, "_C is not loaded", False
    why = cuda_unusable(_META or {}, torch.version.cuda)
    if why:
        # A CPU-only build or a CPU torch is a normal set-up; another CUDA major is worth a warning.
        return False, why, bool((_META or {}).get("cuda")) and bool(torch.version.cuda)
    if not _C_CUDA_PATH.exists():
        return False, f"{_C_CUDA_PATH.name} is missing next to _C although the build record lists CUDA kernels", True
    try:
        _load_library(_C_CUDA_PATH)
    except (ImportError, OSError, RuntimeError) as e:
        return False, f"{_C_CUDA_PATH.name} failed to load ({type(e).__name__}: {e})", True
    return True, None, False


HAS_C, _LOAD_ERROR = _load()
HAS_CUDA_KERNELS, _CUDA_LOAD_ERROR, _warn_cuda = _load_cuda()

# `python -m mmkernels verify` re-executes itself (to switch on Triton's interpreter before the
# kernels are defined); the warning was already shown by the first process.
if os.environ.get("_MMKERNELS_REEXEC") != "1":
    if not HAS_C:
        warnings.warn(f"mmkernels: {_LOAD_ERROR}", MMKernelsWarning, stacklevel=2)
    elif _warn_cuda:
        warnings.warn(f"mmkernels: CUDA kernels not loaded: {_CUDA_LOAD_ERROR}; {_CUDA_FALLBACK}",
                      MMKernelsWarning, stacklevel=2)


def load_error() -> str | None:
    """Why ``mmkernels._C`` could not be loaded, or None if it was."""
    return _LOAD_ERROR


def cuda_load_error() -> str | None:
    """Why the native CUDA kernels (``_C_cuda``) are not loaded, or None if they are."""
    return _CUDA_LOAD_ERROR


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
    """Whether the native libraries provide the op ``torch.ops.mmkernels.<name>``.

    Ops that only exist through Python registrations (torch.library) don't count.  With
    ``device`` ("cpu", "cuda", a torch.device), also require a native kernel for that device
    type (e.g. False for "cuda" in a CPU-only build, or when ``_C_cuda`` is not loaded).  Whether
    that kernel runs on a particular GPU is :meth:`NativeOp.runs_on`'s question.
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


def arch_runs(archs: list[str], capability: tuple[int, int]) -> bool:
    """Whether code built for ``archs`` (CMake's names: ``8.0``, ``9.0a``, ``10.0f``, ``8.0+PTX``) runs
    on a GPU of compute capability ``capability``.

    A cubin for X.Y runs on X.Z for Z >= Y; an ``a`` cubin only on X.Y itself; an ``f`` cubin on the
    family X.Z, Z >= Y; PTX (``+PTX``) for X.Y is compiled by the driver for any later arch
    (``a``/``f`` PTX: only for that arch/family).
    """
    major, minor = capability
    for arch in archs:
        base, _, ptx = arch.partition("+")
        suffix = base[-1] if base[-1] in "af" else ""
        amaj, amin = (int(x) for x in base.rstrip("af").split("."))
        if suffix == "a":
            if (major, minor) == (amaj, amin):
                return True
        elif major == amaj and minor >= amin:
            return True
        elif ptx and not suffix and (major, minor) > (amaj, amin):
            return True
    return False


@torch.compiler.assume_constant_result
def _cuda_device_supported(index: int) -> bool:
    return arch_runs(list((_META or {}).get("archs", [])), torch.cuda.get_device_capability(index))


_CUDA_DEVICE_SUPPORTED: dict[int, bool] = {}


def cuda_device_supported(index: int | None) -> bool:
    """Whether the native CUDA kernels run on CUDA device ``index`` (None: the current one): they are
    loaded and the build carries code for that GPU's arch (see :func:`arch_runs`).  A constant for
    torch.compile."""
    if not HAS_CUDA_KERNELS:
        return False
    if index is None:
        index = torch.cuda.current_device()
    if torch.compiler.is_compiling():
        return _cuda_device_supported(index)
    ok = _CUDA_DEVICE_SUPPORTED.get(index)
    if ok is None:
        ok = _CUDA_DEVICE_SUPPORTED[index] = _cuda_device_supported(index)
    return ok


class NativeOp:
    """Where the native op ``torch.ops.mmkernels.<name>`` can run, looked up once (at import of the
    module that uses it; torch.compile traces :meth:`runs_on`, not :func:`has_op`).

    ``declared``: the libraries define the op (its fake kernel may be registered).
    ``device_types``: the device types with a native kernel ("cpu"; "cuda" once ``_C_cuda`` is loaded).
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self.declared = has_op(name)
        self.device_types = frozenset(t for t in ("cpu", "cuda") if self.declared and has_op(name, t))

    def runs_on(self, device: torch.device) -> bool:
        """Whether tensors on ``device`` run the native kernel: one is registered for the device type
        and, on a GPU, the build carries code for its arch.  Otherwise callers take their Triton/torch
        path."""
        if device.type not in self.device_types:
            return False
        return device.type != "cuda" or cuda_device_supported(device.index)

    def __repr__(self) -> str:
        return f"NativeOp({self.name!r}, device_types={sorted(self.device_types)})"


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

    ``torch_version_built`` / ``torch_cuda_version_built`` (the torch the libraries were compiled
    with) and ``torch_oldest`` (the oldest torch they load into) come from ``_build_meta.json`` (or
    ``_C`` itself), so they are reported even when nothing was loaded.  ``cuda_kernels`` says whether
    the native CUDA kernels are loaded in this process, ``cuda_kernels_built`` whether the build has
    them; ``cuda_version_built`` is the nvcc that compiled them (None without CUDA kernels).
    """
    # the record the loader went by (the loaded _C's own build_config() says the same; a test checks)
    cfg = _META if _META and "error" not in _META else _build_config()
    try:
        import triton

        triton_version: str | None = triton.__version__
    except Exception:
        triton_version = None
    cuda_available = bool(torch.cuda.is_available())
    device_name = None
    device_supported = None
    if cuda_available:
        try:
            device_name = torch.cuda.get_device_name()
            device_supported = cuda_device_supported(None)
        except Exception:
            device_name = None
    meta = _META or {}
    built_cuda = bool(cfg.get("cuda", False))
    return {
        "torch_version": torch.__version__,
        "torch_cuda_version": torch.version.cuda,
        "triton_version": triton_version,
        "torch_version_built": cfg.get("torch_version") or meta.get("torch_version"),
        "torch_cuda_version_built": cfg.get("torch_cuda", meta.get("torch_cuda")),
        "torch_oldest": cfg.get("torch_oldest") or meta.get("torch_oldest"),
        "c_extension_loaded": HAS_C,
        "cuda_kernels": HAS_CUDA_KERNELS,
        "cuda_kernels_built": built_cuda,
        "cuda_archs": list(cfg.get("archs", [])) if built_cuda else [],
        "cuda_version_built": cfg.get("cuda_version") if built_cuda else None,
        "cuda_available": cuda_available,
        "device_name": device_name,
        # Whether the native CUDA kernels run on the current GPU (None without one).
        "cuda_kernels_run_on_device": device_supported,
        "load_error": _LOAD_ERROR,
        # Why the native CUDA kernels are not loaded (None if they are).
        "cuda_load_error": _CUDA_LOAD_ERROR if HAS_C else None,
        # Why the CUDA kernels were left out of this build (None if they weren't).
        "cuda_skip_reason": cfg.get("cuda_skip_reason"),
    }
