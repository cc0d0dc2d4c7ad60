# Two entry points: `make demo` and `make test`. Both create .venv and install what they need.
# torch is pinned to 2.13.0: a CPU build of that version installs quickly, while an
# unpinned torch may pull a multi-GB CUDA build.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

$(STAMP): pyproject.toml
	test -d $(VENV) || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[dev]"
	touch $(STAMP)

.PHONY: venv demo test lint bench-deps mutants
venv: $(STAMP)

demo: $(STAMP)
	$(BIN)/pgscope demo

test: $(STAMP)
	$(BIN)/ruff check src tests bench
	$(BIN)/python -m pytest

bench-deps: $(STAMP)
	$(BIN)/pip install -q -e ".[bench]"

# Curated mutation check (tools/mutants.py): plants each known wiring bug in a copy of src/
# and checks that the fast tests catch it; results in docs/testing.md (--write-docs).
mutants: $(STAMP)
	$(BIN)/python tools/mutants.py
