# `make demo`: set up and run the whole demo pipeline; `make test`: set up and run the tests.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup demo test bench results clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "torch==2.14.1" "torchvision==0.29.1"
	$(BIN)/pip install -q -e ".[dev]"
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(BIN)/clips4 run --preset demo

test: $(STAMP)
	$(BIN)/pytest -q

bench: $(STAMP)
	for b in bench/cluster.py bench/extract.py bench/features.py bench/metrics.py bench/memory.py; do $(BIN)/python $$b || exit 1; done

results: $(STAMP)
	$(BIN)/python bench/worlds.py --seeds 1 2 3 4 5 --split test
	$(BIN)/python bench/ablation.py --seeds 1 2 3 4 5 --split test

clean:
	rm -rf $(VENV) store
