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


def _fake_clock(monkeypatch):
    clock = [0.0]
    monkeypatch.setattr(H.time, "perf_counter", lambda: clock[0])
    return clock


def test_paired_ratio_times_both_sides_back_to_back(monkeypatch):
    """t(base) / t(ours) per round; a side repeats a fast call until it lasts PAIRED_MIN_SAMPLE_MS; the
    leaves' gradients are cleared before every call."""
    clock = _fake_clock(monkeypatch)
    leaf = torch.zeros(1, requires_grad=True)
    order = []

    def ours():
        assert leaf.grad is None
        leaf.grad = torch.ones(1)
        order.append("ours")
        clock[0] += 1e-3

    def base():
        assert leaf.grad is None
        leaf.grad = torch.ones(1)
        order.append("base")
        clock[0] += 3e-3

    r = H.paired_ratio(ours, base, [leaf], reps=4)
    assert float(r) == pytest.approx(3.0) and r.samples == pytest.approx([3.0] * 4) and not r.noisy
    calls = round(H.PAIRED_MIN_SAMPLE_MS)          # the fastest call took 1 ms
    assert order[:2] == ["ours", "base"] and len(order) == 2 + 4 * 2 * calls
    rounds = [order[2 + i * 2 * calls] for i in range(4)]
    assert rounds == ["ours", "base", "ours", "base"]   # the side that goes first alternates
    assert float(r.inverse()) == pytest.approx(1 / 3)


@pytest.mark.parametrize("samples, noisy", [([1.2, 1.3, 1.25, 1.4, 1.22], False), ([0.8, 0.9, 0.85, 0.7, 0.95], False),
                                            ([0.9, 1.1, 1.05, 0.97, 1.2], True), ([1.0, 1.2, 1.3, 1.25, 1.4], False),
                                            ([0.95, 1.0, 1.3, 1.25, 1.4], True)])
def test_noise_rule(samples, noisy):
    """NOISE_RULE: a comparison is flagged when the 20-80 % range of its paired ratios contains 1.00."""
    r = H.PairedRatio(samples)
    assert r.noisy is noisy and r.p20 <= float(r) <= r.p80
    assert H.rank_flag(x_base=r, vs_xcomposer=H.PairedRatio([2.0, 2.1])) == ("noisy: x base" if noisy else "")
    assert H.rank_flag(x_base=None) == ""
    assert "20-80 %" in H.NOISE_RULE and "1.00" in H.NOISE_RULE


def test_cpu_tables_and_json_name_the_reference_path(monkeypatch, tmp_path, capsys):
    """On CPU an mmkernels provider is labelled with the path it runs (the reference path under the
    default backend), in tables, plots and the results JSON; the rows the modules compute keep their names."""
    import json

    import mmkernels

    monkeypatch.setattr(H, "is_cuda", lambda: False)
    assert H.provider_label("mmkernels") == "mmkernels, reference path (CPU)"
    assert H.provider_label("mmkernels wgrad") == "mmkernels wgrad, reference path (CPU)"
    assert H.provider_label("deepspeed") == "deepspeed"
    assert H.provider_label("mmkernels", on_cuda=True) == "mmkernels"
    with mmkernels.use_backend("triton"):
        assert H.provider_label("mmkernels") == "mmkernels, Triton interpreter (CPU)"
    rows = [dict(provider="mmkernels", ms=1.0, rank="noisy: x base"), dict(provider="base_linear", ms=0.5, rank=None)]
    H.print_table("t", rows, [("provider", "provider", None), ("ms", "ms", ".1f"), ("rank", "rank", None)])
    out = capsys.readouterr().out
    assert "mmkernels, reference path (CPU)" in out and H.NOISE_RULE in out
    assert rows[0]["provider"] == "mmkernels"                     # not modified in place
    path = H.write_results("unit", {"rows": rows, "ok": True}, tmp_path, keep_timestamped=False)[0]
    assert [r["provider"] for r in json.loads(path.read_text())["rows"]] == ["mmkernels, reference path (CPU)",
                                                                             "base_linear"]


def test_committed_gpu_results_say_when_the_kernels_changed(monkeypatch, tmp_path):
    """One line per committed GPU result: the commit it was measured at, and whether the operator's
    kernels differ from it (stale), or the commit is unknown here."""
    import json
    import subprocess

    root = subprocess.run(["git", "rev-list", "--max-parents=0", "HEAD"], cwd=H.REPO_ROOT, capture_output=True,
                          text=True).stdout.split()
    if not root:
        pytest.skip("not a git checkout")
    cases = {"h200": root[0], "h100": "0" * 40}
    results = tmp_path / "results"
    results.mkdir()
    for card, commit in cases.items():
        (results / f"moe-{card}-latest.json").write_text(json.dumps(
            {"commit": commit, "machine": {"device": f"NVIDIA {card.upper()}", "cuda_available": True}}))
    (results / "moe-cpu-latest.json").write_text(json.dumps({"machine": {"device": "CPU", "cuda_available": False}}))
    monkeypatch.setattr(H, "RESULTS_DIR", results)
    got = {r["device"]: r for r in H.committed_gpu_results("moe")}
    assert set(got) == {"NVIDIA H200", "NVIDIA H100"}            # CPU results are not GPU numbers
    assert got["NVIDIA H200"]["stale"] is True and got["NVIDIA H200"]["commit"] == root[0]
    assert f"measured at {root[0][:7]}; stale: the moe kernels changed since" in got["NVIDIA H200"]["line"]
    assert got["NVIDIA H100"]["stale"] is None and "commit not in this clone's history" in got["NVIDIA H100"]["line"]
    assert all(len(r["line"].splitlines()) == 1 for r in got.values())
