"""``make bench`` entry point: ``python -m benchmarks.run [--op plora] [--quick] [--out DIR]``.

Prints the machine header and ``mmkernels.build_info()``, runs each registered operator benchmark
(verification + timing), says in one line per committed GPU result of the operator
(``benchmarks/results/<op>-<card>-latest.json``) the commit it was measured at and whether the
kernels changed since, writes ``<op>-<device>-<timestamp>.json``, ``<op>-<device>-latest.json`` and
``<op>-<device>-latest.png`` (default folder ``benchmarks/results``), and exits non-zero if any
verification failed.  On CPU the tables and the JSON name the mmkernels provider
``"mmkernels, reference path (CPU)"``: the default backend runs the plain-PyTorch reference there.

Without CUDA the Triton kernels can only run under Triton's CPU interpreter, which is read when
mmkernels is imported, so this module sets ``TRITON_INTERPRET=1`` *before* importing mmkernels.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys
import time

import torch

# Operator name -> benchmark module (each exposes ``OP`` and ``run(args) -> payload``).  New
# operators (MoE, attention, ...) add a line here.
REGISTRY: dict[str, str] = {
    "plora": "benchmarks.bench_plora",
    "moe": "benchmarks.bench_moe",
    "hyper_attention": "benchmarks.bench_hyper_attention",
}


def _prepare_interpreter() -> None:
    if not torch.cuda.is_available() and "mmkernels" not in sys.modules:
        os.environ["TRITON_INTERPRET"] = "1"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.split("\n\n")[0])
    p.add_argument("--op", action="append", choices=sorted(REGISTRY), default=None,
                   help="operator(s) to run (repeatable); default: all registered")
    p.add_argument("--quick", action="store_true", help="fewer shapes (a smoke run)")
    p.add_argument("--out", default=None, help="output folder (default benchmarks/results)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    _prepare_interpreter()
    if torch.cuda.is_available() is False and os.environ.get("TRITON_INTERPRET") != "1":
        print("warning: no CUDA and TRITON_INTERPRET is not 1 (mmkernels was imported earlier?)", flush=True)

    import mmkernels  # noqa: F401  (after TRITON_INTERPRET)

    from . import harness as H

    t_start = time.perf_counter()
    if not torch.cuda.is_available():
        # every CPU timing runs with this many torch threads (a module may pin fewer, and says so)
        threads = H.pin_cpu_threads()
        print(f"CPU timings: torch.set_num_threads({threads}) (MMKERNELS_BENCH_THREADS to change); "
              "warm-up calls untimed; min and median over the repetitions", flush=True)
    header = H.machine_header()
    print("=== mmkernels benchmarks ===")
    print(H.format_header(header), flush=True)

    ops = args.op or list(REGISTRY)
    all_ok = True
    summary = []
    for name in ops:
        module = importlib.import_module(REGISTRY[name])
        # the committed GPU numbers, read before this run may overwrite them
        committed = H.committed_gpu_results(getattr(module, "OP", name))
        t0 = time.perf_counter()
        try:
            payload = module.run(args)
        except Exception as e:
            import traceback

            traceback.print_exc()
            print(f"!!! benchmark {name} crashed: {type(e).__name__}: {e}", flush=True)
            all_ok = False
            summary.append((name, "CRASH", time.perf_counter() - t0, []))
            continue
        elapsed = time.perf_counter() - t0
        payload["elapsed_s"] = elapsed
        payload["committed_gpu_results"] = committed
        for c in committed:
            print(c["line"], flush=True)
        paths = H.write_results(getattr(module, "OP", name), payload, args.out)
        if payload.get("plot"):
            paths.append(payload["plot"])
        ok = bool(payload.get("ok", True))
        all_ok &= ok
        summary.append((name, "PASS" if ok else "FAIL", elapsed, paths))

    print("\n=== summary ===")
    for name, verdict, elapsed, paths in summary:
        print(f"  {name:<10} verification {verdict:<5} {elapsed:7.1f}s")
        for p in paths:
            print(f"             wrote {p}")
    print(f"  total {time.perf_counter() - t_start:.1f}s", flush=True)
    return 0 if all_ok else 1


if __name__ == "__main__":
    sys.exit(main())
