"""Tile sweep of the hyper attention kernels on the 7B hyper layer (GPU; a tiny CPU smoke mode).

For the ``"bwd"`` and then the ``"fwd"`` entry of the block table in
``mmkernels/ops/hyper_attention/launch.py``, each candidate (an override of the table's entry; the
table's own entry first) times the launcher that runs that kernel, at two shapes: joint mode with
2k text tokens and 32 images of 729 tokens, and zero images (dense causal) at 4k.  The backward is
timed on the forward's saved outputs (preprocessing + the dK/dV + dQ launch), the forward at
inference (no saved parts).  Printed: ms and TFLOP/s over the visible (query, key) pairs (backward
2.5x the forward's FLOPs), then per table entry the verdict: the table's entry is kept unless a
candidate is faster at both shapes by more than ``--margin`` (then the table should take it).  The
rows are written to ``--out`` (JSON) after every measurement, so a run cut short keeps what it
measured.  Nothing in the package changes; the table is edited by hand from the verdict.

    python -m benchmarks.tune_hyper --out hyper_tune.json
"""
from __future__ import annotations

import argparse
import json

import torch

from . import harness as H

# Overrides of the table's entry; {} is the entry itself.  Each candidate keeps every warpgroup on
# distinct rows (8 warps with 128-row tiles, 4 warps with 64-row ones).
CANDIDATES = {
    "bwd": [{}, dict(BLOCK_M_KV=32), dict(num_stages=2),
            dict(BLOCK_M=64, BLOCK_N=64, BLOCK_N_KV=64, BLOCK_M_KV=64, num_warps=4, num_stages=3)],
    "fwd": [{}, dict(BLOCK_N=128, num_stages=2)],
}
GPU_SHAPES = (dict(label="joint 2k+32img", L=2048, images=32), dict(label="causal 4k", L=4096, images=0))
GPU_MODEL = dict(heads=28, kv_heads=4, head_dim=128, T=729)
CPU_SHAPES = (dict(label="joint 40+3img", L=40, images=3), dict(label="causal 48", L=48, images=0))
CPU_MODEL = dict(heads=4, kv_heads=2, head_dim=16, T=9)



def _case(shape: dict, model: dict, device, dtype):
    """Inputs of one shape (joint mode, inclusive visibility) and its forward FLOPs over visible pairs."""
    from mmkernels.ops.hyper_attention import launch

    from .bench_hyper_attention import attention_flops, image_positions_for, visible_pairs

    L, n = shape["L"], shape["images"]
    Hq, Hkv, D, T = model["heads"], model["kv_heads"], model["head_dim"], model["T"]
    g = torch.Generator(device=device).manual_seed(0)

    def r(*s):
        return torch.randn(*s, generator=g, device=device, dtype=dtype)
    positions = image_positions_for(L, n)
    case = dict(q=r(1, L, Hq, D), k=r(1, L, Hkv, D), v=r(1, L, Hkv, D), kv=r(n, T, Hkv, D), vv=r(n, T, Hkv, D),
                pos=torch.tensor(positions, dtype=torch.int32, device=device),
                cu=torch.tensor([0, n], dtype=torch.int32, device=device), dy=r(1, L, Hq, D))
    case["layout"] = launch.hyper_layout(case["pos"], case["cu"], L, L, T, True)
    return case, attention_flops(visible_pairs(L, L, positions, T, "inclusive"), Hq, D)


def _runner(name: str, case: dict):
    from mmkernels.ops.hyper_attention import launch

    c, scale = case, case["q"].shape[-1] ** -0.5
    args = (c["q"], c["k"], c["v"], c["kv"], c["vv"], c["pos"], c["cu"], None, None, False, True, scale)
    if name == "fwd":
        return lambda: launch.hyper_forward(*args, False, c["layout"])
    out, o_t, o_v, lse = launch.hyper_forward(*args, True, c["layout"])
    return lambda: launch.hyper_backward(c["dy"], *args[:9], out, o_t, o_v, lse, False, True, scale, c["layout"])


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=None, help="write the rows and verdicts here (JSON)")
    parser.add_argument("--margin", type=float, default=0.03, help="a candidate must be this much faster")
    parser.add_argument("--kernel", action="append", choices=sorted(CANDIDATES), default=None)
    args = parser.parse_args(argv)
    from .run import _prepare_interpreter

    _prepare_interpreter()   # no CUDA: the smoke run needs Triton's interpreter, set before mmkernels loads
    from mmkernels.ops.hyper_attention import launch

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    on_cuda = device.type == "cuda"
    dtype = torch.bfloat16 if on_cuda else torch.float32
    shapes, model = (GPU_SHAPES, GPU_MODEL) if on_cuda else (CPU_SHAPES, CPU_MODEL)
    kernels = args.kernel or list(CANDIDATES)
    candidates = {k: CANDIDATES[k] if on_cuda else CANDIDATES[k][:2] for k in kernels}
    bench = H.sweep_timer(device)
    print(f"device {torch.cuda.get_device_name() if on_cuda else 'cpu (smoke run, interpreter)'}; "
          f"H {model['heads']}/{model['kv_heads']} D {model['head_dim']} T {model['T']} {str(dtype)[6:]}", flush=True)
    cases = [(s, *_case(s, model, device, dtype)) for s in shapes]
    original = launch._config
    override: dict[str, dict] = {}
    launch._config = lambda name, dev, dt, hd: {**original(name, dev, dt, hd), **override.get(name, {})}
    result = dict(device=torch.cuda.get_device_name() if on_cuda else "cpu", model=model, shapes=list(shapes),
                  margin=args.margin, rows=[], verdicts={})

    def save():
        if args.out:
            with open(args.out, "w") as f:
                json.dump(result, f, indent=1)
    try:
        for name in kernels:
            table = original(name, device, dtype, model["head_dim"])
            times = {}
            for i, cand in enumerate(candidates[name]):
                override[name] = cand
                cfg = {**table, **cand}
                for shape, case, fwd_flops in cases:
                    flops = fwd_flops * (2.5 if name == "bwd" else 1.0)
                    try:
                        ms = bench(_runner(name, case))
                    except Exception as e:   # e.g. out of shared memory or registers on another card
                        print(f"  {name} {shape['label']:<15} {cfg}: not measured: {type(e).__name__}: "
                              f"{str(e).splitlines()[0][:120]}", flush=True)
                        ms = None
                    times[(i, shape["label"])] = ms
                    result["rows"].append(dict(kernel=name, candidate=i, config=cfg, shape=shape["label"], ms=ms,
                                               tflops=flops / ms / 1e9 if ms else None))
                    if ms:
                        print(f"  {name} {shape['label']:<15} {'table ' if i == 0 else 'cand. '}{cfg}: {ms:.3f} ms "
                              f"{flops / ms / 1e9:.3g} TFLOP/s", flush=True)
                    save()
            labels = [s["label"] for s in shapes]

            def wins(i):
                return all(times.get((i, lb)) and times.get((0, lb)) and
                           times[(i, lb)] < (1 - args.margin) * times[(0, lb)] for lb in labels)
            better = [i for i in range(1, len(candidates[name])) if wins(i)]
            best = min(better, key=lambda i: sum(times[(i, lb)] for lb in labels)) if better else 0
            verdict = dict(keep_table=best == 0, config={**table, **candidates[name][best]})
            result["verdicts"][name] = verdict
            print(f"{name}: {'keep the table entry' if best == 0 else 'the table should take'} "
                  f"{verdict['config']}", flush=True)
            save()
            override.pop(name, None)
    finally:
        launch._config = original
    return result


if __name__ == "__main__":
    main()
