# The two set-up commands of the README. Both install the pinned dependencies first (a no-op when present),
# so each works on a fresh machine on its own.
PYTHON ?= python3
CORES ?= 2

.PHONY: install run test lint

install:
	$(PYTHON) -m pip install --quiet torch==2.13.0
	$(PYTHON) -m pip install --quiet -e ".[test]"
	DS_BUILD_OPS=0 $(PYTHON) -m pip install --quiet --no-deps --no-build-isolation deepspeed==0.19.8

run: install
	snakemake --cores $(CORES)

test: install
	$(PYTHON) -m pytest -n $(CORES) --dist loadgroup

lint: install
	snakemake --lint
	snakemake --lint --configfile config/paper.yaml
	snakefmt --check Snakefile workflow/rules
