"""Fixtures of the benchmark scripts' CPU tests."""
import pytest
import torch


@pytest.fixture
def launcher_kernels():
    """For a test that runs a script timing the launchers themselves: without a GPU that needs Triton's
    interpreter, which must be on before mmkernels is first imported (``make test`` runs
    tests/conftest.py first); skipped where mmkernels was imported without it."""
    from .run import _prepare_interpreter

    _prepare_interpreter()
    import mmkernels

    if not (torch.cuda.is_available() or mmkernels.interpreter_enabled()):
        pytest.skip("mmkernels was imported without TRITON_INTERPRET=1 in this process")
