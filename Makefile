# Two entry points for a fresh machine with Python 3.11+ and make:
#   make demo   -- the three-node demo (Seoul, Washington relay, Tokyo)
#   make test   -- lint, type-check and the test suite (the PostgreSQL tests bring up a
#                  throwaway server themselves, installing Debian's postgresql package
#                  when missing: tests/nodes/pg_server.py; TISA_PG_DSN names one instead)
# Each creates the virtual environment it needs in .venv.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint typecheck bench vectors clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/tisa demo

lint: $(STAMP)
	$(BIN)/ruff check tisa tisa_io relay clients tisa_testing tisa_cli tests examples bench scripts fuzz
	$(BIN)/ruff format --check tisa tisa_io relay clients tisa_testing tisa_cli tests examples bench scripts fuzz

typecheck: $(STAMP)
	$(BIN)/mypy

test: lint typecheck
	$(BIN)/pytest -q

bench: $(STAMP)
	$(BIN)/python -m bench

vectors: $(STAMP)
	$(BIN)/python scripts/make_vectors.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .hypothesis
