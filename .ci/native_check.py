"""Proves, in the Python that runs it, that the installed mmkernels loaded its native libraries and
that the public functions run the native ops, not their fallbacks.  .ci/run runs it in each torch
venv the wheel is installed into:

    python native_check.py --cuda-kernels loaded|not-loaded [--site PREFIX]

1. the native libraries are loaded (and, with --site, mmkernels is the copy installed under PREFIX);
   the CUDA kernels are loaded or not, as expected (not loaded: a CPU build of torch);
2. ``torch.library.opcheck`` passes for each native op with a CPU kernel (schema, fake kernel,
   autograd registration, AOT dispatch);
3. mmkernels.moe_route and mmkernels.plora_linear (Triton backend, under Triton's interpreter on
   CPU) dispatch to torch.ops.mmkernels.moe_route / plora_tile_flags, whose CPU kernels are the ones
   registered by _C (not a Python registration), and give the reference results.
"""
from __future__ import annotations

import argparse
import os
import sys

os.environ.setdefault("TRITON_INTERPRET", "1")  # before mmkernels defines its kernels (CPU only here)

import torch  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

import mmkernels  # noqa: E402
from mmkernels import _extension  # noqa: E402

NATIVE_OPS = ("moe_route", "plora_tile_flags")


class _RecordOps(TorchDispatchMode):
    """Records the name of every op dispatched at the top level."""

    def __init__(self) -> None:
        super().__init__()
        self.names: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(func.name())
        return func(*args, **(kwargs or {}))


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--cuda-kernels", choices=("loaded", "not-loaded"), required=True)
    p.add_argument("--site", default=None, help="mmkernels must be imported from under this prefix")
    args = p.parse_args()

    info = mmkernels.build_info()
    print(f"torch {torch.__version__}: native libraries built with torch {info['torch_version_built']}, "
          f"for torch >= {info['torch_oldest']}")
    if args.site:
        where = os.path.realpath(mmkernels.__file__)
        assert where.startswith(os.path.realpath(args.site) + os.sep), where
    assert info["c_extension_loaded"], info["load_error"]
    assert info["cuda_kernels"] is (args.cuda_kernels == "loaded"), (info["cuda_kernels"], info["cuda_load_error"])
    print(f"  _C loaded; CUDA kernels {'loaded' if info['cuda_kernels'] else 'not loaded: ' + info['cuda_load_error']}")

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(37, 6, generator=g)
    noise = -torch.log(-torch.log(torch.rand(37, 6, generator=g)))
    mask = torch.rand(70, generator=g) < 0.4
    for name in NATIVE_OPS:
        assert _extension.has_op(name, "cpu") and _extension._native_registration(f"mmkernels::{name}", "CPU"), name
    torch.library.opcheck(torch.ops.mmkernels.moe_route.default, (logits, 2, 9, noise, None))
    torch.library.opcheck(torch.ops.mmkernels.plora_tile_flags.default, (mask, 16))
    print("  opcheck: moe_route, plora_tile_flags OK")

    x, w0, b0 = torch.randn(70, 16, generator=g), torch.randn(12, 16, generator=g), torch.randn(12, generator=g)
    a, b = torch.randn(4, 16, generator=g), torch.randn(12, 4, generator=g)
    with _RecordOps() as rec:
        r = mmkernels.moe_route(logits, 2, 9, noise)
        with mmkernels.use_backend("triton"):
            y = mmkernels.plora_linear(x, w0, b0, a, b, mask, scaling=0.5)
    for name in NATIVE_OPS:
        assert f"mmkernels::{name}" in rec.names, (name, rec.names)
    want = mmkernels.plora_linear_reference(x.double(), w0.double(), b0.double(), a.double(), b.double(), mask,
                                            scaling=0.5)
    torch.testing.assert_close(y.double(), want, rtol=1e-4, atol=1e-4)
    from mmkernels.ops.moe.reference import route_reference

    ref = route_reference(logits, 2, 9, noise)
    assert torch.equal(r.indices, ref.indices) and torch.equal(r.sorted_slots, ref.sorted_slots)
    print("  mmkernels.moe_route and mmkernels.plora_linear ran torch.ops.mmkernels.moe_route / plora_tile_flags "
          "(the CPU kernels of _C) and match the reference")
    return 0


if __name__ == "__main__":
    sys.exit(main())
