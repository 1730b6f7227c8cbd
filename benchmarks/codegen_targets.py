"""Structural targets for the sm_90 code of the hot kernels, and the known gaps.

Checked by ``python -m benchmarks.codegen --check`` and by ``tests/test_codegen.py`` (Triton of the
environment; CI runs it under Triton 3.6 too).  A row is ``op/case/role`` (see the cases in
:mod:`benchmarks.codegen`); a target's row patterns (fnmatch) match that key, or ``op/case/<kernel
name>`` so a pattern such as ``hyper_attention/*/_hyper_bwd_*`` picks up new backward kernels.

A known gap is a (target, row) that does not meet the target yet.  It is an expected failure, strict:

* a row that fails a target with no gap entry fails the check (a regression, or a new kernel);
* a gap entry whose rows now meet the target fails the check too: delete the entry (or narrow its
  pattern), so the target holds from then on;
* a gap entry or target that matches no row fails the check (a renamed kernel or role).

``python -m benchmarks.codegen --gaps`` prints every current failure as a ready-to-paste entry.  The
third field of an entry is the value measured when it was written (documentation only); a fourth,
optional, limits the entry to some Triton versions (a prefix such as ``"3.6"``).
"""
from __future__ import annotations

import dataclasses
import fnmatch
from typing import Callable

# ---------------------------------------------------------------------------------------- row groups

GEMM_LARGE = ("moe/*/gemm*", "moe/*/fc*", "moe/*/gate_up", "moe/*/dZ", "moe/*/dGU", "moe/*/dX", "moe/*/dW*",
              "plora/*/fwd", "plora/*/dX", "plora/*/dW0")
GEMM_SMALL = ("plora/*/shrink", "plora/*/dS", "plora/*/dA", "plora/*/dB")
GEMM = GEMM_LARGE + GEMM_SMALL
GEMM_FORWARD = ("moe/*/gemm", "moe/*/fc*", "moe/*/gate_up", "plora/*/fwd")
HYPER = ("hyper_attention/*/*",)
HYPER_FWD = ("hyper_attention/*/_hyper_fwd*",)
HYPER_BWD = ("hyper_attention/*/_hyper_bwd*",)
DECODE = ("hyper_attention/*/_hyper_decode*",)   # the split (the merge has no MMA loop)


# ------------------------------------------------------------------------------------------- checks

def _loops_pipelined(row: dict, buffers: int) -> tuple[bool, str]:
    """Every MMA loop copies its operands asynchronously: TMA, or cp.async into >= ``buffers`` buffers
    with a wait that keeps at least one copy group in flight."""
    bad: dict[str, list[int]] = {}    # what is wrong -> the MMA loops (in order) it is wrong in
    for i, loop in enumerate(row["mma_loops"]):
        bufs = min(loop["buffers"], default=0)
        if loop["cp_async"]:
            ok = bufs >= buffers and (loop["cp_async_wait"] or 0) >= 1
        else:
            ok = loop["tma"] > 0
        if not ok:
            how = (f"cp.async, bufs {bufs}, wait {loop['cp_async_wait']}" if loop["cp_async"] else "plain loads")
            bad.setdefault(how, []).append(i)
    return not bad, "; ".join(f"{how} (MMA loop {', '.join(map(str, loops))} of {len(row['mma_loops'])})"
                              for how, loops in bad.items()) or "every MMA loop pipelined"


@dataclasses.dataclass(frozen=True)
class Check:
    text: str                                        # what it asks, with {limit}
    test: Callable[[dict, float | None], tuple[bool, str]]   # (met, measured value)
    needs_mma: bool = False                          # rows without an MMA loop are not checked


CHECKS = {
    "no_c7515": Check("no C7515 (ptxas does not serialize the wgmma pipeline)",
                      lambda r, _: (not r["c7515"], "C7515" if r["c7515"] else "no C7515")),
    "no_spills": Check("no spills", lambda r, _: (r["spill_stores"] + r["spill_loads"] == 0,
                                                   f"spill {r['spill_stores']}/{r['spill_loads']} B")),
    "dup1": Check("no dot replicated across warps",
                  lambda r, _: (r["dup"] == 1, f"dup {r['dup']}")),
    "pipelined": Check("every MMA loop pipelined: TMA, or >= {limit} buffers with a cp.async wait >= 1",
                       lambda r, n: _loops_pipelined(r, int(n)), needs_mma=True),
    "issue": Check("main loop issue/useful <= {limit}",
                   lambda r, x: (r["issue"] <= x, f"issue {r['issue']}"), needs_mma=True),
    "issue_every_loop": Check("every MMA loop issue/useful <= {limit}",
                              lambda r, x: (r["issue_worst"] <= x, f"worst loop issue {r['issue_worst']}"),
                              needs_mma=True),
    "tma": Check("main loop loads with TMA", lambda r, _: (r["tma"] > 0, f"loads {r['loads']}"), needs_mma=True),
}


@dataclasses.dataclass(frozen=True)
class Target:
    id: str
    rows: tuple[str, ...]
    check: str
    limit: float | None = None

    @property
    def text(self) -> str:
        return CHECKS[self.check].text.format(limit=self.limit)


# ------------------------------------------------------------------------------------------ targets

TARGETS = [
    # the GEMM family: MoE grouped GEMMs (forward, dZ, dX, weight gradients) and PLoRA
    Target("gemm.no_c7515", GEMM, "no_c7515"),
    Target("gemm.no_spills", GEMM, "no_spills"),
    Target("gemm.dup1", GEMM, "dup1"),
    Target("gemm.pipelined", GEMM, "pipelined", 3),
    Target("gemm.issue", GEMM_LARGE, "issue", 0.30),
    Target("gemm.issue_small", GEMM_SMALL, "issue", 0.6),
    Target("gemm.weights_tma", GEMM_FORWARD, "tma"),
    # hyper attention
    Target("hyper.no_spills", HYPER, "no_spills"),
    Target("hyper.dup1", HYPER, "dup1"),
    Target("hyper.bwd_pipelined", HYPER_BWD, "pipelined", 3),
    Target("hyper.bwd_issue", HYPER_BWD, "issue_every_loop", 0.75),
    Target("hyper.bwd_issue_unmasked", HYPER_BWD, "issue", 0.5),     # the leanest (unmasked) loop
    Target("hyper.fwd_issue", HYPER_FWD, "issue", 0.85),
    Target("hyper.fwd_pipelined", HYPER_FWD, "pipelined", 2),        # the visual-key boundary loop too
    Target("hyper.decode_pipelined", DECODE, "pipelined", 2),
    Target("hyper.decode_issue", DECODE, "issue", 1.5),
]

# (target id, row pattern, measured when written (Triton 3.8)[, only under these Triton versions]):
# one line each; delete a line when its kernel meets the target (the check fails until you do).
KNOWN_GAPS = [
    # PLoRA dA with dropout: the keep-mask is drawn once per step (_dropout_bits_kernel) and dA reads its
    # packed bits beside each x tile.  x is the wgmma B operand, so every element goes shared memory ->
    # registers -> shared memory, and masking costs about 3 instructions per element (a bit test, a
    # select, a 16-bit half move), against BLOCK_R / 16 useful MMA clocks per element per warp (R 128:
    # 8).  BLOCK_R = 256 (all of the models' r) would halve that cost per MMA clock but also the grid
    # (64 programs for 132 SMs at K = 4096); BLOCK_K = 32 keeps the grid but its 64x32 wgmma costs more
    # than it saves (0.81).  The shrink, whose x is the register operand, meets the target.
    ("gemm.issue_small", "plora/dropout/dA", "issue 0.84 (Triton 3.6: 1.02)"),
    # hyper attention backward: the dK/dV programs' loop over partial row tiles (the boundary tiles and
    # the short last tile, in 32-row steps) keeps 2 stages, so the 128-key tile's two fp32 accumulators
    # still fit the registers; the full-tile loop (wait 4) and every dQ loop (wait 2) have 3 buffers.
    # With 3 stages there (KV_STAGES_MASKED in the "bwd" table entry) the loop meets the target, but the
    # causal case spills 4 B under Triton 3.6; 16-row tiles (BLOCK_M_KV_MASKED 16) with 3 stages pipeline
    # without spills but issue 1.0-1.05 per useful clock there (> 0.75, hyper.bwd_issue; 3.8 and 3.6)
    ("hyper.bwd_pipelined", "hyper_attention/*/bwd", "cp.async, bufs 2, wait 0 (MMA loop 0 of 6: dK/dV partial)"),
]


# ---------------------------------------------------------------------------------------- evaluation

def _matches(row: dict, patterns) -> bool:
    by_kernel = f"{row['op']}/{row['case']}/{row['kernel']}"
    return any(fnmatch.fnmatchcase(row["key"], p) or fnmatch.fnmatchcase(by_kernel, p) for p in patterns)


def _pattern_op(pattern: str) -> str:
    return pattern.split("/")[0]


def _gap_applies(gap: tuple, triton_version: str) -> bool:
    return len(gap) < 4 or any(triton_version.startswith(v) for v in gap[3].split(","))


def evaluate(rows: list[dict], ops, triton_version: str, partial: bool = False) -> dict:
    """Every (target, row) as met / known gap / FAIL / CLOSED (a gap entry whose row meets the target),
    plus the problems that fail the check.  ``ops``: the operators whose rows were analysed;
    ``partial``: only some of their rows were (then unmatched targets and gap entries are not errors)."""
    targets = {t.id: t for t in TARGETS}
    gaps = [g for g in KNOWN_GAPS if _gap_applies(g, triton_version)]
    results, problems, used_gaps = [], [], set()
    for bad in sorted({g[0] for g in KNOWN_GAPS} - set(targets)):
        problems.append(f"known gap for an unknown target {bad!r}")
    for t in TARGETS:
        if not any(fnmatch.fnmatchcase(op, _pattern_op(p)) for p in t.rows for op in ops):
            continue
        check = CHECKS[t.check]
        matched = [r for r in rows if _matches(r, t.rows) and (r["has_mma"] or not check.needs_mma)]
        if not matched and not partial:
            problems.append(f"{t.id}: matches no row (patterns {', '.join(t.rows)}); a kernel or role was renamed?")
        for r in matched:
            met, value = check.test(r, t.limit)
            gap = next((g for g in gaps if g[0] == t.id and fnmatch.fnmatchcase(r["key"], g[1])), None)
            if gap:
                used_gaps.add(gap)
            status = ("met" if met else "FAIL") if gap is None else ("CLOSED" if met else "gap")
            results.append(dict(target=t.id, row=r["key"], status=status, value=value,
                                gap=gap[1] if gap else None))
            if status == "FAIL":
                problems.append(f"{t.id} {r['key']}: {value} (target: {t.text})")
            elif status == "CLOSED":
                problems.append(f"{t.id} {r['key']} now meets the target ({value}): delete or narrow the known "
                                f"gap ({t.id!r}, {gap[1]!r}) in benchmarks/codegen_targets.py")
    if not partial:
        for g in gaps:
            if g not in used_gaps and g[0] in targets and any(
                    fnmatch.fnmatchcase(op, _pattern_op(g[1])) for op in ops):
                problems.append(f"known gap ({g[0]!r}, {g[1]!r}) matches no row: delete it")
    return dict(ok=not problems, triton_version=triton_version, problems=problems, results=results,
                targets=[dict(id=t.id, rows=list(t.rows), text=t.text) for t in TARGETS])


def format_verdict(verdict: dict) -> str:
    """Markdown: one line per target (rows met, known gaps with their values), then the problems."""
    lines = [f"### Structural targets (Triton {verdict['triton_version']})", "",
             "| target | what | met | known gaps | failing |", "|---|---|---|---|---|"]
    for t in verdict["targets"]:
        res = [r for r in verdict["results"] if r["target"] == t["id"]]
        if not res:
            continue
        gaps = "; ".join(f"{r['row']} ({r['value']})" for r in res if r["status"] == "gap") or "-"
        bad = "; ".join(f"{r['row']} ({r['value']}{', gap closed' if r['status'] == 'CLOSED' else ''})"
                        for r in res if r["status"] in ("FAIL", "CLOSED")) or "-"
        lines.append(f"| {t['id']} | {t['text']} | {sum(r['status'] == 'met' for r in res)}/{len(res)} | {gaps} "
                     f"| {bad} |")
    lines.append("")
    if verdict["problems"]:
        lines += [f"Check failed ({len(verdict['problems'])} problems):", *(f"- {p}" for p in verdict["problems"])]
    else:
        lines.append("Check passed: every target is met or a known gap.")
    return "\n".join(lines)


def format_gap_entries(verdict: dict) -> str:
    """Every failing (target, row) as a KNOWN_GAPS line; a role failing in every case it has is
    written once, with ``*`` for the case."""
    failing = [r for r in verdict["results"] if r["status"] in ("FAIL", "gap")]
    lines, done = [], set()
    for r in failing:
        op, _, role = r["row"].split("/")
        same_role = [x for x in verdict["results"] if x["target"] == r["target"]
                     and x["row"].split("/")[0] == op and x["row"].split("/")[2] == role]
        pattern = f"{op}/*/{role}" if len(same_role) > 1 and all(x in failing for x in same_role) else r["row"]
        if (r["target"], pattern) in done:
            continue
        done.add((r["target"], pattern))
        lines.append(f"    ({r['target']!r}, {pattern!r}, {r['value']!r}),")
    return "KNOWN_GAPS = [\n" + "\n".join(lines) + "\n]"
