"""What the hyper attention kernels compiled to on this GPU, at the 7B hyper layer's shapes.

    python -m benchmarks.hyper_codegen [--out DIR]

Runs one training step (forward with the saved parts, backward) of :func:`mmkernels.hyper_attention`
in joint mode at 2k text + 32 images, in gated mode at the same shape, and dense causal at 4k (H 28,
H_kv 4, D 128, T 729, bf16), then lists every compiled variant of every kernel of
``mmkernels.ops.hyper_attention.kernels`` from Triton's cache: block sizes, warps, stages, registers
and spilled bytes (ptxas, as loaded on the device), shared memory, and from the TTGIR the MMA
layouts (``warpsPerCTA`` x instruction shape: a dot whose M is smaller than the rows its warps cover
is computed more than once, "dup" > 1) and the buffers of the pipelined operands.  Written to
``DIR/hyper_codegen.json`` and printed as a table.  Without CUDA it says so and exits 0.
"""
from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import torch

SHAPES = (dict(mode="joint", L=2048, images=32), dict(mode="gated", L=2048, images=32),
          dict(mode="joint", L=4096, images=0))
MODEL = dict(heads=28, kv_heads=4, head_dim=128, T=729)


def ttgir_summary(ttgir: str) -> dict:
    """MMA layouts of a TTGIR module (``[(warpsPerCTA, instrShape)]``), the largest replication of a
    dot's rows across warps ("dup"), and the buffer counts of its multi-buffered shared allocations."""
    layouts = {name: ([int(x) for x in wpc.split(",")], [int(x) for x in ish.split(",")])
               for name, wpc, ish in re.findall(r"^(#mma\d*) = #ttg\.nvidia_mma<\{versionMajor = \d+, versionMinor = "
                                                r"\d+, warpsPerCTA = \[([0-9, ]+)\].*?instrShape = \[([0-9, ]+)\]",
                                                ttgir, re.M)}
    dup = 1
    for m_rows, layout in re.findall(r"(?:warp_group_dot|tt\.dot) .*?->\s*tensor<(\d+)x\d+xf32, (#mma\d*)>", ttgir):
        if layout in layouts:
            (wm, _), _ = layouts[layout]
            dup = max(dup, wm * 16 // int(m_rows))
    bufs = sorted({int(n) for n in re.findall(r"ttg\.local_alloc\s*:\s*\(\)\s*->\s*!ttg\.memdesc<(\d+)x\d+x\d+x", ttgir)})
    return dict(mma=sorted({(tuple(w), tuple(i)) for w, i in layouts.values()}), dup=dup, buffers=bufs)


def _compiled(fn):
    """Every compiled variant of a JITFunction (Triton keeps them per device: cache first)."""
    for entry in getattr(fn, "device_caches", {}).values():
        cache = entry[0] if isinstance(entry, tuple) else entry
        yield from cache.values()


def collect() -> list[dict]:
    import triton

    from mmkernels.ops.hyper_attention import kernels

    rows = []
    for name in sorted(dir(kernels)):
        fn = getattr(kernels, name)
        if not (name.endswith("_kernel") and isinstance(fn, triton.runtime.jit.JITFunction)):
            continue
        for ck in _compiled(fn):
            md = ck.metadata
            consts = getattr(md, "constants", None) or {}
            blocks = {str(k): v for k, v in (consts.items() if isinstance(consts, dict) else [])
                      if "BLOCK" in str(k) or str(k) in ("GATED", "HAS_KPM")}
            rows.append(dict(kernel=name, blocks=blocks, num_warps=md.num_warps, num_stages=md.num_stages,
                             regs=getattr(ck, "n_regs", None), spill_bytes=getattr(ck, "n_spills", None),
                             shared_kb=round(md.shared / 1024, 1), **ttgir_summary(ck.asm.get("ttgir", ""))))
    return rows


def run_steps(device) -> None:
    import mmkernels

    from .bench_hyper_attention import image_positions_for

    Hq, Hkv, D, T = MODEL["heads"], MODEL["kv_heads"], MODEL["head_dim"], MODEL["T"]
    for s in SHAPES:
        L, n, mode = s["L"], s["images"], s["mode"]
        q = torch.randn(1, L, Hq, D, device=device, dtype=torch.bfloat16, requires_grad=True)
        k, v = (torch.randn(1, L, Hkv, D, device=device, dtype=torch.bfloat16, requires_grad=True) for _ in "kv")
        kv, vv = (torch.randn(n, T, Hkv, D, device=device, dtype=torch.bfloat16, requires_grad=True) for _ in "kv")
        gate = torch.randn(Hq * D, device=device, dtype=torch.bfloat16, requires_grad=True) if mode == "gated" else None
        pos = torch.tensor(image_positions_for(L, n), dtype=torch.int32, device=device)
        cu = torch.tensor([0, n], dtype=torch.int32, device=device)
        out = mmkernels.hyper_attention(q, k, v, kv, vv, pos, cu, mode=mode, gate=gate,
                                        visibility="strict" if mode == "gated" else "inclusive", check_metadata=False)
        out.backward(torch.randn_like(out))
    torch.cuda.synchronize()


COLUMNS = ("kernel", "blocks", "num_warps", "num_stages", "regs", "spill_bytes", "shared_kb", "dup", "buffers", "mma")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=None, help="folder for hyper_codegen.json")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("hyper_codegen: not measured: needs a CUDA GPU (the offline analysis compiles for sm_90 without one)")
        return 0
    run_steps(torch.device("cuda"))
    rows = collect()
    print(" | ".join(COLUMNS))
    for r in rows:
        print(" | ".join(str(r[c]) for c in COLUMNS))
    bad = [r for r in rows if (r["spill_bytes"] or 0) > 0 or r["dup"] > 1]
    print(f"{len(rows)} compiled kernels; {len(bad)} with spills or replicated MMA work")
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "hyper_codegen.json").write_text(json.dumps(
            dict(device=torch.cuda.get_device_name(), rows=rows), indent=1, default=str) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
