# uncurl: `make demo` prunes a built-in tiny SMoE on RTE, offline; `make test` runs the tests.
PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin
DATA   ?= ../shared/data
export HF_HUB_OFFLINE ?= 1
export HF_DATASETS_OFFLINE ?= 1

.PHONY: setup demo test bench clean

setup: $(VENV)/.installed

# torch first, pinned: on a CPU machine this takes the CPU wheel; the package's own range is then
# already satisfied, so nothing pulls a CUDA build. constraints.txt pins what CI tested.
$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -c constraints.txt -e '.[test,testbed]'
	touch $@

demo: setup
	$(BIN)/uncurl prune --model builtin:mixtral --task superglue-rte --keep 4 \
		--data-dir $(DATA) --samples 64 --out runs/demo --overwrite

test: setup
	$(BIN)/python -m pytest

bench: setup
	$(BIN)/python -m benchmarks.run $(BENCH_ARGS)

clean:
	rm -rf runs .pytest_cache
