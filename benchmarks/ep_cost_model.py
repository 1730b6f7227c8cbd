"""Expert-parallel cost on paper: ``python -m benchmarks.ep_cost_model [--json] [shape and link flags]``.

One GPU cannot measure all-to-all speed, so this prints a model: for each MoE
shape, the bytes one token moves through the all-to-alls of one MoE layer, the time that takes on
each link, next to the time of the grouped GEMMs that the same tokens cost, and how much of the
layer an overlap of the two could hide.  Nothing is timed; every number follows from the flags.

The model, per MoE layer, for S tokens on each of the P ranks of an expert-parallel group (each rank
holds E/P experts, routing uniform over the experts):

* **rows exchanged.**  Dropless: a token sends its k expert rows of H values; on average (P-1)/P of
  them go to another rank.  Capacity: the whole ``[E, C, H]`` buffer is exchanged with equal splits
  (DeepSpeed's ``_AllToAll``), ``C = max(ceil(S/E * cf * k), min_capacity)`` (DeepSpeed's
  ``_capacity``), padding and dropped slots included; (P-1)/P of it leaves the rank.
* **all-to-alls.**  Forward: dispatch and combine (the expert outputs come back, same size).
  Backward: the reverse of each (the gradients of both, same size).  Four equal all-to-alls per
  training step; dropless adds one exchange of E per-expert counts per layer (bytes, not per token;
  its latency is the host sync that sizes the receive buffer).
* **time.**  Bytes leaving one rank / the per-direction bandwidth of that rank's link (an all-to-all
  sends and receives at once, and every rank sends the same amount), plus ``--latency-us`` per
  all-to-all, the dropless counts exchange included (default 0: bandwidth only, so the times are
  lower bounds; latency is what dominates at decode-sized token counts).  NVLink 4 on an H200: 900 GB/s
  bidirectional per GPU, i.e. 450 GB/s each way (``NVLink4``); InfiniBand NDR 400 Gb/s per GPU, i.e.
  50 GB/s each way (``IB-NDR``), the link an EP group that spans nodes crosses.
* **grouped GEMMs.**  Each rank runs its experts on the rows it receives: ``S*k`` rows (dropless,
  balanced) or ``E*C`` padded rows (capacity, as DeepSpeed's dense experts do).  Forward FLOPs
  ``2 * rows * H * (F1 + F)`` with F1 = F (GELU MLP) or 2F (SwiGLU: gate and up); backward twice that
  (dX and dW).  At ``--tflops`` (forward; default 513, ``mmkernels.grouped_gemm`` measured on an H200,
  phi-2 experts, 16k tokens; ``torch._grouped_mm`` measured 635) and ``--bwd-tflops`` (default: the same).
* **overlap.**  Chunking the tokens lets the all-to-all of one chunk run under the GEMMs of another:
  at best the layer takes ``max(comm, gemm)`` instead of ``comm + gemm``, a saving of
  ``min / (comm + gemm)``.  Where comm is a few percent of the GEMMs, overlap cannot pay for its
  extra launches and smaller GEMMs; where comm is comparable to the GEMMs, it can save up to half.
  The verdict column: "no" below comm/GEMM 0.1, "marginal" up to 0.3, "yes" above.

Since bytes and FLOPs both scale with the tokens, the comm/GEMM ratio does not depend on S (with
``--latency-us 0``): per all-to-all it is ``b * (P-1)/P * TFLOP/s / (2 * (F1 + F) * GB/s)``.

Not modelled: the data-parallel all-reduce of the gradients (per step, not per token), the non-MoE
layers, imbalance (a hot expert's rank receives more than S*k rows and the others wait for it).
"""
from __future__ import annotations

import argparse
import json
import math
import sys

# MoE-LLaVA backbones (shared/research/moe.md section 1.3): H, expert FFN width F, gated (SwiGLU),
# decoder layers, MoE layers (every other layer, "sparse" mode).
MODELS = {
    "phi-2": dict(hidden=2560, ffn=10240, gated=False, layers=32, moe_layers=16),
    "stablelm-1.6b": dict(hidden=2048, ffn=5632, gated=True, layers=24, moe_layers=12),
    "qwen-1.8b": dict(hidden=2048, ffn=5504, gated=True, layers=24, moe_layers=12),
}
LINKS = {"NVLink4": 450.0, "IB-NDR": 50.0}   # GB/s per GPU, each direction
DEFAULTS = dict(tokens=16384, experts=4, k=2, ep_size=4, dtype_bytes=2, capacity_factor=1.5, min_capacity=0,
                tflops=513.0, latency_us=0.0)
ALLTOALLS_FWD, ALLTOALLS_FWD_BWD = 2, 4   # dispatch + combine; and their reverses in backward


def capacity(tokens: int, experts: int, capacity_factor: float, k: int, min_capacity: int) -> int:
    """DeepSpeed's capacity: the one implementation is :func:`mmkernels.ops.moe.reference.capacity_for`."""
    from mmkernels.ops.moe.reference import capacity_for
    return int(capacity_for(tokens, experts, capacity_factor, k, min_capacity))


def ep_cost(*, tokens: int, hidden: int, ffn: int, gated: bool, experts: int, k: int, ep_size: int,
            dtype_bytes: int, capacity_factor: float | None, link_gbps: float, tflops: float,
            bwd_tflops: float | None = None, min_capacity: int = 0, latency_us: float = 0.0) -> dict:
    """The model for one MoE layer on one rank (see the module docstring); ``capacity_factor=None`` is
    dropless.  Bytes are per token per layer; times in microseconds per layer."""
    for name, value in (("tokens", tokens), ("hidden", hidden), ("ffn", ffn), ("experts", experts), ("k", k),
                        ("ep_size", ep_size), ("dtype_bytes", dtype_bytes)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if k > experts:
        raise ValueError(f"k must be <= experts={experts}, got {k}")
    if experts % ep_size:
        raise ValueError(f"experts ({experts}) must be divisible by ep_size ({ep_size})")
    for name, value in (("link_gbps", link_gbps), ("tflops", tflops), ("bwd_tflops", bwd_tflops)):
        if value is not None and not value > 0:
            raise ValueError(f"{name} must be > 0, got {value!r}")
    if capacity_factor is not None and not capacity_factor > 0:
        raise ValueError(f"capacity_factor must be > 0 (or None: dropless), got {capacity_factor!r}")
    if latency_us < 0:
        raise ValueError(f"latency_us must be >= 0, got {latency_us!r}")
    bwd_tflops = tflops if bwd_tflops is None else bwd_tflops
    remote = (ep_size - 1) / ep_size   # share of the exchanged rows that leave the rank
    if capacity_factor is None:
        cap = None
        rows_exchanged = tokens * k            # the rank's (token, expert) rows
        gemm_rows = tokens * k                 # what it receives, balanced
    else:
        cap = capacity(tokens, experts, capacity_factor, k, min_capacity)
        rows_exchanged = experts * cap         # [E, C, H], padding included
        gemm_rows = experts * cap              # E/P local experts x C rows from each of P ranks
    bytes_per_a2a = rows_exchanged * hidden * dtype_bytes * remote   # leaving one rank
    first = 2 * ffn if gated else ffn
    fwd_flops = 2.0 * gemm_rows * hidden * (first + ffn)
    a2a_us = bytes_per_a2a / (link_gbps * 1e9) * 1e6 + (latency_us if ep_size > 1 else 0.0)
    comm_fwd, comm_step = ALLTOALLS_FWD * a2a_us, ALLTOALLS_FWD_BWD * a2a_us
    if capacity_factor is None and ep_size > 1:   # dropless: the counts exchange before the dispatch
        comm_fwd, comm_step = comm_fwd + latency_us, comm_step + latency_us
    gemm_fwd = fwd_flops / (tflops * 1e12) * 1e6
    gemm_step = gemm_fwd + 2 * fwd_flops / (bwd_tflops * 1e12) * 1e6
    return {
        "capacity": cap,
        "bytes_per_token_a2a": bytes_per_a2a / tokens,
        "bytes_per_token_fwd": ALLTOALLS_FWD * bytes_per_a2a / tokens,
        "bytes_per_token_step": ALLTOALLS_FWD_BWD * bytes_per_a2a / tokens,
        "counts_bytes": experts * 8 if capacity_factor is None and ep_size > 1 else 0,   # int64 counts
        "comm_fwd_us": comm_fwd, "comm_step_us": comm_step,
        "gemm_fwd_us": gemm_fwd, "gemm_step_us": gemm_step,
        "comm_over_gemm": comm_step / gemm_step,
        "overlap_saves": min(comm_step, gemm_step) / (comm_step + gemm_step),
    }


def verdict(ratio: float) -> str:
    """Whether overlapping the all-to-alls with the GEMMs pays, from comm / GEMM time: below 0.1 it can
    hide < 9 % of the layer, less than what chunking costs (smaller GEMMs, more launches); above 0.3 it
    hides > 23 %."""
    if ratio < 0.1:
        return "no"
    if ratio < 0.3:
        return "marginal"
    return "yes"


def rows(args) -> list[dict]:
    """One row per (model, routing mode, link)."""
    if args.hidden is not None:
        models = {"custom": dict(hidden=args.hidden, ffn=args.ffn, gated=args.gated, moe_layers=args.moe_layers)}
    else:
        models = {name: MODELS[name] for name in (args.model or list(MODELS))}
    links = dict(LINKS) if not args.link else dict(args.link)
    modes = {"capacity": args.capacity_factor, "dropless": None}
    modes = {m: modes[m] for m in (args.mode or list(modes))}
    out = []
    for name, shape in models.items():
        for mode, cf in modes.items():
            for link, gbps in links.items():
                c = ep_cost(tokens=args.tokens, hidden=shape["hidden"], ffn=shape["ffn"], gated=shape["gated"],
                            experts=args.experts, k=args.k, ep_size=args.ep_size, dtype_bytes=args.dtype_bytes,
                            capacity_factor=cf, link_gbps=gbps, tflops=args.tflops, bwd_tflops=args.bwd_tflops,
                            min_capacity=args.min_capacity, latency_us=args.latency_us)
                out.append({"model": name, "H": shape["hidden"], "F": shape["ffn"],
                            "form": "swiglu" if shape["gated"] else "gelu",
                            "mode": mode if cf is None else f"{mode} cf={cf:g}",
                            "link": link, "link_gbps": gbps, "moe_layers": shape.get("moe_layers"),
                            "kib_token_fwd": c["bytes_per_token_fwd"] / 1024,
                            "kib_token_step": c["bytes_per_token_step"] / 1024,
                            "mib_token_model_step": (c["bytes_per_token_step"] * shape["moe_layers"] / 2**20
                                                     if shape.get("moe_layers") else None),
                            "comm_fwd_us": c["comm_fwd_us"], "comm_step_us": c["comm_step_us"],
                            "gemm_fwd_us": c["gemm_fwd_us"], "gemm_step_us": c["gemm_step_us"],
                            "comm_over_gemm": c["comm_over_gemm"], "overlap_saves_pct": 100 * c["overlap_saves"],
                            "overlap": verdict(c["comm_over_gemm"]), "capacity": c["capacity"]})
    return out


COLUMNS = [("model", "model", None), ("mode", "mode", None), ("link", "link", None),
           ("kib_token_fwd", "KiB/tok fwd", ".2f"), ("kib_token_step", "KiB/tok f+b", ".2f"),
           ("mib_token_model_step", "MiB/tok model f+b", ".3f"),
           ("comm_step_us", "a2a f+b us", ".0f"), ("gemm_step_us", "GEMM f+b us", ".0f"),
           ("comm_over_gemm", "a2a/GEMM", ".3f"), ("overlap_saves_pct", "overlap saves %", ".1f"),
           ("overlap", "overlap pays?", None)]


def _link(text: str):
    name, sep, value = text.partition("=")
    try:
        gbps = float(value)
    except ValueError:
        gbps = float("nan")
    if not sep or not name or not gbps > 0:
        raise argparse.ArgumentTypeError(f"--link takes NAME=GB/s (per GPU, each direction, > 0), got {text!r}")
    return name, gbps


def parse_args(argv=None) -> argparse.Namespace:
    d = DEFAULTS
    p = argparse.ArgumentParser(prog="python -m benchmarks.ep_cost_model", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", action="append", choices=sorted(MODELS),
                   help="MoE-LLaVA backbone(s) (repeatable); default: all")
    p.add_argument("--hidden", type=int, default=None, help="custom shape: hidden size H (replaces --model)")
    p.add_argument("--ffn", type=int, default=None, help="custom shape: expert FFN width F")
    p.add_argument("--gated", action="store_true", help="custom shape: SwiGLU expert (first layer 2F wide)")
    p.add_argument("--moe-layers", type=int, default=None, help="custom shape: MoE layers in the model")
    p.add_argument("--tokens", type=int, default=d["tokens"], help="tokens S per rank per layer")
    p.add_argument("--experts", type=int, default=d["experts"], help="experts E")
    p.add_argument("--k", type=int, default=d["k"], help="experts per token")
    p.add_argument("--ep-size", type=int, default=d["ep_size"], help="expert-parallel group size P")
    p.add_argument("--dtype-bytes", type=int, default=d["dtype_bytes"], help="bytes per activation value (bf16: 2)")
    p.add_argument("--capacity-factor", type=float, default=d["capacity_factor"],
                   help="capacity factor of the capacity mode (MoE-LLaVA trains with 1.5, evaluates with 2.0)")
    p.add_argument("--min-capacity", type=int, default=d["min_capacity"], help="DeepSpeed's min_capacity")
    p.add_argument("--mode", action="append", choices=["capacity", "dropless"], help="routing mode(s); default both")
    p.add_argument("--link", action="append", type=_link, metavar="NAME=GB/s",
                   help="link(s), GB/s per GPU each direction (repeatable); default NVLink4=450 IB-NDR=50")
    p.add_argument("--tflops", type=float, default=d["tflops"], help="grouped-GEMM TFLOP/s, forward")
    p.add_argument("--bwd-tflops", type=float, default=None, help="grouped-GEMM TFLOP/s, backward (default: --tflops)")
    p.add_argument("--latency-us", type=float, default=d["latency_us"], help="fixed latency per all-to-all")
    p.add_argument("--json", action="store_true", help="print JSON (inputs and rows) instead of the table")
    args = p.parse_args(argv)
    if args.hidden is not None and args.ffn is None:
        p.error("--hidden needs --ffn (a custom shape)")
    if args.hidden is None and (args.ffn is not None or args.gated or args.moe_layers is not None):
        p.error("--ffn, --gated and --moe-layers describe a custom shape: give --hidden too")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        table = rows(args)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    inputs = {k: v for k, v in vars(args).items() if k != "json"}
    inputs["link"] = dict(args.link) if args.link else dict(LINKS)
    if args.json:
        json.dump({"inputs": inputs, "rows": table}, sys.stdout, indent=1)
        print()
        return 0
    from .harness import format_table
    bwd = args.bwd_tflops or args.tflops
    print(f"EP cost per MoE layer: S={args.tokens} tokens/rank, E={args.experts}, k={args.k}, P={args.ep_size} ranks, "
          f"{args.dtype_bytes}-byte activations; grouped GEMMs at {args.tflops:g} TFLOP/s fwd, {bwd:g} bwd; "
          f"latency {args.latency_us:g} us per all-to-all")
    print("KiB/tok: bytes one token sends off its rank per layer (fwd: dispatch+combine; f+b: and their "
          "reverses); MiB/tok model: f+b over all MoE layers; overlap pays: no < 0.1 <= marginal < 0.3 <= yes "
          "(a2a/GEMM)")
    print(format_table(table, COLUMNS))
    return 0


if __name__ == "__main__":
    sys.exit(main())
