"""Verification of every kernel against its float64 reference.

This is the verification table that ``make bench`` prints and ``python -m mmkernels verify`` runs
from an installed package: each operator's Triton kernels (forward and every gradient) and native
ops, run on fresh random inputs in float32 / float16 / bfloat16, compared with the reference
evaluated in float64 on the same inputs through :func:`mmkernels.testing.compare` (tolerances are
stated once per dtype in :data:`mmkernels.testing.TOLERANCES`).

On CPU the Triton kernels can only run under Triton's interpreter, which must be switched on
(``TRITON_INTERPRET=1``) before mmkernels is imported; ``python -m mmkernels verify`` takes care
of that.  API::

    from mmkernels import verify
    reports = verify.run(["plora"], device="cpu")        # prints progress and the tables
    ok = all(r.ok for r in reports)
    rows, ok = verify.verify_plora("cpu")                # just the rows of one operator

Every verifier returns ``(rows, ok)``; a row is a dict with the columns of ``COLUMNS[op]`` and a
``result`` of ``PASS`` or ``FAIL ...``.  A case that raises is a FAIL row, not an abort.
"""
from __future__ import annotations

import copy
import math
import sys
import time
import zlib
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Sequence, TextIO

import torch
import torch.nn.functional as F
from torch import nn

from .testing import TOLERANCES, compare

__all__ = ["OPS", "COLUMNS", "DESCRIPTIONS", "Report", "format_table", "resolve_device", "run",
           "verify_hyper_attention", "verify_moe", "verify_plora"]

OPS = ("plora", "moe", "hyper_attention")

_ERR_COLUMNS = [("max_err", "max_err", ".2e"), ("rms_err", "rms_err", ".2e"), ("tol_max", "tol_max", ".0e"),
                ("tol_rms", "tol_rms", ".0e"), ("result", "result", None)]
COLUMNS: dict[str, list[tuple[str, str, str | None]]] = {
    "plora": [("shape", "shape", None), ("dtype", "dtype", None), ("mask", "mask", None),
              ("tensor", "tensor", None), *_ERR_COLUMNS],
    "moe": [("check", "check", None), ("dtype", "dtype", None), ("tensor", "tensor", None), *_ERR_COLUMNS],
    "hyper_attention": [("shape", "shape", None), ("dtype", "dtype", None), ("mode", "mode", None),
                        ("tensor", "tensor", None), *_ERR_COLUMNS],
}
DESCRIPTIONS = {
    "plora": "plora_linear, triton backend vs float64 reference: y and every gradient (bias, scaling 0.5, dropout 0)",
    "moe": "routing op vs reference (exact); MoE layer vs the DeepSpeed 0.9.5 einsum formulation (in-package "
           "mirror, float64); "
           "triton grouped-GEMM FFN vs float64 reference: y and every gradient",
    "hyper_attention": "hyper_attention, triton backend vs float64 reference: out and every gradient, "
                       "decode step, visual_kv producer",
}

Progress = Callable[[str], None]


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``None`` -> cuda if available, else cpu.  Raises ValueError if the Triton kernels cannot run there."""
    from ._interpreter import interpreter_enabled

    dev = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' requested but torch.cuda.is_available() is False")
    if dev.type == "cpu" and not interpreter_enabled():
        raise ValueError("the Triton kernels run on CPU only under Triton's interpreter: set TRITON_INTERPRET=1 "
                         "before importing mmkernels (`python -m mmkernels verify` does this itself)")
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'cpu' or 'cuda', got {device!r}")
    return dev


# --------------------------------------------------------------------------- case runner

@dataclass
class _Case:
    label: str
    fn: Callable[[], list[dict]]
    crash_row: dict[str, Any]   # the key columns of the FAIL row written if ``fn`` raises


def _run_cases(op: str, cases: Sequence[_Case], progress: Progress | None,
               device: torch.device) -> tuple[list[dict], bool]:
    """Run ``cases`` under a forked random generator (the CPU's and ``device``'s): whatever a case draws
    from torch's global generator (module initialisations, dropout seeds), the caller's random stream is
    where it was."""
    rows: list[dict] = []
    for i, case in enumerate(cases, 1):
        t0 = time.perf_counter()
        try:
            with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
                got = case.fn()
        except Exception as e:  # a crash is a failure, not an abort of the whole run
            got = [dict(case.crash_row, tensor="(all)", max_err=None, rms_err=None, tol_max=None, tol_rms=None,
                        result=f"FAIL ({type(e).__name__}: {str(e)[:160]})")]
        rows.extend(got)
        if progress is not None:
            verdict = "PASS" if all(r["result"].startswith("PASS") for r in got) else "FAIL"
            progress(f"  {op} [{i}/{len(cases)}] {case.label}: {verdict} ({time.perf_counter() - t0:.1f}s)")
    return rows, all(r["result"].startswith("PASS") for r in rows)


def _err_row(name: str, actual: torch.Tensor | None, expected: torch.Tensor, dtype: torch.dtype,
             tol_scale: float = 1.0) -> dict[str, Any]:
    """max/rms error columns of one tensor (``tol_scale`` widens the dtype tolerance)."""
    tol = TOLERANCES[dtype]
    if actual is None:
        return dict(max_err=math.inf, rms_err=math.inf, tol_max=tol.max_err * tol_scale,
                    tol_rms=tol.rms_err * tol_scale, result="FAIL (no tensor)")
    c = compare(name, actual, expected, dtype)
    ok = c.max_err <= tol.max_err * tol_scale and c.rms_err <= tol.rms_err * tol_scale
    note = f" ({tol_scale:g}x tol)" if tol_scale != 1.0 else ""
    return dict(max_err=c.max_err, rms_err=c.rms_err, tol_max=tol.max_err * tol_scale,
                tol_rms=tol.rms_err * tol_scale, result=("PASS" if ok else "FAIL") + note)


def _gen(*key: Any) -> torch.Generator:
    return torch.Generator(device="cpu").manual_seed(zlib.crc32(repr(key).encode()))


# --------------------------------------------------------------------------- plora

PLORA_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
PLORA_MASKS = ("none", "scattered", "all")


def plora_cases(device: torch.device, quick: bool) -> list[tuple[int, int, int, int]]:
    """(M, K, N, r): tiny under the CPU interpreter, moderate on CUDA (odd M exercises the tails)."""
    if device.type == "cuda":
        return [(1000, 512, 768, 64)] if quick else [(1000, 512, 768, 64), (77, 320, 200, 48)]
    return [(37, 48, 40, 16)] if quick else [(37, 48, 40, 16), (64, 48, 40, 16)]


def _plora_mask(M: int, kind: str, device) -> torch.Tensor:
    if kind == "none":
        return torch.zeros(M, dtype=torch.bool, device=device)
    if kind == "all":
        return torch.ones(M, dtype=torch.bool, device=device)
    return (torch.rand(M, generator=torch.Generator().manual_seed(1234)) < 0.5).to(device)


def _plora_one(M: int, K: int, N: int, r: int, dtype: torch.dtype, mask_kind: str, device) -> list[dict]:
    import mmkernels

    g = _gen("plora", M, K, N, r, str(dtype), mask_kind)

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(device=device, dtype=dtype)

    x, w, b = rnd(M, K), rnd(N, K, scale=K ** -0.5), rnd(N, scale=0.5)
    a, lb = rnd(r, K, scale=K ** -0.5), rnd(N, r, scale=r ** -0.5)  # nonzero B: the LoRA term and dA count
    dy = rnd(M, N)
    mask = _plora_mask(M, mask_kind, device)
    leaves = [t.detach().clone().requires_grad_(True) for t in (x, w, b, a, lb)]
    with mmkernels.use_backend("triton"):
        y = mmkernels.plora_linear(*leaves, mask, scaling=0.5, dropout_p=0.0, training=False)
    y.backward(dy)
    refs = [t.detach().to(torch.float64).requires_grad_(True) for t in (x, w, b, a, lb)]
    y_ref = mmkernels.plora_linear_reference(*refs, mask, scaling=0.5, dropout_p=0.0, training=False)
    y_ref.backward(dy.to(torch.float64))
    key = dict(shape=f"M{M} K{K} N{N} r{r}", dtype=_dtype_name(dtype), mask=mask_kind)
    return [dict(key, tensor=name, **_err_row(name, got, want, dtype))
            for name, got, want in zip(("y", "dx", "dW0", "db0", "dA", "dB"),
                                       [y] + [t.grad for t in leaves], [y_ref] + [t.grad for t in refs])]


def verify_plora(device: str | torch.device | None = None, quick: bool = False,
                 progress: Progress | None = None) -> tuple[list[dict], bool]:
    """Partial-LoRA: every case, dtype and mask kind (none / scattered / all visual rows)."""
    dev = resolve_device(device)
    cases = []
    for (M, K, N, r) in plora_cases(dev, quick):
        for dtype in PLORA_DTYPES:
            for mask_kind in PLORA_MASKS:
                key = dict(shape=f"M{M} K{K} N{N} r{r}", dtype=_dtype_name(dtype), mask=mask_kind)
                cases.append(_Case(f"{key['shape']} {key['dtype']} mask={mask_kind}",
                                   lambda a=(M, K, N, r, dtype, mask_kind): _plora_one(*a, dev), key))
    return _run_cases("plora", cases, progress, dev)


# --------------------------------------------------------------------------- moe

MOE_EXPERTS, MOE_K = 4, 2


class _GeluMLP(nn.Module):
    """phi-2's MLP (MoE-LLaVA's expert): fc2(gelu_tanh(fc1 x))."""

    def __init__(self, hidden: int, ffn: int, dtype=None):
        super().__init__()
        self.fc1 = nn.Linear(hidden, ffn, dtype=dtype)
        self.fc2 = nn.Linear(ffn, hidden, dtype=dtype)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


def _gumbel(S: int, E: int, g: torch.Generator) -> torch.Tensor:
    return -torch.log(-torch.log(torch.rand(S, E, generator=g).clamp(1e-20, 1 - 1e-7)))


def moe_cases(device: torch.device, quick: bool):
    """((S, H, F, activation) cases, dtypes) of the Triton FFN check."""
    if device.type == "cuda":
        return [(300, 256, 512, a) for a in ("gelu_tanh", "swiglu")], (torch.float32, torch.float16, torch.bfloat16)
    # CPU interpreter: tiny shapes; bf16 is checked on the GPU only
    cases = [(37, 40, 24, a) for a in ("gelu_tanh", "swiglu")]
    return (cases[:1] if quick else cases), (torch.float32, torch.float16)


def _moe_route_case(S: int, k: int, cf: float | None, device) -> list[dict]:
    from .ops.moe import launch
    from .ops.moe.reference import capacity_for, route_reference

    g = _gen("moe-route", S, k, cf)
    E = MOE_EXPERTS
    logits = torch.randn(S, E, generator=g).to(device) * 2
    noise = _gumbel(S, E, g).to(device)
    cap = capacity_for(S, E, cf, k, 0) if cf else -1
    got = launch.route(logits, k, cap, noise if k > 1 else None, None)
    want = route_reference(logits, k, None if cap < 0 else cap, noise if k > 1 else None)
    ok = all(torch.equal(a, b) for a, b in zip(got, (want.indices, want.keep, want.exp_counts, want.top1_counts,
                                                     want.sorted_slots, want.expert_offsets)))
    path = "native" if launch.NATIVE_ROUTE_OP.runs_on(logits.device) else "torch fallback"
    check = f"route S{S} k{k} cf{cf} ({path})"
    return [dict(check=check, dtype="float32", tensor="decisions", max_err=None, rms_err=None, tol_max=None,
                 tol_rms=None, result="PASS" if ok else "FAIL")]


def _moe_layer_vs_deepspeed() -> list[dict]:
    """mmkernels.MoE (reference backend) vs DeepSpeed 0.9.5's einsum gating + MOELayer (the in-package
    mirror; the benchmark adds the installed DeepSpeed), float64, with drops."""
    import mmkernels
    from .ops.moe.reference import deepspeed_einsum_moe

    S, Hd, Fd, E = 333, 64, 128, MOE_EXPERTS
    g = _gen("moe-layer", S, Hd, Fd)
    template = _GeluMLP(Hd, Fd, dtype=torch.float64)
    moe = mmkernels.MoE(Hd, template, num_experts=E, k=MOE_K, capacity_factor=1.5, eval_capacity_factor=2.0,
                        min_capacity=0).train()
    with torch.no_grad():
        moe.w1.add_(torch.randn(moe.w1.shape, generator=g, dtype=moe.w1.dtype) * 0.02)  # distinct experts
        moe.w2.add_(torch.randn(moe.w2.shape, generator=g, dtype=moe.w2.dtype) * 0.02)
        moe.gate_weight[0].add_(0.15)  # skewed: expert 0 is most rows' first choice, so tokens are dropped
    moe.gate_weight.data = moe.gate_weight.data.float()
    ds = moe.deepspeed_state_dict()
    experts = []
    for e in range(E):
        prefix = f"deepspeed_moe.experts.deepspeed_experts.{e}."
        ex = copy.deepcopy(template)
        ex.load_state_dict({k[len(prefix):]: v for k, v in ds.items() if k.startswith(prefix)})
        experts.append(ex)
    x = torch.randn(S, Hd, generator=g, dtype=torch.float64)
    noise = _gumbel(S, E, g)
    with torch.no_grad(), mmkernels.use_backend("reference"):
        y, l_aux, counts = moe(x, second_expert_noise=noise)
        y_ds, l_ds, c_ds = deepspeed_einsum_moe(x, moe.gate_weight, experts, MOE_K, moe.capacity(S), noise)
    check = "MoE vs DeepSpeed 0.9.5 einsum mirror (train, cf 1.5, drops)"
    same = bool(torch.allclose(l_aux, l_ds.float(), rtol=1e-6) and torch.equal(counts, c_ds.to(counts)))
    return [dict(check=check, dtype="float64", tensor="y", **_err_row("y", y, y_ds, torch.float64)),
            dict(check=check, dtype="float32", tensor="l_aux, exp_counts", max_err=None, rms_err=None,
                 tol_max=None, tol_rms=None, result="PASS" if same else "FAIL")]


def _moe_ffn_case(S: int, Hd: int, Fd: int, act: str, dtype: torch.dtype, device) -> list[dict]:
    import mmkernels
    from .ops.moe.reference import capacity_for, moe_ffn_reference

    E = MOE_EXPERTS
    g = _gen("moe-ffn", S, Hd, Fd, act, str(dtype))
    x = torch.randn(S, Hd, generator=g).to(device, dtype)
    wg = torch.randn(E, Hd, generator=g).to(device)
    F1 = 2 * Fd if act == "swiglu" else Fd
    w1 = (torch.randn(E, F1, Hd, generator=g) / Hd ** 0.5).to(device, dtype)
    w2 = (torch.randn(E, Hd, Fd, generator=g) / Fd ** 0.5).to(device, dtype)
    b1 = (torch.randn(E, F1, generator=g) * 0.1).to(device, dtype) if act == "gelu_tanh" else None
    b2 = (torch.randn(E, Hd, generator=g) * 0.1).to(device, dtype) if act == "gelu_tanh" else None
    noise = _gumbel(S, E, g).to(device)
    cap = capacity_for(S, E, 0.75, MOE_K, 0)  # tokens are dropped
    leaves = [t.clone().requires_grad_() if t is not None else None for t in (x, wg, w1, b1, w2, b2)]
    r = mmkernels.moe_route(F.linear(leaves[0].float(), leaves[1]), MOE_K, cap, noise)
    with mmkernels.use_backend("triton"):
        y = mmkernels.moe_ffn(leaves[0], r, *leaves[2:], activation=act)
    dy = torch.randn(S, Hd, generator=g).to(device, dtype)
    (y.float() * dy.float()).sum().backward()
    refs = [t.detach().double().requires_grad_() if t is not None else None for t in (x, wg, w1, b1, w2, b2)]
    r2 = mmkernels.moe_route(F.linear(refs[0], refs[1]).float(), MOE_K, cap, noise)
    y_ref = moe_ffn_reference(refs[0], r2.weights.double(), r2.sorted_slots, r2.expert_offsets, *refs[2:], act)
    (y_ref * dy.double()).sum().backward()
    check = f"triton S{S} H{Hd} F{Fd} {act} cap{cap}"
    pairs = [("y", y, y_ref)] + [(n, a.grad, b.grad) for n, a, b in
                                 zip(("dx", "dWg", "dw1", "db1", "dw2", "db2"), leaves, refs) if a is not None]
    # dWg goes through the softmax backward (cancellation): the dtype tolerance x 4
    return [dict(check=check, dtype=_dtype_name(dtype), tensor=name,
                 **_err_row(name, a, b, dtype, tol_scale=4.0 if name == "dWg" else 1.0))
            for name, a, b in pairs]


def verify_moe(device: str | torch.device | None = None, quick: bool = False,
               progress: Progress | None = None) -> tuple[list[dict], bool]:
    """MoE: (a) the routing op (native when built) equals the torch reference exactly; (b) the MoE
    layer equals DeepSpeed 0.9.5's einsum formulation (in-package mirror) in float64; (c) the Triton grouped-GEMM FFN,
    forward and every gradient, against the float64 reference."""
    dev = resolve_device(device)
    cases = []
    for S, k, cf in ((1000, 2, 1.5), (777, 1, 1.0), (513, 2, None)):
        label = f"route S{S} k{k} cf{cf}"
        cases.append(_Case(label, lambda a=(S, k, cf): _moe_route_case(*a, dev),
                           dict(check=label, dtype="float32")))
    cases.append(_Case("MoE layer vs DeepSpeed 0.9.5 einsum mirror", _moe_layer_vs_deepspeed,
                       dict(check="MoE vs DeepSpeed 0.9.5 einsum mirror", dtype="float64")))
    shapes, dtypes = moe_cases(dev, quick)
    for (S, Hd, Fd, act) in shapes:
        for dtype in dtypes:
            label = f"triton S{S} H{Hd} F{Fd} {act}"
            cases.append(_Case(f"{label} {_dtype_name(dtype)}",
                               lambda a=(S, Hd, Fd, act, dtype): _moe_ffn_case(*a, dev),
                               dict(check=label, dtype=_dtype_name(dtype))))
    return _run_cases("moe", cases, progress, dev)


# --------------------------------------------------------------------------- hyper attention

HYPER_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
HYPER_MODES = ("gated", "joint")


def hyper_attention_cases(device: torch.device, quick: bool) -> list[dict]:
    """Tiny under the interpreter, moderate on CUDA (odd sizes exercise the tails)."""
    if device.type == "cuda":
        return [dict(B=2, L=333, H=8, Hkv=2, D=128, T=97, positions=[[0, 40, 41], [100]])]
    return [dict(B=2, L=29, H=4, Hkv=2, D=32, T=11, positions=[[0, 8, 9], [28]])]


def _hyper_rows(prefix: str, names, got, want, dtype, shape: str, mode: str) -> list[dict]:
    return [dict(shape=shape, dtype=_dtype_name(dtype), mode=mode, tensor=f"{prefix}{name}",
                 **_err_row(name, a, b, dtype)) for name, a, b in zip(names, got, want)]


def _hyper_shape(case: dict) -> str:
    n = sum(len(p) for p in case["positions"])
    return f"B{case['B']} L{case['L']} H{case['H']}/{case['Hkv']} D{case['D']} T{case['T']} N{n}"


def _hyper_one(case: dict, dtype: torch.dtype, mode: str, device) -> list[dict]:
    import mmkernels

    B, L, Hq, Hkv, D, T = case["B"], case["L"], case["H"], case["Hkv"], case["D"], case["T"]
    flat = [p for ps in case["positions"] for p in ps]
    N = len(flat)
    pos = torch.tensor(flat, dtype=torch.int32, device=device)
    counts = [len(p) for p in case["positions"]]
    cu = torch.tensor([0] + [sum(counts[:i + 1]) for i in range(len(counts))], dtype=torch.int32, device=device)
    g = _gen("hyper", repr(case), str(dtype), mode)

    def rnd(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64).to(device=device, dtype=dtype)

    q, k, v = rnd(B, L, Hq, D), rnd(B, L, Hkv, D), rnd(B, L, Hkv, D)
    kv, vv = rnd(N, T, Hkv, D), rnd(N, T, Hkv, D)
    gate = rnd(Hq * D)
    dout = rnd(B, L, Hq, D)
    names = ["out", "dq", "dk", "dv", "dk_vis", "dv_vis"] + (["dgate"] if mode == "gated" else [])
    inputs = [q, k, v, kv, vv] + ([gate] if mode == "gated" else [])
    leaves = [t.detach().clone().requires_grad_(True) for t in inputs]
    with mmkernels.use_backend("triton"):
        out = mmkernels.hyper_attention(*leaves[:5], pos, cu, mode=mode, gate=leaves[5] if mode == "gated" else None)
        out.backward(dout)
        dec = mmkernels.hyper_attention(q[:, -1:], k, v, kv, vv, pos, cu, mode=mode,
                                        gate=gate if mode == "gated" else None)
    refs = [t.detach().to(torch.float64).requires_grad_(True) for t in inputs]
    ref = mmkernels.hyper_attention_reference(*refs[:5], pos, cu, mode=mode, gate=refs[5] if mode == "gated" else None)
    ref.backward(dout.to(torch.float64))
    shape = _hyper_shape(case)
    rows = _hyper_rows("", names, [out] + [t.grad for t in leaves], [ref] + [t.grad for t in refs], dtype, shape, mode)
    rows += _hyper_rows("decode ", ["out"], [dec], [ref[:, -1:]], dtype, shape, mode)
    return rows


def _hyper_producer(dtype: torch.dtype, device) -> list[dict]:
    import mmkernels

    N, T, Dm, Hkv, D = 3, 11, 48, 2, 32
    g = _gen("producer", str(dtype))

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(device=device, dtype=dtype)

    x, w = rnd(N, T, Dm), rnd(Dm, scale=0.2) + 1
    W, b = rnd(2 * Hkv * D, Dm, scale=Dm ** -0.5), rnd(2 * Hkv * D)
    pos = torch.tensor([0, 7, 300], device=device)
    with mmkernels.use_backend("triton"):
        k, v = mmkernels.visual_kv(x, w, W, b, pos, num_kv_heads=Hkv, rope_theta=1e6, position_offset=1)
    rk, rv = mmkernels.visual_kv_reference(x.double(), w.double(), W.double(), b.double(), pos, num_kv_heads=Hkv,
                                           rope_theta=1e6, position_offset=1)
    return _hyper_rows("visual_kv ", ["k_vis", "v_vis"], [k, v], [rk, rv], dtype, f"N{N} T{T} Dm{Dm}", "-")


def verify_hyper_attention(device: str | torch.device | None = None, quick: bool = False,
                           progress: Progress | None = None) -> tuple[list[dict], bool]:
    """Hyper attention: forward + every gradient in both modes, a decode step, the visual_kv producer."""
    dev = resolve_device(device)
    cases = []
    for case in hyper_attention_cases(dev, quick):
        shape = _hyper_shape(case)
        for dtype in HYPER_DTYPES if not quick else (torch.bfloat16,):
            for mode in HYPER_MODES:
                cases.append(_Case(f"{shape} {_dtype_name(dtype)} {mode}",
                                   lambda a=(case, dtype, mode): _hyper_one(*a, dev),
                                   dict(shape=shape, dtype=_dtype_name(dtype), mode=mode)))
    for dtype in HYPER_DTYPES if not quick else (torch.bfloat16,):
        cases.append(_Case(f"visual_kv producer {_dtype_name(dtype)}", lambda d=dtype: _hyper_producer(d, dev),
                           dict(shape="producer", dtype=_dtype_name(dtype), mode="-")))
    return _run_cases("hyper_attention", cases, progress, dev)


VERIFIERS: dict[str, Callable[..., tuple[list[dict], bool]]] = {
    "plora": verify_plora,
    "moe": verify_moe,
    "hyper_attention": verify_hyper_attention,
}


# --------------------------------------------------------------------------- tables and the runner

def _fmt(value: Any, spec: str | None) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        return format(value, spec or ".3g")
    return str(value)


def format_table(rows: Sequence[dict[str, Any]], columns: Sequence[tuple[str, str, str | None]]) -> str:
    """Fixed-width table.  ``columns``: (key, header, format spec or None); numbers right-aligned."""
    cells = [[_fmt(r.get(k), f) for k, _, f in columns] for r in rows]
    widths = [max([len(h)] + [len(c[i]) for c in cells]) for i, (_, h, _) in enumerate(columns)]
    numeric = [all(isinstance(r.get(k), (int, float)) or r.get(k) is None for r in rows) for k, _, _ in columns]

    def line(values):
        return "  ".join(v.rjust(w) if num else v.ljust(w) for v, w, num in zip(values, widths, numeric)).rstrip()

    out = [line([h for _, h, _ in columns]), "  ".join("-" * w for w in widths)]
    out.extend(line(c) for c in cells)
    return "\n".join(out)


@dataclass
class Report:
    op: str
    device: str
    rows: list[dict] = field(default_factory=list)
    ok: bool = False
    elapsed_s: float = 0.0

    def table(self) -> str:
        return format_table(self.rows, COLUMNS[self.op]) if self.rows else "(no rows)"


def run(ops: Iterable[str] | None = None, device: str | torch.device | None = None, quick: bool = False,
        stream: TextIO | None = None, progress: bool = True) -> list[Report]:
    """Verify ``ops`` (default: all) on ``device``; print progress lines and one table per operator
    to ``stream`` (default stdout).  Returns one :class:`Report` per operator."""
    out = stream if stream is not None else sys.stdout
    dev = resolve_device(device)
    names = list(ops) if ops else list(OPS)
    unknown = [n for n in names if n not in VERIFIERS]
    if unknown:
        raise ValueError(f"unknown op(s) {unknown}; expected some of {list(OPS)}")

    def say(line: str) -> None:
        print(line, file=out, flush=True)

    where = "CUDA" if dev.type == "cuda" else "CPU, Triton interpreter"
    reports = []
    for name in names:
        say(f"\n### {name}: verification on {where} ({DESCRIPTIONS[name]})")
        t0 = time.perf_counter()
        rows, ok = VERIFIERS[name](dev, quick=quick, progress=say if progress else None)
        rep = Report(name, str(dev), rows, ok, time.perf_counter() - t0)
        say(f"\n== {name} verification ({'PASS' if ok else 'FAIL'}, {rep.elapsed_s:.1f}s) ==")
        say(rep.table())
        reports.append(rep)
    return reports
