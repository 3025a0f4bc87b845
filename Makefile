# Set-up commands: `make demo` runs the pipeline end to end, `make test` runs the tests.
# Both create .venv with pinned versions on first use and reuse it afterwards.

PYTHON ?= python3
VENV ?= .venv
# cpu or cuda; cuda is picked when nvidia-smi is on PATH.
DEVICE ?= $(shell command -v nvidia-smi >/dev/null 2>&1 && echo cuda || echo cpu)
REQUIREMENTS = requirements/$(if $(filter cuda,$(DEVICE)),gpu,cpu).txt
STAMP = $(VENV)/.installed-$(DEVICE)
PY = $(VENV)/bin/python
PYTEST_ARGS ?=

.PHONY: demo test venv java clean

java:
	@scripts/check-java

$(STAMP): pyproject.toml $(REQUIREMENTS) requirements/torchrec.txt
	@scripts/check-java
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade "pip>=24"
	$(PY) -m pip install --quiet -r $(REQUIREMENTS)
	$(PY) -m pip install --quiet --no-deps -r requirements/torchrec.txt
	$(PY) -m pip install --quiet --no-deps --no-build-isolation -e .
	rm -f $(VENV)/.installed-*
	touch $@

venv: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/valuerank demo --out runs/demo

test: $(STAMP)
	$(PY) -m pytest $(PYTEST_ARGS) tests

clean:
	rm -rf runs .pytest_cache
