# recframe: `make demo` trains DLRM on built-in data and exports it for serving,
# `make test` runs every test.
# Both set up .venv first when needed; set-up is idempotent and near-instant
# once done (a stamp file records the requirement files it was built from).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.recframe-setup
REQS := requirements/cpu.txt requirements/dev.txt requirements/torchrec.txt pyproject.toml

.PHONY: setup demo test lint docs bench clean

setup: $(STAMP)

$(STAMP): $(REQS)
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -r requirements/cpu.txt -r requirements/dev.txt
	$(BIN)/python -m pip install -q --no-deps -r requirements/torchrec.txt
	$(BIN)/python -m pip install -q --no-deps --no-build-isolation -e .
	@touch $(STAMP)

demo: setup
	$(BIN)/recframe train --output_dir output/demo
	$(BIN)/recframe export output/demo output/demo/model-int8.pt2 --quantize int8

test: setup
	$(BIN)/python -m ruff check recframe tests benchmarks
	$(BIN)/python -m pytest -q tests

lint: setup
	$(BIN)/python -m ruff check recframe tests benchmarks

# the API reference, generated from the docstrings; fails on a broken reference
docs: setup
	$(BIN)/python docs/api_reference.py build/api

bench: setup
	$(BIN)/python benchmarks/trainer_overhead.py

clean:
	rm -rf $(VENV) output build

# The XLA lane: .venv-xla holds the TPU stack (requirements/xla.txt: torch-xla with
# its own torch) beside the rest of requirements/cpu.txt; `make test-xla` runs the
# tests marked xla on torch-xla's CPU client (PJRT_DEVICE=CPU). Idempotent like setup.
XLA_VENV := .venv-xla
XLA_BIN := $(XLA_VENV)/bin
XLA_STAMP := $(XLA_VENV)/.recframe-setup
XLA_REQS := requirements/xla.txt requirements/cpu.txt requirements/dev.txt pyproject.toml
XLA_PINNED := torch|torch-xla|fbgemm-gpu-cpu|tensordict|torchmetrics|torchrec

.PHONY: setup-xla test-xla

setup-xla: $(XLA_STAMP)

$(XLA_STAMP): $(XLA_REQS)
	@test -x $(XLA_BIN)/python || $(PYTHON) -m venv $(XLA_VENV)
	$(XLA_BIN)/python -m pip install -q --upgrade pip "setuptools>=77"
	sed -n '/^torchrec/q;/^[a-z]/p' requirements/xla.txt > $(XLA_VENV)/constraints.txt
	grep -vE '^($(XLA_PINNED))([<>=!~ ]|$$)' requirements/cpu.txt > $(XLA_VENV)/cpu-rest.txt
	$(XLA_BIN)/python -m pip install -q -c $(XLA_VENV)/constraints.txt \
		-r $(XLA_VENV)/constraints.txt -r $(XLA_VENV)/cpu-rest.txt -r requirements/dev.txt
	$(XLA_BIN)/python -m pip install -q --no-deps $$(grep -E '^torchrec' requirements/xla.txt)
	$(XLA_BIN)/python -m pip install -q --no-deps --no-build-isolation -e .
	@touch $(XLA_STAMP)

test-xla: setup-xla
	PJRT_DEVICE=CPU $(XLA_BIN)/python -m pytest -q -m xla tests
