# The README's two commands: `make run` (set up + dvc repro) and `make test`.
# Both create .venv when it is missing and install the project with its pinned dependencies.

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# make run needs the package and its runtime dependencies; make test adds the test and
# scale-out extras (pytest, prefect-dask, s3fs, moto)
STAMP  := $(VENV)/.installed
DEV    := $(VENV)/.installed-dev
PYTEST_ARGS ?=

# Prefect keeps its state inside the checkout (git-ignored), never in ~/.prefect.
export PREFECT_HOME ?= $(CURDIR)/.prefect
export PREFECT_SERVER_ANALYTICS_ENABLED ?= false
export PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS ?= 120
export TORCHINDUCTOR_CACHE_DIR ?= $(CURDIR)/.cache/inductor

.PHONY: run test test-slow install bench clean

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e .
	@touch $@

$(DEV): $(STAMP)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[dev]'
	@touch $@

install: $(DEV)

## make test: the fast suite (everything not marked slow)
test: $(DEV)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

## make test-slow: the long end-to-end tests (CI runs them too)
test-slow: $(DEV)
	$(BIN)/python -m pytest -m slow $(PYTEST_ARGS)

## make run: the whole pipeline on the embedded defaults (dvc repro, flow runs in a local
## Prefect UI on 127.0.0.1); RUN_ARGS="--keep-server" keeps the UI up afterwards
RUN_ARGS ?=
run: $(STAMP)
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python -m flows.run $(RUN_ARGS)

bench: $(STAMP)
	$(BIN)/python -m benchmarks run

clean:
	rm -rf .prefect .cache .pytest_cache
