# Everything a new machine needs: `make run` trains, `make test` tests.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# Pinned torch build that pip finds on this project's machines; any torch >= 2.11 works.
TORCH_PINS ?= torch==2.14.1 torchvision==0.29.1
# Extra flags for `make run`, e.g. DOWNLOAD_ARGS="--url /path/to/cifar-10-python.tar.gz --md5 <hex>".
DOWNLOAD_ARGS ?=
# The first command a new user runs must end: 15 minutes of training on any machine (budget/plan.py).
TRAIN_ARGS ?= --time-budget 15m
# Test processes side by side (pytest-xdist): one test alone keeps about one core busy; 0 runs them in one process.
TEST_WORKERS ?= 2

# The prepared CIFAR-10 that `make gpu-pack` packs for a lent GPU machine (scripts/gpu_check.py).
GPU_DATA ?= my_cifar_data

.PHONY: install run test lint docs bench gpu-pack clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip
	$(BIN)/pip install $(TORCH_PINS)
	$(BIN)/pip install -e '.[dev,export,optuna,parquet]'
	touch $@

run: install
	$(BIN)/cifar download $(DOWNLOAD_ARGS)
	$(BIN)/cifar prepare
	$(BIN)/cifar train $(TRAIN_ARGS)

test: install
	scripts/slurm/local-cluster.sh maybe-install
	$(BIN)/pytest -q -n $(TEST_WORKERS) --dist loadgroup

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# The command reference, generated from the Typer app (tests/test_docs.py fails when it is stale).
docs: install
	$(BIN)/typer cifar_cli.cli utils docs --name cifar --title "cifar: command reference" --output docs/cli.md

bench: install
	$(BIN)/cifar bench

# What a lent GPU machine lacks, into .gpu/; there, in one call carrying .gpu: python3 scripts/gpu_check.py run $$OUT
gpu-pack: install
	$(BIN)/python scripts/gpu_check.py pack --processed-dir $(GPU_DATA)

clean:
	rm -rf $(VENV) build *.egg-info
