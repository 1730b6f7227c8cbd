"""Which path and which block sizes each GEMM role takes: the one table per GPU generation.

A *role* is one GEMM of an operator (the MoE layer's first GEMM, the PLoRA backward's dX, ...).  For
each role and each kind of device there is one entry:

* ``path``: ``"triton"`` (the shared core, :mod:`.kernels`) or ``"torch._grouped_mm"`` (torch's
  grouped GEMM -- CUTLASS on sm_90/sm_100 -- with the operator's gathers and epilogues in torch ops;
  MoE and ``grouped_gemm`` roles only);
* the block sizes and launch options of the Triton kernel (``BLOCK_*``, ``GROUP_M``, ``num_warps``,
  ``num_stages``) and ``ctas_per_sm``, the CTAs of that kernel one SM holds (the persistent grid is
  ``ctas_per_sm`` times the SM count);
* ``source``: where the entry comes from -- ``"default"`` (chosen from the offline sm_90 compile, not
  timed) or ``"measured at <commit> on <card>"`` (a GPU sweep, ``benchmarks/tune_gemm.py``).

Tables: ``sm90`` (Hopper, half precision), ``sm80`` (other CUDA GPUs, half precision), ``fp32`` (any
CUDA GPU, float32) and ``interpreter`` (CPU tensors under Triton's interpreter: the smallest legal
tiles, so tests stay fast).  ``MMKERNELS_GEMM_CONFIGS=<json>`` (written by the sweep) overrides the
half-precision entries of one GPU generation; :func:`forced_arch` makes every lookup use one table
(the offline compile checks use it to compile exactly what a GPU runs).
"""
from __future__ import annotations

import contextlib
import functools
import json
import os
from dataclasses import dataclass, replace

import torch

TRITON = "triton"
GROUPED_MM = "torch._grouped_mm"
PATHS = (TRITON, GROUPED_MM)

ROLES = {
    "moe.up": "MoE first GEMM: gathered x rows @ w1[e].T + b1, then the activation (Z and H stored)",
    "moe.up_gated": "MoE first GEMM, gated: gate and up rows of w1 in one pass, act(gate) * up",
    "moe.down": "MoE second GEMM: H @ w2[e].T + b2, scattered to the slots",
    "moe.dz": "MoE backward: dO @ w2[e] * act'(Z)",
    "moe.dz_gated": "MoE backward, gated: dO @ w2[e] split into d(gate) and d(up)",
    "moe.dx": "MoE backward: dZ @ w1[e], scattered to the slots",
    "moe.wgrad": "MoE weight gradients dW1, dW2 and the bias sums (reduction over each expert's rows)",
    "grouped.fwd": "grouped_gemm: a @ b[e].T + bias[e]",
    "grouped.dgrad": "grouped_gemm backward: dc @ b[e]",
    "grouped.wgrad": "grouped_gemm backward: db[e] = dc[group e].T @ a[group e], dbias",
    "plora.fwd": "PLoRA forward: x @ W0.T + b0, plus scaling * S @ B.T on visual rows",
    "plora.dx": "PLoRA backward: dY @ W0, plus dS @ A on visual rows",
    "plora.dx_dropout": "PLoRA backward with LoRA dropout: dY @ W0, plus (dS @ A) * keep on visual rows",
    "plora.ds": "PLoRA backward: dS = scaling * dY @ B on the visual row tiles",
}
# roles torch._grouped_mm can compute (the PLoRA GEMMs are dense: their torch peer is cuBLAS)
GROUPED_MM_ROLES = tuple(r for r in ROLES if r.startswith(("moe.", "grouped.")))
WGRAD_ROLES = ("moe.wgrad", "grouped.wgrad")


@dataclass(frozen=True)
class Entry:
    """One role's choice on one kind of device (see the module docstring)."""
    blocks: dict
    path: str = TRITON
    source: str = "default"
    why: str = ""                       # set by :func:`choose` when it falls back from the table's path
    ctas_per_sm: int = 1

    def launch_options(self) -> dict:
        """The Triton kernel's block constexprs and launch options."""
        return dict(self.blocks)


def _row(bm, bn, bk, warps, stages, group_m=8, ctas=1, split=1):
    """A row-GEMM entry.  ``split`` 2 / 4: the epilogue stores column halves / quarters one after the
    other (fewer live registers)."""
    return Entry(dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=group_m, EPI_SPLIT=split,
                      num_warps=warps, num_stages=stages), ctas_per_sm=ctas)


def _wgrad(bn, bk, bm, warps, stages, ctas=1):
    return Entry(dict(BLOCK_N=bn, BLOCK_K=bk, BLOCK_M=bm, num_warps=warps, num_stages=stages), ctas_per_sm=ctas)


# The PLoRA forward, dX and dS tiles were measured on an H200 (benchmarks/tune_plora.py); dX's 128 output
# columns and 64-wide reduction were its BLOCK_K and BLOCK_N, dS's 128 output columns its BLOCK_R.
_PLORA_MEASURED = "measured at b9ce55f5bd76f75f8cca4d5fdcef08ebea76dd69 on NVIDIA H200"

# Hopper: 128x256 output tiles (two warpgroups, each HGMMA 64x256x16) with 3 stages in 144-176 KB,
# one CTA per SM; weights through TMA.  The MoE wgrad uses the PLoRA dW0 tile (128x256 per program,
# reduction over 64 rows per step).  A gated role keeps two 128x128 accumulators.
_SM90 = {
    "moe.up": _row(128, 256, 64, 8, 3, split=2),
    "moe.up_gated": _row(128, 128, 64, 8, 3, split=2),
    "moe.down": _row(128, 256, 64, 8, 3, split=2),
    "moe.dz": _row(128, 256, 64, 8, 3, split=4),
    "moe.dz_gated": _row(128, 256, 64, 8, 3, split=4),
    "moe.dx": _row(128, 256, 64, 8, 3, split=2),
    "moe.wgrad": _wgrad(128, 256, 64, 8, 3),
    "grouped.fwd": _row(128, 256, 64, 8, 3, split=2),
    "grouped.dgrad": _row(128, 256, 64, 8, 3, split=2),
    "grouped.wgrad": _wgrad(128, 256, 64, 8, 3),
    "plora.fwd": replace(_row(256, 128, 64, 8, 3), source=_PLORA_MEASURED),
    # dX: the measured 128x128x64 (4 stages) computed the LoRA term in a second accumulator; with it
    # in the same accumulator a 128x256 tile no longer spills and halves the instructions per MMA clock
    # (0.34 -> 0.18); a default until the sweep (benchmarks/tune_gemm.py) has timed both
    "plora.dx": _row(128, 256, 64, 8, 3, split=2),
    # with dropout the LoRA term (times its keep-mask) is in the same accumulator too, but drawing the
    # mask for a 128x256 tile spills (96 B); 128x128 with a 128-wide reduction step does not and keeps
    # the main loop at 0.20 instructions per MMA clock (the measured 128x128x64, 4 stages: 0.34).
    # A default until the sweep (benchmarks/tune_gemm.py, which keeps the measured tile a candidate).
    "plora.dx_dropout": _row(128, 128, 128, 8, 3),
    "plora.ds": replace(_row(64, 128, 64, 4, 4, ctas=2), source=_PLORA_MEASURED),
}
# Ampere and other CUDA GPUs (no TMA): 128x128x64 tiles in 96 KB of shared memory (one CTA per A100 SM).
_SM80 = {role: _row(128, 128, 64, 8, 3) for role in ROLES}
_SM80.update({"moe.up_gated": _row(128, 64, 64, 8, 3), "moe.dz_gated": _row(128, 64, 64, 8, 3),
              "moe.wgrad": _wgrad(128, 128, 64, 8, 3), "grouped.wgrad": _wgrad(128, 128, 64, 8, 3)})
# float32 on any CUDA GPU (tf32 or exact fp32 dots): shorter K blocks and two stages
_FP32 = {role: _row(128, 128, 32, 8, 2) for role in ROLES}
_FP32.update({"moe.up_gated": _row(128, 64, 32, 8, 2), "moe.dz_gated": _row(128, 64, 32, 8, 2),
              "moe.wgrad": _wgrad(64, 64, 32, 4, 2, ctas=2), "grouped.wgrad": _wgrad(64, 64, 32, 4, 2, ctas=2),
              "plora.dx": _row(128, 128, 64, 8, 2), "plora.dx_dropout": _row(128, 128, 64, 8, 2),
              "plora.ds": _row(128, 128, 64, 8, 2)})
# Triton's CPU interpreter: the smallest legal tl.dot tiles (PLoRA's BLOCK_M a multiple of its 16-row flags)
_INTERPRETER = {role: _row(16, 16, 16, 1, 1, group_m=2) for role in ROLES}
_INTERPRETER.update({"moe.wgrad": _wgrad(16, 16, 16, 1, 1), "grouped.wgrad": _wgrad(16, 16, 16, 1, 1),
                     "plora.fwd": _row(32, 32, 16, 1, 1, group_m=2), "plora.dx": _row(16, 32, 16, 1, 1, group_m=2),
                     "plora.dx_dropout": _row(128, 128, 128, 8, 3),
                     "plora.ds": _row(32, 16, 16, 1, 1, group_m=2)})
for _table in (_INTERPRETER,):
    for _role, _entry in list(_table.items()):
        _table[_role] = replace(_entry, blocks={k: v for k, v in _entry.blocks.items()
                                                if k not in ("num_warps", "num_stages")})

TABLES = {"sm90": _SM90, "sm80": _SM80, "fp32": _FP32, "interpreter": _INTERPRETER}
# persistent programs under the interpreter (a few, so the tile loop runs several tiles each)
INTERPRETER_PROGRAMS = 3
# SMs of the card an offline compile targets with forced_arch("sm90") (H100 SXM / H200)
SM90_NUM_SMS = 132

_FORCED: list = []


@contextlib.contextmanager
def forced_arch(arch: str, num_sms: int = SM90_NUM_SMS):
    """Look every role up in ``TABLES[arch]`` (``"fp32"`` entries for float32 when ``arch`` is a GPU
    table) whatever the tensors' device, with ``num_sms`` SMs: what the offline compile checks use to
    compile, on a machine without a GPU, exactly what that GPU runs."""
    if arch not in TABLES:
        raise ValueError(f"arch must be one of {sorted(TABLES)}, got {arch!r}")
    _FORCED.append((arch, num_sms))
    try:
        yield
    finally:
        _FORCED.pop()


@functools.lru_cache(maxsize=None)
def _capability(index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _cuda_index(device: torch.device) -> int:
    return device.index if device.index is not None else torch.cuda.current_device()


def arch_of(device: torch.device, dtype: torch.dtype) -> str:
    """The table a launch on ``device`` in ``dtype`` reads."""
    if _FORCED:
        arch = _FORCED[-1][0]
        return "fp32" if dtype == torch.float32 and arch != "interpreter" else arch
    if device.type != "cuda":
        return "interpreter"
    if dtype == torch.float32:
        return "fp32"
    return "sm90" if _capability(_cuda_index(device))[0] >= 9 else "sm80"


def num_sms(device: torch.device) -> int:
    """SMs of ``device`` (cached device properties: no synchronisation), or the interpreter's small
    program count on CPU."""
    if _FORCED:
        return _FORCED[-1][1] if _FORCED[-1][0] != "interpreter" else INTERPRETER_PROGRAMS
    if device.type != "cuda":
        return INTERPRETER_PROGRAMS
    return _sm_count(_cuda_index(device))


def _load_overrides(path: str | None) -> tuple[str | None, dict]:
    """``MMKERNELS_GEMM_CONFIGS``: ``{"arch": "sm90", "commit": ..., "card": ..., "roles": {role:
    {"path": ..., "blocks": {...}, "ctas_per_sm": ...}}}`` as written by benchmarks/tune_gemm.py; it
    replaces the entries of those roles in the table ``arch``."""
    if not path:
        return None, {}
    with open(path) as f:
        doc = json.load(f)
    arch = doc.get("arch")
    if arch not in TABLES:
        raise ValueError(f"MMKERNELS_GEMM_CONFIGS={path}: 'arch' must be one of {sorted(TABLES)}, got {arch!r}")
    roles = doc.get("roles", {})
    unknown = set(roles) - set(ROLES)
    if unknown:
        raise ValueError(f"MMKERNELS_GEMM_CONFIGS={path}: unknown role(s) {sorted(unknown)}; expected some of "
                         f"{sorted(ROLES)}")
    source = f"measured at {doc.get('commit', 'unknown commit')} on {doc.get('card', 'unknown card')}"
    out = {}
    for role, spec in roles.items():
        path_ = spec.get("path", TRITON)
        if path_ not in PATHS or (path_ == GROUPED_MM and role not in GROUPED_MM_ROLES):
            raise ValueError(f"MMKERNELS_GEMM_CONFIGS={path}: role {role!r} cannot take path {path_!r}")
        base = TABLES[arch][role]
        out[role] = Entry(dict(base.blocks, **spec.get("blocks", {})), path=path_, source=source,
                          ctas_per_sm=int(spec.get("ctas_per_sm", base.ctas_per_sm)))
    return arch, out


_OVERRIDE_ARCH, _OVERRIDES = _load_overrides(os.environ.get("MMKERNELS_GEMM_CONFIGS"))


def entry(role: str, device: torch.device, dtype: torch.dtype) -> Entry:
    """The table entry of ``role`` for a launch on ``device`` in ``dtype`` (sweep overrides applied)."""
    arch = arch_of(device, dtype)
    if arch == _OVERRIDE_ARCH and role in _OVERRIDES:
        return _OVERRIDES[role]
    return TABLES[arch][role]


def grouped_mm_unavailable(device_type: str, capability: tuple[int, int] | None, dtype: torch.dtype,
                           widths=()) -> str | None:
    """Why ``torch._grouped_mm`` is not a fast, sync-free path here (None when it is): torch must have
    the op, the device must be a CUDA sm_90/sm_100 (elsewhere torch runs one ``mm`` per group after
    copying the offsets to the host), the dtype bfloat16 (its CUTLASS kernels' type), and each
    ``width`` (row length of an operand) a multiple of 16 bytes.  Pure: testable without a GPU."""
    if not hasattr(torch, "_grouped_mm"):
        return f"torch {torch.__version__} has no torch._grouped_mm"
    if device_type != "cuda":
        return f"torch._grouped_mm's fused kernels need a CUDA device, not {device_type}"
    if capability is None or capability[0] not in (9, 10):
        return (f"torch._grouped_mm is fused on sm_90/sm_100 only; on sm_{capability[0]}{capability[1]} it loops "
                "over the groups after a host synchronisation" if capability else "unknown CUDA capability")
    if dtype != torch.bfloat16:
        return f"torch._grouped_mm's fused kernels take bfloat16, not {str(dtype).replace('torch.', '')}"
    bad = [w for w in widths if (w * torch.finfo(dtype).bits // 8) % 16]
    if bad:
        return f"torch._grouped_mm needs rows of a multiple of 16 bytes; width(s) {bad} in bfloat16 are not"
    return None


def choose(role: str, device: torch.device, dtype: torch.dtype, widths=()) -> Entry:
    """The entry a launch uses: the table's, except that a ``torch._grouped_mm`` entry falls back to
    the Triton kernel (with ``why`` saying so) where torch's kernel is not usable."""
    e = entry(role, device, dtype)
    if e.path == GROUPED_MM:
        cap = _capability(_cuda_index(device)) if device.type == "cuda" and not _FORCED else None
        if _FORCED:
            cap = {"sm90": (9, 0), "sm80": (8, 0)}.get(_FORCED[-1][0])
        why = grouped_mm_unavailable("cuda" if _FORCED else device.type, cap, dtype, widths)
        if why:
            return replace(e, path=TRITON, why=f"table says {GROUPED_MM} ({e.source}), but {why}")
    return e


def describe(device: torch.device | None = None, dtype: torch.dtype = torch.bfloat16) -> list[dict]:
    """Per role: the path and blocks a launch on ``device`` (default: the current CUDA device, else CPU)
    in ``dtype`` takes, and why -- what ``python -m mmkernels info`` prints."""
    if device is None:
        device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    arch = arch_of(device, dtype)
    cap = _capability(_cuda_index(device)) if device.type == "cuda" else None
    grouped_mm = grouped_mm_unavailable(device.type, cap, dtype)
    rows = []
    for role, what in ROLES.items():
        e = choose(role, device, dtype)
        if e.why:
            reason = e.why
        elif e.source != "default":
            reason = e.source
        elif arch == "interpreter":
            reason = "interpreter tiles (CPU tensors run under Triton's interpreter)"
        else:
            reason = "default (not measured)"
        rows.append(dict(role=role, what=what, arch=arch, path=e.path, blocks=e.blocks, why=reason,
                         grouped_mm=grouped_mm))
    return rows
