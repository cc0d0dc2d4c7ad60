# Two entry points: `make demo` and `make test` (ruff, mypy over src/pgscope as pyproject.toml
# configures it, pytest). Both create .venv and install what they need.
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

# Debian packages the tests need: chromium (tests/test_report.py opens reports in it) and
# EGL/Mesa for offscreen MuJoCo rendering (pgscope evaluate --video, MUJOCO_GL=egl; no GPU
# needed). `make sysdeps` installs only what is missing, with sudo when not root.
SYSDEPS := chromium libegl1 libegl-mesa0 libgl1-mesa-dri

.PHONY: venv demo test lint bench-deps mutants sysdeps
venv: $(STAMP)

sysdeps:
	@missing=$$(for p in $(SYSDEPS); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	if [ -z "$$missing" ]; then exit 0; fi; \
	if ! command -v apt-get >/dev/null 2>&1; then \
		echo "sysdeps: not a Debian system; install $$missing yourself" >&2; exit 1; fi; \
	sudo=""; [ "$$(id -u)" = 0 ] || sudo=sudo; \
	echo "sysdeps: installing $$missing"; \
	$$sudo apt-get update -q && $$sudo apt-get install -y -q $$missing

demo: $(STAMP)
	$(BIN)/pgscope demo

# The suite runs in two processes (pytest-xdist); the Ray tests share one of them
# (xdist_group "ray"), so only one Ray runs at a time. Plain `pytest` runs it in one.
test: $(STAMP) sysdeps
	$(BIN)/ruff check src tests bench
	$(BIN)/mypy
	$(BIN)/python -m pytest -n 2 --dist loadgroup

bench-deps: $(STAMP)
	$(BIN)/pip install -q -e ".[bench]"

# Curated mutation check (tools/mutants.py): plants each known wiring bug in a copy of src/
# and checks that the fast tests catch it; results in docs/testing.md (--write-docs).
mutants: $(STAMP)
	$(BIN)/python tools/mutants.py
