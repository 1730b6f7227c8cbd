"""``python -m mmkernels``: check an installed mmkernels.

    python -m mmkernels info [--json]
        versions, how the package was built (torch/CUDA it was compiled against), the device, the
        backends that can run here and which native ops _C provides, on which devices; exit status 1
        if the backend setting (MMKERNELS_BACKEND) is invalid.
    python -m mmkernels verify [--op NAME ...] [--device cpu|cuda] [--quick]
        the verification table of every kernel against its float64 reference (the one `make bench`
        prints), with a progress line per case; exit status 1 if any check FAILs.

Without a GPU the Triton kernels run under Triton's interpreter, which has to be switched on
(``TRITON_INTERPRET=1``) before mmkernels defines its kernels.  ``python -m mmkernels`` has already
imported the package by the time this module runs, so ``verify`` on CPU re-executes itself once
with ``TRITON_INTERPRET=1`` set (running ``TRITON_INTERPRET=1 python -m mmkernels verify``
directly skips that step).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from typing import Any

import torch

import mmkernels
from mmkernels import _extension
from mmkernels._interpreter import interpreter_enabled

_REEXEC_ENV = "_MMKERNELS_REEXEC"


def _cpu_name() -> str:
    name = platform.processor() or platform.machine() or "cpu"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return name


def _native_ops() -> list[dict[str, Any]]:
    """Per native op: a native kernel for CPU / CUDA tensors, and whether it runs on this GPU (None
    without one)."""
    gpu = torch.cuda.is_available()
    out = []
    for name in _extension.native_ops():
        op = _extension.NativeOp(name)
        # no backend kernel at all (one for every device, e.g. build_config): device-independent
        backend = any(torch._C._dispatch_has_kernel_for_dispatch_key(f"mmkernels::{name}", k) for k in ("CPU", "CUDA"))
        out.append(dict(name=name, cpu=backend and "cpu" in op.device_types, cuda=backend and "cuda" in op.device_types,
                        this_gpu=op.runs_on(torch.device("cuda", torch.cuda.current_device())) if gpu and backend
                        else None))
    return out


def _arch_label(capability: tuple[int, int]) -> str:
    return f"sm_{capability[0]}{capability[1]}"


def info_dict() -> dict[str, Any]:
    """Everything ``info`` prints, as plain data."""
    bi = mmkernels.build_info()
    try:
        import numpy

        numpy_version: str | None = numpy.__version__
    except Exception:
        numpy_version = None
    cuda = bool(torch.cuda.is_available())
    if cuda:
        props = torch.cuda.get_device_properties(torch.cuda.current_device())
        device = f"CUDA {props.name} (compute capability {props.major}.{props.minor}, {props.multi_processor_count} SMs)"
    else:
        device = f"CPU {_cpu_name()} ({torch.get_num_threads()} torch threads), no CUDA device"
    if cuda:
        triton_backend = "compiled kernels on CUDA"
    elif interpreter_enabled():
        triton_backend = "Triton interpreter on CPU (TRITON_INTERPRET=1)"
    else:
        triton_backend = ("CPU tensors need Triton's interpreter: TRITON_INTERPRET=1 before importing mmkernels "
                          "(`python -m mmkernels verify` sets it itself)")
    try:
        backend, backend_error = mmkernels.get_backend(), None
    except ValueError as e:   # a bad MMKERNELS_BACKEND: every op raises this, so info reports it
        backend, backend_error = None, str(e)
    return {
        "mmkernels_version": mmkernels.__version__,
        "location": os.path.dirname(mmkernels.__file__),
        "python": platform.python_version(),
        "numpy_version": numpy_version,
        "device": device,
        "backend": backend,
        "backend_error": backend_error,
        "triton_backend": triton_backend,
        "native_ops": _native_ops(),
        "build_info": bi,
        "gemm_roles": _gemm_roles(),
    }


def _gemm_roles() -> list[dict[str, Any]]:
    """Per GEMM role of the shared core: the path and blocks a bf16 launch on this device takes, and
    why (the table's source: measured at a commit on a card, or the default)."""
    from mmkernels.ops._gemm import config

    return config.describe()


def _print_info(d: dict[str, Any]) -> None:
    bi = d["build_info"]
    built = bi.get("torch_version_built")
    built_label = _extension.torch_label(built, bi.get("torch_cuda_version_built")) if built else "unknown"
    lines = [
        f"mmkernels        {d['mmkernels_version']}  ({d['location']})",
        f"python           {d['python']}",
        f"torch            {bi['torch_version']}  (CUDA {bi['torch_cuda_version'] or 'none'})",
        f"triton           {bi['triton_version'] or 'not installed'}",
        f"numpy            {d['numpy_version'] or 'not installed'}",
        f"device           {d['device']}",
        "",
        (f"backend          {d['backend']}  (auto: triton for CUDA tensors, reference for CPU tensors; "
         "MMKERNELS_BACKEND / mmkernels.use_backend to change)" if d["backend_error"] is None else
         f"backend          INVALID: {d['backend_error']}; every mmkernels op raises this until "
         "MMKERNELS_BACKEND is fixed or unset"),
        f"triton kernels   {d['triton_backend']}",
        "reference        plain PyTorch, any device",
        "",
        f"native _C        {'loaded' if bi['c_extension_loaded'] else 'NOT loaded'}",
        f"  built with     torch {built_label}",
    ]
    if bi["c_extension_loaded"]:
        lines[-1] += f"; loads into torch >= {bi['torch_oldest']} (LibTorch stable ABI)"
        archs = ", ".join(bi["cuda_archs"])
        if bi["cuda_kernels"]:
            lines.append(f"  CUDA kernels   loaded: archs {archs} (nvcc {bi['cuda_version_built']})")
        elif bi["cuda_kernels_built"]:
            lines.append(f"  CUDA kernels   built for archs {archs}, NOT loaded: {bi['cuda_load_error']}")
        else:
            lines.append(f"  CUDA kernels   none ({bi.get('cuda_skip_reason') or 'CPU-only build'})")
        if bi["cuda_available"]:
            cap = torch.cuda.get_device_capability()
            if bi["cuda_kernels_run_on_device"]:
                lines.append(f"  this GPU       {_arch_label(cap)}: CUDA tensors run the native CUDA kernels")
            elif bi["cuda_kernels"]:
                lines.append(f"  this GPU       {_arch_label(cap)}: the build carries no code for it; CUDA tensors "
                             "take the Triton/torch path")
            else:
                lines.append(f"  this GPU       {_arch_label(cap)}: no native CUDA kernels loaded; CUDA tensors take "
                             "the Triton/torch path")
        ops = d["native_ops"]
        width = max([len(o["name"]) for o in ops] + [4])
        lines.append("  native ops:")
        for o in ops:
            devs = [k for k in ("cpu", "cuda") if o[k]]
            where = ", ".join(devs) if devs else "(device-independent)"
            if devs and o["this_gpu"] is False:
                where += "  (on this GPU: Triton/torch path)"
            elif devs and not o["cuda"]:
                where += "  (CUDA tensors: Triton/torch path)"
            lines.append(f"    {o['name']:<{width}}  {where}")
    else:
        lines.append(f"  why            {bi['load_error']}")
    roles = d["gemm_roles"]
    if roles:
        lines += ["", f"GEMM roles       bf16 launches on this device (table {roles[0]['arch']}): path, blocks, why"]
        width = max(len(r["role"]) for r in roles)
        for r in roles:
            b = r["blocks"]
            tile = " ".join(f"{k[6:]}{b[k]}" for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K") if k in b)
            lines.append(f"  {r['role']:<{width}}  {r['path']:<17} {tile:<15} {r['why']}")
        lines.append(f"  torch._grouped_mm here: {roles[0]['grouped_mm'] or 'usable (bf16)'}")
    print("\n".join(lines), flush=True)


def _reexec_with_interpreter(argv: list[str]) -> None:
    """Run ``python -m mmkernels <argv>`` again, with TRITON_INTERPRET=1 (replaces this process)."""
    env = dict(os.environ, TRITON_INTERPRET="1", **{_REEXEC_ENV: "1"})
    print("mmkernels: no CUDA device; re-running with TRITON_INTERPRET=1 so the Triton kernels run on CPU "
          "under Triton's interpreter", file=sys.stderr, flush=True)
    sys.stdout.flush()
    os.execve(sys.executable, [sys.executable, "-m", "mmkernels", *argv], env)


def _verify(args: argparse.Namespace, argv: list[str]) -> int:
    from mmkernels import verify

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        print("mmkernels verify: --device cuda, but torch.cuda.is_available() is False", file=sys.stderr)
        return 2
    if device == "cpu" and not interpreter_enabled():
        if os.environ.get(_REEXEC_ENV) == "1" or not sys.executable:
            print("mmkernels verify: the Triton kernels need TRITON_INTERPRET=1 to run on CPU; run: "
                  "TRITON_INTERPRET=1 python -m mmkernels verify", file=sys.stderr)
            return 2
        _reexec_with_interpreter(argv)
    bi = mmkernels.build_info()
    print(f"mmkernels {mmkernels.__version__} verify on {device}: torch {bi['torch_version']}, "
          f"triton {bi['triton_version']}, _C {'loaded' if bi['c_extension_loaded'] else 'not loaded'}, "
          f"{'quick' if args.quick else 'full'} set", flush=True)
    reports = verify.run(args.op, device=device, quick=args.quick)
    print("\n=== summary ===")
    for r in reports:
        print(f"  {r.op:<16} {'PASS' if r.ok else 'FAIL'}  {len(r.rows):4d} checks  {r.elapsed_s:6.1f}s")
    ok = all(r.ok for r in reports)
    print(f"verification {'PASSED' if ok else 'FAILED'}", flush=True)
    return 0 if ok else 1


def _parser() -> argparse.ArgumentParser:
    from mmkernels.verify import OPS

    p = argparse.ArgumentParser(prog="python -m mmkernels", description="Check an mmkernels installation.")
    sub = p.add_subparsers(dest="command", required=True)
    pi = sub.add_parser("info", help="versions, build, device, backends, native ops")
    pi.add_argument("--json", action="store_true", help="print the information as JSON")
    pv = sub.add_parser("verify", help="verify every kernel against its float64 reference")
    pv.add_argument("--op", action="append", choices=OPS, default=None,
                    help="operator to verify (repeatable; default: all)")
    pv.add_argument("--device", choices=("cpu", "cuda"), default=None,
                    help="where to run the kernels (default: cuda if available, else cpu)")
    pv.add_argument("--quick", action="store_true", help="fewer cases (a smoke run)")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = _parser().parse_args(argv)
    if args.command == "info":
        d = info_dict()
        if args.json:
            print(json.dumps(d, indent=2, default=str))
        else:
            _print_info(d)
        return 0 if d["backend_error"] is None else 1
    return _verify(args, argv)


if __name__ == "__main__":
    sys.exit(main())
