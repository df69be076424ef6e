# Entry points for a fresh machine: `make quickstart` trains the example forest on this CPU,
# `make test` lints and tests; both create .venv and install what they need first.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: test lint typecheck pytest install clean quickstart

install: $(STAMP)

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	# The CPU torch wheel first and pinned exactly, so no dependency can pull a CUDA build.
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[trainer,operator,local,dev]'
	touch $(STAMP)

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

typecheck: $(STAMP)
	$(VENV)/bin/mypy

pytest: $(STAMP)
	$(VENV)/bin/pytest

test: lint typecheck pytest

# A whole forest (tokenizer, seed, four experts, report) on this machine's CPU, in minutes.
quickstart: $(STAMP)
	$(VENV)/bin/elmforest up -f examples/quickstart/

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
