# Two entry points: `make run` and `make test`. Both bootstrap .venv first.
PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.installed
CORES ?= 2
CONFIG ?= config/experiments/demo.yaml

.PHONY: run test venv clean bench lint

venv: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install --quiet --upgrade pip "setuptools>=68" wheel
	$(VENV)/bin/python -m pip install --quiet -e ".[test,bench]"
	@touch $(STAMP)

run: $(STAMP)
	@$(VENV)/bin/python -m skystack.core.config $(CONFIG)
	$(VENV)/bin/snakemake --profile profiles/default --cores $(CORES) --configfile $(CONFIG)
	@$(VENV)/bin/snakemake --profile profiles/default --cores $(CORES) --configfile $(CONFIG) --quiet all \
	  --report $$($(VENV)/bin/python -m skystack.report.summary --configfile $(CONFIG) --report-path)
	@$(VENV)/bin/python -m skystack.report.summary --configfile $(CONFIG)

# Two workers: the machine's second core is otherwise idle in single-threaded tests and while
# Slurm jobs wait; the tests that share the session's tiny run, Slurm's among them, stay on one
# worker (conftest.py).
TEST_WORKERS ?= 2
test: $(STAMP)
	$(VENV)/bin/python -m pytest -n $(TEST_WORKERS) --dist loadgroup tests

# snakefmt, then Snakemake's linter, also under the Slurm profile (its set-resources choose the
# GPU rules' conda environments when the workflow is parsed).
lint: $(STAMP)
	$(VENV)/bin/snakefmt --check workflow/Snakefile workflow/rules
	$(VENV)/bin/snakemake --lint
	$(VENV)/bin/snakemake --lint --profile profiles/slurm

bench: $(STAMP)
	$(VENV)/bin/python -m benchmarks.run_all

clean:
	rm -rf results cache logs .snakemake
