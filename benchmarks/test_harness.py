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
