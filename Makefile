# tumorbench: `make bench` and `make test` set everything up on a fresh machine.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
export TUMORBENCH_CACHE ?= $(CURDIR)/.cache
export TF_CPP_MIN_LOG_LEVEL ?= 2

BACKBONES ?=
DATA ?=
CONFIG ?= configs/quick.toml
WEIGHTS ?=
SOURCE ?= bench

bench_args = $(if $(BACKBONES),--backbones $(BACKBONES)) $(if $(DATA),--data $(DATA)) \
             --config $(CONFIG) $(if $(WEIGHTS),--weights $(WEIGHTS))

.PHONY: install test bench report ui check-data clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -e '.[hed,test]'
	touch $@

install: $(VENV)/.installed

test: install
	$(PY) -m pytest -q

bench: install
	$(PY) -m benchmark bench $(bench_args)

report: install
	$(PY) -m benchmark report --source $(SOURCE) $(if $(DATA),--data $(DATA)) --config $(CONFIG)

check-data: install
	$(PY) -m benchmark check-data $(DATA)

ui: install
	$(VENV)/bin/mlflow ui --host 127.0.0.1 --port 5000 --backend-store-uri sqlite:///results/mlflow.db

clean:
	rm -rf $(VENV) .cache .pytest_cache
