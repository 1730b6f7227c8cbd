"""The GPU targets of the GEMM family (and of packed hyper attention), read from results JSONs: measured (met or not) or not measured.

    python -m benchmarks.targets [DIR ...] [--card h200]

Reads every ``<op>-<card>-latest.json`` in each DIR (default ``benchmarks/results``) and prints, per
target id below, the value, the goal, whether it is met, and the full commit and card of the run
that measured it -- or ``not measured`` when no results file of this card has the id with a value
(no GPU run since the target was defined, or the case failed).  Exit status 0 either way: this is a
report, the benchmarks themselves fail on a broken verification.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from . import harness as H

# (operator, id): the GEMM-family targets the benchmarks compute (bench_moe.py, bench_plora.py)
GEMM_TARGETS = (
    ("moe", "moe.grouped_gemm_vs_torch"),
    ("moe", "moe.wgrad_tflops"),
    ("moe", "moe.layer_fwd_vs_torch"),
    ("moe", "moe.layer_fwd_bwd_vs_torch"),
    ("plora", "plora.fwd_vs_base"),
    ("plora", "plora.fwd_bwd_vs_xcomposer"),
    ("plora", "plora.all_text_vs_base"),
)
# packed samples through hyper attention (bench_hyper_attention.py --varlen)
HYPER_VARLEN_TARGETS = (
    ("hyper_attention", "hyper.varlen_tokens_per_s_vs_padded"),
    ("hyper_attention", "hyper.varlen_fwd_bwd_vs_flex_document"),
)
TARGETS = GEMM_TARGETS + HYPER_VARLEN_TARGETS


def collect(dirs, card: str | None = None) -> list[dict]:
    """One row per target id: ``{op, id, status, value, goal, better, met, commit, card, file}``;
    ``status`` is ``"measured"`` or ``"not measured"``."""
    found = {}
    for d in dirs:
        for path in sorted(Path(d).glob("*-latest.json")):
            op, _, rest = path.name.partition("-")
            file_card = rest[: -len("-latest.json")]
            if card and file_card != card:
                continue
            try:
                doc = json.loads(path.read_text())
            except (OSError, ValueError):
                continue
            for t in doc.get("targets", []) or []:
                if isinstance(t, dict) and t.get("id") and t.get("value") is not None:
                    found[t["id"]] = dict(t, commit=doc.get("commit"), card=file_card, file=str(path))
    rows = []
    for op, tid in TARGETS:
        t = found.get(tid)
        if t is None:
            rows.append(dict(op=op, id=tid, status="not measured", value=None, goal=None, better=None, met=False,
                             commit=None, card=None, file=None))
        else:
            rows.append(dict(op=op, id=tid, status="measured", value=t["value"], goal=t.get("goal"),
                             better=t.get("better"), met=bool(t.get("met")), commit=t.get("commit"), card=t["card"],
                             file=t["file"]))
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.targets", description=__doc__.split("\n\n")[0])
    p.add_argument("dirs", nargs="*", default=[str(H.RESULTS_DIR)], help="folders of results JSONs")
    p.add_argument("--card", default=None, help="only files of this card slug (h100, h200, ...)")
    p.add_argument("--json", default=None, help="also write the rows here")
    args = p.parse_args(argv)
    rows = collect(args.dirs, args.card)
    width = max(len(r["id"]) for r in rows)
    print("== GEMM-family and packed hyper attention GPU targets ==")
    for r in rows:
        if r["status"] == "not measured":
            print(f"  {r['id']:<{width}}  not measured")
        else:
            rel = ">=" if r["better"] == "higher" else "<="
            print(f"  {r['id']:<{width}}  {r['value']} (goal {rel} {r['goal']}: {'MET' if r['met'] else 'NOT MET'})"
                  f"  {r['card']}, commit {r['commit']}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
