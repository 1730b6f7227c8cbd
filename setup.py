"""Thin setuptools driver for the CMake build of ``mmkernels._C``.

All native sources and flags live in CMakeLists.txt.  Build against the
installed torch:

    pip install --no-build-isolation -e .          # editable, _C lands in mmkernels/
    pip wheel --no-build-isolation --no-deps -w dist .

Environment knobs (read by CMakeLists.txt, forwarded explicitly here):
    MMKERNELS_REQUIRE_CUDA=1   missing/broken CUDA toolchain is a build error
    MMKERNELS_DISABLE_CUDA=1   force a CPU-only _C
    TORCH_CUDA_ARCH_LIST       e.g. "8.0;9.0a" (default) or "8.0 9.0+PTX"
    CUDACXX                    nvcc to use (otherwise PATH, CUDA_HOME, /usr/local/cuda)
    MAX_JOBS                   parallel compile jobs (default: number of cores)
    MMKERNELS_BUILD_TYPE       CMake build type (default Release)
    MMKERNELS_CMAKE_BUILD_DIR  CMake build tree (default build/cmake-<python tag>)
    MMKERNELS_CMAKE_ARGS       extra arguments for the CMake configure step
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent
MIN_CMAKE = (3, 26)


class CMakeExtension(Extension):
    """An extension whose sources and flags are owned by CMakeLists.txt."""

    def __init__(self, name: str, source_dir: Path = ROOT) -> None:
        super().__init__(name, sources=[])
        self.source_dir = str(source_dir)


def _cmake_version(cmake: str) -> tuple[int, ...]:
    try:
        out = subprocess.run([cmake, "--version"], capture_output=True, text=True, check=True).stdout
        return tuple(int(x) for x in out.split()[2].split(".")[:2])
    except (OSError, subprocess.CalledProcessError, ValueError, IndexError):
        return (0,)


def _find_cmake() -> str:
    """A CMake >= 3.26: the one next to this Python (pip's cmake), the cmake module, or PATH."""
    candidates = [str(Path(sys.executable).parent / "cmake")]
    try:
        import cmake  # PyPI cmake

        candidates.append(os.path.join(cmake.CMAKE_BIN_DIR, "cmake"))
    except Exception:
        pass
    if shutil.which("cmake"):
        candidates.append(shutil.which("cmake"))
    seen = []
    for c in candidates:
        if c and os.path.isfile(c) and os.access(c, os.X_OK) and c not in seen:
            seen.append(c)
            if _cmake_version(c) >= MIN_CMAKE:
                return c
    raise RuntimeError(
        "mmkernels needs CMake >= %d.%d (found: %s); run: pip install 'cmake>=3.26'"
        % (*MIN_CMAKE, ", ".join(f"{c} {_cmake_version(c)}" for c in seen) or "none")
    )


def _find_ninja() -> str | None:
    candidates = [str(Path(sys.executable).parent / "ninja")]
    try:
        import ninja  # PyPI ninja

        candidates.append(os.path.join(ninja.BIN_DIR, "ninja"))
    except Exception:
        pass
    candidates.append(shutil.which("ninja") or "")
    for c in candidates:
        if c and os.path.isfile(c) and os.access(c, os.X_OK):
            return c
    return None


class CMakeBuild(build_ext):
    def build_extension(self, ext: Extension) -> None:
        if not isinstance(ext, CMakeExtension):
            return super().build_extension(ext)

        import torch.utils  # the installed torch (--no-build-isolation)

        ext_path = Path(self.get_ext_fullpath(ext.name)).resolve()
        out_dir = ext_path.parent
        out_dir.mkdir(parents=True, exist_ok=True)
        # A fixed CMake build dir (not setuptools' build_temp, which pip's editable
        # builds put in a fresh temp dir) so rebuilds are incremental and shared by
        # `pip install -e .` and `pip wheel .`.  MMKERNELS_CMAKE_BUILD_DIR overrides it.
        build_temp = Path(
            os.environ.get("MMKERNELS_CMAKE_BUILD_DIR")
            or ROOT / "build" / f"cmake-{sys.implementation.cache_tag}"
        ).resolve()
        build_temp.mkdir(parents=True, exist_ok=True)

        cmake = _find_cmake()
        ninja = _find_ninja()
        build_type = os.environ.get("MMKERNELS_BUILD_TYPE", "Debug" if self.debug else "Release")

        # Things that CMake caches (compiler detection, library lookups): if any
        # changes, start from a fresh cache instead of silently reusing stale results.
        signature = "\n".join(
            [
                sys.executable,
                cmake,
                str(ninja),
                torch.__version__,
                torch.__file__,
                os.environ.get("CUDACXX", "<unset>"),
                os.environ.get("CUDA_HOME", "<unset>"),
                os.environ.get("CUDA_PATH", "<unset>"),
                shutil.which("nvcc") or "<no nvcc on PATH>",
            ]
        )
        sig_file = build_temp / "mmkernels_config_signature.txt"
        fresh = not sig_file.exists() or sig_file.read_text() != signature

        def env_flag(name: str) -> str:
            return "ON" if os.environ.get(name, "0").strip().lower() in ("1", "on", "true", "yes", "y") else "OFF"

        cmake_args = [
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path}",
            f"-DCMAKE_BUILD_TYPE={build_type}",
            f"-DMMKERNELS_OUTPUT_DIR={out_dir}",
            f"-DMMKERNELS_REQUIRE_CUDA={env_flag('MMKERNELS_REQUIRE_CUDA')}",
            f"-DMMKERNELS_DISABLE_CUDA={env_flag('MMKERNELS_DISABLE_CUDA')}",
        ]
        arch_list = os.environ.get("TORCH_CUDA_ARCH_LIST", "").strip()
        if arch_list:
            cmake_args.append(f"-DMMKERNELS_CUDA_ARCH_LIST={arch_list}")
        else:
            cmake_args.append("-UMMKERNELS_CUDA_ARCH_LIST")
        if ninja:
            cmake_args += ["-G", "Ninja", f"-DCMAKE_MAKE_PROGRAM={ninja}"]
        if fresh:
            cmake_args.append("--fresh")
        cmake_args += shlex_split(os.environ.get("MMKERNELS_CMAKE_ARGS", ""))

        jobs = os.environ.get("MAX_JOBS") or str(os.cpu_count() or 1)

        def run(cmd: list[str]) -> None:
            print("mmkernels:", " ".join(cmd), flush=True)
            subprocess.run(cmd, cwd=build_temp, check=True)

        if fresh and sig_file.exists():
            sig_file.unlink()
        run([cmake, "-S", ext.source_dir, "-B", str(build_temp), *cmake_args])
        sig_file.write_text(signature)
        run([cmake, "--build", str(build_temp), "--config", build_type, "--parallel", jobs])

        if not ext_path.exists():
            raise RuntimeError(f"mmkernels: CMake did not produce {ext_path}")


def shlex_split(s: str) -> list[str]:
    import shlex

    return shlex.split(s)


setup(
    ext_modules=[CMakeExtension("mmkernels._C")],
    cmdclass={"build_ext": CMakeBuild},
)
