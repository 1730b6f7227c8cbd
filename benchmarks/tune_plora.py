"""Block-size sweep for the PLoRA kernels outside the GEMM core (shrink, dW0, dA, dB, the dropout mask) on one
InternLM2-7B shape (GPU; a tiny CPU smoke mode).  The forward, dX and dS GEMMs are roles of the shared
core: ``benchmarks/tune_gemm.py`` sweeps them.

Kernels are tuned one after another (each keeps the winners found before it), timing the launcher
that contains the kernel, next to cuBLAS doing the same base GEMM.  The winners are written as
JSON; ``MMKERNELS_PLORA_CONFIGS=<that file>`` makes the launchers use them, and the tables in
``mmkernels/ops/plora/launch.py`` are updated from it.

    python -m benchmarks.tune_plora --out plora_configs.json [--tokens 16384 --K 4096 --N 6144]
"""
import argparse
import json

import torch

from . import harness as H

W8S3, W8S4, W4S4, W4S3 = (dict(num_warps=8, num_stages=3), dict(num_warps=8, num_stages=4),
                          dict(num_warps=4, num_stages=4), dict(num_warps=4, num_stages=3))
# Output-tile x reduction-block candidates, spelled in each kernel's own block names.
CANDIDATES = {
    "shrink": [dict(BLOCK_M=128, BLOCK_R=128, BLOCK_K=64, **W8S3), dict(BLOCK_M=64, BLOCK_R=128, BLOCK_K=64, **W4S4),
               dict(BLOCK_M=128, BLOCK_R=256, BLOCK_K=64, **W8S3), dict(BLOCK_M=64, BLOCK_R=256, BLOCK_K=64, **W8S3)],
    "dw": [dict(BLOCK_N=128, BLOCK_K=128, BLOCK_M=64, **c) for c in (W8S3, W4S4, W8S4)]
    + [dict(BLOCK_N=128, BLOCK_K=256, BLOCK_M=64, **c) for c in (W8S3, W8S4)]
    + [dict(BLOCK_N=256, BLOCK_K=128, BLOCK_M=64, **W8S3)],
    "dlora_a": [dict(BLOCK_R=64, BLOCK_K=64, BLOCK_M=128, **W4S3), dict(BLOCK_R=64, BLOCK_K=64, BLOCK_M=64, **W4S4),
                dict(BLOCK_R=64, BLOCK_K=128, BLOCK_M=64, **W4S4), dict(BLOCK_R=128, BLOCK_K=128, BLOCK_M=64, **W8S3)],
    "dlora_b": [dict(BLOCK_N=128, BLOCK_R=64, BLOCK_M=64, **W4S3), dict(BLOCK_N=128, BLOCK_R=128, BLOCK_M=64, **W8S3),
                dict(BLOCK_N=64, BLOCK_R=64, BLOCK_M=64, **W4S4), dict(BLOCK_N=64, BLOCK_R=128, BLOCK_M=64, **W4S3)],
    # with LoRA dropout 0.05 (unpacking the keep bits of x adds to these loops; BLOCK_K a multiple of 32):
    # the tiles without dropout are candidates, and dA over all of R (half the grid at r 256)
    "shrink_dropout": [dict(BLOCK_M=64, BLOCK_R=256, BLOCK_K=64, **W4S4), dict(BLOCK_M=64, BLOCK_R=128, BLOCK_K=64, **W4S4),
                       dict(BLOCK_M=128, BLOCK_R=256, BLOCK_K=64, **W8S4)],
    "dlora_a_dropout": [dict(BLOCK_R=128, BLOCK_K=64, BLOCK_M=128, **W4S4),
                        dict(BLOCK_R=64, BLOCK_K=64, BLOCK_M=128, **W4S3),
                        dict(BLOCK_R=256, BLOCK_K=64, BLOCK_M=64, **W4S4)],
    # the keep-mask drawn once per step (Philox, no MMA)
    "dropout_bits": [dict(BLOCK_M=64, BLOCK_K=128, num_warps=4), dict(BLOCK_M=32, BLOCK_K=128, num_warps=4),
                     dict(BLOCK_M=64, BLOCK_K=256, num_warps=8)],
}



def main(argv=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", type=int, default=16384)
    parser.add_argument("--K", type=int, default=4096)
    parser.add_argument("--N", type=int, default=6144)
    parser.add_argument("--rank", type=int, default=256)
    parser.add_argument("--out", default=None, help="write the winning configs here (JSON)")
    parser.add_argument("--kernel", action="append", choices=sorted(CANDIDATES), default=None,
                        help="sweep only these kernels (repeatable); default: all, in table order")
    args = parser.parse_args(argv)
    from .run import _prepare_interpreter

    _prepare_interpreter()   # no CUDA: the smoke run needs Triton's interpreter, set before mmkernels loads
    from mmkernels.ops.plora import launch

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu":  # smoke mode for the script itself: tiny shapes under the interpreter
        args.tokens, args.K, args.N, args.rank = 64, 64, 64, 32
        candidates = {name: [{k: (min(v, 32) if k.startswith("BLOCK") else v) for k, v in c.items()}
                             for c in cands[:2]] for name, cands in CANDIDATES.items()}
    else:
        candidates = CANDIDATES
    candidates = {name: cands for name, cands in candidates.items() if args.kernel is None or name in args.kernel}
    M, K, N, r = args.tokens, args.K, args.N, args.rank
    dt = torch.bfloat16
    x = torch.randn(M, K, device=device, dtype=dt)
    w = torch.randn(N, K, device=device, dtype=dt) / K**0.5
    a = torch.randn(r, K, device=device, dtype=dt) / K**0.5
    b = torch.randn(N, r, device=device, dtype=dt) / r**0.5
    mask = torch.zeros(M, dtype=torch.bool, device=device)
    mask[M // 4: 3 * M // 4] = True
    flags = launch.tile_flags(mask)
    _, s = launch.plora_forward(x, w, None, a, b, mask, flags, 1.0, 0.0, None)
    dy = torch.randn(M, N, device=device, dtype=dt)
    bench = H.sweep_timer(device)

    def fwd():
        launch.plora_forward(x, w, None, a, b, mask, flags, 1.0, 0.0, None)

    def bwd(mask5, p=0.0):   # (with dropout: the keep bits drawn once, outside the timed launcher)
        return lambda: launch.plora_backward(dy, x, w, a, b, s, mask, flags, 1.0, p, seed if p else None, mask5,
                                             keep_bits if p else None)

    seed = torch.tensor([1234], dtype=torch.int64, device=device)
    keep_bits = launch.dropout_keep_bits(mask, flags, seed, M, K, 0.05)
    runs = {"shrink": fwd, "dw": bwd([False, True, False, False, False]),
            "dlora_a": bwd([False, False, False, True, False]), "dlora_b": bwd([False, False, False, False, True]),
            "shrink_dropout": lambda: launch.plora_forward(x, w, None, a, b, mask, flags, 1.0, 0.05, seed, keep_bits),
            "dlora_a_dropout": bwd([False, False, False, True, False], 0.05),
            "dropout_bits": lambda: launch.dropout_keep_bits(mask, flags, seed, M, K, 0.05)}
    flops = {"dw": 2.0 * M * N * K, "shrink": 2.0 * M * K * r / 2, "dlora_a": 2.0 * M * K * r / 2,
             "dlora_b": 2.0 * M * N * r / 2}
    flops.update(shrink_dropout=flops["shrink"], dlora_a_dropout=flops["dlora_a"])
    draws = {"dropout_bits": M * K / 2}   # the keep-mask of the visual rows (half of them)
    if device.type == "cuda":
        cublas = {"dw": bench(lambda: dy.t() @ x)}
        print(f"device {torch.cuda.get_device_name()}  M={M} K={K} N={N} r={r} bf16, 50% visual span")
        for k, ms in cublas.items():
            print(f"cuBLAS {k}: {ms:.3f} ms = {flops[k] / ms / 1e9:.0f} TFLOP/s")

    original = launch._config
    chosen: dict[str, dict] = {}

    def config(name, dev, dtype):
        cfg = original(name, dev, dtype)
        cfg.update(chosen.get(name, {}))
        return cfg

    launch._config = config
    rows = []
    try:
        for name, cands in candidates.items():
            best = None
            for cand in cands:
                chosen[name] = cand
                try:
                    ms = bench(runs[name])
                except Exception as e:  # e.g. out of shared memory on a smaller card
                    print(f"  {name} {cand}: failed {type(e).__name__}: {str(e)[:100]}")
                    continue
                rows.append(dict(kernel=name, config=cand, ms=ms))
                rate = (f"{flops[name] / ms / 1e9:.0f} TFLOP/s of its own FLOPs" if name in flops
                        else f"{draws[name] / ms / 1e6:.0f} G elements/s")
                print(f"  {name} {cand}: {ms:.3f} ms ({rate}, launcher total)", flush=True)
                if best is None or ms < best[0]:
                    best = (ms, cand)
            if best is None:
                chosen.pop(name, None)
            else:
                chosen[name] = best[1]
                print(f"{name}: best {best[1]} {best[0]:.3f} ms", flush=True)
    finally:
        launch._config = original
    if args.out:
        with open(args.out, "w") as f:
            json.dump(chosen, f, indent=1)
        with open(args.out.replace(".json", "") + "-sweep.json", "w") as f:
            json.dump(dict(device=str(torch.cuda.get_device_name() if device.type == "cuda" else "cpu"),
                           M=M, K=K, N=N, r=r, rows=rows), f, indent=1)
    return chosen


if __name__ == "__main__":
    main()
