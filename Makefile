# tmd — two commands for a fresh machine:
#   make demo   sets up, then runs the toy-world demo (stage 1 + stage 2 on the shipped teacher) -> runs/demo/report.md
#   make reproduce  the comparison with 3 seeds, curves and ablations (~3 h on 2 cores; resumable) -> docs/results.md
#   make bench  runs every benchmark (BENCH_ARGS, default --small; on the GPU when there is one)
#   make test   creates .venv if missing, installs torch (the CUDA build where available) + the project, runs pytest
#   make gpu-check  everything that needs a GPU in one run (bench/gpu_check.py; GPU_CHECK_ARGS); DRY=1: toy sizes, any device
# In an environment that already has torch >= 2.11 and no network (e.g. the GPU machine): make test VENV=
VENV ?= .venv
TORCH_SPEC ?= torch==2.14.1
MAX_JOBS ?= 2
PYTEST_ARGS ?=
DEMO_ARGS ?=
REPRODUCE_ARGS ?=
BENCH_ARGS ?= --small
GPU_CHECK_ARGS ?=
DRY ?=
export MAX_JOBS

ifeq ($(strip $(VENV)),)
PY := python3
READY := .build-inplace
else
PY := $(abspath $(VENV))/bin/python
READY := $(VENV)/.tmd-installed
endif

DEPS := numpy ninja pytest expecttest ruff safetensors tqdm pyyaml "diffusers>=0.33" "transformers>=4.45" \
        "accelerate>=1.0" sentencepiece imageio imageio-ffmpeg tensorboard matplotlib "peft>=0.13" "av>=12"

.PHONY: test demo reproduce bench build clean lint gpu-check FORCE

test: $(READY)
	$(PY) -c "import tmd_ext, json; print('tmd_ext build:', json.dumps(tmd_ext.build_info()))"
	$(PY) -m pytest tests -q --durations=15 $(PYTEST_ARGS)

demo: $(READY)
	$(PY) -m tmd_train.toy.demo $(DEMO_ARGS)

reproduce: $(READY)
	$(PY) -m tmd_train.toy.reproduce $(REPRODUCE_ARGS)

bench: $(READY)
	@for b in bench/bench_*.py; do echo "== $$b"; (cd bench && PYTHONPATH=$(CURDIR) $(PY) $$(basename $$b) $(BENCH_ARGS)) || exit 1; done

# The build for the visible arch is part of the check (with VENV= or an existing interpreter, the script builds).
gpu-check: $(if $(strip $(VENV)),$(if $(wildcard $(PY)),,$(READY)),)
	PYTHONPATH=$(CURDIR)$(if $(PYTHONPATH),:$(PYTHONPATH),) $(PY) bench/gpu_check.py $(if $(strip $(DRY)),--dry,) $(GPU_CHECK_ARGS)

lint: $(READY)
	$(PY) -m ruff check .

build: $(READY)

# A fresh virtual environment: torch (CUDA build where available), the dependencies, the CUTLASS headers
# (nvidia-cutlass without its dependencies), then the project, editable, with its C++/CUDA ops compiled.
$(VENV)/.tmd-installed: pyproject.toml setup.py $(shell find csrc -name '*.cpp' -o -name '*.cu' -o -name '*.h' -o -name '*.cuh')
	test -x $(VENV)/bin/python || python3 -m venv $(VENV)
	$(VENV)/bin/python -m pip install -q --upgrade pip setuptools wheel
	$(VENV)/bin/python -m pip install -q "$(TORCH_SPEC)"
	$(VENV)/bin/python -m pip install -q $(DEPS)
	$(VENV)/bin/python -m pip install -q --no-deps nvidia-cutlass
	$(VENV)/bin/python -m pip install -v --no-deps --no-build-isolation -e . > $(VENV)/build.log 2>&1 || (tail -60 $(VENV)/build.log; exit 1)
	@grep -h "tmd_ext:" $(VENV)/build.log | sort -u
	@grep -E "bin/nvcc " $(VENV)/build.log | grep -oE "csrc/[^ ]+\.cu" | sort -u | sed 's/^/  nvcc compiled /'
	$(VENV)/bin/python -c "import tmd_ext"
	touch $@

# No venv: build in place with the torch already installed (offline).
.build-inplace: FORCE
	$(PY) setup.py build_ext --inplace > build-inplace.log 2>&1 || (tail -60 build-inplace.log; exit 1)
	@grep -h "tmd_ext:" build-inplace.log | sort -u
	$(PY) -c "import tmd_ext"

clean:
	rm -rf build tmd_ext/_C*.so tmd_ext/_build_meta.py *.egg-info
