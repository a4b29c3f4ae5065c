# Quick start: `make demo` runs the whole flow on the bundled checkpoint; `make test` runs the test suite.
# Both create .venv on first use. torch is installed first, on its own, so that its build is chosen here and not by
# the resolver of the second install: TORCH is the requirement, TORCH_INDEX the index it comes from (empty: pip's
# own configuration). From PyPI alone, torch==2.13.0 on Linux x86_64 is the CUDA build with its NVIDIA wheels
# (about 2.6 GB); the development machines' pip has a local 2.13.0+cpu wheel, which it takes instead. PyTorch's CPU
# wheels anywhere (TORCH holds one requirement: pip reads a quoted "torch --index-url ..." as a requirement name):
#   make test TORCH_INDEX=https://download.pytorch.org/whl/cpu
PYTHON ?= python3
TORCH ?= torch==2.13.0
TORCH_INDEX ?=
EXTRAS ?= cpu,dev
VENV := .venv
BIN := $(VENV)/bin
# The serving environment: no torch, PyTriton's tritonserver. PyTriton's Python backend stub runs under 3.13 here
# (under 3.11 it fails on an RLock attribute, and pyenv's 3.12 lacks libpython3.12.so).
SERVE_PYTHON ?= $(shell PYENV_VERSION=3.13.0 python3.13 -c 'import sys; print(sys.executable)' 2>/dev/null || command -v python3.13)
SERVE_VENV := .venv-serve

.PHONY: demo test install serve-env test-serve gpu-check clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH)" $(if $(TORCH_INDEX),--index-url "$(TORCH_INDEX)")
	$(BIN)/python -m pip install --quiet -e ".[$(EXTRAS)]"
	# soft-moe's layer module for the tests, without its timm dependency (see pyproject's dev extra)
	$(BIN)/python -m pip install --quiet --no-deps "soft-moe==0.0.1"
	touch $@

install: $(VENV)/.installed

# numpy, onnxruntime, nvidia-pytriton (numpy < 2: pip builds numpy 1.26 from source for 3.13 the first time, about
# 4 minutes on 2 cores; later installs take the wheel pip cached), the client, Pillow (the predictor resizes and crops
# images of any size), and moe-prune without its dependencies.
$(SERVE_VENV)/.installed: pyproject.toml
	@test -n "$(SERVE_PYTHON)" || { echo "serve-env: no Python 3.13 found (pyenv 3.13.0 or python3.13 on PATH); set SERVE_PYTHON"; exit 1; }
	$(SERVE_PYTHON) -m venv $(SERVE_VENV)
	$(SERVE_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(SERVE_VENV)/bin/python -m pip install --quiet numpy onnxruntime nvidia-pytriton "tritonclient[http,grpc]" "pillow>=9"
	$(SERVE_VENV)/bin/python -m pip install --quiet --no-deps .
	touch $@

serve-env: $(SERVE_VENV)/.installed

# The live server test alone: the model exported here, served from the environment without torch.
test-serve: $(VENV)/.installed $(SERVE_VENV)/.installed
	MOE_PRUNE_SERVE_PYTHON=$(SERVE_VENV)/bin/python MOE_PRUNE_REQUIRE_SERVER=1 $(BIN)/python -m pytest -q tests/test_serve_live.py

# Everything a GPU must show, in one run (benchmarks/gpu_check.py); without a GPU it says so and exits 0. On a lent
# machine with torch and triton already installed: pip install --no-deps --no-build-isolation -e . && make gpu-check
# PY=python
PY ?= $(BIN)/python
gpu-check:
	$(PY) benchmarks/gpu_check.py

demo: $(VENV)/.installed
	$(BIN)/moe-prune demo

test: $(VENV)/.installed
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) $(SERVE_VENV) build dist *.egg-info demo-output
