# Two entry points, both idempotent and quick when everything is installed:
#   make demo   set up, then run the whole pipeline on Fashion-MNIST
#   make test   set up, then run the test suite
#   make lint   set up, then check formatting and lint (ruff)
VENV   ?= .venv
PYTHON ?= python3
PY      = $(VENV)/bin/python
FADRM   = $(VENV)/bin/fadrm
STAMP   = $(VENV)/.fadrm-installed
FMNIST  = /usr/share/datasets/fashion-mnist
RUNS   ?= runs

.PHONY: setup demo test lint clean-venv

setup: $(STAMP) $(FMNIST)

$(FMNIST):
	apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test,plots,lint]'
	touch $(STAMP)

demo: setup
	$(FADRM) run --dataset fashion-mnist --ipc 10 --method fadrm --repeats 2 --jobs auto --out $(RUNS)/demo

test: setup
	$(PY) -m pytest -q

lint: setup
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/ruff check .

clean-venv:
	rm -rf $(VENV)
