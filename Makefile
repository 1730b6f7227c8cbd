# mmkernels developer entry points.  Each target does the whole set-up on a
# fresh Linux machine: creates .venv, installs torch + tools, builds _C.
#
#   make test    build + run the test suite (tests/ and benchmarks/ pytest files)
#   make bench   build + run benchmarks (python -m benchmarks.run)
#   make wheel   build dist/mmkernels-*.whl (with CUDA kernels when nvcc is usable)
#   make build   just (re)build the editable install
#   make info    print mmkernels.build_info()
#   make clean   remove build outputs (keeps .venv); make distclean also removes .venv
#
# Overridable: PYTHON, TORCH_SPEC, VENV, PYTEST_ARGS, MAX_JOBS, and the build
# knobs MMKERNELS_REQUIRE_CUDA / MMKERNELS_DISABLE_CUDA / TORCH_CUDA_ARCH_LIST / CUDACXX.

SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
TORCH_SPEC ?= torch==2.14.1
VENV ?= .venv
PYTEST_ARGS ?= -q
DEV_DEPS := numpy pytest pytest-benchmark hypothesis ninja pybind11 'cmake>=3.26' matplotlib 'setuptools>=64' wheel

VPY := $(VENV)/bin/python
PIP := $(VPY) -m pip
DEPS_STAMP := $(VENV)/.mmkernels-deps.stamp
BUILD_STAMP := $(VENV)/.mmkernels-build.stamp
BUILD_ENV_FILE := $(VENV)/.mmkernels-build-env
NATIVE_INPUTS := CMakeLists.txt setup.py pyproject.toml $(shell find csrc -type f 2>/dev/null)
TEST_DIRS := tests $(wildcard benchmarks)

# Rebuild _C when the build knobs change (the file is rewritten only on change).
BUILD_ENV := REQUIRE=$(MMKERNELS_REQUIRE_CUDA) DISABLE=$(MMKERNELS_DISABLE_CUDA) ARCHS=$(TORCH_CUDA_ARCH_LIST) CUDACXX=$(CUDACXX) TORCH=$(TORCH_SPEC)
_ := $(shell mkdir -p $(VENV) && (printf '%s\n' '$(BUILD_ENV)' | cmp -s - $(BUILD_ENV_FILE) || printf '%s\n' '$(BUILD_ENV)' > $(BUILD_ENV_FILE)))

.PHONY: all test bench wheel build info clean distclean
all: build

$(VPY):
	@test -n "$(PYTHON)" || { echo "error: no python3.11/python3 found; set PYTHON=..." >&2; exit 1; }
	$(PYTHON) -m venv $(VENV)

$(DEPS_STAMP): $(VPY) Makefile
	$(PIP) install '$(TORCH_SPEC)' $(DEV_DEPS)
	@touch $@

$(BUILD_STAMP): $(DEPS_STAMP) $(NATIVE_INPUTS) $(BUILD_ENV_FILE)
	@start=$$(date +%s); \
	$(PIP) install --no-build-isolation --no-deps -e . && \
	echo "mmkernels: editable build took $$(( $$(date +%s) - start ))s"
	@$(VPY) -c "from mmkernels._extension import build_info; print('mmkernels build_info:', build_info())"
	@touch $@

build: $(BUILD_STAMP)

info: $(BUILD_STAMP)
	@$(VPY) -c "import json; from mmkernels._extension import build_info; print(json.dumps(build_info(), indent=2))"

test: $(BUILD_STAMP)
	$(VPY) -m pytest $(PYTEST_ARGS) $(TEST_DIRS)

bench: $(BUILD_STAMP)
	$(VPY) -m benchmarks.run

wheel: $(DEPS_STAMP)
	rm -f dist/mmkernels-*.whl
	@start=$$(date +%s); \
	$(PIP) wheel --no-build-isolation --no-deps -w dist . && \
	echo "mmkernels: wheel build took $$(( $$(date +%s) - start ))s"
	@ls -l dist/mmkernels-*.whl

clean:
	rm -rf build dist *.egg-info mmkernels/_C*.so $(BUILD_STAMP)

distclean: clean
	rm -rf $(VENV)
