"""Kernel-time profile of one forward+backward training step per operator.

    python -m benchmarks.profile_step --out DIR [--case moe --case plora --case hyper_joint ...] [--rows 25]
                                      [--name profile]

For each case: two untimed warm-up steps (Triton compiles, autotuning, caches), then one step under
``torch.profiler`` (CPU + CUDA activities); printed, and written to ``DIR/profile.txt`` (the tables) and
``DIR/profile.json`` (per case: the kernels sorted by self device time, with calls and % of the step's
kernel time; ``--name`` changes the files' stem).  Cases (CUDA, bf16, the default backend: Triton):

* ``moe``: :class:`mmkernels.MoE`, phi-2 experts (E 4, H 2560, F 10240, GELU-tanh), 16k tokens,
  top-2 dropless, no second-expert sampling;
* ``plora``: :func:`mmkernels.plora_linear`, InternLM2-7B wqkv (4096 -> 6144), 8k tokens, r 256, 50 %
  visual rows (one contiguous span), dropout off (the benchmark's timed path);
* ``hyper_joint`` / ``hyper_gated``: :func:`mmkernels.hyper_attention` of the 7B hyper layer (H 28,
  H_kv 4, D 128, T 729 tokens per image), 2k text tokens and 32 images, joint and gated.

Without CUDA it runs tiny shapes on the CPU with the default (reference) backend: a smoke run of this
script (its test), not a profile of the kernels; it says so.  A case that fails prints
``not measured: <why>`` and the others still run; the exit status is 1 if any case failed.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from . import harness as H

CASES = ("moe", "plora", "hyper_joint", "hyper_gated")
GPU_SHAPES = {"moe": dict(H=2560, F=10240, S=16384), "plora": dict(K=4096, N=6144, M=8192, r=256),
              "hyper": dict(L=2048, H=28, H_kv=4, D=128, T=729, images=32)}
CPU_SHAPES = {"moe": dict(H=32, F=64, S=64), "plora": dict(K=64, N=96, M=64, r=8),
              "hyper": dict(L=48, H=4, H_kv=2, D=16, T=7, images=3)}


def _step_moe(device, dtype, s):
    from .bench_moe import make_layer

    moe, _ = make_layer(s["H"], s["F"], "gelu_tanh", device, dtype, skewed=False)
    moe.drop_tokens, moe.top2_2nd_expert_sampling = False, False
    x = (torch.randn(s["S"], s["H"], device=device) * 0.5).to(dtype).requires_grad_(True)
    dy = torch.randn_like(x)
    leaves = [x, *moe.parameters()]
    return (lambda: moe(x)[0].backward(dy)), leaves, f"MoE phi-2-form E4 H{s['H']} F{s['F']} S{s['S']} top-2 dropless"


def _step_plora(device, dtype, s):
    import mmkernels

    from .bench_plora import make_mask

    K, N, M, r = s["K"], s["N"], s["M"], s["r"]
    x = torch.randn(1, M, K, device=device, dtype=dtype, requires_grad=True)
    W0 = (torch.randn(N, K, device=device, dtype=dtype) * K ** -0.5).requires_grad_(True)
    A = (torch.randn(r, K, device=device, dtype=dtype) * K ** -0.5).requires_grad_(True)
    B = (torch.randn(N, r, device=device, dtype=dtype) * r ** -0.5).requires_grad_(True)
    mask = make_mask(M, 0.5, "span", device, batch_shape=(1, M))
    dy = torch.randn(1, M, N, device=device, dtype=dtype)

    def step():
        mmkernels.plora_linear(x, W0, None, A, B, mask, scaling=1.0, dropout_p=0.05, training=False).backward(dy)

    return step, [x, W0, A, B], f"PLoRA K{K} N{N} M{M} r{r} 50% visual (span)"


def _step_hyper(device, dtype, s, mode):
    import mmkernels

    L, Hq, Hkv, D, T, n = s["L"], s["H"], s["H_kv"], s["D"], s["T"], s["images"]

    def t(*shape):
        return torch.randn(*shape, device=device, dtype=dtype).requires_grad_(True)

    q, k, v = t(1, L, Hq, D), t(1, L, Hkv, D), t(1, L, Hkv, D)
    kv, vv = t(n, T, Hkv, D), t(n, T, Hkv, D)
    pos = (torch.arange(n, device=device) * (L // n)).to(torch.int64)   # images spread over the text
    cu = torch.tensor([0, n], device=device, dtype=torch.int32)
    gate = t(Hq * D) if mode == "gated" else None
    do = torch.randn(1, L, Hq, D, device=device, dtype=dtype)
    leaves = [q, k, v, kv, vv] + ([gate] if gate is not None else [])

    def step():
        mmkernels.hyper_attention(q, k, v, kv, vv, pos, cu, mode=mode, gate=gate, check_metadata=False).backward(do)

    return step, leaves, f"hyper attention {mode}: L{L} H{Hq} H_kv{Hkv} D{D}, {n} images x T{T}"


def build(case, device, dtype, shapes):
    if case == "moe":
        return _step_moe(device, dtype, shapes["moe"])
    if case == "plora":
        return _step_plora(device, dtype, shapes["plora"])
    return _step_hyper(device, dtype, shapes["hyper"], case.split("_", 1)[1])


def _self_time(evt, on_cuda):
    """Self time (us) of a profiler average: device time on CUDA (the attribute was renamed across
    torch versions), CPU time otherwise."""
    if not on_cuda:
        return float(evt.self_cpu_time_total)
    return float(getattr(evt, H.profiler_device_time_attr(evt), 0.0))


def profile_case(case, device, dtype, shapes, rows):
    from torch.profiler import ProfilerActivity, profile

    on_cuda = device.type == "cuda"
    step, leaves, what = build(case, device, dtype, shapes)

    def clear():
        for p in leaves:
            p.grad = None

    for _ in range(2):   # untimed: compile, autotune, allocator warm-up
        clear()
        step()
    if on_cuda:
        torch.cuda.synchronize()
    clear()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_cuda else [])
    t0 = time.perf_counter()
    with profile(activities=activities) as prof:
        step()
        if on_cuda:
            torch.cuda.synchronize()
    wall_ms = (time.perf_counter() - t0) * 1e3
    averages = prof.key_averages()
    sort_key = H.profiler_device_time_attr(averages[0]) if on_cuda and len(averages) else "self_cpu_time_total"
    try:
        table = averages.table(sort_by=sort_key, row_limit=rows)
    except Exception:  # noqa: BLE001 -- a sort key this torch does not know: the table unsorted
        table = averages.table(row_limit=rows)
    kernels = []
    for evt in averages:
        us = _self_time(evt, on_cuda)
        if us > 0:
            kernels.append(dict(name=evt.key, self_us=us, calls=int(evt.count)))
    kernels.sort(key=lambda d: -d["self_us"])
    total = sum(d["self_us"] for d in kernels)   # on CUDA: the step's kernel time (ops have no self device time)
    for d in kernels:
        d["pct"] = 100.0 * d["self_us"] / total if total else None
    return dict(case=case, what=what, dtype=H.dtype_name(dtype), wall_ms_profiled=wall_ms,
                total_self_ms=total / 1e3, time_kind="self device (CUDA) time" if on_cuda else "self CPU time",
                kernels=kernels[:rows]), table


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.profile_step", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=None, help="folder for profile.txt and profile.json (default: print only)")
    p.add_argument("--case", action="append", choices=CASES, default=None, help="repeatable; default: all")
    p.add_argument("--rows", type=int, default=25, help="kernels per table")
    p.add_argument("--name", default="profile", help="stem of the output files (default: profile)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    on_cuda = torch.cuda.is_available()
    device = torch.device("cuda" if on_cuda else "cpu")
    dtype = torch.bfloat16 if on_cuda else torch.float32
    shapes = GPU_SHAPES if on_cuda else CPU_SHAPES
    header = H.machine_header()
    lines = [f"profile_step: one forward+backward step per case, {header['device']}, torch {header['torch_version']}, "
             f"triton {header['triton_version']}, commit {H.git_commit_full()}"]
    if not on_cuda:
        lines.append("NO CUDA: tiny shapes on the CPU with the reference backend -- a smoke run of this script, "
                     "not a profile of the kernels (self CPU time)")
    print("\n".join(lines), flush=True)
    results, ok = [], True
    for case in args.case or CASES:
        try:
            res, table = profile_case(case, device, dtype, shapes, args.rows)
        except Exception as e:  # noqa: BLE001 -- one failing case must not hide the others
            ok = False
            why = H.error_line(e, 300)
            results.append(dict(case=case, error=why))
            block = f"\n== {case}: not measured: {why}"
        else:
            results.append(res)
            block = (f"\n== {case}: {res['what']}, {res['dtype']}; {res['time_kind']} total "
                     f"{res['total_self_ms']:.3f} ms (profiled step {res['wall_ms_profiled']:.1f} ms wall)\n{table}")
        print(block, flush=True)
        lines.append(block)
        if on_cuda:
            torch.cuda.empty_cache()
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        txt, js = out / f"{args.name}.txt", out / f"{args.name}.json"
        txt.write_text("\n".join(lines) + "\n")
        doc = {"commit": H.git_commit_full(), "machine": header, "cuda": on_cuda, "cases": results}
        js.write_text(json.dumps(H._jsonable(doc), indent=1) + "\n")
        print(f"wrote {txt} and {js}", flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
