"""The hyper attention tile sweep (benchmarks.tune_hyper) and codegen table (benchmarks.hyper_codegen) on
CPU: the sweep's smoke run writes its rows and verdicts; the TTGIR reading finds replicated MMA work."""
import json

import pytest
import torch

from .hyper_codegen import ttgir_summary
from .tune_hyper import main as tune_main

_TTGIR = """#mma = #ttg.nvidia_mma<{versionMajor = 3, versionMinor = 0, warpsPerCTA = [8, 1], instrShape = [16, 32, 16]}>
#mma1 = #ttg.nvidia_mma<{versionMajor = 3, versionMinor = 0, warpsPerCTA = [8, 1], instrShape = [16, 128, 16]}>
    %a = ttg.local_alloc : () -> !ttg.memdesc<3x64x128xbf16, #shared, #smem, mutable>
    %s = ttng.warp_group_dot %q, %k, %c : !ttg.memdesc<64x128xbf16, #shared, #smem> * !ttg.memdesc<128x64xbf16, #shared1, #smem> -> tensor<64x64xf32, #mma>
    %o = ttng.warp_group_dot %p, %v, %d : tensor<128x64xbf16> * !ttg.memdesc<64x128xbf16, #shared, #smem> -> tensor<128x128xf32, #mma1>
"""


def test_ttgir_summary_finds_replicated_rows():
    """8 warps laid out [8, 1] cover 128 rows: a 64-row dot is computed twice, a 128-row one once."""
    s = ttgir_summary(_TTGIR)
    assert s["dup"] == 2 and s["buffers"] == [3]
    assert ((8, 1), (16, 32, 16)) in s["mma"]
    assert ttgir_summary(_TTGIR.replace("tensor<64x64xf32, #mma>", "tensor<128x64xf32, #mma>"))["dup"] == 1


def test_tune_smoke_run_writes_rows_and_verdicts(tmp_path):
    """The sweep times the launchers themselves, so without a GPU it needs Triton's interpreter, which
    must be on before mmkernels is first imported (``make test`` runs tests/conftest.py first)."""
    from .run import _prepare_interpreter

    _prepare_interpreter()
    import mmkernels

    if not (torch.cuda.is_available() or mmkernels.interpreter_enabled()):
        pytest.skip("mmkernels was imported without TRITON_INTERPRET=1 in this process")
    out = tmp_path / "hyper_tune.json"
    result = tune_main(["--kernel", "fwd", "--out", str(out)])
    saved = json.loads(out.read_text())
    assert saved["rows"] == json.loads(json.dumps(result["rows"]))
    assert len(saved["rows"]) == 4 and all(r["ms"] > 0 for r in saved["rows"])   # 2 candidates x 2 shapes
    assert set(saved["verdicts"]) == {"fwd"} and "BLOCK_N" in saved["verdicts"]["fwd"]["config"]
