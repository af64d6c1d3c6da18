# difftune: `make demo` sets up and runs the demo; `make test` sets up and runs the tests.
PYTHON ?= python3
VENV   ?= .venv
# The CPU build on this machine. On a GPU machine: make setup TORCH="torch==2.13.0 --index-url ..." or a CUDA wheel.
TORCH  ?= torch==2.13.0
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.difftune-installed

.PHONY: setup demo test bench clean lock

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(TORCH)
	$(BIN)/python -m pip install -q -c constraints.txt -e ".[test]"
	touch $(STAMP)

demo: setup
	$(BIN)/difftune demo --out demo-out

# Two workers: tiny-model tests are bound by single-threaded Python, so two share two cores well
# (tests/conftest.py keeps torch at one thread per test process).
test: setup
	$(BIN)/python -m pytest -q -n 2 --dist worksteal

# Refresh constraints.txt from the current environment (torch is pinned by TORCH, not here).
lock:
	$(BIN)/python -m pip freeze --exclude-editable | grep -v -i '^torch==' > constraints.txt

clean:
	rm -rf demo-out .pytest_cache test-output
