# recipe-search: `make demo` runs a real sweep on the embedded digits; `make test` runs the tests.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp

.PHONY: install demo test test-fast bench clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[test]"
	touch $(STAMP)

# A default sweep: space `rsb` on recipe `rsb-digits`, 12 trials, TPE + ASHA, tracked in ./mlflow.db.
demo: install
	$(BIN)/recipe-search sweep rsb --trials 12

test: install
	$(BIN)/python -m pytest -q

test-fast: install
	$(BIN)/python -m pytest -q -m "not slow"

bench: install
	$(BIN)/python bench/trial_overhead.py
	$(BIN)/python bench/throughput.py

clean:
	rm -rf runs mlflow.db .pytest_cache
