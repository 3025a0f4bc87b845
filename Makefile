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
# Second environment for the petastorm reader: petastorm 0.12.1 needs pyarrow < 15.
PETASTORM_VENV ?= .venv-petastorm
PETASTORM_STAMP = $(PETASTORM_VENV)/.installed
PETASTORM_TESTS = tests/test_petastorm.py

.PHONY: demo test venv petastorm-venv java clean

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

# The project is put on PYTHONPATH rather than installed, because its metadata asks for the
# pyarrow, numpy and pandas versions of the main environment.
$(PETASTORM_STAMP): requirements/petastorm.txt requirements/torchrec.txt
	@scripts/check-java
	test -x $(PETASTORM_VENV)/bin/python || $(PYTHON) -m venv $(PETASTORM_VENV)
	$(PETASTORM_VENV)/bin/python -m pip install --quiet --upgrade "pip>=24"
	$(PETASTORM_VENV)/bin/python -m pip install --quiet -r requirements/petastorm.txt
	$(PETASTORM_VENV)/bin/python -m pip install --quiet --no-deps -r requirements/torchrec.txt
	touch $@

petastorm-venv: $(PETASTORM_STAMP)

demo: $(STAMP)
	$(VENV)/bin/valuerank demo --out runs/demo

test: $(STAMP) $(PETASTORM_STAMP)
	$(PY) -m pytest $(PYTEST_ARGS) tests
	PYTHONPATH=$(CURDIR) $(PETASTORM_VENV)/bin/python -m pytest -p no:cacheprovider $(PYTEST_ARGS) $(PETASTORM_TESTS)

clean:
	rm -rf runs .pytest_cache
