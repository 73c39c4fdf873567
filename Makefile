# The README's two commands: `make demo` (the main job) and `make test` (the test suite).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
RUN := runs/icons-margin

.PHONY: demo test lint install

$(BIN)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $@

install: $(BIN)/.installed

# Build IconThemes (cached), train margin + distance-weighted sampling on it (about 12 minutes
# of CPU), evaluate the best-by-validation model on the test split. A second run reuses both.
demo: $(BIN)/.installed
	$(BIN)/lookalike data build-icons data/icons
	test -f $(RUN)/results.json || $(BIN)/lookalike train --data data/icons --method margin --preset icons --out $(RUN)
	$(BIN)/lookalike evaluate --model $(RUN)/best --data data/icons --split test --json $(RUN)/test.json

lint: $(BIN)/.installed
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# pytest exits 5 when it collects no test; that is not a failure of the suite.
test: lint
	$(BIN)/python -m pytest -q --durations=15 || [ $$? -eq 5 ]
