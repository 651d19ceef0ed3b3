# Every target sets up what it needs: a fresh clone runs `make demo` or `make test` directly.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
LINTED := bulkdisconnect tests $(wildcard benchmarks)

.PHONY: install lint test demo bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade "pip>=25.1"
	$(BIN)/python -m pip install --quiet --editable . --group dev
	touch $(STAMP)

install: $(STAMP)

lint: install
	$(BIN)/ruff check $(LINTED)
	$(BIN)/ruff format --check $(LINTED)
	$(BIN)/mypy

test: lint
	$(BIN)/python -m pytest

demo: install
	bash scripts/demo.sh

bench: install
	$(BIN)/python -m pip install --quiet --group bench
	$(BIN)/python -m benchmarks

clean:
	rm -rf $(VENV) state demo-output .mypy_cache .ruff_cache .pytest_cache
