"""The README's Python examples run as written (reference backend on CPU)."""
import re
from pathlib import Path

import pytest

import mmkernels

README = Path(__file__).resolve().parent.parent / "README.md"
BLOCKS = [b for b in re.findall(r"```python\n(.*?)```", README.read_text(), re.S) if "import mmkernels" in b]


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_example_runs(index):
    if "import transformers" in BLOCKS[index] or "mmkernels.transformers" in BLOCKS[index]:
        pytest.importorskip("transformers", minversion="5", reason="the optional transformers extra is not installed")
    if "deepspeed" in BLOCKS[index]:
        pytest.importorskip("deepspeed.moe.layer", reason="DeepSpeed (the test extra) is not installed")
    with mmkernels.use_backend("reference"):
        exec(compile(BLOCKS[index], f"README.md example {index}", "exec"), {})
