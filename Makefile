# mmkernels developer entry points.  Each target does the whole set-up on a
# fresh Linux machine: creates .venv, installs torch + tools, builds _C.
#
#   make test    build + run the test suite (tests/ and benchmarks/ pytest files; the
#                pytest-benchmark cases run once as smoke tests, without timing tables)
#   make bench   build + verify every kernel and time it (python -m benchmarks.run)
#   make wheel   build dist/mmkernels-*.whl: one abi3 wheel, manylinux-tagged, for torch >= the
#                oldest supported release (with CUDA kernels when nvcc is usable); WHEEL_PYTHON
#                picks the Python (and so the torch) that compiles it (default: the venv's)
#   make build   just (re)build the editable install
#   make info    python -m mmkernels info (versions, build, device, backends, native ops)
#   make clean   remove build outputs (keeps .venv); make distclean also removes .venv
#
# Requirement lists (the torch releases, runtime deps, extras) live in pyproject.toml only;
# `python setup.py --requirements KIND` prints them for this Makefile.
#
# Overridable: PYTHON, TORCH_SPEC (default: pyproject's dev-torch), VENV, WHEEL_PYTHON, PYTEST_ARGS,
# MAX_JOBS, and the build
# knobs MMKERNELS_REQUIRE_CUDA / MMKERNELS_DISABLE_CUDA / TORCH_CUDA_ARCH_LIST / CUDACXX.

SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
ifeq ($(origin TORCH_SPEC),undefined)
TORCH_SPEC := $(shell $(PYTHON) setup.py --requirements torch)
endif
VENV ?= .venv
# One pytest worker per core (pytest-xdist): the interpreter-bound suite is CPU-bound and single-threaded
# per test (conftest.py pins one intra-op thread), so two cores run it in about half the time.
PYTEST_ARGS ?= -q -n auto
# pytest-benchmark cases are smoke tests in `make test`; timing is `make bench`'s job.
PYTEST_BENCH_ARGS ?= --benchmark-disable
# Libraries the wheel must NOT bundle: torch's own and CUDA's (they come with the torch wheel).
WHEEL_EXCLUDE := 'libtorch*.so*' 'libc10*.so*' 'libcudart.so*' 'libcuda.so*' 'libnvrtc*.so*' 'libnvToolsExt*.so*' 'libgomp*.so*'

VPY := $(VENV)/bin/python
PIP := $(VPY) -m pip
DEPS_STAMP := $(VENV)/.mmkernels-deps.stamp
BUILD_STAMP := $(VENV)/.mmkernels-build.stamp
BUILD_ENV_FILE := $(VENV)/.mmkernels-build-env
NATIVE_INPUTS := CMakeLists.txt setup.py pyproject.toml $(shell find csrc -type f 2>/dev/null)
TEST_DIRS := tests $(wildcard benchmarks)

# pip -v shows the CMake/ninja output of the builds below (so setup.py need not echo it to the
# terminal itself: MMKERNELS_BUILD_PROGRESS=0).
# Rebuild _C when the build knobs change (the file is rewritten only on change).
BUILD_ENV := REQUIRE=$(MMKERNELS_REQUIRE_CUDA) DISABLE=$(MMKERNELS_DISABLE_CUDA) ARCHS=$(TORCH_CUDA_ARCH_LIST) CUDACXX=$(CUDACXX) TORCH=$(TORCH_SPEC)
_ := $(shell mkdir -p $(VENV) && (printf '%s\n' '$(BUILD_ENV)' | cmp -s - $(BUILD_ENV_FILE) || printf '%s\n' '$(BUILD_ENV)' > $(BUILD_ENV_FILE)))

.PHONY: all test bench wheel build info clean distclean
all: build

$(VPY):
	@test -n "$(PYTHON)" || { echo "error: no python3.11/python3 found; set PYTHON=..." >&2; exit 1; }
	$(PYTHON) -m venv $(VENV)

$(DEPS_STAMP): $(VPY) Makefile pyproject.toml
	@test -n "$(TORCH_SPEC)" || { echo "error: no dev-torch found in pyproject.toml" >&2; exit 1; }
	$(VPY) setup.py --requirements dev > $(VENV)/.mmkernels-dev-requirements.txt
	$(PIP) install '$(TORCH_SPEC)' -r $(VENV)/.mmkernels-dev-requirements.txt
	@touch $@

$(BUILD_STAMP): $(DEPS_STAMP) $(NATIVE_INPUTS) $(BUILD_ENV_FILE)
	@start=$$(date +%s); \
	MMKERNELS_BUILD_PROGRESS=0 $(PIP) install -v --no-build-isolation --no-deps -e . && \
	echo "mmkernels: editable build took $$(( $$(date +%s) - start ))s"
	@$(VPY) -c "from mmkernels._extension import build_info; print('mmkernels build_info:', build_info())"
	@touch $@

build: $(BUILD_STAMP)

info: $(BUILD_STAMP)
	@$(VPY) -m mmkernels info

test: $(BUILD_STAMP)
	$(VPY) -m pytest $(PYTEST_ARGS) $(PYTEST_BENCH_ARGS) $(TEST_DIRS)

bench: $(BUILD_STAMP)
	$(VPY) -m benchmarks.run

# pip wheel gives a cp310-abi3-linux_x86_64 wheel; auditwheel checks it against the manylinux
# policies and retags it (plat "auto": the most compatible policy this build satisfies, e.g.
# manylinux_2_24), bundling nothing from torch or CUDA (WHEEL_EXCLUDE).  auditwheel needs patchelf on
# PATH.  The wheel has its own CMake tree, so building it with another WHEEL_PYTHON (CI compiles it
# with the oldest supported torch) does not reconfigure the editable build's.
WHEEL_PYTHON ?= $(VPY)
wheel: $(DEPS_STAMP)
	rm -rf dist/mmkernels-*.whl build/wheel-raw
	@start=$$(date +%s); \
	MMKERNELS_BUILD_PROGRESS=0 MMKERNELS_CMAKE_BUILD_DIR=build/cmake-wheel \
		$(WHEEL_PYTHON) -m pip wheel -v --no-build-isolation --no-deps -w build/wheel-raw . && \
	echo "mmkernels: wheel build took $$(( $$(date +%s) - start ))s"
	PATH="$(abspath $(VENV))/bin:$$PATH" $(VENV)/bin/auditwheel repair $(addprefix --exclude ,$(WHEEL_EXCLUDE)) \
		-w dist build/wheel-raw/mmkernels-*.whl
	@ls -l dist/mmkernels-*.whl

clean:
	rm -rf build dist *.egg-info mmkernels/_C*.so mmkernels/_build_meta.json $(BUILD_STAMP)

distclean: clean
	rm -rf $(VENV)
