# Two commands do all the set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# torch is pinned here (not in pyproject) so these CPU machines take the local CPU build;
# GPU users install their own CUDA build and the package's range accepts it.
TORCH_PIN ?= torch==2.13.0
STAMP := $(VENV)/.chatvec-installed

.PHONY: demo test bench clean

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check "$(TORCH_PIN)"
	$(PY) -m pip install --quiet --disable-pip-version-check -e ".[dev]"
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q

demo: $(STAMP)
	$(VENV)/bin/chatvec demo --out demo-out

bench: $(STAMP)
	$(PY) bench/merge.py --workers 0,1,2 --repeats 5
	$(PY) bench/eval.py

clean:
	rm -rf demo-out .pytest_cache
