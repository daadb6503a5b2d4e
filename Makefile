# Two commands matter: `make run` and `make test`. Both create .venv on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# Stamp files record that an install ran against the current pyproject.toml.
INSTALLED := $(VENV)/.installed
DEV_INSTALLED := $(VENV)/.dev-installed

.PHONY: run test proto lint format bench bench-quick clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(INSTALLED): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e .
	touch $@

$(DEV_INSTALLED): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $@ $(INSTALLED)

run: $(INSTALLED)
	$(BIN)/transaction-service serve

test: lint
	$(BIN)/python -m pytest

# Re-make the committed stubs in generated/ from proto/.
proto: $(DEV_INSTALLED)
	$(BIN)/python scripts/gen_proto.py

lint: $(DEV_INSTALLED)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/buf lint
	$(BIN)/mypy

format: $(DEV_INSTALLED)
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

# Servers in processes of their own, the load from another; prints a table and writes
# bench/results.json. About 10 minutes; bench-quick about 3.
bench: $(DEV_INSTALLED)
	$(BIN)/python bench/bench.py

bench-quick: $(DEV_INSTALLED)
	$(BIN)/python bench/bench.py --quick

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info
