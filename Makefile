# recipe-search: `make demo` runs a real sweep on the embedded digits; `make test` runs the tests.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp

.PHONY: install demo demo-det demo-bit study-rsb test test-fast test-gpu bench clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[test,postgres,mysql]"
	touch $(STAMP)

# A sweep of space `rsb` on recipe `rsb-digits` at 12 epochs: 12 trials, TPE + ASHA, then the top 3
# recipes trained again on 3 fresh seeds each (mean ± std, Welch's test); tracked in ./mlflow.db.
demo: install
	$(BIN)/recipe-search sweep rsb --trials 12 --set schedule.epochs=12 --confirm 3 --seeds 3

# Rethinking ImageNet Pre-training on the embedded digits-det: scratch vs pretrained, 1x and 2x,
# after an upstream digits classifier for the pretrained backbone (kept in runs/ and reused).
demo-det: install
	$(BIN)/recipe-search study rethinking

# BiT transfer: a tiny GN+WS ResNet-v2 on digits 0-4, then HyperRule-centred searches at 1, 5 and 10 shots of 5-9.
demo-bit: install
	$(BIN)/recipe-search status bit-upstream-digits > /dev/null 2>&1 || $(BIN)/recipe-search train bit-upstream-digits --name bit-upstream-digits
	for shots in 1 5 10; do \
	  $(BIN)/recipe-search sweep bit --trials 6 --name bit-$${shots}shot-$$(date +%Y%m%d-%H%M%S) \
	    --set data.shots_per_class=$$shots --set model.init=run:bit-upstream-digits || exit 1; \
	done

# ResNet strikes back's A1/A2/A3 on the embedded digits (120/60/20 epochs), 3 seeds each: accuracy vs budget.
study-rsb: install
	$(BIN)/recipe-search study rsb --seeds 3

# Two pytest processes: the cluster tests start their own Ray, and only one Ray runs on a machine at a time.
test: install
	$(BIN)/python -m pytest -q --durations=15 -m "not cluster"
	$(BIN)/python -m pytest -q --durations=5 -m cluster

# Where CUDA GPUs are: bf16 autocast, channels_last, torch.compile, 2-GPU DDP and SyncBN (skipped without GPUs).
test-gpu: install
	$(BIN)/python -m pytest -q -m gpu -rs

test-fast: install
	$(BIN)/python -m pytest -q -m "not slow"

bench: install
	$(BIN)/python bench/trial_overhead.py
	$(BIN)/python bench/throughput.py

clean:
	rm -rf runs mlflow.db .pytest_cache
