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
	for b in bench/cluster.py bench/extract.py bench/features.py bench/metrics.py; do $(BIN)/python $$b || exit 1; done

results: $(STAMP)
	$(BIN)/python bench/quality.py report --seeds 0 1 2 --split test --out docs/results/demo.md
	$(BIN)/python bench/quality.py ablate --seed 0 --out docs/results/ablations.md

clean:
	rm -rf $(VENV) store
