# Two commands matter: `make run` and `make test`. Both create .venv on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# Stamp files record that an install ran against the current pyproject.toml files and lock.
INSTALLED := $(VENV)/.installed
DEV_INSTALLED := $(VENV)/.dev-installed
# Every third-party package comes from a lock, pinned with its hashes (the image installs
# requirements.lock the same way): requirements.lock for `make run` and the image,
# requirements-dev.lock (the same versions, plus the dev tools) for `make test` and CI.
# `make lock` makes both from pyproject.toml; see docs/deploy.md.
LOCK := requirements.lock
DEV_LOCK := requirements-dev.lock
# The project's own distributions (folders with a pyproject.toml), installed editable from the
# work tree without resolving dependencies: theirs are in the lock. A folder added here that the
# server depends on needs a `[tool.uv.sources]` entry in pyproject.toml and its name in
# LOCAL_NAMES, so that `make lock` resolves it from the folder and leaves it out of the lock.
# client/: the client distribution (the generated stubs and the Python client), which the
# server depends on.
LOCAL_PACKAGES := ./client .
LOCAL_NAMES := transaction-service-client
LOCK_FLAGS := --generate-hashes --universal --python-version 3.11 --quiet \
	--custom-compile-command 'make lock' $(foreach name,$(LOCAL_NAMES),--no-emit-package $(name))
PIP_LOCKED := $(BIN)/python -m pip install --quiet --require-hashes --no-deps -r
PIP_LOCAL := $(BIN)/python -m pip install --quiet --no-deps $(foreach p,$(LOCAL_PACKAGES),-e $(p))

.PHONY: run test proto lint format bench bench-quick clean lock lock-upgrade

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(INSTALLED): pyproject.toml client/pyproject.toml $(LOCK) | $(BIN)/python
	$(PIP_LOCKED) $(LOCK)
	$(PIP_LOCAL)
	touch $@

$(DEV_INSTALLED): pyproject.toml client/pyproject.toml $(DEV_LOCK) | $(BIN)/python
	$(PIP_LOCKED) $(DEV_LOCK)
	$(PIP_LOCAL)
	touch $@ $(INSTALLED)

# After changing a dependency in pyproject.toml: re-make both locks (versions already locked
# are kept; new ones resolved), then commit them. `make lock-upgrade` moves every package to
# its newest version that pyproject.toml allows.
lock: | $(BIN)/python
	test -x $(BIN)/uv || $(BIN)/python -m pip install --quiet "$$(grep -o 'uv==[0-9.]*' pyproject.toml)"
	$(BIN)/uv pip compile pyproject.toml --extra dev $(LOCK_FLAGS) $(UPGRADE) -o $(DEV_LOCK)
	$(BIN)/uv pip compile pyproject.toml $(LOCK_FLAGS) -c $(DEV_LOCK) -o $(LOCK)

lock-upgrade:
	$(MAKE) lock UPGRADE=--upgrade

run: $(INSTALLED)
	$(BIN)/transaction-service serve

# Whole test files go to TEST_WORKERS processes (pytest-xdist), the longest first (the order of
# tests/conftest.py's LONGEST_FIRST); each worker makes its PostgreSQL schemas in a database of
# its own (tests/pg.py). `make test TEST_WORKERS=0` runs in one process. Four on two cores: most
# of a test's time is spent waiting (for a server to start, a retry, a deadline), not computing.
TEST_WORKERS ?= 4

test: lint
	$(BIN)/python -m pytest -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder

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
