"""The PLoRA block-size sweep (benchmarks.tune_plora) on CPU: the smoke run writes its winners and rows."""
import json

from .tune_plora import main as tune_main


def test_tune_smoke_run_writes_winners_and_rows(tmp_path, launcher_kernels):
    out = tmp_path / "plora_configs.json"
    chosen = tune_main(["--kernel", "shrink", "--out", str(out)])
    assert json.loads(out.read_text()) == chosen and set(chosen) == {"shrink"}
    sweep = json.loads((tmp_path / "plora_configs-sweep.json").read_text())
    assert len(sweep["rows"]) == 2 and all(r["kernel"] == "shrink" and r["ms"] > 0 for r in sweep["rows"])
    assert chosen["shrink"] in [r["config"] for r in sweep["rows"]]
