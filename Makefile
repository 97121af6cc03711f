# Every target makes .venv first when it is missing, so a fresh clone needs only `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: venv test test-floors lint format train bench clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[dev,viz]"
	touch $(STAMP)

lint: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports  # pyproject.toml's contracts: commands -> train -> nn -> kernels, light kernels

format: venv
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

test: lint
	$(BIN)/python -m pytest -q -n auto  # one worker per core: compiles are single-threaded

# The lowest declared version of every dependency, in a venv of its own (.venv-floors).
test-floors:
	bash .ci/floors.sh

train: venv
	$(BIN)/python train.py --config configs/tiny.yaml

# The benchmark's optional peers (torch, tokamax) are installed here only, never by test/train.
bench: venv
	$(BIN)/python -m pip install --quiet -e ".[bench]"
	$(BIN)/python benchmarks/attention.py

clean:
	rm -rf $(VENV) .venv-floors .pytest_cache .ruff_cache .hypothesis .import_linter_cache
