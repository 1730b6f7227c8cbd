"""Backend selection (auto / reference / triton) and the interpreter's bf16 dot fix."""
import pytest
import torch
import triton
import triton.language as tl

import mmkernels
from mmkernels import backend
from mmkernels._interpreter import patch_bf16_dot


def test_default_is_auto_and_resolves_by_device():
    assert mmkernels.get_backend() in ("auto", "reference", "triton")
    with mmkernels.use_backend("auto"):
        assert backend.resolve_backend(torch.device("cpu"), torch.float32) == "reference"
        assert backend.resolve_backend(torch.device("cuda"), torch.bfloat16) == "triton"
        assert backend.resolve_backend(torch.device("cuda"), torch.float64) == "reference"


def test_context_manager_nests_and_restores():
    before = mmkernels.get_backend()
    with mmkernels.use_backend("reference"):
        assert mmkernels.get_backend() == "reference"
        with mmkernels.use_backend("TRITON"):
            assert mmkernels.get_backend() == "triton"
        assert mmkernels.get_backend() == "reference"
    assert mmkernels.get_backend() == before


def test_bad_backend_name():
    with pytest.raises(ValueError, match="backend"):
        with mmkernels.use_backend("cuda"):
            pass


def test_environment_variable(monkeypatch):
    monkeypatch.setattr(backend, "_ENV_BACKEND", "reference")
    assert mmkernels.get_backend() == "reference"
    monkeypatch.setattr(backend, "_ENV_BACKEND", "bogus")
    with pytest.raises(ValueError, match="MMKERNELS_BACKEND"):
        mmkernels.get_backend()


def test_triton_on_cpu_needs_the_interpreter(monkeypatch):
    monkeypatch.setattr(backend, "interpreter_enabled", lambda: False)
    with mmkernels.use_backend("triton"), pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        backend.resolve_backend(torch.device("cpu"), torch.float32)


def test_triton_rejects_float64():
    with mmkernels.use_backend("triton"), pytest.raises(TypeError, match="float64"):
        backend.resolve_backend(torch.device("cpu"), torch.float64)


def test_reference_backend_runs_float64_on_any_machine():
    x = torch.randn(5, 8, dtype=torch.float64)
    w, a, b = torch.randn(6, 8, dtype=torch.float64), torch.randn(2, 8, dtype=torch.float64), \
        torch.randn(6, 2, dtype=torch.float64)
    m = torch.tensor([1, 0, 1, 0, 0], dtype=torch.bool)
    with mmkernels.use_backend("reference"):
        y = mmkernels.plora_linear(x, w, None, a, b, m, scaling=2.0)
    expected = x @ w.T
    expected[m] += 2.0 * (x[m] @ a.T) @ b.T
    torch.testing.assert_close(y, expected)


def test_build_info_keys():
    info = mmkernels.build_info()
    for key in ("torch_version", "triton_version", "c_extension_loaded", "cuda_kernels", "cuda_archs"):
        assert key in info
    assert info["torch_version"] == torch.__version__


@triton.jit
def _dot_kernel(a_ptr, b_ptr, c_ptr, N: tl.constexpr):
    offs = tl.arange(0, N)
    a = tl.load(a_ptr + offs[:, None] * N + offs[None, :])
    b = tl.load(b_ptr + offs[:, None] * N + offs[None, :])
    tl.store(c_ptr + offs[:, None] * N + offs[None, :], tl.dot(a, b))


@pytest.mark.skipif(not mmkernels.interpreter_enabled(), reason="interpreter-only fix")
def test_interpreter_bf16_dot_is_correct():
    """triton-lang/triton#11584: without the patch a bf16 tl.dot multiplies raw bit patterns (~1e10)."""
    assert patch_bf16_dot()
    a = torch.randn(16, 16).bfloat16()
    b = torch.randn(16, 16).bfloat16()
    c = torch.empty(16, 16)
    _dot_kernel[(1,)](a, b, c, N=16)
    torch.testing.assert_close(c, a.float() @ b.float(), atol=1e-5, rtol=1e-5)


@triton.jit
def _cast_kernel(x_ptr, y_ptr, N: tl.constexpr):
    offs = tl.arange(0, N)
    tl.store(y_ptr + offs, tl.load(x_ptr + offs).to(tl.bfloat16))


@pytest.mark.skipif(not mmkernels.interpreter_enabled(), reason="interpreter-only fix")
def test_interpreter_bf16_cast_rounds_to_nearest_even():
    x = torch.randn(64)
    x[0] = float("nan")
    y = torch.empty(64, dtype=torch.bfloat16)
    _cast_kernel[(1,)](x, y, N=64)
    expected = x.bfloat16()  # torch rounds to nearest even, like the GPU
    assert torch.equal(y[1:], expected[1:]) and torch.isnan(y[0])


# --------------------------------------------------------------------- use_backend is per thread/task

def test_use_backend_is_per_thread():
    """Thread A's block must not change what thread B sees, before, during or after it."""
    import threading

    a_inside, b_checked, a_exited = threading.Event(), threading.Event(), threading.Event()
    seen = {}

    def thread_a():
        with mmkernels.use_backend("triton"):
            a_inside.set()
            b_checked.wait(5)
        a_exited.set()

    def thread_b():
        seen["before"] = mmkernels.get_backend()
        with mmkernels.use_backend("reference"):
            a_inside.wait(5)
            seen["while_a_inside"] = mmkernels.get_backend()
            b_checked.set()
            a_exited.wait(5)
            seen["after_a_exited"] = mmkernels.get_backend()

    default = mmkernels.get_backend()
    threads = [threading.Thread(target=thread_a), threading.Thread(target=thread_b)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert seen == {"before": default, "while_a_inside": "reference", "after_a_exited": "reference"}
    assert mmkernels.get_backend() == default


def test_thread_outside_any_block_sees_the_default():
    import threading

    seen = []
    with mmkernels.use_backend("triton"):
        t = threading.Thread(target=lambda: seen.append(mmkernels.get_backend()))
        t.start()
        t.join(10)
    assert seen == [backend.get_backend()]  # the default, not the other thread's "triton"


def test_use_backend_is_per_asyncio_task():
    import asyncio

    async def worker(name, gate, log):
        with mmkernels.use_backend(name):
            await gate.wait()
            log.append((name, mmkernels.get_backend()))

    async def main():
        gate, log = asyncio.Event(), []
        tasks = [asyncio.create_task(worker(n, gate, log)) for n in ("reference", "triton")]
        await asyncio.sleep(0)          # both tasks are now inside their blocks
        outside = mmkernels.get_backend()
        gate.set()
        await asyncio.gather(*tasks)
        return outside, sorted(log)

    default = mmkernels.get_backend()
    outside, log = asyncio.run(main())
    assert outside == default
    assert log == [("reference", "reference"), ("triton", "triton")]


def test_torch_compile_traces_the_backend_choice():
    """fullgraph tracing of get_backend(); on torch >= 2.14 a different backend recompiles."""
    def f(x):
        return x + 1 if mmkernels.get_backend() == "reference" else x - 1

    cf = torch.compile(f, fullgraph=True, backend="eager")
    x = torch.ones(3)
    with mmkernels.use_backend("reference"):
        assert torch.equal(cf(x), x + 1)
    if backend._DYNAMO_GUARDS_CONTEXTVARS:
        with mmkernels.use_backend("triton"):
            assert torch.equal(cf(x), x - 1)
