"""The expert-parallel cost model: its byte and FLOP formulas against hand
computations, and the CLI (table and JSON)."""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from . import ep_cost_model as M

ROOT = Path(__file__).resolve().parent.parent


def test_dropless_bytes_and_times_by_hand():
    # phi-2, S = 1000 tokens/rank, E 4, k 2, P 4, bf16: a token sends k rows of H values, 3/4 leave the rank
    c = M.ep_cost(tokens=1000, hidden=2560, ffn=10240, gated=False, experts=4, k=2, ep_size=4, dtype_bytes=2,
                  capacity_factor=None, link_gbps=450.0, tflops=500.0)
    per_a2a = 2 * 2560 * 2 * 3 / 4                       # 7680 bytes
    assert c["bytes_per_token_a2a"] == per_a2a
    assert c["bytes_per_token_fwd"] == 2 * per_a2a       # dispatch + combine
    assert c["bytes_per_token_step"] == 4 * per_a2a      # + their reverses in backward
    assert c["comm_step_us"] == pytest.approx(4 * 1000 * per_a2a / 450e9 * 1e6)
    fwd_flops = 2 * (1000 * 2) * 2560 * (10240 + 10240)  # two GEMMs on S*k rows
    assert c["gemm_fwd_us"] == pytest.approx(fwd_flops / 500e12 * 1e6)
    assert c["gemm_step_us"] == pytest.approx(3 * fwd_flops / 500e12 * 1e6)   # backward: dX and dW
    ratio = c["comm_step_us"] / c["gemm_step_us"]
    assert c["comm_over_gemm"] == pytest.approx(ratio)
    assert c["overlap_saves"] == pytest.approx(ratio / (1 + ratio))
    assert c["counts_bytes"] == 4 * 8


def test_capacity_bytes_swiglu_and_single_rank_by_hand():
    # capacity mode: the [E, C, H] buffer with C = ceil(S/E * cf * k) (DeepSpeed), padding included
    S, E, k, cf, H, F_ = 1001, 4, 2, 1.5, 2048, 5632
    C = math.ceil(S / E * cf * k)
    c = M.ep_cost(tokens=S, hidden=H, ffn=F_, gated=True, experts=E, k=k, ep_size=2, dtype_bytes=2,
                  capacity_factor=cf, link_gbps=50.0, tflops=600.0, bwd_tflops=300.0)
    assert c["capacity"] == C == 751
    assert c["bytes_per_token_a2a"] == pytest.approx(E * C * H * 2 / 2 / S)
    fwd_flops = 2 * (E * C) * H * (2 * F_ + F_)          # SwiGLU: gate and up, then down
    assert c["gemm_step_us"] == pytest.approx((fwd_flops / 600e12 + 2 * fwd_flops / 300e12) * 1e6)
    assert c["counts_bytes"] == 0
    one = M.ep_cost(tokens=S, hidden=H, ffn=F_, gated=True, experts=E, k=k, ep_size=1, dtype_bytes=2,
                    capacity_factor=None, link_gbps=50.0, tflops=600.0, latency_us=20.0)
    assert one["bytes_per_token_step"] == 0 and one["comm_step_us"] == 0 and one["overlap_saves"] == 0
    # latency: per all-to-all, and dropless adds the counts exchange in the forward
    lat = M.ep_cost(tokens=S, hidden=H, ffn=F_, gated=True, experts=E, k=k, ep_size=2, dtype_bytes=2,
                    capacity_factor=None, link_gbps=50.0, tflops=600.0, latency_us=20.0)
    bw = M.ep_cost(tokens=S, hidden=H, ffn=F_, gated=True, experts=E, k=k, ep_size=2, dtype_bytes=2,
                   capacity_factor=None, link_gbps=50.0, tflops=600.0)
    assert lat["comm_fwd_us"] == pytest.approx(bw["comm_fwd_us"] + 3 * 20.0)
    assert lat["comm_step_us"] == pytest.approx(bw["comm_step_us"] + 5 * 20.0)


@pytest.mark.parametrize("kwargs, match", [({"ep_size": 3}, "divisible"), ({"k": 5}, "k must"),
                                           ({"tokens": 0}, "tokens"), ({"link_gbps": 0.0}, "link_gbps"),
                                           ({"capacity_factor": -1.0}, "capacity_factor")])
def test_bad_arguments_are_named(kwargs, match):
    base = dict(tokens=16, hidden=8, ffn=8, gated=False, experts=4, k=2, ep_size=2, dtype_bytes=2,
                capacity_factor=None, link_gbps=1.0, tflops=1.0)
    with pytest.raises(ValueError, match=match):
        M.ep_cost(**{**base, **kwargs})


def test_cli_table_and_json():
    # the table with the defaults: every MoE-LLaVA backbone x {capacity, dropless} x {NVLink, IB}
    assert M.main([]) == 0
    out = subprocess.run([sys.executable, "-m", "benchmarks.ep_cost_model", "--json", "--model", "phi-2",
                          "--mode", "dropless", "--link", "X=100", "--tokens", "512"],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    (row,) = data["rows"]
    assert (row["model"], row["mode"], row["link"], row["H"]) == ("phi-2", "dropless", "X", 2560)
    assert row["kib_token_step"] == pytest.approx(4 * 2 * 2560 * 2 * 3 / 4 / 1024)
    assert data["inputs"]["tokens"] == 512 and data["inputs"]["link"] == {"X": 100.0}


def test_cli_default_table_lists_every_backbone(capsys):
    assert M.main(["--tokens", "4096"]) == 0
    text = capsys.readouterr().out
    for name in M.MODELS:
        assert text.count(name) == 4
    assert "NVLink4" in text and "IB-NDR" in text


def test_cli_rejects_bad_flags(capsys):
    with pytest.raises(SystemExit):
        M.parse_args(["--link", "nvlink"])
    with pytest.raises(SystemExit):
        M.parse_args(["--ffn", "128"])
    assert M.main(["--hidden", "64", "--ffn", "128", "--ep-size", "3"]) == 2
    assert "divisible" in capsys.readouterr().err
