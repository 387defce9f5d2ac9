# chaincomp — the usual targets. `make demo` and `make test` work on a fresh machine:
# they create (or reuse) .venv, install torch the CPU-safe way unless one is installed, then the package.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torch==2.13.0 is the CPU wheel on this project's machines; set TORCH_SPEC for another build.
TORCH_SPEC ?= torch==2.13.0
SHARED_DATA := $(abspath ../shared/datasets)
# Offline copies of MNIST / Fashion-MNIST / CIFAR-10 when the checkout sits next to ../shared.
ifneq ($(wildcard $(SHARED_DATA)/mnist),)
export CHAINCOMP_DATA_DIR ?= $(SHARED_DATA)
endif

.PHONY: setup demo demo-digits test test-slow test-gpu lint format typecheck bench gpu-carry studies reports strip-notebooks clean help

help:
	@echo "make setup      create/reuse $(VENV) and install chaincomp[dev]"
	@echo "make demo       the main job: the DPQE chain on Fashion-MNIST (ResNet-10, 6-14 min on 2 CPU cores)"
	@echo "make demo-digits the DPQE chain on the bundled digits data (no download, ~15 s)"
	@echo "make test       the default test suite (fast; no slow or GPU tests)"
	@echo "make test-slow  the long quality tests (real datasets, minutes)"
	@echo "make lint       ruff check + format check;  make format: apply ruff format"
	@echo "make typecheck  mypy;  make bench: training throughput vs a plain PyTorch loop"
	@echo "make gpu-carry  .whl/ (wheels the GPU machine lacks) and .gpu/ (the CIFAR-10 archive) for benchmarks/gpu_session.sh"
	@echo "make studies    the CPU-size order studies (24 orders on Fashion-MNIST and rotation; resumable, more than 1 h each with oneDNN off)"
	@echo "make reports    chaincomp report for every study into experiments/*/results/"
	@echo "make strip-notebooks  clear the outputs of notebooks/*.ipynb before a commit"

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(BIN)/chaincomp run experiment=dpqe_fashion

demo-digits: setup
	$(BIN)/chaincomp run data=digits model=small_cnn trainer.max_epochs=8 chain.steps.D.settings.epochs=15 \
		chain.steps.D.settings.width_mult=0.75 chain.steps.P.settings.epochs=3 chain.steps.Q.settings.epochs=3 \
		chain.steps.E.settings.epochs=2

test: setup
	$(BIN)/python -m pytest -q

test-slow: setup
	$(BIN)/python -m pytest -q -m slow

test-gpu: setup
	$(BIN)/python -m pytest -q -m gpu

lint: setup
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks

format: setup
	$(BIN)/ruff format src tests benchmarks
	$(BIN)/ruff check --fix src tests benchmarks

typecheck: setup
	$(BIN)/mypy

bench: setup
	$(BIN)/python benchmarks/train_throughput.py

# What a GPU lease without network needs beside the checkout (carried as ignored folders, see
# benchmarks/gpu_session.sh): wheels of the packages that machine lacks, at the versions of this
# .venv (antlr4-python3-runtime has no wheel on PyPI: built from its sdist), and CIFAR-10's
# JPEG archive.
CARRY_WHEELS = hydra-core omegaconf torch-pruning optuna colorlog
gpu-carry: setup
	rm -rf .whl && mkdir -p .whl .gpu
	$(BIN)/python -m pip download -q --no-deps -d .whl $$(for p in $(CARRY_WHEELS); do \
		printf '%s==%s ' $$p $$($(BIN)/python -c "import importlib.metadata as m; print(m.version('$$p'))"); done)
	$(BIN)/python -m pip wheel -q --no-deps -w .whl \
		antlr4-python3-runtime==$$($(BIN)/python -c "import importlib.metadata as m; print(m.version('antlr4-python3-runtime'))")
	cp "$${CHAINCOMP_DATA_DIR:?set CHAINCOMP_DATA_DIR to the folder holding cifar10-jpeg75.tar.gz}/cifar10-jpeg75.tar.gz" .gpu/
	@du -sh .whl .gpu
	@# a lease takes 64 MiB: the tracked and unignored files, plus what is carried
	@{ git ls-files -z --cached --others --exclude-standard; find .whl .gpu -type f -print0; } | \
		du -cb --files0-from=- 2>/dev/null | tail -1 | \
		awk '{ printf "a lease carrying .whl and .gpu takes %.1f MiB of its 64\n", $$1 / 1048576 }'

# the order studies write into the stores that are committed beside their results
ORDERS_STORE = sqlite:///experiments/all_orders/results

studies: setup
	$(BIN)/chaincomp sweep experiment=orders_fashion tracking.uri=$(ORDERS_STORE)/fashion/runs-cpu.sqlite
	$(BIN)/chaincomp sweep experiment=orders_rotation tracking.uri=$(ORDERS_STORE)/rotation/runs-cpu.sqlite
	$(BIN)/chaincomp sweep experiment=orders_cifar10_cpu tracking.uri=$(ORDERS_STORE)/cifar10-cpu/runs-cpu.sqlite
	$(BIN)/chaincomp sweep experiment=orders_cifar10_cpu_kd tracking.uri=$(ORDERS_STORE)/cifar10-cpu-kd/runs-cpu.sqlite
	$(BIN)/chaincomp sweep experiment=orders_cifar10_cpu_onecycle tracking.uri=$(ORDERS_STORE)/cifar10-cpu-onecycle/runs-cpu.sqlite

reports: setup
	$(BIN)/chaincomp report experiment=orders_fashion tracking.uri=$(ORDERS_STORE)/fashion/runs-cpu.sqlite
	$(BIN)/chaincomp report experiment=orders_rotation tracking.uri=$(ORDERS_STORE)/rotation/runs-cpu.sqlite
	$(BIN)/chaincomp report experiment=orders_cifar10_cpu tracking.uri=$(ORDERS_STORE)/cifar10-cpu/runs-cpu.sqlite
	$(BIN)/chaincomp report experiment=orders_cifar10_cpu_kd tracking.uri=$(ORDERS_STORE)/cifar10-cpu-kd/runs-cpu.sqlite
	$(BIN)/chaincomp report experiment=orders_cifar10_cpu_onecycle tracking.uri=$(ORDERS_STORE)/cifar10-cpu-onecycle/runs-cpu.sqlite
	$(BIN)/chaincomp report experiment=orders_cifar10 tracking=none \
		"report.summaries=[experiments/all_orders/results/cifar10/trials/*/summary.json]"
	$(BIN)/chaincomp report experiment=headline_cifar10 \
		"report.summaries=[experiments/headline/results/cifar10/summary.json]"
	$(BIN)/chaincomp report experiment=headline_cifar10 report.label=cifar10-v1 \
		tracking.uri=sqlite:///experiments/headline/results/cifar10-v1/runs-h200.sqlite

strip-notebooks: setup
	$(BIN)/python notebooks/strip.py notebooks/*.ipynb

clean:
	rm -rf runs outputs multirun .pytest_cache .ruff_cache .mypy_cache
