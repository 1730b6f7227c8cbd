"""Compile the package's Triton kernel launches for a GPU target on a machine without a GPU.

Two users, so both compile the same launches the same way and share Triton's on-disk cache
(``TRITON_CACHE_DIR``, default ``~/.triton/cache``):

* ``tests/gpu_target_compile.py``: every launch compiles for sm_80 and sm_90;
* ``benchmarks/codegen.py``: what the sm_90 code of the hot kernels looks like.

The mechanism, in three pieces:

* :func:`recording` -- every ``kernel[grid](...)`` launch in the process appends a :class:`Launch`
  (kernel, arguments, grid) instead of running.  It wraps ``JITFunction.run``, so a kernel is seen
  whichever module defines or launches it;
* :func:`simulated_gpu` -- answers the ``torch.cuda`` device queries a launcher makes (capability,
  SM count, shared memory) as an H100 would, so launchers called on ``meta`` tensors pick the
  per-arch table entries a GPU run picks;
* :func:`compile_launch` -- specialises a launch's arguments with the JIT's own binder (an int equal
  to 1 becomes a constexpr; pointers and ints divisible by 16 are marked so, which is what lets the
  pipeliner use 16-byte asynchronous copies), then ``triton.compile`` for the target.  A file lock per
  compile key keeps two processes from compiling the same kernel at once: the second one waits, then
  reads the first one's result from the cache.

:func:`ptxas_log` and :func:`sass` read back ptxas's ``-v`` log (kept from the compile, or Triton's
ptxas step run again for a kernel found in the cache) and ``cuobjdump -sass``; both are stored beside
the kernel in Triton's cache.

Run without ``TRITON_INTERPRET``: the interpreter replaces ``@triton.jit`` functions when they are
defined, so it must be unset before mmkernels is imported.
"""
from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import io
import math
import os
import subprocess
import sys
import tempfile
import types
from typing import Any, Iterator

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, make_backend
from triton.runtime.cache import get_cache_manager
from triton.runtime.jit import JITFunction, create_function_from_signature

SM80 = GPUTarget("cuda", 80, 32)
SM90 = GPUTarget("cuda", 90, 32)   # Triton emits sm_90a for it (wgmma needs the "a" target)

# Shared memory one block may use (bytes): sm_80 (A100) 163 KB, sm_90 (H100/H200) 227 KB.
SHARED_LIMIT = {80: 166912, 90: 232448}


# ------------------------------------------------------------------------------------------- devices

@dataclasses.dataclass(frozen=True)
class Machine:
    """Per-SM limits and SM count of the card a simulated launch is sized for."""
    name: str
    capability: tuple[int, int]
    sms: int
    regs_per_sm: int = 65536
    smem_per_sm: int = 233472          # 228 KB
    smem_per_block: int = 232448       # 227 KB (opt-in maximum)
    smem_reserved_per_cta: int = 1024  # the driver keeps 1 KB of each CTA's shared memory
    warps_per_sm: int = 64
    ctas_per_sm: int = 32


H100 = Machine("NVIDIA H100 80GB HBM3 (simulated)", (9, 0), 132)
A100 = Machine("NVIDIA A100-SXM4-80GB (simulated)", (8, 0), 108, smem_per_sm=167936, smem_per_block=166912)


@contextlib.contextmanager
def simulated_gpu(machine: Machine = H100) -> Iterator[Machine]:
    """``torch.cuda.get_device_capability / get_device_properties / current_device / device_count``
    answer as ``machine`` would, so a launcher called on ``meta`` tensors takes its GPU path with that
    card's table entries and grid sizes.  ``torch.cuda.is_available()`` is left alone.  A launcher
    that caches the capability (``functools.lru_cache``) keeps the first answer for the process."""
    props = types.SimpleNamespace(
        name=machine.name, major=machine.capability[0], minor=machine.capability[1],
        multi_processor_count=machine.sms, total_memory=80 * 2**30, warp_size=32,
        regs_per_multiprocessor=machine.regs_per_sm, max_threads_per_multi_processor=2048,
        shared_memory_per_multiprocessor=machine.smem_per_sm, shared_memory_per_block_optin=machine.smem_per_block,
        L2_cache_size=50 * 2**20)
    fakes = {"get_device_capability": lambda device=None: machine.capability,
             "get_device_properties": lambda device=None: props,
             "current_device": lambda: 0,
             "device_count": lambda: 1}
    saved = {name: getattr(torch.cuda, name) for name in fakes}
    for name, fake in fakes.items():
        setattr(torch.cuda, name, fake)
    try:
        yield machine
    finally:
        for name, original in saved.items():
            setattr(torch.cuda, name, original)


# ----------------------------------------------------------------------------------------- recording

@dataclasses.dataclass
class Launch:
    """One recorded ``fn[grid](*args, **kwargs)``."""
    fn: JITFunction
    args: tuple
    kwargs: dict
    grid: tuple

    @property
    def name(self) -> str:
        return self.fn.__name__

    @property
    def programs(self) -> int:
        return math.prod(self.grid)


def _grid_tuple(fn: JITFunction, grid, args: tuple, kwargs: dict) -> tuple:
    if callable(grid):   # Triton calls a grid function with every argument by name
        named = fn.signature.bind(*args, **{k: v for k, v in kwargs.items() if k in fn.signature.parameters})
        named.apply_defaults()
        grid = grid(dict(named.arguments))
    grid = tuple(int(g) for g in grid)
    return grid + (1,) * (3 - len(grid))


@contextlib.contextmanager
def recording() -> Iterator[list[Launch]]:
    """Within the block, every launch of any ``@triton.jit`` kernel is appended to the yielded list
    instead of running."""
    launches: list[Launch] = []
    original = JITFunction.run

    def record(self, *args, grid, warmup, **kwargs):
        launches.append(Launch(self, args, dict(kwargs), _grid_tuple(self, grid, args, kwargs)))

    JITFunction.run = record
    try:
        yield launches
    finally:
        JITFunction.run = original


# ------------------------------------------------------------------------------------------ compiling

@dataclasses.dataclass
class Compiled:
    """A launch compiled for one target: Triton's CompiledKernel plus the options it was built with."""
    launch: Launch
    target: GPUTarget
    kernel: Any            # triton.compiler.CompiledKernel
    options: dict
    key: str               # the specialisation (kernel, argument types, constexprs, attributes, options)
    signature: dict        # argument name -> Triton type ("*bf16", "i32", "constexpr", ...)

    @property
    def shared(self) -> int:
        return self.kernel.metadata.shared

    def describe(self) -> str:
        """``name  *bf16``: the kernel and its first pointer argument's type, for messages."""
        pointer = next((t for t in self.signature.values() if t.startswith("*")), "")
        return f"{self.launch.name}  {pointer}".rstrip()


def specialise(launch: Launch, target: GPUTarget):
    """``(signature, constexprs, attrs, options)`` exactly as ``JITFunction.run`` builds them on a device
    of ``target``: the JIT's own binder and argument packing (a host ``TensorDescriptor``, e.g. a TMA
    operand of the GEMM core, becomes ``tensordesc<bf16[block]>``; Triton 3.6 and 3.8 alike)."""
    fn, backend = launch.fn, make_backend(target)
    kwargs = dict(launch.kwargs)
    kwargs["debug"] = kwargs.get("debug", fn.debug) or triton.knobs.runtime.debug
    kwargs["instrumentation_mode"] = triton.knobs.compilation.instrumentation_mode
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound_args, specialization, options = binder(*launch.args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound_args, specialization, options)
    return signature, constexprs, attrs, options.__dict__


_COMPILED: dict[str, Compiled] = {}


@contextlib.contextmanager
def _compile_lock(key: str) -> Iterator[None]:
    folder = os.path.join(triton.knobs.cache.dir, "mmkernels-compile-locks")
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, key[:32] + ".lock"), "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def compile_launch(launch: Launch, target: GPUTarget) -> Compiled:
    """``triton.compile`` of a recorded launch for ``target`` (memoised per process; on disk by Triton)."""
    signature, constexprs, attrs, options = specialise(launch, target)
    text = repr((launch.fn.cache_key, target.arch, triton.__version__, sorted(signature.items()),
                 sorted((k, repr(v)) for k, v in constexprs.items()),
                 sorted((k, repr(v)) for k, v in attrs.items()), sorted((k, repr(v)) for k, v in options.items())))
    key = hashlib.sha256(text.encode()).hexdigest()
    if key not in _COMPILED:
        printed = io.StringIO()   # ptxas's -v log, which Triton prints when asked (and only when it compiles)
        with _compile_lock(key), _ptxas_log_printed(printed):
            try:
                kernel = triton.compile(ASTSource(fn=launch.fn, signature=signature, constexprs=constexprs,
                                                  attrs=attrs), target=target, options=options)
            except Exception:
                sys.stdout.write(printed.getvalue())   # what Triton printed about the failure
                raise
        _COMPILED[key] = Compiled(launch, target, kernel, options, key, signature)
        if "ptxas" in printed.getvalue():
            _store_text(_COMPILED[key], "ptxas.log", printed.getvalue())
    compiled = _COMPILED[key]
    return dataclasses.replace(compiled, launch=launch) if compiled.launch is not launch else compiled


@contextlib.contextmanager
def _ptxas_log_printed(out: io.StringIO) -> Iterator[None]:
    """Within the block, Triton's ptxas step prints its ``-v`` log, into ``out``."""
    with triton.knobs.nvidia.scope(), contextlib.redirect_stdout(out):
        triton.knobs.nvidia.dump_ptxas_log = True
        yield


def _store_text(compiled: Compiled, suffix: str, text: str) -> None:
    get_cache_manager(compiled.kernel.hash).put(text, f"{compiled.kernel.name}.{suffix}", binary=False)


def _cached_text(compiled: Compiled, suffix: str, make) -> str:
    """A text file beside the kernel in Triton's cache (made once)."""
    path = get_cache_manager(compiled.kernel.hash).get_file(f"{compiled.kernel.name}.{suffix}")
    if path is not None:
        with open(path) as f:
            return f.read()
    text = make()
    _store_text(compiled, suffix, text)
    return text


def ptxas_log(compiled: Compiled) -> str:
    """ptxas's ``-v`` output for the kernel (registers, spills, warnings such as C7515).  Kept from the
    compile when :func:`compile_launch` compiled it; otherwise (a kernel read from Triton's cache)
    Triton's own ptxas step -- same binary, same flags -- runs again on the kernel's PTX."""
    def make():
        backend = make_backend(compiled.target)
        out = io.StringIO()
        with _ptxas_log_printed(out):
            backend.make_cubin(compiled.kernel.asm["ptx"], {}, backend.parse_options(compiled.options),
                               compiled.target.arch)
        return out.getvalue()
    return _cached_text(compiled, "ptxas.log", make)


def sass(compiled: Compiled) -> str:
    """``cuobjdump -sass`` of the kernel's cubin."""
    def make():
        with tempfile.TemporaryDirectory() as folder:
            path = os.path.join(folder, "kernel.cubin")
            with open(path, "wb") as f:
                f.write(compiled.kernel.asm["cubin"])
            proc = subprocess.run([triton.knobs.nvidia.cuobjdump.path, "-sass", path], capture_output=True,
                                  text=True, check=True)
        return proc.stdout
    return _cached_text(compiled, "sass", make)


