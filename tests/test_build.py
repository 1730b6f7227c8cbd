"""Tests of the native build (CMakeLists.txt + setup.py) and of the native libraries
(mmkernels/_C.abi3.so and mmkernels/_C_cuda.abi3.so, LibTorch stable ABI).

Build outcomes (see CMakeLists.txt):
  a. CUDA torch + working nvcc      -> _C + _C_cuda with CUDA kernels for TORCH_CUDA_ARCH_LIST
                                       (default 8.0+PTX;9.0a;10.0a)     [test_outcome_a_*]
  b. no usable CUDA toolchain        -> _C only (CPU kernels) + one warning line
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
    "torch_oldest",
    "c_extension_loaded",
    "cuda_kernels",
    "cuda_kernels_built",
    "cuda_archs",
    "cuda_version_built",
    "cuda_available",
    "device_name",
    "cuda_kernels_run_on_device",
    "load_error",
    "cuda_load_error",
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
    assert _extension._C_PATH.parent == Path(_extension.__file__).parent and _extension._C_PATH.is_file()
    assert "mmkernels._C" not in sys.modules  # a library loaded by torch.ops.load_library, not a module
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
    if info["cuda_kernels_built"]:
        assert info["cuda_archs"] and re.fullmatch(r"\d+\.\d+", info["cuda_version_built"])
    else:
        assert info["cuda_archs"] == [] and info["cuda_version_built"] is None
        assert info["cuda_kernels"] is False
    assert (info["cuda_load_error"] is None) == (info["cuda_kernels"] or not info["c_extension_loaded"])
    if not info["cuda_available"]:
        assert info["device_name"] is None and info["cuda_kernels_run_on_device"] is None
    json.dumps(info)  # plain data


@requires_c
def test_build_config_json():
    cfg = json.loads(torch.ops.mmkernels.build_config())
    assert {"cuda", "archs", "cuda_version", "torch_version", "torch_oldest", "stable_abi"} <= set(cfg)
    assert cfg["stable_abi"] is True
    assert has_op("plora_tile_flags", "cuda") == build_info()["cuda_kernels"]
    if cfg["cuda"] and torch.version.cuda and cfg["cuda_version"].split(".")[0] == torch.version.cuda.split(".")[0]:
        assert build_info()["cuda_kernels"], _extension.cuda_load_error()


def test_missing_extension_falls_back_with_one_warning():
    """If _C cannot be loaded, mmkernels still imports and warns exactly once."""
    code = textwrap.dedent(
        """
        import sys, warnings
        import torch
        def blocked(path):
            raise OSError("blocked for the test")
        torch.ops.load_library = blocked
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
        assert info["cuda_kernels"] is False and info["cuda_load_error"] is None
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
    try:  # the nvidia-cuda-cuobjdump package (the dev extra)
        import nvidia

        cands += [str(p) for d in nvidia.__path__ for p in sorted(Path(d).glob("cu*/bin/cuobjdump"))]
    except Exception:
        pass
    try:
        import triton

        cands.append(str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"))
    except Exception:
        pass
    return next((c for c in cands if c and os.path.isfile(c) and os.access(c, os.X_OK)), None)


@requires_c
def test_outcome_a_cuda_archs():
    info = build_info()
    if not info["cuda_kernels_built"]:
        if _env_flag("MMKERNELS_REQUIRE_CUDA"):
            pytest.fail(f"MMKERNELS_REQUIRE_CUDA=1 but the build has no CUDA kernels: {info.get('cuda_skip_reason')}")
        pytest.skip(f"in-tree build is CPU-only: {info.get('cuda_skip_reason')}")
    archs = info["cuda_archs"]
    assert all(re.fullmatch(r"\d+\.\d+[af]?(\+PTX)?", a) for a in archs), archs
    if not os.environ.get("TORCH_CUDA_ARCH_LIST"):
        assert archs[:2] == ["8.0+PTX", "9.0a"], archs
        if int(info["cuda_version_built"].split(".")[0]) >= 13:
            assert archs == ["8.0+PTX", "9.0a", "10.0a"], archs
    assert info["cuda_kernels"], _extension.cuda_load_error()
    assert info["cuda_version_built"].split(".")[0] == (torch.version.cuda or "").split(".")[0]

    tool = _cuobjdump()
    if tool is None:
        pytest.skip("cuobjdump not found")
    lib = str(_extension._C_CUDA_PATH)
    listing = subprocess.run([tool, "--list-elf", lib], capture_output=True, text=True, check=True).stdout
    for a in archs:
        sm = "sm_" + a.split("+")[0].replace(".", "")
        assert re.search(rf"\.{sm}\.cubin", listing), (sm, listing)
    ptx = subprocess.run([tool, "--list-ptx", lib], capture_output=True, text=True, check=True).stdout
    for a in archs:
        if a.endswith("+PTX"):
            assert re.search(rf"\.sm_{a.split('+')[0].replace('.', '')}\.ptx", ptx), (a, ptx)


def test_native_libraries_use_only_the_stable_abi():
    """The libraries reach torch only through the stable C shims (aoti_torch_* / torch_*: no C++
    symbol of libtorch or c10) and use no Python C API at all (so the wheel is abi3)."""
    nm = shutil.which("nm")
    libs = [p for p in (_extension._C_PATH, _extension._C_CUDA_PATH) if p.is_file()]
    if nm is None or not libs:
        pytest.skip("needs nm and a build")
    for lib in libs:
        out = subprocess.run([nm, "-D", "--undefined-only", str(lib)], capture_output=True, text=True,
                             check=True).stdout
        names = [ln.split()[-1] for ln in out.splitlines() if ln.strip()]
        # versioned symbols come from glibc, libstdc++, libgcc and libcudart
        unversioned = [n for n in names if "@" not in n and n not in
                       ("_ITM_deregisterTMCloneTable", "_ITM_registerTMCloneTable", "__gmon_start__")]
        assert unversioned and all(re.match(r"(aoti_torch_|torch_)", n) for n in unversioned), (lib, unversioned)
        assert not [n for n in names if n.startswith(("Py", "_Py"))], lib
        needed = subprocess.run(["readelf", "-d", str(lib)], capture_output=True, text=True).stdout
        assert "libc10" not in needed and "libtorch_python" not in needed and "libpython" not in needed, needed
        # no libstdc++ newer than GCC 8's (torch's manylinux_2_28 platform): csrc/libstdcxx_compat.cpp
        versions = set(re.findall(r"GLIBCXX_3\.4\.(\d+)", out))
        assert all(int(v) <= 25 for v in versions), (lib, sorted(versions))


@pytest.mark.parametrize(
    "archs, capability, runs",
    [
        (["8.0+PTX", "9.0a", "10.0a"], (8, 0), True),    # A100: the sm_80 cubin
        (["8.0+PTX", "9.0a", "10.0a"], (8, 9), True),    # L4/L40: the sm_80 cubin (same major)
        (["8.0+PTX", "9.0a", "10.0a"], (9, 0), True),    # H100/H200: the sm_90a cubin
        (["8.0+PTX", "9.0a", "10.0a"], (10, 0), True),   # B200: the sm_100a cubin
        (["8.0+PTX", "9.0a", "10.0a"], (10, 3), True),   # B300: compute_80 PTX, compiled by the driver
        (["8.0+PTX", "9.0a", "10.0a"], (12, 0), True),   # RTX 50xx: compute_80 PTX
        (["8.0+PTX", "9.0a", "10.0a"], (7, 5), False),   # T4: older than every arch here
        (["8.0", "9.0a"], (10, 0), False),               # no PTX: nothing for sm_100
        (["8.0", "9.0a"], (9, 1), False),                # an "a" cubin runs on its own arch only
        (["10.0f"], (10, 3), True),                      # a family cubin runs on the family
        (["9.0a+PTX"], (10, 0), False),                  # arch-specific PTX does not carry forward
    ],
)
def test_arch_runs(archs, capability, runs):
    assert _extension.arch_runs(archs, capability) is runs


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
    so = sorted(lib.glob("mmkernels/*.so"))
    assert [p.name for p in so] == ["_C.abi3.so"], list(lib.rglob("*"))  # no _C_cuda in a CPU-only build
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
    assert not list(lib.glob("mmkernels/*.so"))


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
# Packaging: the supported torch range stated once, metadata
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


def test_torch_range_is_stated_once(tmp_path):
    tool = _pyproject()["tool"]["mmkernels"]
    oldest, dev = tool["oldest-torch"], tool["dev-torch"]
    assert re.fullmatch(r"\d+\.\d+\.\d+", oldest) and re.fullmatch(r"\d+\.\d+\.\d+", dev)
    assert _extension._release(oldest) <= _extension._release(dev)
    assert _requirements("torch") == [f"torch=={dev}"]
    assert _requirements("torch-oldest") == [f"torch=={oldest}"]
    assert _requirements("torch-range") == [f"torch>={oldest}"]
    # an isolated build may use any supported torch: the build requirement is the same range
    build_torch = [r for r in _pyproject()["build-system"]["requires"] if re.match(r"torch\b", r)]
    assert build_torch == [f"torch>={oldest}"], build_torch
    # nobody else restates a torch version: the Makefile, setup.py and CMakeLists.txt read pyproject.toml
    for name in ("Makefile", "setup.py", "CMakeLists.txt"):
        text = (ROOT / name).read_text()
        assert not re.search(r"torch\s*[=>]=\s*\d", text) and oldest not in text and dev not in text, name
    # (VENV in tmp_path: parsing the Makefile writes its build-knob file into the venv folder)
    make = subprocess.run(["make", "-n", "-p", "-f", str(ROOT / "Makefile"), f"VENV={tmp_path / 'venv'}"], cwd=ROOT,
                          capture_output=True, text=True, timeout=60).stdout
    assert f"TORCH_SPEC := torch=={dev}" in make


@requires_c
def test_build_targets_the_oldest_supported_torch():
    """The libraries were compiled for the stable ABI of oldest-torch, whichever torch compiled them."""
    meta = json.loads(_extension._META_PATH.read_text())
    assert meta["torch_oldest"] == _pyproject()["tool"]["mmkernels"]["oldest-torch"]
    assert meta["stable_abi"] is True
    assert build_info()["torch_oldest"] == meta["torch_oldest"]


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
    assert project["license"] == "MIT" and project["license-files"] == ["LICENSE"]
    assert (ROOT / "LICENSE").read_text().startswith("MIT License\n")
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
    meta = json.loads(_extension._META_PATH.read_text())
    cfg = json.loads(torch.ops.mmkernels.build_config())
    assert meta == cfg
    info = build_info()
    assert info["torch_version_built"] == meta["torch_version"]
    assert info["torch_cuda_version_built"] == meta["torch_cuda"]
    assert info["torch_cuda_version"] == torch.version.cuda


@pytest.mark.parametrize(
    "oldest, running, expect",
    [
        ("2.11.0", "2.11.0+cu130", None),
        ("2.11.0", "2.14.1+cpu", None),
        ("2.11.0", "2.15.0a0+gitabc", None),     # a newer pre-release provides the same stable ABI
        ("2.11.0", "3.0.0", None),
        ("2.11.0", "2.10.1+cu128",
         "needs torch >= 2.11.0 (it is built for the LibTorch stable ABI of 2.11), running 2.10.1+cu128"),
        ("2.11.0", "2.9.0", "running 2.9.0"),
        (None, "2.14.1", "names no oldest supported torch"),
    ],
)
def test_torch_out_of_range(oldest, running, expect):
    meta = {"torch_version": "2.14.1+cu130"} | ({"torch_oldest": oldest} if oldest else {})
    why = _extension.torch_out_of_range(meta, running)
    if expect is None:
        assert why is None
    else:
        assert why is not None and expect in why and "native ops fall back to" in why
        if oldest:
            assert f"pip install 'torch>={oldest}'" in why


@pytest.mark.parametrize(
    "meta, torch_cuda, expect",
    [
        (dict(cuda=True, cuda_version="13.0"), "13.0", None),
        (dict(cuda=True, cuda_version="13.0"), "13.2", None),
        (dict(cuda=True, cuda_version="13.0"), None, "torch is a CPU build"),
        (dict(cuda=True, cuda_version="13.0"), "12.8", "built with CUDA 13.0, torch uses CUDA 12.8"),
        (dict(cuda=False, cuda_skip_reason="MMKERNELS_DISABLE_CUDA is set"), "13.0",
         "no CUDA kernels (MMKERNELS_DISABLE_CUDA is set)"),
    ],
)
def test_cuda_unusable(meta, torch_cuda, expect):
    why = _extension.cuda_unusable(meta, torch_cuda)
    assert why is None if expect is None else expect in why


def _copy_package(tmp_path: Path, edit_meta=None, drop: tuple[str, ...] = ()) -> Path:
    pkg = tmp_path / "mmkernels"
    shutil.copytree(Path(_extension.__file__).parent, pkg, ignore=shutil.ignore_patterns("__pycache__"))
    if edit_meta is not None:
        meta = json.loads((pkg / "_build_meta.json").read_text())
        edit_meta(meta)
        (pkg / "_build_meta.json").write_text(json.dumps(meta))
    for name in drop:
        (pkg / name).unlink(missing_ok=True)
    return pkg


def _run_copy(tmp_path: Path, code: str, prelude: str = "") -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(tmp_path), TRITON_INTERPRET="1")
    return subprocess.run([sys.executable, "-c", prelude + textwrap.dedent(code), str(tmp_path)], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=300)


@requires_c
def test_torch_older_than_the_build_target_is_refused(tmp_path):
    """Libraries whose stable-ABI target is newer than the running torch are not loaded; ONE warning says
    which torch they need and what to do; the reference and Triton paths still work."""
    _copy_package(tmp_path, lambda m: m.update(torch_oldest="2.99.0"))
    code = """
        import sys, warnings
        import torch
        loaded = []
        torch.ops.load_library = lambda path: loaded.append(path)
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            import mmkernels
            from mmkernels._extension import HAS_C, MMKernelsWarning, build_info
        ours = [str(x.message) for x in w if issubclass(x.category, MMKernelsWarning)]
        assert len(ours) == 1, ours
        assert loaded == [], loaded
        assert mmkernels.__file__.startswith(sys.argv[1]), mmkernels.__file__
        print("WARNING=" + ours[0])
        info = build_info()
        assert HAS_C is False and info["c_extension_loaded"] is False and info["cuda_kernels"] is False
        assert info["torch_oldest"] == "2.99.0"
        x, w0, a, b = torch.randn(5, 8), torch.randn(6, 8), torch.randn(2, 8), torch.randn(6, 2)
        mask = torch.tensor([True, False, True, True, False])
        want = mmkernels.plora_linear_reference(x, w0, None, a, b, mask)
        for backend in ("reference", "triton"):
            with mmkernels.use_backend(backend):
                got = mmkernels.plora_linear(x, w0, None, a, b, mask)
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
        print("OK")
        """
    r = _run_copy(tmp_path, code)
    assert r.returncode == 0 and "OK" in r.stdout, r.stdout + r.stderr
    warning = r.stdout.split("WARNING=", 1)[1].splitlines()[0]
    assert f"native extension _C needs torch >= 2.99.0 (it is built for the LibTorch stable ABI of 2.99), " \
           f"running {torch.__version__}" in warning, warning
    assert "native ops fall back to their Python/Triton implementations" in warning
    assert "upgrade torch (pip install 'torch>=2.99.0')" in warning


_CPU_KERNELS_ONLY_CHECK = """
    import json, warnings
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        import mmkernels
    import torch
    from mmkernels import _extension
    from mmkernels._extension import MMKernelsWarning, NativeOp, build_info, has_op
    from mmkernels.ops.moe import launch as moe_launch
    from mmkernels.ops.plora import launch as plora_launch
    ours = [str(x.message) for x in w if issubclass(x.category, MMKernelsWarning)]
    print("WARNINGS=" + json.dumps(ours))
    info = build_info()
    assert info["c_extension_loaded"] and not info["cuda_kernels"], info
    # the CPU kernels are registered, the CUDA ones are not
    assert torch._C._dispatch_has_kernel_for_dispatch_key("mmkernels::moe_route", "CPU")
    assert not torch._C._dispatch_has_kernel_for_dispatch_key("mmkernels::moe_route", "CUDA")
    for op in (moe_launch.NATIVE_ROUTE_OP, plora_launch.NATIVE_TILE_FLAGS_OP):
        assert op.declared and op.device_types == {"cpu"}, op
        assert op.runs_on(torch.device("cpu"))
        assert not op.runs_on(torch.device("cuda", 0))   # CUDA tensors: the Triton/torch path
    assert has_op("moe_route", "cpu") and not has_op("moe_route", "cuda")
    # CPU tensors still run the native kernel
    idx, keep, counts, top1, slots, offsets = moe_launch.route(torch.randn(10, 4), 2, -1, None, None)
    assert int(counts.sum()) == 20 and bool(keep.all())
    print("CUDA_LOAD_ERROR=" + info["cuda_load_error"])
    from mmkernels.__main__ import main
    assert main(["info"]) == 0
    print("OK")
    """


@requires_c
def test_cpu_only_build_sends_cuda_tensors_to_the_triton_path(tmp_path):
    """A CPU-only build on a GPU machine (a GPU machine without nvcc): _C registers only CPU kernels, so
    CUDA tensors must take the Triton/torch path, and `info` says so."""
    _copy_package(tmp_path, lambda m: m.update(cuda=False, archs=[], cuda_version=None,
                                               cuda_skip_reason="no CUDA compiler (nvcc) found"),
                  drop=("_C_cuda.abi3.so",))
    r = _run_copy(tmp_path, _CPU_KERNELS_ONLY_CHECK)
    assert r.returncode == 0 and "OK" in r.stdout, r.stdout + r.stderr
    assert json.loads(r.stdout.split("WARNINGS=", 1)[1].splitlines()[0]) == []  # a CPU-only build is no fault
    assert "this build has no CUDA kernels (no CUDA compiler (nvcc) found)" in r.stdout
    assert "CUDA kernels   none (no CUDA compiler (nvcc) found)" in r.stdout
    for op in ("moe_route", "plora_tile_flags"):
        assert re.search(rf"{op} +cpu  \(CUDA tensors: Triton/torch path\)", r.stdout), r.stdout


@requires_c
@pytest.mark.skipif(not _extension._C_CUDA_PATH.is_file(), reason="needs a build with CUDA kernels")
def test_cuda_kernels_of_another_cuda_major_are_not_loaded(tmp_path):
    """The CUDA kernels link the CUDA runtime of the CUDA major they were built with: under a torch of
    another CUDA major only _C is loaded (CPU kernels), ONE warning says why, CUDA tensors take the
    Triton/torch path."""
    _copy_package(tmp_path)
    other = "12.8" if (build_info()["cuda_version_built"] or "").split(".")[0] != "12" else "13.0"
    prelude = f"import torch; torch.version.cuda = {other!r}\n"
    r = _run_copy(tmp_path, _CPU_KERNELS_ONLY_CHECK, prelude)
    assert r.returncode == 0 and "OK" in r.stdout, r.stdout + r.stderr
    warnings_ = json.loads(r.stdout.split("WARNINGS=", 1)[1].splitlines()[0])
    assert len(warnings_) == 1 and "CUDA kernels not loaded" in warnings_[0], warnings_
    assert f"torch uses CUDA {other}" in warnings_[0] and "CUDA tensors take the Triton/torch path" in warnings_[0]
    assert "CUDA kernels   built for archs" in r.stdout and "NOT loaded" in r.stdout


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cpu_kernel_only_routes_cuda_tensors_through_torch(monkeypatch):
    """With a native kernel for CPU only (as in a CPU-only build), CUDA tensors never reach the native op:
    routing and tile flags take the torch path and give the reference results."""
    from mmkernels.ops.moe import launch as moe_launch
    from mmkernels.ops.moe.reference import route_reference
    from mmkernels.ops.plora import launch as plora_launch

    for op in (moe_launch.NATIVE_ROUTE_OP, plora_launch.NATIVE_TILE_FLAGS_OP):
        monkeypatch.setattr(op, "device_types", frozenset({"cpu"}))

    def refuse(*args, **kwargs):
        raise AssertionError("a CUDA tensor reached the native op")

    monkeypatch.setattr(torch.ops.mmkernels, "moe_route", refuse)
    monkeypatch.setattr(torch.ops.mmkernels, "plora_tile_flags", refuse)
    logits = torch.randn(37, 6, device="cuda")
    got = moe_launch.route(logits, 2, 9, None, None)
    want = route_reference(logits, 2, 9, None)
    assert torch.equal(got[0], want.indices) and torch.equal(got[4], want.sorted_slots)
    mask = torch.rand(70, device="cuda") < 0.5
    assert plora_launch.tile_flags(mask).tolist() == _ref_tile_flags(mask, plora_launch.FLAG_ROWS)
