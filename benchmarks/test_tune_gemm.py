"""benchmarks/tune_gemm.py and benchmarks/targets.py on CPU: the sweep's smoke run (tiny shapes under the
interpreter) writes a table MMKERNELS_GEMM_CONFIGS reads, and the targets report says "not measured"
for every target no results file holds."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mmkernels.ops._gemm import config

from . import targets

ROOT = Path(__file__).resolve().parents[1]


def _tune(*args):
    """``python -m benchmarks.tune_gemm ...`` in a fresh process (it switches the interpreter on itself
    before importing mmkernels); returns the written table."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "-m", "benchmarks.tune_gemm", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    return json.loads(Path(args[args.index("--out") + 1]).read_text())


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU smoke run (a GPU runs the real sweep)")
def test_tune_gemm_cpu_smoke(tmp_path):
    out = tmp_path / "gemm_configs.json"
    doc = _tune("--out", str(out), "--roles", "moe.wgrad,plora.ds")
    assert set(doc["roles"]) == {"moe.wgrad", "plora.ds"} and len(doc["commit"]) >= 40
    arch, table = config._load_overrides(str(out))
    assert arch == "interpreter" and table["moe.wgrad"].source.startswith("measured at ")
    sweep = json.loads((tmp_path / "gemm_configs-sweep.json").read_text())
    labels = {(r["role"], r["candidate"]) for r in sweep["rows"]}
    assert ("moe.wgrad", "table") in labels and ("moe.wgrad", config.GROUPED_MM) in labels
    row = next(r for r in sweep["rows"] if r["candidate"] == config.GROUPED_MM)
    assert row["ms"] is None and row["note"].startswith("not measured: ")   # no CUDA here


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU smoke run (a GPU runs the real sweep)")
def test_tune_gemm_budget_leaves_roles_unswept(tmp_path):
    doc = _tune("--out", str(tmp_path / "g.json"), "--roles", "plora.ds,plora.fwd", "--budget-s", "1e-9")
    sweep = json.loads((tmp_path / "g-sweep.json").read_text())
    assert sweep["not_swept"] == ["plora.fwd"] and set(doc["roles"]) == {"plora.ds"}


def test_targets_report_not_measured_and_measured(tmp_path, capsys):
    assert targets.main([str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert out.count("not measured") == len(targets.TARGETS)
    doc = {"op": "moe", "commit": "f" * 40, "targets": [
        {"id": "moe.wgrad_tflops", "value": 612.0, "goal": 500.0, "better": "higher", "met": True, "target": "..."},
        {"id": "moe.layer_fwd_vs_torch", "value": None, "goal": 1.2, "better": "higher", "met": False}]}
    (tmp_path / "moe-h200-latest.json").write_text(json.dumps(doc))
    rows = {r["id"]: r for r in targets.collect([tmp_path])}
    assert rows["moe.wgrad_tflops"]["status"] == "measured" and rows["moe.wgrad_tflops"]["commit"] == "f" * 40
    assert rows["moe.wgrad_tflops"]["card"] == "h200" and rows["moe.wgrad_tflops"]["met"]
    assert rows["moe.layer_fwd_vs_torch"]["status"] == "not measured"     # a value of None was not measured
    assert targets.collect([tmp_path], card="h100")[1]["status"] == "not measured"
