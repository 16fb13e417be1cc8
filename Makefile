# `make demo` and `make test` each work on a fresh machine: they create .venv
# and install everything first. torch is pinned so pip takes the CPU wheel, and
# held there (constraints.txt) while packages that depend on it are installed.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp

.PHONY: demo test bench clean

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -c constraints.txt -e '.[dev,ray,hf,lightning]'
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m bench demo

test: $(STAMP)
	$(PY) -m pytest -q

bench: $(STAMP)
	$(PY) -m bench fork --json bench-results/fork.json

clean:
	rm -rf $(VENV) demo-repo .pytest_cache .hypothesis
