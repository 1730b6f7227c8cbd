"""Block-size sweep for the three large PLoRA GEMM kernels on one InternLM2-7B shape (GPU only).

Prints, per kernel and configuration, the median time and TFLOP/s next to cuBLAS doing the same
GEMM, so the fixed configurations in ``mmkernels/ops/plora/launch.py`` can be chosen from data.
Run: ``python -m benchmarks.tune_plora [--tokens 16384] [--out results.json]``.
"""
import argparse
import json

import torch
import triton

from mmkernels.ops.plora import launch

CANDIDATES = [
    dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, num_warps=8, num_stages=3),
    dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, num_warps=4, num_stages=4),
    dict(BLOCK_M=128, BLOCK_N=256, BLOCK_K=64, num_warps=8, num_stages=3),
    dict(BLOCK_M=256, BLOCK_N=128, BLOCK_K=64, num_warps=8, num_stages=3),
    dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, num_warps=8, num_stages=4),
    dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=64, num_warps=4, num_stages=4),
]


def _rename(cfg, kernel):
    # the dx kernel tiles [M, K] and reduces over N; the dw kernel tiles [N, K] and reduces over M
    if kernel == "fwd":
        return dict(cfg, GROUP_M=8)
    if kernel == "dx":
        return dict(BLOCK_M=cfg["BLOCK_M"], BLOCK_K=cfg["BLOCK_N"], BLOCK_N=cfg["BLOCK_K"], GROUP_M=8,
                    num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    return dict(BLOCK_N=cfg["BLOCK_M"], BLOCK_K=cfg["BLOCK_N"], BLOCK_M=cfg["BLOCK_K"],
                num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", type=int, default=16384)
    parser.add_argument("--K", type=int, default=4096)
    parser.add_argument("--N", type=int, default=6144)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    M, K, N, r = args.tokens, args.K, args.N, 256
    dev, dt = "cuda", torch.bfloat16
    x = torch.randn(M, K, device=dev, dtype=dt)
    w = torch.randn(N, K, device=dev, dtype=dt) / K**0.5
    a = torch.randn(r, K, device=dev, dtype=dt) / K**0.5
    b = torch.randn(N, r, device=dev, dtype=dt) / r**0.5
    mask = torch.zeros(M, dtype=torch.bool, device=dev)
    mask[M // 4: 3 * M // 4] = True
    flags = launch.tile_flags(mask)
    _, s = launch.plora_forward(x, w, None, a, b, mask, flags, 1.0, 0.0, None)
    dy = torch.randn(M, N, device=dev, dtype=dt)
    base_flops = 2.0 * M * N * K
    cublas = {
        "fwd": triton.testing.do_bench(lambda: torch.nn.functional.linear(x, w), warmup=10, rep=50),
        "dx": triton.testing.do_bench(lambda: dy @ w, warmup=10, rep=50),
        "dw": triton.testing.do_bench(lambda: dy.t() @ x, warmup=10, rep=50),
    }
    rows = []
    original = launch._config
    for kernel in ("fwd", "dx", "dw"):
        print(f"{kernel}: cuBLAS {cublas[kernel]:.3f} ms = {base_flops / cublas[kernel] / 1e9:.0f} TFLOP/s")
        for cfg in CANDIDATES:
            cfg = _rename(cfg, kernel)
            launch._config = lambda name, device, dtype, k=kernel, c=cfg: dict(c) if name == k else original(
                name, device, dtype)
            if kernel == "fwd":
                fn = lambda: launch.plora_forward(x, w, None, a, b, mask, flags, 1.0, 0.0, None)  # noqa: E731
            else:
                om = [kernel == "dx", kernel == "dw", False, False, False]
                fn = lambda om=om: launch.plora_backward(dy, x, w, a, b, s, mask, flags, 1.0, 0.0, None, om)  # noqa
            try:
                ms = triton.testing.do_bench(fn, warmup=10, rep=50)
            except Exception as e:  # e.g. out of shared memory
                print(f"  {cfg}: failed {type(e).__name__}: {str(e)[:80]}")
                continue
            rows.append(dict(kernel=kernel, config=cfg, ms=ms, cublas_ms=cublas[kernel]))
            print(f"  {cfg}: {ms:.3f} ms = {base_flops / ms / 1e9:.0f} TFLOP/s (base GEMM FLOPs), "
                  f"{ms / cublas[kernel]:.2f}x cuBLAS")
        launch._config = original
    if args.out:
        with open(args.out, "w") as f:
            json.dump(dict(device=torch.cuda.get_device_name(), M=M, K=K, N=N, rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
