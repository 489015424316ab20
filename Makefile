# `make test` and `make demo` work from a clean clone: they create .venv when it is missing.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: test demo lint bench bench-gpu clean

$(STAMP): pyproject.toml constraints.txt
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c constraints.txt torch==2.13.0
	$(BIN)/python -m pip install -q -c constraints.txt -e ".[dev]"
	touch $(STAMP)

test: $(STAMP)
	TRITON_INTERPRET=1 $(BIN)/python -m pytest -n 2 --dist loadfile

demo: $(STAMP)
	$(BIN)/involution demo

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks
	$(BIN)/mypy

# The operator's CPU tables in BENCHMARKS.md, NCHW then channels-last; each output heads itself
# with the machine and command.
BENCH_OP := $(BIN)/involution bench op --device cpu --backends reference torch cpu \
	--baselines depthwise --passes forward forward+backward

bench: $(STAMP)
	$(BENCH_OP)
	$(BENCH_OP) --channels-last

bench-gpu: $(STAMP)
	$(BIN)/python benchmarks/bench_gpu.py

clean:
	rm -rf $(VENV) build dist .pytest_cache .mypy_cache .ruff_cache runs
