# The two commands of the README: `make run` and `make test`. Both set up .venv first if needed.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: run test lint postgres bench clean

# torch is installed first and pinned: 2.13.0 is the CPU build this project tests with. A GPU
# machine keeps the CUDA build it already has in the venv (the range in pyproject.toml admits it).
$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check --upgrade pip
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install --quiet --disable-pip-version-check "torch==2.13.0"
	$(BIN)/pip install --quiet --disable-pip-version-check -e ".[test]"
	touch $@

run: $(VENV)/.installed
	$(BIN)/idefics-bot run $(ARGS)

# The PostgreSQL store's tests start a throwaway server of their own (tests/postgres.py) from the
# programs of Debian's postgresql package, installed here when missing.
postgres:
	@ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || command -v initdb >/dev/null || { \
	    echo "Installing Debian's postgresql package for the tests ..."; \
	    $(SUDO) apt-get update -qq && \
	    $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends postgresql >/dev/null; }

# The linters CI runs before the tests (installed with the test extras).
lint: $(VENV)/.installed
	$(BIN)/python -m ruff check bot model adapters
	$(BIN)/python -m mypy bot model adapters

test: $(VENV)/.installed postgres
	$(BIN)/python -m pytest $(ARGS)

bench: $(VENV)/.installed postgres
	$(BIN)/python benchmarks/mixed_load.py
	$(BIN)/python benchmarks/throughput.py
	$(BIN)/python benchmarks/image_intake.py
	$(BIN)/python benchmarks/load.py
	$(BIN)/python benchmarks/adoption.py

clean:
	rm -rf $(VENV) *.egg-info
