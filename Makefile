# Two entry points for a fresh machine: `make simulate` and `make test`.
# Both create .venv, install fedfuse with the tested versions pinned in constraints.txt, then run.

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
OUT    ?= runs/$(shell date +%Y%m%d-%H%M%S)

# Flower offline and self-contained: no telemetry, no update check, no runtime `uv sync` (as common/offline.py).
export FLWR_TELEMETRY_ENABLED := 0
export FLWR_DISABLE_UPDATE_CHECK := 1
export FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION := 1

.PHONY: simulate test test-fast check install clean

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[test]'
	@touch $@

simulate: $(STAMP)
	$(BIN)/fedfuse simulate --scenario simulations/scenarios/default.toml --out $(OUT)

test: $(STAMP)
	$(BIN)/python -m pytest -m "not slow" -q
	$(BIN)/python -m pytest -m slow -q

test-fast: $(STAMP)
	$(BIN)/python -m pytest -m "not slow" -q

# Quality gates (each also runs on its own: README "Contributing").
check: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/python .ci/mypy_baseline.py
	$(BIN)/lint-imports

clean:
	rm -rf $(VENV) runs .pytest_cache .hypothesis
