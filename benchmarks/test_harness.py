"""The CPU timer of the benchmark harness: pinned threads, untimed warm-up, min and median."""
from __future__ import annotations

import pytest
import torch

from . import harness as H


def test_cpu_time_ms_excludes_warmup_and_reports_min_and_median(monkeypatch):
    calls = []
    durations = iter([10.0, 10.0] + [0.004, 0.001, 0.002, 0.003, 0.005] + [0.0] * 100)
    clock = [0.0]

    def fn():
        calls.append(1)
        clock[0] += next(durations)   # a slow first (warm-up) call must not reach the samples

    monkeypatch.setattr(H.time, "perf_counter", lambda: clock[0])
    t = H.cpu_time_ms(fn, warmup=2, min_reps=5, max_reps=5, min_time_s=0.0)
    assert len(calls) == 2 + 5 and t.reps == 5
    assert t.min == pytest.approx(1.0) and t.median == pytest.approx(3.0) and t[0] == t.median
    p50, p20, p80 = t                 # still unpacks like the old (p50, p20, p80) tuple
    assert p20 <= p50 <= p80 and t.min <= p20
    assert t.threads == torch.get_num_threads()
    f = t.fields()
    assert f["ms"] == t.median and f["ms_min"] == t.min and f["threads"] == t.threads


def test_pin_cpu_threads(monkeypatch):
    before = torch.get_num_threads()
    try:
        monkeypatch.delenv("MMKERNELS_BENCH_THREADS", raising=False)
        assert H.pin_cpu_threads() == H.DEFAULT_CPU_THREADS == torch.get_num_threads()
        monkeypatch.setenv("MMKERNELS_BENCH_THREADS", "2")
        assert H.pin_cpu_threads() == 2 == torch.get_num_threads()
        assert "2 torch threads" in H.timer_description(on_cuda=False)
        monkeypatch.setenv("MMKERNELS_BENCH_THREADS", "zero")
        with pytest.raises(ValueError, match="MMKERNELS_BENCH_THREADS"):
            H.pin_cpu_threads()
    finally:
        torch.set_num_threads(before)


def test_target_schema():
    t = H.target("moe.layer_fwd_vs_torch", 1.3, 1.2, "higher", "MoE fwd vs torch-native")
    assert t == {"id": "moe.layer_fwd_vs_torch", "value": 1.3, "goal": 1.2, "better": "higher", "met": True,
                 "target": "MoE fwd vs torch-native"}
    assert H.target("plora.fwd_vs_base", 1.2, 1.1, "lower", "x")["met"] is False
    assert H.target("hyper.decode_kernel_us", None, 20, "lower", "x")["met"] is False   # not measured
    with pytest.raises(ValueError, match="better"):
        H.target("x", 1.0, 1.0, "more", "x")
    assert len(H.git_commit_full().split("-")[0]) == 40


def test_error_line_is_the_type_and_first_message_line():
    assert H.error_line(RuntimeError("kernel exploded\nsecond line")) == "RuntimeError: kernel exploded"
    assert H.error_line(ValueError("x" * 50), limit=10) == "ValueError: " + "x" * 10
    assert H.error_line(KeyError()) == "KeyError: "


def test_worst_skips_unmeasured_and_follows_better():
    assert H.worst([3.0, None, 1.0, 2.0], "higher") == 1.0
    assert H.worst([3.0, None, 1.0, 2.0], "lower") == 3.0
    assert H.worst([None], "lower") is None
    rows = [dict(x=2.0), dict(x=None), dict(x=5.0)]
    assert H.worst(rows, "higher", key=lambda r: r["x"]) == dict(x=2.0)


def test_cpu_threads_sets_and_restores():
    before = torch.get_num_threads()
    with H.cpu_threads(1):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before
    with pytest.raises(RuntimeError), H.cpu_threads(None):
        assert torch.get_num_threads() == before
        raise RuntimeError("restored on the way out")
    assert torch.get_num_threads() == before
