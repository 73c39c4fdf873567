# The README's two commands: `make demo` (the main job) and `make test` (the test suite).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
RUN := runs/icons-margin

.PHONY: demo train-icons test lint install constraints settings-doc wheelhouse compose-smoke

$(BIN)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $@

install: $(BIN)/.installed

TRAIN_MINUTES ?= 5

# The product on this machine: IconThemes (cached), the API with its workers on
# http://127.0.0.1:8000 (state in ./var), a gallery of the test split, a DVML+margin job of
# TRAIN_MINUTES minutes (validation included), the trained and the built-in model compared on
# the test split, and the gallery re-indexed only if the trained model is better. Ctrl-C stops.
demo: $(BIN)/.installed
	$(BIN)/lookalike demo --train-minutes $(TRAIN_MINUTES)

# The training library alone: train margin + distance-weighted sampling on IconThemes (about
# 12 minutes of CPU), evaluate the best-by-validation model on the test split. Reruns reuse both.
train-icons: $(BIN)/.installed
	$(BIN)/lookalike data build-icons data/icons
	test -f $(RUN)/results.json || $(BIN)/lookalike train --data data/icons --method margin --preset icons --out $(RUN)
	$(BIN)/lookalike evaluate --model $(RUN)/best --data data/icons --split test --json $(RUN)/test.json

lint: $(BIN)/.installed
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

# The service tests that go through a gallery index run a second time on the milvus backend,
# against one Milvus Lite server (docs/service.md, "Index backends").
MILVUS_PASS := $(addprefix tests/app/,test_api_catalog.py test_api_search.py \
	test_api_security.py test_api_durability.py test_api_contract.py test_api_fuzz.py \
	test_import_jobs.py test_jobs.py test_index_embedding.py)

# pytest exits 5 when it collects no test; that is not a failure of the suite.
test: lint
	$(BIN)/python -m pytest -q --durations=15 || [ $$? -eq 5 ]
	LOOKALIKE_INDEX_BACKEND=milvus $(BIN)/python -m pytest -q --durations=5 $(MILVUS_PASS)

# The compose stack in real containers (needs a Docker engine with Compose v2): build, up, the
# user journey, restart, down and up (scripts/compose_smoke.py). COMPOSE_SMOKE=offline builds the
# base images from Debian packages and installs from ./wheelhouse (no registry, no index).
COMPOSE_SMOKE ?= online
compose-smoke: $(BIN)/.installed
	LOOKALIKE_COMPOSE_SMOKE=$(COMPOSE_SMOKE) $(BIN)/python -m pytest -q -s tests/deploy/test_compose_smoke.py

# Every wheel the images install, into ./wheelhouse, for builds without a package index.
wheelhouse:
	scripts/wheelhouse.sh

# Pin the tested virtual environment's versions for the Docker images (constraints.txt).
constraints: $(BIN)/.installed
	$(BIN)/python scripts/freeze_constraints.py

# Regenerate .env.example and README's configuration table from app/core/config.py.
settings-doc: $(BIN)/.installed
	$(BIN)/python -m app.core.settings_doc --write
