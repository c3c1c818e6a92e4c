# Two commands: `make demo` and `make test`. Both create .venv on first use.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip

.PHONY: demo test lint bench bundle clean

$(VENV)/.installed: requirements.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	# The CPU build of torch lies on disk here; installing it first keeps the ranges below from pulling CUDA.
	$(PIP) install --quiet torch==2.13.0
	$(PIP) install --quiet -r requirements.txt
	$(PIP) install --quiet --no-deps -e .
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed requirements-test.txt
	$(PIP) install --quiet -r requirements-test.txt
	touch $@

demo: $(VENV)/.installed
	$(PY) -m kagglekd demo

test: $(VENV)/.installed-test
	$(PY) -m pytest -q

lint: $(VENV)/.installed-test
	$(PY) -m ruff check kagglekd tests bench tools
	$(PY) -m ruff format --check kagglekd tests bench tools

bench: $(VENV)/.installed-test
	$(PY) -m pip install --quiet -r bench/requirements.txt
	$(PY) bench/run_all.py

clean:
	rm -rf $(VENV) .pytest_cache runs

# Regenerate the committed kernel folder after changing the package (a test fails while it is stale).
bundle: $(VENV)/.installed
	$(PY) -m kagglekd bundle --owner your-kaggle-username --out kaggle_kernel
