# recframe: `make demo` trains DLRM on built-in data, `make test` runs every test.
# Both set up .venv first when needed; set-up is idempotent and near-instant
# once done (a stamp file records the requirement files it was built from).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.recframe-setup
REQS := requirements/cpu.txt requirements/torchrec.txt pyproject.toml

.PHONY: setup demo test lint bench clean

setup: $(STAMP)

$(STAMP): $(REQS)
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -r requirements/cpu.txt
	$(BIN)/python -m pip install -q --no-deps -r requirements/torchrec.txt
	$(BIN)/python -m pip install -q --no-deps --no-build-isolation -e .
	@touch $(STAMP)

demo: setup
	$(BIN)/recframe train --output_dir output/demo

test: setup
	$(BIN)/python -m ruff check recframe tests benchmarks
	$(BIN)/python -m pytest -q tests

bench: setup
	$(BIN)/python benchmarks/trainer_overhead.py

clean:
	rm -rf $(VENV) output
