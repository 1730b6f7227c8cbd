"""The PLoRA block-size sweep (benchmarks.tune_plora) on CPU: the smoke run writes its winners and rows."""
import json

import pytest
import torch

from .tune_plora import main as tune_main


def test_tune_smoke_run_writes_winners_and_rows(tmp_path):
    """The sweep times the launchers themselves, so without a GPU it needs Triton's interpreter, which
    must be on before mmkernels is first imported (``make test`` runs tests/conftest.py first)."""
    from .run import _prepare_interpreter

    _prepare_interpreter()
    import mmkernels

    if not (torch.cuda.is_available() or mmkernels.interpreter_enabled()):
        pytest.skip("mmkernels was imported without TRITON_INTERPRET=1 in this process")
    out = tmp_path / "plora_configs.json"
    chosen = tune_main(["--kernel", "shrink", "--out", str(out)])
    assert json.loads(out.read_text()) == chosen and set(chosen) == {"shrink"}
    sweep = json.loads((tmp_path / "plora_configs-sweep.json").read_text())
    assert len(sweep["rows"]) == 2 and all(r["kernel"] == "shrink" and r["ms"] > 0 for r in sweep["rows"])
    assert chosen["shrink"] in [r["config"] for r in sweep["rows"]]
