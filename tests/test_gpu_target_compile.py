"""Every Triton kernel launch compiles for sm_90 and sm_80 (no GPU needed; see gpu_target_compile.py)."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent


@pytest.mark.slow
@pytest.mark.parametrize("op", ["plora", "hyper_attention", "moe"])
def test_kernels_compile_for_gpu_targets(op):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(HERE.parent), env.get("PYTHONPATH", "")])
    proc = subprocess.run([sys.executable, str(HERE / "gpu_target_compile.py"), op], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "ok  sm_90" in proc.stdout and "ok  sm_80" in proc.stdout
