"""benchmarks/profile_step.py runs on CPU (tiny shapes, reference backend: a smoke run of the script
benchmarks/gpu_check.sh runs on a GPU), writes profile.txt / profile.json, and a failing case is "not measured" without
hiding the others."""
from __future__ import annotations

import json

from . import profile_step


def test_profile_step_cpu_smoke(tmp_path, capsys):
    rc = profile_step.main(["--out", str(tmp_path), "--case", "moe", "--case", "plora", "--case", "hyper_gated",
                            "--rows", "5"])
    assert rc == 0
    text = (tmp_path / "profile.txt").read_text()
    assert "NO CUDA" in text and "smoke run" in text
    doc = json.loads((tmp_path / "profile.json").read_text())
    assert doc["cuda"] is False and len(doc["commit"]) >= 40
    assert [c["case"] for c in doc["cases"]] == ["moe", "plora", "hyper_gated"]
    for c in doc["cases"]:
        assert "error" not in c, c
        assert 0 < len(c["kernels"]) <= 5 and c["total_self_ms"] > 0
        assert all(k["self_us"] > 0 and k["calls"] >= 1 for k in c["kernels"])


def test_a_failing_case_is_not_measured(tmp_path, monkeypatch, capsys):
    real = profile_step.build

    def build(case, *args):
        if case == "plora":
            raise RuntimeError("boom")
        return real(case, *args)

    monkeypatch.setattr(profile_step, "build", build)
    rc = profile_step.main(["--out", str(tmp_path), "--case", "plora", "--case", "hyper_joint", "--rows", "3"])
    assert rc == 1
    assert "plora: not measured: RuntimeError: boom" in capsys.readouterr().out
    cases = json.loads((tmp_path / "profile.json").read_text())["cases"]
    assert cases[0] == {"case": "plora", "error": "RuntimeError: boom"} and "kernels" in cases[1]
