"""Tests of the native build (CMakeLists.txt + setup.py) and of mmkernels._C.

Build outcomes (see CMakeLists.txt):
  a. CUDA torch + working nvcc      -> _C has CUDA kernels for TORCH_CUDA_ARCH_LIST
                                       (default 8.0;9.0a)     [test_outcome_a_*]
  b. no usable CUDA toolchain        -> CPU-only _C + one warning line
                                       [test_outcome_b_*, slow: builds into tmp dirs]
  c. MMKERNELS_REQUIRE_CUDA=1        -> (b) becomes a configure-time error
                                       [test_outcome_c_*, slow but fail fast]
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from mmkernels import _extension
from mmkernels._extension import HAS_C, build_info, has_op

ROOT = Path(__file__).resolve().parents[1]
WARNING_TEXT = "mmkernels: CUDA kernels skipped, building a CPU-only _C"
REQUIRE_TEXT = "MMKERNELS_REQUIRE_CUDA=1 but CUDA kernels cannot be built"
BUILD_INFO_KEYS = {
    "torch_version",
    "triton_version",
    "c_extension_loaded",
    "cuda_kernels",
    "cuda_archs",
    "cuda_version_built",
    "cuda_available",
    "device_name",
    "load_error",
}


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "0").strip().lower() in ("1", "on", "true", "yes", "y")


def _ref_tile_flags(mask: torch.Tensor, group_rows: int) -> list[int]:
    vals = mask.cpu().tolist()
    return [sum(vals[i : i + group_rows]) for i in range(0, len(vals), group_rows)]


requires_c = pytest.mark.skipif(not HAS_C, reason=f"mmkernels._C not loaded: {_extension.load_error()}")


# --------------------------------------------------------------------------- #
# The in-tree / installed extension
# --------------------------------------------------------------------------- #
def test_extension_loaded():
    assert HAS_C, f"mmkernels._C failed to load: {_extension.load_error()}"
    import mmkernels._C as C

    assert Path(C.__file__).parent == Path(_extension.__file__).parent
    assert has_op("plora_tile_flags")
    assert has_op("plora_tile_flags", "cpu")
    assert has_op("build_config")
    assert not has_op("definitely_not_an_op")


@requires_c
def test_has_op_ignores_python_registered_ops():
    lib = torch.library.Library("mmkernels", "FRAGMENT")  # noqa: TOR901
    lib.define("_test_build_python_only(Tensor x) -> Tensor")
    lib.impl("_test_build_python_only", lambda x: x.clone(), "CPU")
    assert torch.ops.mmkernels._test_build_python_only(torch.ones(2)).tolist() == [1.0, 1.0]
    assert not has_op("_test_build_python_only")
    assert not has_op("_test_build_python_only", "cpu")


def test_build_info_shape():
    info = build_info()
    assert BUILD_INFO_KEYS <= set(info)
    assert info["torch_version"] == torch.__version__
    assert isinstance(info["c_extension_loaded"], bool)
    assert isinstance(info["cuda_kernels"], bool)
    assert isinstance(info["cuda_archs"], list) and all(isinstance(a, str) for a in info["cuda_archs"])
    assert info["cuda_available"] == torch.cuda.is_available()
    if info["cuda_kernels"]:
        assert info["cuda_archs"] and re.fullmatch(r"\d+\.\d+", info["cuda_version_built"])
    else:
        assert info["cuda_archs"] == [] and info["cuda_version_built"] is None
    if not info["cuda_available"]:
        assert info["device_name"] is None
    json.dumps(info)  # plain data


@requires_c
def test_build_config_json():
    cfg = json.loads(torch.ops.mmkernels.build_config())
    assert {"cuda", "archs", "cuda_version", "torch_version"} <= set(cfg)
    assert cfg["torch_version"] == torch.__version__
    assert has_op("plora_tile_flags", "cuda") == cfg["cuda"]


def test_missing_extension_falls_back_with_one_warning():
    """If _C cannot be imported, mmkernels still imports and warns exactly once."""
    code = textwrap.dedent(
        """
        import sys, warnings, importlib.abc
        class Block(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name == "mmkernels._C":
                    raise ImportError("blocked for the test")
        sys.meta_path.insert(0, Block())
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            import mmkernels
            from mmkernels._extension import HAS_C, build_info, has_op, MMKernelsWarning
        ours = [x for x in w if issubclass(x.category, MMKernelsWarning)]
        assert len(ours) == 1, [str(x.message) for x in ours]
        assert issubclass(MMKernelsWarning, RuntimeWarning)
        assert "fall back" in str(ours[0].message)
        info = build_info()
        assert HAS_C is False and info["c_extension_loaded"] is False
        assert info["cuda_kernels"] is False and info["cuda_archs"] == []
        assert "blocked for the test" in info["load_error"]
        assert not has_op("plora_tile_flags")
        # the ops' Python paths take over the native ones
        import torch
        from mmkernels.ops.plora import launch as plora_launch
        from mmkernels.ops.moe import launch as moe_launch
        mask = torch.tensor([True] * 20 + [False] * 13)
        assert plora_launch.tile_flags(mask).tolist() == [16, 4, 0]
        idx, keep, counts, top1, slots, offsets = moe_launch.route(torch.randn(10, 4), 2, -1, None, None)
        assert int(counts.sum()) == 20 and bool(keep.all()) and int(offsets[-1]) == 20
        print("OK")
        """
    )
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "OK" in r.stdout, r.stdout + r.stderr


# --------------------------------------------------------------------------- #
# plora_tile_flags
# --------------------------------------------------------------------------- #
@requires_c
@pytest.mark.parametrize("m", [0, 1, 5, 64, 65, 1000])
@pytest.mark.parametrize("group_rows", [1, 3, 64, 128])
def test_plora_tile_flags_cpu(m, group_rows):
    g = torch.Generator().manual_seed(m * 131 + group_rows)
    mask = torch.rand(m, generator=g) < 0.3
    out = torch.ops.mmkernels.plora_tile_flags(mask, group_rows)
    assert out.dtype == torch.int32 and out.device.type == "cpu"
    assert out.shape == ((m + group_rows - 1) // group_rows,)
    assert out.tolist() == _ref_tile_flags(mask, group_rows)


@requires_c
def test_plora_tile_flags_cpu_example_and_strides():
    op = torch.ops.mmkernels.plora_tile_flags
    assert op(torch.tensor([True, False, True]), 2).tolist() == [1, 1]
    assert op(torch.zeros(0, dtype=torch.bool), 4).dtype == torch.int32
    base = torch.rand(2000) < 0.5
    for view in (base[::3], base[1::7], base.view(40, 50)[:, 3], base.flip(0)[5:]):
        assert not view.is_contiguous() or view.stride(0) == 1
        assert op(view, 16).tolist() == _ref_tile_flags(view, 16)


@requires_c
def test_plora_tile_flags_validation():
    op = torch.ops.mmkernels.plora_tile_flags
    with pytest.raises(RuntimeError, match="bool"):
        op(torch.ones(4, dtype=torch.int32), 2)
    with pytest.raises(RuntimeError, match="1-D"):
        op(torch.ones(2, 2, dtype=torch.bool), 2)
    with pytest.raises(RuntimeError, match="group_rows"):
        op(torch.ones(4, dtype=torch.bool), 0)


@requires_c
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_plora_tile_flags_cuda():
    if not has_op("plora_tile_flags", "cuda"):
        pytest.skip(f"_C built without CUDA kernels: {build_info().get('cuda_skip_reason')}")
    op = torch.ops.mmkernels.plora_tile_flags
    g = torch.Generator().manual_seed(0)
    for m in (0, 1, 31, 32, 33, 1000, 100_003):
        for group_rows in (1, 7, 64, 128, 4096):
            mask = torch.rand(m, generator=g) < 0.4
            want = op(mask, group_rows)
            got = op(mask.cuda(), group_rows)
            assert got.device.type == "cuda" and got.dtype == torch.int32
            assert torch.equal(got.cpu(), want), (m, group_rows)
    # non-contiguous input
    base = (torch.rand(5000, generator=g) < 0.5).cuda()
    view = base[1::3]
    assert op(view, 64).cpu().tolist() == _ref_tile_flags(view, 64)
    # launched on the current stream, with no host synchronisation
    s = torch.cuda.Stream()
    mask = (torch.rand(1 << 16, generator=g) < 0.5).cuda()
    torch.cuda.synchronize()
    with torch.cuda.stream(s):
        torch.cuda.set_sync_debug_mode("error")
        try:
            out = op(mask, 128)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    s.synchronize()
    assert out.cpu().tolist() == _ref_tile_flags(mask, 128)
    with pytest.raises(RuntimeError, match="bool"):
        op(torch.ones(4, device="cuda"), 2)


# --------------------------------------------------------------------------- #
# Outcome a: CUDA kernels compiled for the requested archs
# --------------------------------------------------------------------------- #
def _cuobjdump() -> str | None:
    cands = [shutil.which("cuobjdump"), os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin", "cuobjdump")]
    try:
        import triton

        cands.append(str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"))
    except Exception:
        pass
    return next((c for c in cands if c and os.path.isfile(c) and os.access(c, os.X_OK)), None)


@requires_c
def test_outcome_a_cuda_archs():
    info = build_info()
    if not info["cuda_kernels"]:
        if _env_flag("MMKERNELS_REQUIRE_CUDA"):
            pytest.fail(f"MMKERNELS_REQUIRE_CUDA=1 but _C has no CUDA kernels: {info.get('cuda_skip_reason')}")
        pytest.skip(f"in-tree _C is CPU-only: {info.get('cuda_skip_reason')}")
    archs = info["cuda_archs"]
    assert all(re.fullmatch(r"\d+\.\d+[af]?(\+PTX)?", a) for a in archs), archs
    if not os.environ.get("TORCH_CUDA_ARCH_LIST"):
        assert "8.0" in archs and "9.0a" in archs, archs
    assert info["cuda_version_built"].split(".")[0] == (torch.version.cuda or "").split(".")[0]

    tool = _cuobjdump()
    if tool is None:
        pytest.skip("cuobjdump not found")
    import mmkernels._C as C

    listing = subprocess.run([tool, "--list-elf", C.__file__], capture_output=True, text=True, check=True).stdout
    for a in archs:
        sm = "sm_" + a.split("+")[0].replace(".", "")
        assert re.search(rf"\.{sm}\.cubin", listing), (sm, listing)


# --------------------------------------------------------------------------- #
# Outcomes b and c: builds from scratch into temporary directories
# --------------------------------------------------------------------------- #
def _path_without_nvcc() -> str:
    keep = []
    for d in os.environ.get("PATH", "").split(os.pathsep):
        if d and not os.path.exists(os.path.join(d, "nvcc")):
            keep.append(d)
    return os.pathsep.join(keep)


def _setup_build(tmp_path: Path, **env_overrides: str | None) -> tuple[subprocess.CompletedProcess, Path]:
    env = dict(os.environ)
    for k in ("MMKERNELS_REQUIRE_CUDA", "MMKERNELS_DISABLE_CUDA", "TORCH_CUDA_ARCH_LIST"):
        env.pop(k, None)
    env["MMKERNELS_CMAKE_BUILD_DIR"] = str(tmp_path / "cmake")
    for k, v in env_overrides.items():
        if v is None:
            env.pop(k, None)
        else:
            env[k] = v
    lib = tmp_path / "lib"
    cmd = [sys.executable, "setup.py", "-q", "build_ext", "--build-lib", str(lib), "--build-temp", str(tmp_path / "temp")]
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    return r, lib


def _load_built(lib: Path) -> dict:
    so = sorted(lib.glob("mmkernels/_C*.so"))
    assert len(so) == 1, list(lib.rglob("*"))
    code = textwrap.dedent(
        f"""
        import json, torch
        torch.ops.load_library({str(so[0])!r})
        cfg = json.loads(torch.ops.mmkernels.build_config())
        cfg["flags"] = torch.ops.mmkernels.plora_tile_flags(torch.tensor([True, False, True]), 2).tolist()
        cfg["has_cuda_kernel"] = torch._C._dispatch_has_kernel_for_dispatch_key("mmkernels::plora_tile_flags", "CUDA")
        print("CFG=" + json.dumps(cfg))
        """
    )
    r = subprocess.run([sys.executable, "-c", code], cwd=lib, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    return json.loads(r.stdout.split("CFG=", 1)[1])


def _check_cpu_only_build(r: subprocess.CompletedProcess, lib: Path, reason_re: str) -> None:
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-6000:]
    lines = [ln for ln in out.splitlines() if WARNING_TEXT in ln]
    assert len(lines) == 1, out[-6000:]
    assert re.search(reason_re, lines[0]), lines[0]
    cfg = _load_built(lib)
    assert cfg["cuda"] is False and cfg["archs"] == [] and cfg["cuda_version"] is None
    assert re.search(reason_re, cfg["cuda_skip_reason"])
    assert cfg["flags"] == [1, 1]
    assert cfg["has_cuda_kernel"] is False


@pytest.mark.slow
def test_outcome_b_cpu_only_when_disabled(tmp_path):
    r, lib = _setup_build(tmp_path, MMKERNELS_DISABLE_CUDA="1")
    _check_cpu_only_build(r, lib, "MMKERNELS_DISABLE_CUDA")


@pytest.mark.slow
def test_outcome_b_cpu_only_without_nvcc(tmp_path):
    # No nvcc anywhere: CUDACXX points nowhere and nvcc is removed from PATH.
    r, lib = _setup_build(
        tmp_path, CUDACXX="/nonexistent/bin/nvcc", PATH=_path_without_nvcc(), CUDA_HOME=None, CUDA_PATH=None
    )
    reason = "CUDACXX=/nonexistent/bin/nvcc" if torch.version.cuda else "CPU-only build"
    _check_cpu_only_build(r, lib, re.escape(reason))


@pytest.mark.slow
def test_outcome_c_require_cuda_without_nvcc_fails_fast(tmp_path):
    r, lib = _setup_build(
        tmp_path,
        MMKERNELS_REQUIRE_CUDA="1",
        CUDACXX="/nonexistent/bin/nvcc",
        PATH=_path_without_nvcc(),
        CUDA_HOME=None,
        CUDA_PATH=None,
    )
    out = r.stdout + r.stderr
    assert r.returncode != 0, out[-6000:]
    assert REQUIRE_TEXT in out, out[-6000:]
    assert "Building" not in out and "Linking" not in out  # failed at configure time
    assert not list(lib.glob("mmkernels/_C*.so"))


@pytest.mark.slow
def test_outcome_c_require_and_disable_conflict(tmp_path):
    r, _ = _setup_build(tmp_path, MMKERNELS_REQUIRE_CUDA="1", MMKERNELS_DISABLE_CUDA="1")
    out = r.stdout + r.stderr
    assert r.returncode != 0 and REQUIRE_TEXT in out and "MMKERNELS_DISABLE_CUDA" in out, out[-6000:]


@pytest.mark.slow
@pytest.mark.skipif(not torch.version.cuda, reason="CPU-only torch")
def test_arch_list_parsing_configure_only(tmp_path):
    """TORCH_CUDA_ARCH_LIST forms -> explicit -gencode flags (configure step only)."""
    import cmake  # PyPI cmake >= 3.26

    exe = os.path.join(cmake.CMAKE_BIN_DIR, "cmake")
    env = dict(os.environ, TORCH_CUDA_ARCH_LIST="8.0 9.0a,10.0+PTX;sm_120a")
    env.pop("MMKERNELS_DISABLE_CUDA", None)
    env.pop("MMKERNELS_REQUIRE_CUDA", None)
    r = subprocess.run(
        [exe, "-S", str(ROOT), "-B", str(tmp_path), f"-DPython_EXECUTABLE={sys.executable}"],
        env=env, capture_output=True, text=True, timeout=600,
    )
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-6000:]
    cfg = json.loads((tmp_path / "mmkernels_build_config.json").read_text())
    if not cfg["cuda"]:
        pytest.skip(f"no usable nvcc here: {cfg['cuda_skip_reason']}")
    assert cfg["archs"] == ["8.0", "9.0a", "10.0+PTX", "12.0a"]
    gencode = re.search(r"mmkernels: gencode: (.*)", out).group(1).split(";")
    assert gencode == [
        "-gencode=arch=compute_80,code=sm_80",
        "-gencode=arch=compute_90a,code=sm_90a",
        "-gencode=arch=compute_100,code=sm_100",
        "-gencode=arch=compute_100,code=compute_100",
        "-gencode=arch=compute_120a,code=sm_120a",
    ]


# --------------------------------------------------------------------------- #
# Packaging: one torch pin, the wheel tied to its torch, metadata
# --------------------------------------------------------------------------- #
def _pyproject() -> dict:
    import tomllib

    with open(ROOT / "pyproject.toml", "rb") as f:
        return tomllib.load(f)


def _requirements(*kinds: str) -> list[str]:
    r = subprocess.run([sys.executable, str(ROOT / "setup.py"), "--requirements", *kinds],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    return r.stdout.splitlines()


def test_torch_pin_is_stated_once(tmp_path):
    pins = [r for r in _pyproject()["build-system"]["requires"] if r.replace(" ", "").startswith("torch==")]
    assert len(pins) == 1 and re.fullmatch(r"torch==\d+\.\d+\.\d+", pins[0]), pins
    assert _requirements("torch") == pins
    # nobody else restates it: the Makefile and setup.py read it from pyproject.toml
    for name in ("Makefile", "setup.py"):
        text = (ROOT / name).read_text()
        assert not re.search(r"torch==\d", text), f"{name} restates the torch pin"
    # (VENV in tmp_path: parsing the Makefile writes its build-knob file into the venv folder)
    make = subprocess.run(["make", "-n", "-p", "-f", str(ROOT / "Makefile"), f"VENV={tmp_path / 'venv'}"], cwd=ROOT,
                          capture_output=True, text=True, timeout=60).stdout
    assert f"TORCH_SPEC := {pins[0]}" in make


def test_dependency_lists_live_in_pyproject():
    data = _pyproject()
    assert set(data["project"]["dynamic"]) == {"version", "dependencies"}
    assert "dependencies" not in data["project"]
    runtime = data["tool"]["mmkernels"]["dependencies"]
    assert any(r.startswith("numpy") for r in runtime) and any(r.startswith("triton") for r in runtime)
    extras = data["project"]["optional-dependencies"]
    assert {"test", "dev", "transformers"} <= set(extras)
    assert extras["test"] != extras["dev"] and "pytest" in extras["test"]
    assert "mmkernels[test]" in extras["dev"] and "pytest" not in extras["dev"]
    assert any(r.replace(" ", "").startswith("transformers>=5") for r in extras["transformers"])
    dev = _requirements("dev")
    assert "pytest" in dev and "pytest-benchmark" in dev and not any("mmkernels" in r for r in dev)
    assert any(r.startswith("auditwheel") for r in dev) and any(r.startswith("cmake") for r in dev)
    assert "DEV_DEPS :=" not in (ROOT / "Makefile").read_text()


def test_package_metadata():
    project = _pyproject()["project"]
    assert project["license"] == "MIT"
    assert project["readme"] == "README.md"
    assert any(c.startswith("Programming Language :: Python :: 3.11") for c in project["classifiers"])
    assert "Typing :: Typed" in project["classifiers"]
    assert "urls" not in project  # no public homepage yet: none invented
    assert (ROOT / "mmkernels" / "py.typed").is_file()
    assert "py.typed" in _pyproject()["tool"]["setuptools"]["package-data"]["mmkernels"]
    import mmkernels

    assert _pyproject()["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "mmkernels.__version__"}
    assert re.fullmatch(r"\d+\.\d+\.\d+", mmkernels.__version__)


@requires_c
def test_build_meta_describes_the_loaded_extension():
    meta = json.loads((Path(_extension.__file__).with_name("_build_meta.json")).read_text())
    cfg = json.loads(torch.ops.mmkernels.build_config())
    assert meta == cfg
    assert meta["torch_version"] == torch.__version__
    assert meta["torch_cuda"] == torch.version.cuda
    assert meta["cxx11_abi"] == bool(torch._C._GLIBCXX_USE_CXX11_ABI)
    info = build_info()
    assert info["torch_version_built"] == torch.__version__
    assert info["torch_cuda_version_built"] == torch.version.cuda
    assert info["torch_cuda_version"] == torch.version.cuda


@pytest.mark.parametrize(
    "meta, running, expect",
    [
        # same release, other CUDA variant label, CPU-only _C: loads
        (dict(torch_version="2.14.1+cu130", torch_cuda="13.0", cuda=False), ("2.14.1+cpu", None), None),
        (dict(torch_version="2.14.1+cu130", torch_cuda="13.0", cuda=True), ("2.14.1", "13.0"), None),
        (dict(torch_version="2.14.1+cu130", torch_cuda="13.0", cuda=True), ("2.14.1+cu130", "13.2"), None),
        # another release: never
        (dict(torch_version="2.14.1+cu130", torch_cuda="13.0", cuda=True), ("2.13.0+cpu", None),
         "built for torch 2.14.1+cu130, running 2.13.0+cpu"),
        (dict(torch_version="2.14.1", torch_cuda=None, cuda=False), ("2.15.0", None),
         "built for torch 2.14.1+cpu, running 2.15.0+cpu"),
        # CUDA kernels need a CUDA torch of the same major version
        (dict(torch_version="2.14.1+cu130", torch_cuda="13.0", cuda=True), ("2.14.1+cpu", None),
         "its CUDA kernels need a CUDA build of torch"),
        (dict(torch_version="2.14.1+cu130", torch_cuda="13.0", cuda=True), ("2.14.1+cu128", "12.8"),
         "CUDA 13.0 vs 12.8"),
        (dict(torch_version="2.14.1", torch_cuda=None, cuda=False, cxx11_abi=False), ("2.14.1", None),
         "_GLIBCXX_USE_CXX11_ABI=0 vs 1"),
    ],
)
def test_abi_mismatch(meta, running, expect):
    why = _extension.abi_mismatch(meta, running[0], running[1], True)
    if expect is None:
        assert why is None
    else:
        assert why is not None and expect in why
        assert "native ops fall back to" in why and "rebuild with `pip install --no-build-isolation" in why
        assert f"torch=={meta['torch_version'].split('+')[0]}" in why


def test_extension_built_for_another_torch_is_not_loaded(tmp_path):
    """A _C whose _build_meta.json names another torch is not imported; ONE warning says which torch it
    was built for and what to do; the reference and Triton paths still work."""
    pkg = tmp_path / "mmkernels"
    shutil.copytree(Path(_extension.__file__).parent, pkg, ignore=shutil.ignore_patterns("__pycache__"))
    meta = dict(cuda=True, archs=["8.0"], cuda_version="12.8", cuda_skip_reason=None,
                torch_version="2.9.0+cu128", torch_cuda="12.8", cxx11_abi=True)
    (pkg / "_build_meta.json").write_text(json.dumps(meta))
    code = textwrap.dedent(
        """
        import sys, warnings
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            import mmkernels
            from mmkernels._extension import HAS_C, MMKernelsWarning, build_info
        ours = [str(x.message) for x in w if issubclass(x.category, MMKernelsWarning)]
        assert len(ours) == 1, ours
        assert "mmkernels._C" not in sys.modules, "a _C built for another torch was imported"
        assert mmkernels.__file__.startswith(sys.argv[1]), mmkernels.__file__
        print("WARNING=" + ours[0])
        info = build_info()
        assert HAS_C is False and info["c_extension_loaded"] is False and info["cuda_kernels"] is False
        assert info["torch_version_built"] == "2.9.0+cu128" and info["torch_cuda_version_built"] == "12.8"
        import torch
        x, w0, a, b = torch.randn(5, 8), torch.randn(6, 8), torch.randn(2, 8), torch.randn(6, 2)
        mask = torch.tensor([True, False, True, True, False])
        want = mmkernels.plora_linear_reference(x, w0, None, a, b, mask)
        for backend in ("reference", "triton"):
            with mmkernels.use_backend(backend):
                got = mmkernels.plora_linear(x, w0, None, a, b, mask)
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
        print("OK")
        """
    )
    env = dict(os.environ, PYTHONPATH=str(tmp_path), TRITON_INTERPRET="1")
    r = subprocess.run([sys.executable, "-c", code, str(tmp_path)], cwd=tmp_path, env=env, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0 and "OK" in r.stdout, r.stdout + r.stderr
    warning = r.stdout.split("WARNING=", 1)[1].splitlines()[0]
    assert f"built for torch 2.9.0+cu128, running {torch.__version__}" in warning, warning
    assert "native ops fall back to their Python/Triton implementations" in warning
    assert "rebuild with `pip install --no-build-isolation" in warning and "torch==2.9.0" in warning
