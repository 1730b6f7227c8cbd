"""The hyper attention tile sweep (benchmarks.tune_hyper) on CPU: the smoke run writes its rows and verdicts."""
import json

from .tune_hyper import main as tune_main


def test_tune_smoke_run_writes_rows_and_verdicts(tmp_path, launcher_kernels):
    out = tmp_path / "hyper_tune.json"
    result = tune_main(["--kernel", "fwd", "--out", str(out)])
    saved = json.loads(out.read_text())
    assert saved["rows"] == json.loads(json.dumps(result["rows"]))
    assert len(saved["rows"]) == 4 and all(r["ms"] > 0 for r in saved["rows"])   # 2 candidates x 2 shapes
    assert set(saved["verdicts"]) == {"fwd"} and "BLOCK_N" in saved["verdicts"]["fwd"]["config"]
