"""Test set-up shared by every test module.

Triton picks compiled vs interpreted kernels when they are decorated, so ``TRITON_INTERPRET=1`` is
set here, before any test module imports mmkernels, whenever there is no GPU: the Triton kernels
then run on CPU tensors.  Kernel outputs are allocated full of NaN (``MMKERNELS_POISON_OUTPUTS``)
so an element a kernel forgets to write fails the comparison.
"""
import os
import random
import zlib

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("MMKERNELS_POISON_OUTPUTS", "1")

import mmkernels  # noqa: E402  (after the environment is set)

# One intra-op thread per test process: the tests' matrices are tiny, and on a busy 2-core machine
# (or with pytest-xdist workers side by side) OpenMP's spinning threads made small steps 30-50x slower.
torch.set_num_threads(1)

# Devices on which the Triton kernels can run in this process.
KERNEL_DEVICES = []
if mmkernels.interpreter_enabled():
    KERNEL_DEVICES.append("cpu")
if HAS_CUDA:
    KERNEL_DEVICES.append(pytest.param("cuda", marks=pytest.mark.gpu))

# (backend, device) pairs: the reference on CPU, the Triton kernels on every kernel device (the
# interpreter on CPU, the GPU when there is one).
BACKEND_DEVICES = [pytest.param("reference", "cpu", id="reference-cpu")]
for _d in KERNEL_DEVICES:
    _marks, _name = (_d.marks, _d.values[0]) if hasattr(_d, "values") else ((), _d)
    BACKEND_DEVICES.append(pytest.param("triton", _name, marks=_marks, id=f"triton-{_name}"))


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


# Fresh random inputs on every run, yet replayable: the run's seed is printed in pytest's header and
# MMKERNELS_TEST_SEED=<that number> reproduces it; each test mixes in a stable hash of its own id.
SESSION_SEED = int(os.environ.get("MMKERNELS_TEST_SEED") or random.SystemRandom().randrange(2**31))
# the same seed in every pytest-xdist worker (they start after this file is imported and inherit the
# environment) and in the processes tests spawn
os.environ["MMKERNELS_TEST_SEED"] = str(SESSION_SEED)


def pytest_report_header(config):
    return f"mmkernels: MMKERNELS_TEST_SEED={SESSION_SEED} (set it to replay this run's random inputs)"


@pytest.fixture(autouse=True)
def _fresh_seed(request):
    torch.manual_seed((SESSION_SEED + zlib.crc32(request.node.nodeid.encode())) % 2**31)
    yield
