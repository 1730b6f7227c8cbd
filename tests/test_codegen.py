"""The sm_90 code of the hot kernels meets the structural targets (no GPU needed).

``python -m benchmarks.codegen --check`` compiles every hot kernel for sm_90 at the benchmark shapes
(the launches ``tests/gpu_target_compile.py`` compiles too, so one of the two reads the other's
kernels from Triton's cache), reads ptxas, TTGIR and SASS, and checks the targets and known gaps of
``benchmarks/codegen_targets.py``: a target failed without a known-gap entry fails, and so does a
known gap whose kernel now meets its target (delete the entry)."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import codegen, codegen_targets

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
@pytest.mark.parametrize("op", codegen.OPS)
def test_codegen_targets(op):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    proc = subprocess.run([sys.executable, "-m", "benchmarks.codegen", "--only", op, "--check", "--quiet"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    failed = proc.stdout.find("Check failed")
    assert proc.returncode == 0, (proc.stdout[failed:] if failed >= 0 else proc.stdout[-3000:]) + proc.stderr[-3000:]


def _row(key, **fields):
    op, case, role = key.split("/")
    row = dict(key=key, op=op, case=case, role=role, kernel=f"_{role}_kernel", has_mma=True, c7515=False,
               spill_stores=0, spill_loads=0, dup=1, issue=0.2, issue_worst=0.2, tma=1, loads="TMA x2",
               mma_loops=[dict(cp_async=0, tma=2, plain_loads=0, buffers=[3, 3], cp_async_wait=None, dup=1.0)])
    row.update(fields)
    return row


def test_known_gaps_are_strict(monkeypatch):
    """A failing (target, row) without a gap entry fails; with one it is expected; a gap entry whose
    row meets the target, or that matches no row, fails."""
    monkeypatch.setattr(codegen_targets, "TARGETS", [codegen_targets.Target("t.issue", ("op/*/a*",), "issue", 0.3),
                                                     codegen_targets.Target("t.tma", ("op/*/a*",), "tma")])
    fast, slow = _row("op/c/a1"), _row("op/c/a2", issue=0.9)
    monkeypatch.setattr(codegen_targets, "KNOWN_GAPS", [])
    verdict = codegen_targets.evaluate([fast, slow], ops=["op"], triton_version="3.8.0")
    assert not verdict["ok"] and verdict["problems"] == ["t.issue op/c/a2: issue 0.9 (target: main loop "
                                                         "issue/useful <= 0.3)"]
    monkeypatch.setattr(codegen_targets, "KNOWN_GAPS", [("t.issue", "op/c/a2", "0.9")])
    assert codegen_targets.evaluate([fast, slow], ops=["op"], triton_version="3.8.0")["ok"]
    # the same entry once the kernel is fast: the gap is closed, the entry must go
    verdict = codegen_targets.evaluate([fast, _row("op/c/a2")], ops=["op"], triton_version="3.8.0")
    assert not verdict["ok"] and "now meets the target" in verdict["problems"][0]
    # an entry for another Triton does not apply; an entry matching no row is stale
    monkeypatch.setattr(codegen_targets, "KNOWN_GAPS", [("t.issue", "op/c/a2", "0.9", "3.6")])
    assert not codegen_targets.evaluate([fast, slow], ops=["op"], triton_version="3.8.0")["ok"]
    assert codegen_targets.evaluate([fast, slow], ops=["op"], triton_version="3.6.0")["ok"]
    monkeypatch.setattr(codegen_targets, "KNOWN_GAPS", [("t.issue", "op/c/a2", "0.9"), ("t.issue", "op/x/*", "")])
    verdict = codegen_targets.evaluate([fast, slow], ops=["op"], triton_version="3.8.0")
    assert verdict["problems"] == ["known gap ('t.issue', 'op/x/*') matches no row: delete it"]
    # a target that matches no row (a renamed role) fails
    verdict = codegen_targets.evaluate([_row("op/c/b1")], ops=["op"], triton_version="3.8.0")
    assert any("matches no row" in p for p in verdict["problems"])


def test_pipelined_check():
    check = codegen_targets.CHECKS["pipelined"].test
    loop = dict(cp_async=2, tma=0, plain_loads=0, buffers=[3, 3], cp_async_wait=2, dup=1.0)
    assert check(_row("op/c/a", mma_loops=[loop]), 3)[0]
    assert not check(_row("op/c/a", mma_loops=[dict(loop, cp_async_wait=0)]), 3)[0]      # waits for every copy
    assert not check(_row("op/c/a", mma_loops=[dict(loop, buffers=[1, 2])]), 3)[0]       # single-buffered operand
    assert not check(_row("op/c/a", mma_loops=[dict(loop, cp_async=0)]), 2)[0]           # plain loads
    assert check(_row("op/c/a", mma_loops=[dict(loop, cp_async=0, tma=2, buffers=[2])]), 3)[0]   # TMA
