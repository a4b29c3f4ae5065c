# Quick start: `make demo` runs the whole flow on the bundled checkpoint; `make test` runs the test suite.
# Both create .venv on first use. torch is installed first, pinned, so that pip takes the CPU build instead of
# resolving an unpinned `torch` to multi-gigabyte CUDA wheels; override TORCH for another build, e.g.
#   make test TORCH="torch --index-url https://download.pytorch.org/whl/cpu"
PYTHON ?= python3
TORCH ?= torch==2.13.0
EXTRAS ?= cpu,dev
VENV := .venv
BIN := $(VENV)/bin

.PHONY: demo test install clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH)"
	$(BIN)/python -m pip install --quiet -e ".[$(EXTRAS)]"
	touch $@

install: $(VENV)/.installed

demo: $(VENV)/.installed
	$(BIN)/moe-prune demo

test: $(VENV)/.installed
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) build dist *.egg-info demo-output
