# The two commands of the README: `make run` and `make test`. Both set up .venv first if needed.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: run test chat bench clean

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

test: $(VENV)/.installed
	$(BIN)/python -m pytest $(ARGS)

bench: $(VENV)/.installed
	$(BIN)/python benchmarks/throughput.py
	$(BIN)/python benchmarks/image_intake.py
	$(BIN)/python benchmarks/load.py

clean:
	rm -rf $(VENV) *.egg-info
