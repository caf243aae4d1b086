# Thin wrappers around the project's tools. `make help` lists the targets.
# Everything runs from the virtualenv in .venv, created on demand from pyproject.toml.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
INSTALLED := $(VENV)/.installed
BENCH_INSTALLED := $(VENV)/.installed-bench
# Lint the package and tests, plus examples/ and bench/ once they exist.
LINT_PATHS := trioproxy tests $(wildcard examples) $(wildcard bench)

.DEFAULT_GOAL := help
.PHONY: help install postgres lint type test-fast test demo bench bench-plot bench-soak clean distclean

help: ## List the targets
	@grep -hE '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | \
		awk 'BEGIN {FS = ":.*## "} {printf "  %-10s %s\n", $$1, $$2}'

$(INSTALLED): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -U pip
	$(BIN)/pip install -e '.[test]'
	touch $@

install: $(INSTALLED) ## Create/refresh the virtualenv in .venv with the test extras

postgres: ## Make sure PostgreSQL server and client binaries are installed
	bash scripts/ensure-postgres.sh

lint: $(INSTALLED) ## Run ruff on the code and tests
	$(BIN)/ruff check $(LINT_PATHS)

type: $(INSTALLED) ## Run mypy --strict on the package
	$(BIN)/mypy --strict trioproxy

test-fast: $(INSTALLED) ## Run the unit and in-process trio tests (no PostgreSQL)
	$(BIN)/pytest tests/unit tests/trio

test: $(INSTALLED) postgres lint type ## Lint, type-check, then run the whole suite against a real PostgreSQL
	$(BIN)/pytest

demo: $(INSTALLED) ## Run the demo (python -m trioproxy.demo)
	$(BIN)/python -m trioproxy.demo

# The bench extra (matplotlib, for the plots), on top of the test extras.
$(BENCH_INSTALLED): $(INSTALLED) pyproject.toml
	$(BIN)/pip install -e '.[bench]'
	touch $@

bench: $(BENCH_INSTALLED) postgres ## Run the benchmark (bench/run.py), with plots
	$(BIN)/python bench/run.py

bench-plot: $(BENCH_INSTALLED) ## Redraw bench/results/*.png from the saved JSON (bench/plots.py)
	$(BIN)/python -m bench.plots

bench-soak: $(INSTALLED) postgres ## Minutes of steady load on thousands of clients; proxy RSS must not grow (bench/soak.py)
	$(BIN)/python bench/soak.py

clean: ## Remove caches and build artefacts (keeps .venv)
	rm -rf .pytest_cache .mypy_cache .ruff_cache .hypothesis build dist *.egg-info bench/results/tmp
	find . -path ./$(VENV) -prune -o -type d -name __pycache__ -exec rm -rf {} +

distclean: clean ## Also remove the virtualenv
	rm -rf $(VENV)
