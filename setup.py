"""Thin setuptools driver for the CMake build of mmkernels' native libraries.

All native sources and flags live in CMakeLists.txt; metadata lives in pyproject.toml.

    pip install .                                   # isolated build: brings cmake, ninja, a torch
    pip install --no-build-isolation .              # build against the torch already installed
    pip install --no-build-isolation -e .           # editable, the libraries land in mmkernels/
    pip wheel --no-build-isolation --no-deps -w dist .

The native libraries (mmkernels/_C.abi3.so, and mmkernels/_C_cuda.abi3.so with CUDA kernels) use
only the LibTorch stable ABI of the oldest supported torch and no Python C API, so whichever
supported torch builds them, the result loads into every torch release from
``[tool.mmkernels] oldest-torch`` on and into every Python: one abi3 wheel per platform and CUDA
major version.

What this file adds to the static metadata in pyproject.toml:

* the torch requirement of the wheel, ``torch>=<oldest-torch>``, plus ``[tool.mmkernels]
  dependencies``; the abi3 wheel tag;
* a CMake >= 3.26 and ninja: the ``cmake``/``ninja`` pip packages when installed (the build
  requirements), else PATH; if neither has a recent enough CMake, they are installed into
  ``build/_tools`` with pip (``MMKERNELS_NO_TOOL_INSTALL=1`` turns that off);
* progress: CMake/ninja output goes to stdout (``pip -v`` and ``make`` show it); when pip captures
  it and a terminal is attached, the CMake summary and ninja ``[i/n]`` steps are also written to
  the terminal (``MMKERNELS_BUILD_PROGRESS=0`` turns that off).

Environment knobs (read by CMakeLists.txt, forwarded explicitly here):
    MMKERNELS_REQUIRE_CUDA=1   missing/broken CUDA toolchain is a build error
    MMKERNELS_DISABLE_CUDA=1   force a CPU-only build (no _C_cuda)
    TORCH_CUDA_ARCH_LIST       e.g. "8.0+PTX;9.0a;10.0a" (default) or "8.0 9.0+PTX"
    CUDACXX                    nvcc to use (otherwise PATH, CUDA_HOME, /usr/local/cuda)
    MAX_JOBS                   parallel compile jobs (default: number of cores)
    MMKERNELS_BUILD_TYPE       CMake build type (default Release)
    MMKERNELS_CMAKE_BUILD_DIR  CMake build tree (default build/cmake-<python tag>)
    MMKERNELS_CMAKE_ARGS       extra arguments for the CMake configure step
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import NoReturn

ROOT = Path(__file__).resolve().parent
MIN_CMAKE = (3, 26)
TOOLS_DIR = ROOT / "build" / "_tools"


def _load_pyproject() -> dict:
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        try:
            import tomli as tomllib  # type: ignore[no-redef]
        except ModuleNotFoundError:
            from setuptools._vendor import tomli as tomllib  # type: ignore[no-redef]
    with open(ROOT / "pyproject.toml", "rb") as f:
        return tomllib.load(f)


# ----------------------------------------------------------------------------- requirement lists
# ``python setup.py --requirements KIND...`` prints requirement lists from pyproject.toml, the one
# place they are written, for the Makefile and .ci/run (before any venv exists, so this runs before
# setuptools is imported):
#     torch         torch==<dev-torch>: the torch `make` develops and tests with (the newest supported)
#     torch-oldest  torch==<oldest-torch>: the oldest supported torch
#     torch-range   torch>=<oldest-torch>: what the wheel requires
#     build         [build-system] requires
#     runtime       [tool.mmkernels] dependencies (the wheel adds torch-range)
#     EXTRA         an extra (test, dev, transformers), self-references such as "mmkernels[test]"
#                   expanded, plus the runtime list
# One requirement per line; markers that do not apply to this interpreter are dropped.

def _marker_applies(req: str) -> bool:
    if ";" not in req:
        return True
    try:
        from pip._vendor.packaging.requirements import Requirement
    except ImportError:  # pragma: no cover
        from packaging.requirements import Requirement
    marker = Requirement(req).marker
    return marker is None or marker.evaluate()


def requirements(kind: str, data: dict) -> list[str]:
    name = data["project"]["name"]
    build = data["build-system"]["requires"]
    tool = data["tool"]["mmkernels"]
    runtime = tool["dependencies"]
    extras = data["project"].get("optional-dependencies", {})
    if kind == "torch":
        return [f"torch=={tool['dev-torch']}"]
    if kind == "torch-oldest":
        return [f"torch=={tool['oldest-torch']}"]
    if kind == "torch-range":
        return [f"torch>={tool['oldest-torch']}"]
    if kind == "build":
        return list(build)
    if kind == "runtime":
        return list(runtime)
    if kind not in extras:
        raise SystemExit(f"unknown list {kind!r}; expected torch, torch-oldest, torch-range, build, runtime "
                         f"or one of {sorted(extras)}")
    out: list[str] = list(runtime)
    todo, seen = [kind], set()
    while todo:
        extra = todo.pop(0)
        if extra in seen:
            continue
        seen.add(extra)
        for req in extras[extra]:
            m = re.fullmatch(rf"{re.escape(name)}\[([^\]]+)\]", req.strip())
            if m:
                todo.extend(e.strip() for e in m.group(1).split(","))
            else:
                out.append(req)
    return out


if __name__ == "__main__" and sys.argv[1:2] == ["--requirements"]:
    if len(sys.argv) < 3:
        raise SystemExit("usage: python setup.py --requirements "
                         "{torch|torch-oldest|torch-range|build|runtime|EXTRA}...")
    _data = _load_pyproject()
    for _req in dict.fromkeys(r for kind in sys.argv[2:] for r in requirements(kind, _data)):
        if _marker_applies(_req):
            print(_req)
    sys.exit(0)

from setuptools import Extension, setup  # noqa: E402  (after the requirements mode, which needs none)
from setuptools.command.build_ext import build_ext  # noqa: E402


PYPROJECT = _load_pyproject()


TORCH_RANGE = requirements("torch-range", PYPROJECT)[0]  # torch>=<oldest-torch>
# "cp310" for requires-python = ">=3.10": the abi3 wheel's tag
ABI3_TAG = "cp3" + re.fullmatch(r">=\s*3\.(\d+)", PYPROJECT["project"]["requires-python"].strip()).group(1)


def _check_setuptools() -> None:
    """pyproject.toml's metadata (an SPDX license string) needs setuptools >= 77; with
    --no-build-isolation the environment's setuptools is used, so say so instead of failing
    in pyproject validation."""
    import setuptools

    spec = next((r for r in PYPROJECT["build-system"]["requires"] if r.startswith("setuptools")), "setuptools")
    need = tuple(int(x) for x in re.findall(r">=\s*([\d.]+)", spec)[0].split(".")) if ">=" in spec else (0,)
    have = tuple(int(x) for x in re.findall(r"\d+", setuptools.__version__)[:2])
    if have < need:
        _fail(f"  setuptools {setuptools.__version__} is too old to build mmkernels ({spec} is needed).",
              f"run: pip install '{spec}'   (then repeat the command)")


def _fail(*lines: str) -> NoReturn:
    """Stop the build with a message whose LAST line says what to run."""
    print("\n".join(["", "mmkernels: build failed:", *lines]), file=sys.stderr, flush=True)
    raise SystemExit(1)


def _import_torch():
    try:
        import torch
        import torch.utils.cpp_extension  # noqa: F401
    except Exception as e:
        _fail(
            f"  cannot import torch ({type(e).__name__}: {e}).",
            "  the native libraries are compiled with the installed torch when building with",
            "  --no-build-isolation; without that flag, pip installs a torch into the isolated build environment.",
            f"run: pip install '{TORCH_RANGE}'   (then repeat the command), or drop --no-build-isolation",
        )
    return torch


# --------------------------------------------------------------------------- build tools

class CMakeExtension(Extension):
    """An extension whose sources and flags are owned by CMakeLists.txt.  ``py_limited_api``: the
    libraries use no Python C API at all (they are loaded with torch.ops.load_library), so they are
    named and tagged abi3."""

    def __init__(self, name: str, source_dir: Path = ROOT) -> None:
        super().__init__(name, sources=[], py_limited_api=True)
        self.source_dir = str(source_dir)


def _cmake_version(cmake: str) -> tuple[int, ...]:
    try:
        out = subprocess.run([cmake, "--version"], capture_output=True, text=True, check=True).stdout
        return tuple(int(x) for x in out.split()[2].split(".")[:2])
    except (OSError, subprocess.CalledProcessError, ValueError, IndexError):
        return (0,)


def _executable(path: str | None) -> bool:
    return bool(path) and os.path.isfile(path) and os.access(path, os.X_OK)


def _tool_candidates(tool: str, bin_dir_attr: str) -> list[str]:
    """Executables of ``tool`` (cmake or ninja), in order of preference: next to this Python, from
    the PyPI package of the same name (a build requirement), on PATH, then in ``build/_tools``."""
    cands = [str(Path(sys.executable).parent / tool)]
    try:
        module = __import__(tool)
        cands.append(os.path.join(getattr(module, bin_dir_attr), tool))
    except Exception:
        pass
    cands.append(shutil.which(tool) or "")
    cands.extend(str(p) for p in sorted(TOOLS_DIR.glob(f"{tool}/data/bin/{tool}")))
    return [c for c in dict.fromkeys(cands) if _executable(c)]


def _cmake_candidates() -> list[str]:
    return _tool_candidates("cmake", "CMAKE_BIN_DIR")


def _ninja_candidates() -> list[str]:
    return _tool_candidates("ninja", "BIN_DIR")


def _tool_requirements() -> list[str]:
    """cmake and ninja as stated in pyproject.toml's build requirements."""
    reqs = [r for r in PYPROJECT["build-system"]["requires"] if re.match(r"(cmake|ninja)\b", r)]
    return reqs or ["cmake>=%d.%d" % MIN_CMAKE, "ninja"]


def _install_tools() -> None:
    """pip-install cmake and ninja into build/_tools (not into the user's environment)."""
    reqs = _tool_requirements()
    cmd = [sys.executable, "-m", "pip", "install", "--disable-pip-version-check", "--no-input",
           "--upgrade", "--target", str(TOOLS_DIR), *reqs]
    print(f"mmkernels: no CMake >= {MIN_CMAKE[0]}.{MIN_CMAKE[1]} found; installing {' '.join(reqs)} into "
          f"{TOOLS_DIR} ({' '.join(shlex.quote(c) for c in cmd)})", flush=True)
    try:
        subprocess.run(cmd, check=True, stdout=sys.stdout, stderr=sys.stderr)
    except (OSError, subprocess.CalledProcessError) as e:
        print(f"mmkernels: installing the build tools failed: {e}", file=sys.stderr, flush=True)


def _find_cmake() -> str:
    """A CMake >= 3.26: the cmake pip package, PATH, or one installed into build/_tools."""
    for c in _cmake_candidates():
        if _cmake_version(c) >= MIN_CMAKE:
            return c
    found = ", ".join(f"{c} ({'.'.join(map(str, _cmake_version(c)))})" for c in _cmake_candidates()) or "none"
    if os.environ.get("MMKERNELS_NO_TOOL_INSTALL", "0").strip().lower() not in ("1", "on", "true", "yes"):
        _install_tools()
        for c in _cmake_candidates():
            if _cmake_version(c) >= MIN_CMAKE:
                return c
    reqs = " ".join(shlex.quote(r) for r in _tool_requirements())
    _fail(
        f"  mmkernels needs CMake >= {MIN_CMAKE[0]}.{MIN_CMAKE[1]}; found: {found}.",
        f"run: pip install {reqs}   (then repeat the command)",
    )


def _find_ninja() -> str | None:
    cands = _ninja_candidates()
    return cands[0] if cands else None


# --------------------------------------------------------------------------- progress

_PROGRESS_RE = re.compile(r"^(\[\d+/\d+\] |-- mmkernels:|CMake (Warning|Error)| mmkernels:|mmkernels:|FAILED:)")


def _progress_tty():
    """The terminal to echo progress to when pip captures our output, else None."""
    if os.environ.get("MMKERNELS_BUILD_PROGRESS", "auto").strip().lower() in ("0", "off", "false", "no"):
        return None
    if sys.stdout.isatty():
        return None  # the output already reaches the terminal
    try:
        return open("/dev/tty", "w", buffering=1)  # noqa: SIM115
    except OSError:  # no controlling terminal (CI, pip in a pipe): pip -v / logs show the output
        return None


META_FILE = "_build_meta.json"  # written next to _C by CMakeLists.txt; read by mmkernels/_extension.py
CUDA_LIBRARY = "_C_cuda.abi3.so"  # the CUDA kernels, next to _C when the build has them


class CMakeBuild(build_ext):
    # _build_meta.json and _C_cuda travel with _C: editable installs and `build_ext --inplace` copy
    # only the extension files into the source tree (copy_extensions_to_source / get_output_mapping).
    # A CPU-only build leaves no _C_cuda in the build tree, and removes a stale one from the source
    # tree (_build_meta.json then says cuda: false, so it would not be loaded, but it would mislead).
    def _meta_pairs(self) -> list[tuple[str, str]]:
        build_py = self.get_finalized_command("build_py")
        pairs = []
        for ext in self.extensions:
            if isinstance(ext, CMakeExtension):
                inplace_file, regular_file = self._get_inplace_equivalent(build_py, ext)
                for name in (META_FILE, CUDA_LIBRARY):
                    pairs.append((os.path.join(os.path.dirname(regular_file), name),
                                  os.path.join(os.path.dirname(inplace_file), name)))
        return pairs

    def copy_extensions_to_source(self) -> None:
        super().copy_extensions_to_source()
        for regular, inplace in self._meta_pairs():
            if os.path.exists(regular):
                self.copy_file(regular, inplace, level=self.verbose)
            elif os.path.exists(inplace):
                os.remove(inplace)

    def get_output_mapping(self) -> dict[str, str]:
        mapping = super().get_output_mapping()
        if self.inplace:
            mapping.update((regular, inplace) for regular, inplace in self._meta_pairs() if os.path.exists(regular))
        return mapping

    def build_extension(self, ext: Extension) -> None:
        if not isinstance(ext, CMakeExtension):
            return super().build_extension(ext)

        torch = _import_torch()

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
        cmake_args += shlex.split(os.environ.get("MMKERNELS_CMAKE_ARGS", ""))

        jobs = os.environ.get("MAX_JOBS") or str(os.cpu_count() or 1)
        tty = _progress_tty()

        def echo(line: str) -> None:
            print(line, flush=True)
            if tty is not None and _PROGRESS_RE.match(line):
                try:
                    tty.write(f"\r{line}\n")
                except OSError:
                    pass

        def run(cmd: list[str], what: str) -> None:
            echo(f"mmkernels: {what}: " + " ".join(shlex.quote(c) for c in cmd))
            proc = subprocess.Popen(cmd, cwd=build_temp, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                    text=True, errors="replace", bufsize=1)
            assert proc.stdout is not None
            for line in proc.stdout:
                echo(line.rstrip("\n"))
            if proc.wait() != 0:
                _fail(
                    f"  CMake {what} failed (exit code {proc.returncode}); see the output above.",
                    f"  build tree: {build_temp}",
                    "run: pip install -v --no-build-isolation .   (full build log), or `make build` in a checkout",
                )

        try:
            if fresh and sig_file.exists():
                sig_file.unlink()
            run([cmake, "-S", ext.source_dir, "-B", str(build_temp), *cmake_args], "configure")
            sig_file.write_text(signature)
            run([cmake, "--build", str(build_temp), "--config", build_type, "--parallel", jobs], "build")
        finally:
            if tty is not None:
                tty.close()

        if not ext_path.exists():
            _fail(f"  CMake did not produce {ext_path}.", "run: pip install -v --no-build-isolation .   (full build log)")
        if not (out_dir / META_FILE).exists():
            _fail(f"  CMake did not write {out_dir / META_FILE}.",
                  "run: pip install -v --no-build-isolation .   (full build log)")


_check_setuptools()
setup(
    ext_modules=[CMakeExtension("mmkernels._C")],
    cmdclass={"build_ext": CMakeBuild},
    install_requires=[TORCH_RANGE, *PYPROJECT["tool"]["mmkernels"]["dependencies"]],
    # one wheel for every CPython from the oldest one pyproject.toml supports (requires-python)
    options={"bdist_wheel": {"py_limited_api": ABI3_TAG}},
)
