# Two commands matter: `make run` and `make test`. Both create .venv on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# Stamp files record that an install ran against the current pyproject.toml files. The client
# distribution (client/: the generated stubs and the Python client) is installed in the same pip
# command as the server, which depends on it.
INSTALLED := $(VENV)/.installed
DEV_INSTALLED := $(VENV)/.dev-installed

.PHONY: run test proto lint format bench bench-quick clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(INSTALLED): pyproject.toml client/pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e ./client -e .
	touch $@

$(DEV_INSTALLED): pyproject.toml client/pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e ./client -e '.[dev]'
	touch $@ $(INSTALLED)

run: $(INSTALLED)
	$(BIN)/transaction-service serve

test: lint
	$(BIN)/python -m pytest

# Re-make the committed stubs in client/src/transactions/ from proto/ (buf.gen.yaml), and the
# descriptor set with the proto's comments that reflection serves.
proto: $(DEV_INSTALLED)
	$(BIN)/buf generate
	$(BIN)/buf build --as-file-descriptor-set -o client/src/transactions/descriptor_set.binpb

# buf breaking compares proto/ with the main branch's (a no-op where there is no main branch).
lint: $(DEV_INSTALLED)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/buf lint
	$(BIN)/python scripts/buf_breaking.py
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
	rm -rf $(VENV) build *.egg-info src/*.egg-info client/build client/src/*.egg-info
