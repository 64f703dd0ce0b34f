# Every target runs tools from the project's own virtual environment, so a fresh machine needs
# only python3 (3.11+) and make.
VENV ?= .venv
PY := $(VENV)/bin/python
BIN := $(VENV)/bin
PROTO_FILES := $(wildcard protos/crm/v1/*.proto)


.PHONY: deploy-check setup test test-unit test-integration test-e2e lint typecheck protos protos-check buf-lint run down bench ci clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints.txt
	python3 -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip==26.3
	$(BIN)/pip install --quiet -c constraints.txt -e '.[dev]'
	touch $@

test: setup
	$(BIN)/pytest -q

test-unit: setup
	$(BIN)/pytest -q -m unit

test-integration: setup
	$(BIN)/pytest -q -m integration

test-e2e: setup
	$(BIN)/pytest -q -m e2e

lint: setup buf-lint
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: setup
	$(BIN)/mypy shared services gateway cli

buf-lint: setup
	PATH=$(BIN):$$PATH buf lint

protos: setup
	$(PY) scripts/gen_protos.py crm/v1

protos-check: setup
	$(PY) scripts/gen_protos.py --check crm/v1

run: setup
	$(BIN)/crm up

down: setup
	$(BIN)/crm down

bench: setup
	$(BIN)/pip install --quiet -c constraints.txt -e '.[bench]'
	$(PY) -m bench $(BENCH_ARGS)

deploy-check:
	bash deploy/checkov.sh

clean:
	rm -rf $(VENV) .crm .pytest_cache .mypy_cache .ruff_cache
