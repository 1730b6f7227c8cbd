"""Path and tile sweep for every GEMM role of the shared core (GPU; a tiny CPU smoke mode).

Each role (``mmkernels.ops._gemm.config.ROLES``) is timed through the launcher that runs it, at the
shapes of the measured training runs -- MoE-LLaVA phi-2 experts (E 4, H 2560, F 10240, 16k tokens
top-2: 32768 sorted rows), the same rows for ``grouped_gemm``, StableLM-2's SwiGLU experts (H 2048,
F 5632) for the gated roles, InternLM2-7B wqkv for PLoRA (8192 tokens, 4096 -> 6144, r 256, 50 %
visual) -- for each candidate: the table's entry, a few other tiles, and ``torch._grouped_mm`` for
the roles it can compute when it runs on this device.  A role keeps its table entry unless a
candidate is faster by more than ``--margin`` (default 3 %).

Writes ``--out`` (default ``gemm_configs.json``) in the format ``MMKERNELS_GEMM_CONFIGS`` reads
(``{"arch", "commit", "card", "roles": {role: {"path", "blocks", "ctas_per_sm"}}}``: every swept role,
so ``python -m mmkernels info`` then says "measured at <commit> on <card>"), and
``<out>-sweep.json`` with every timing.  ``--budget-s`` stops starting new roles when spent (the first
role always runs; the remaining roles keep their table entries and are listed as not swept).

    python -m benchmarks.tune_gemm --out gemm_configs.json [--roles moe.up,plora.fwd] [--budget-s 60]
"""
from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace

import torch

from . import harness as H
from .run import _prepare_interpreter

# candidate tiles per role besides the table's own entry (row GEMMs: M, N, K, warps, stages, split;
# wgrad: N, K, M, warps, stages)
ROW_CANDIDATES = [(128, 128, 64, 8, 4, 1), (256, 128, 64, 8, 3, 2)]
GATED_CANDIDATES = [(128, 128, 64, 8, 3, 2)]
WGRAD_CANDIDATES = [(128, 128, 64, 8, 4), (256, 128, 64, 8, 3)]
PLORA_CANDIDATES = {"plora.fwd": [(128, 256, 64, 8, 3, 2)],
                    "plora.dx": [(128, 128, 64, 8, 4, 1)],      # the tile measured on the pre-core kernel
                    # the 128x128x64 / 4 stages measured when dropout's LoRA term had its own accumulator
                    "plora.dx_dropout": [(128, 128, 64, 8, 4, 1), (128, 128, 64, 8, 3, 1), (128, 256, 64, 8, 3, 2)],
                    "plora.ds": [(128, 128, 64, 8, 3, 1)]}


def candidates(role: str, base) -> list:
    """``[(label, Entry)]`` for ``role``: the table entry first."""
    from mmkernels.ops._gemm import config

    out = [("table", base)]
    if role in config.WGRAD_ROLES:
        for bn, bk, bm, w, st in WGRAD_CANDIDATES:
            out.append((f"N{bn} K{bk} M{bm} w{w} s{st}",
                        config.Entry(dict(BLOCK_N=bn, BLOCK_K=bk, BLOCK_M=bm, num_warps=w, num_stages=st))))
    else:
        tiles = PLORA_CANDIDATES.get(role) or (GATED_CANDIDATES if role.endswith("_gated") else ROW_CANDIDATES)
        for bm, bn, bk, w, st, split in tiles:
            e = config._row(bm, bn, bk, w, st, split=split)
            out.append((f"M{bm} N{bn} K{bk} w{w} s{st}", e))
    if role in config.GROUPED_MM_ROLES:
        out.append((config.GROUPED_MM, replace(base, path=config.GROUPED_MM)))
    seen, unique = set(), []
    for label, e in out:   # drop a candidate equal to the table entry
        key = (e.path, tuple(sorted(e.blocks.items())))
        if key not in seen:
            seen.add(key)
            unique.append((label, e))
    return unique


def _setups(device, small: bool):
    """role -> (callable running the role once, FLOPs of one call)."""
    from mmkernels.ops.moe import launch as moe
    from mmkernels.ops.moe.reference import route_reference
    from mmkernels.ops.plora import launch as plora

    dt = torch.bfloat16 if device.type == "cuda" else torch.float32
    if small:
        S, E, Hd, F, Hs, Fs, M_p, K_p, N_p, R_p = 64, 4, 64, 96, 64, 48, 64, 64, 48, 32
    else:
        S, E, Hd, F, Hs, Fs, M_p, K_p, N_p, R_p = 16384, 4, 2560, 10240, 2048, 5632, 8192, 4096, 6144, 256
    k = 2
    M = S * k

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, device=device) * scale).to(dt)

    d = route_reference(torch.randn(S, E, device=device), k, None, None)
    slots, offs = d.sorted_slots, d.expert_offsets
    x = rand(S, Hd)
    w1, b1, w2, b2 = rand(E, F, Hd, scale=Hd ** -0.5), rand(E, F), rand(E, Hd, F, scale=F ** -0.5), rand(E, Hd)
    z, h, o, do = rand(M, F), rand(M, F), rand(M, Hd), rand(M, Hd)
    xs = x.index_select(0, slots.long() // k)
    dz = rand(M, F)
    # gated (SwiGLU) shapes
    xg = rand(S, Hs)
    w1g, w2g = rand(E, 2 * Fs, Hs, scale=Hs ** -0.5), rand(E, Hs, Fs, scale=Fs ** -0.5)
    zg, hg, dog = rand(M, 2 * Fs), rand(M, Fs), rand(M, Hs)
    dzg = rand(M, 2 * Fs)
    # PLoRA
    xp = rand(M_p, K_p)
    wp, ap, lbp = rand(N_p, K_p, scale=K_p ** -0.5), rand(R_p, K_p, scale=K_p ** -0.5), rand(N_p, R_p, scale=R_p ** -0.5)
    mask = torch.zeros(M_p, dtype=torch.bool, device=device)
    mask[M_p // 4: 3 * M_p // 4] = True
    flags = plora.tile_flags(mask)
    _, sp = plora.plora_forward(xp, wp, None, ap, lbp, mask, flags, 1.0, 0.0, None)
    dyp = rand(M_p, N_p)
    seed = torch.tensor([1234], dtype=torch.int64, device=device)
    keep_bits = plora.dropout_keep_bits(mask, flags, seed, M_p, K_p, 0.05)   # drawn once per step, outside dX
    gg_a, gg_b, gg_dc = xs, w1, dz

    mm = 2.0 * M
    return {
        "moe.up": (lambda: moe._up(x, w1, b1, slots, offs, k, z, h, "gelu_tanh"), mm * F * Hd),
        "moe.up_gated": (lambda: moe._up(xg, w1g, None, slots, offs, k, zg, hg, "swiglu"), mm * 2 * Fs * Hs),
        "moe.down": (lambda: moe._down(h, w2, b2, slots, offs, o), mm * Hd * F),
        "moe.dz": (lambda: moe._dz(do, w2, offs, z, dz, "gelu_tanh"), mm * F * Hd),
        "moe.dz_gated": (lambda: moe._dz(dog, w2g, offs, zg, dzg, "swiglu"), mm * Fs * Hs),
        "moe.dx": (lambda: moe._dx(dz, w1, slots, offs, o), mm * Hd * F),
        "moe.wgrad": (lambda: moe.grouped_wgrad("moe.wgrad", dz, x, offs, N=F, K=Hd, need_db=True, need_dbias=True,
                                                a_idx=slots, a_div=k), mm * F * Hd),
        "grouped.fwd": (lambda: moe.grouped_gemm_forward(gg_a, gg_b, None, offs), mm * F * Hd),
        "grouped.dgrad": (lambda: moe.grouped_gemm_backward(gg_dc, gg_a, gg_b, offs, [True, False, False]),
                          mm * F * Hd),
        "grouped.wgrad": (lambda: moe.grouped_gemm_backward(gg_dc, gg_a, gg_b, offs, [False, True, False]),
                          mm * F * Hd),
        "plora.fwd": (lambda: plora.plora_forward(xp, wp, None, ap, lbp, mask, flags, 1.0, 0.0, None),
                      2.0 * M_p * N_p * K_p),
        "plora.dx": (lambda: plora.plora_backward(dyp, xp, wp, ap, lbp, sp, mask, flags, 1.0, 0.0, None,
                                                  [True, False, False, False, False]), 2.0 * M_p * N_p * K_p),
        "plora.dx_dropout": (lambda: plora.plora_backward(dyp, xp, wp, ap, lbp, sp, mask, flags, 1.0, 0.05, seed,
                                                          [True, False, False, False, False], keep_bits),
                             2.0 * M_p * N_p * K_p),
        "plora.ds": (lambda: plora.plora_backward(dyp, xp, wp, ap, lbp, sp, mask, flags, 1.0, 0.0, None,
                                                  [False, False, False, True, False]), 2.0 * M_p * N_p * R_p / 2),
    }



def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="gemm_configs.json", help="winners, in MMKERNELS_GEMM_CONFIGS format")
    parser.add_argument("--roles", default="", help="comma-separated roles (default: all)")
    parser.add_argument("--budget-s", type=float, default=0.0, help="stop starting roles after this many seconds")
    parser.add_argument("--margin", type=float, default=0.03, help="a candidate must beat the table by this fraction")
    args = parser.parse_args(argv)
    _prepare_interpreter()   # CPU: the Triton kernels run under the interpreter (before mmkernels is imported)

    from mmkernels.ops._gemm import config

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    small = device.type == "cpu"   # smoke mode for the script itself: tiny shapes under the interpreter
    arch = config.arch_of(device, torch.bfloat16)
    roles = [r for r in (args.roles.split(",") if args.roles else config.ROLES) if r]
    unknown = set(roles) - set(config.ROLES)
    if unknown:
        parser.error(f"unknown role(s) {sorted(unknown)}; expected some of {sorted(config.ROLES)}")
    card = torch.cuda.get_device_name() if device.type == "cuda" else "cpu (interpreter smoke run)"
    commit = H.git_commit_full()
    print(f"GEMM sweep on {card} (table {arch}), commit {commit}", flush=True)
    setups = _setups(device, small)
    bench = H.sweep_timer(device, warmup=5, rep=25)
    saved_arch, saved = config._OVERRIDE_ARCH, dict(config._OVERRIDES)
    config._OVERRIDE_ARCH = arch
    rows, winners, skipped = [], {}, []
    cap = torch.cuda.get_device_capability() if device.type == "cuda" else None
    t_start = time.perf_counter()
    try:
        for role in roles:
            if args.budget_s and rows and time.perf_counter() - t_start > args.budget_s:
                skipped.append(role)
                continue
            fn, flops = setups[role]
            base = config.TABLES[arch][role] if arch in config.TABLES else config.entry(role, device, torch.bfloat16)
            results = []
            for label, cand in candidates(role, base):
                config._OVERRIDES[role] = cand
                why = config.grouped_mm_unavailable(device.type, cap, torch.bfloat16)
                if cand.path == config.GROUPED_MM and why:
                    rows.append(dict(role=role, candidate=label, ms=None, note=f"not measured: {why}"))
                    print(f"  {role:<14} {label:<24} not measured: {why}", flush=True)
                    continue
                try:
                    ms = bench(fn)
                except Exception as e:  # e.g. out of shared memory on a smaller card
                    rows.append(dict(role=role, candidate=label, ms=None, note=f"failed: {H.error_line(e, 120)}"))
                    print(f"  {role:<14} {label:<24} failed: {H.error_line(e, 120)}", flush=True)
                    continue
                rows.append(dict(role=role, candidate=label, path=cand.path, blocks=cand.blocks, ms=ms,
                                 tflops=flops / ms / 1e9))
                print(f"  {role:<14} {label:<24} {ms:8.3f} ms  {flops / ms / 1e9:6.0f} TFLOP/s", flush=True)
                results.append((ms, label, cand))
            if not results:
                continue
            table_ms = next((ms for ms, label, _ in results if label == "table"), None)
            best = min(results, key=lambda r: r[0])
            if table_ms is not None and best[0] > table_ms * (1 - args.margin):
                best = next(r for r in results if r[1] == "table")
            winners[role] = best[2]
            print(f"{role}: {best[1]} ({best[0]:.3f} ms)", flush=True)
    finally:
        config._OVERRIDE_ARCH, config._OVERRIDES = saved_arch, saved
    doc = dict(arch=arch, commit=commit, card=card,
               roles={r: dict(path=e.path, blocks=e.blocks, ctas_per_sm=e.ctas_per_sm) for r, e in winners.items()})
    with open(args.out, "w") as f:
        json.dump(doc, f, indent=1)
    with open(args.out.replace(".json", "") + "-sweep.json", "w") as f:
        json.dump(dict(doc, rows=rows, not_swept=skipped), f, indent=1, default=str)
    if skipped:
        print(f"not swept (time budget): {', '.join(skipped)}", flush=True)
    return doc


if __name__ == "__main__":
    main()
