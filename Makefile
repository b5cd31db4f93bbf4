# The two commands of the README: `make run` and `make test`. Both set up .venv first if needed.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: run test lint postgres chromium screenshot bench clean

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

# The linters CI runs before the tests, the import contracts among them (installed with the test extras).
lint: $(VENV)/.installed
	$(BIN)/python -m ruff check ground model bot adapters tests benchmarks
	$(BIN)/python -m mypy ground model bot adapters
	$(BIN)/lint-imports  # the floors: contracts in pyproject.toml

# The web chat's tests open it in Debian's headless chromium (driven by Playwright from PyPI, which
# downloads no browser of its own here), installed here when missing.
chromium:
	@test -x /usr/bin/chromium || { \
	    echo "Installing Debian's chromium package for the browser tests ..."; \
	    $(SUDO) apt-get update -qq && \
	    $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium fonts-liberation >/dev/null; }

test: $(VENV)/.installed postgres chromium
	$(BIN)/python -m pytest $(ARGS)

# The README's picture of the web chat, taken by its browser test.
screenshot: $(VENV)/.installed chromium
	SCREENSHOTS=docs $(BIN)/python -m pytest -q tests/test_web_browser.py -k restart

bench: $(VENV)/.installed postgres
	$(BIN)/python benchmarks/mixed_load.py
	$(BIN)/python benchmarks/throughput.py
	$(BIN)/python benchmarks/image_intake.py
	$(BIN)/python benchmarks/load.py
	$(BIN)/python benchmarks/adoption.py

clean:
	rm -rf $(VENV) *.egg-info
