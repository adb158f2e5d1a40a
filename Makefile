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
TRIALS ?=
STORAGE ?=
WORKERS ?= 1
FOLDS ?=
ONLY_FOLDS ?=
AGAINST ?=
TEST_WORKERS ?= auto

bench_args = $(if $(BACKBONES),--backbones $(BACKBONES)) $(if $(DATA),--data $(DATA)) \
             --config $(CONFIG) $(if $(WEIGHTS),--weights $(WEIGHTS))

sweep_args = $(bench_args) $(if $(TRIALS),--trials $(TRIALS)) $(if $(STORAGE),--storage $(STORAGE)) \
             --workers $(WORKERS)

.PHONY: install test bench sweep perf report ui dashboard audit check-data docs leaderboard clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -e '.[hed,test]'
	touch $@

install: $(VENV)/.installed

# On every core (pytest-xdist); TEST_WORKERS=0 runs the tests in this one process.
test: install
	$(PY) -m pytest -q -n $(TEST_WORKERS)

# FOLDS=5 cross-validates: mean and 95% CI per metric, paired comparisons on out-of-fold predictions.
# ONLY_FOLDS=1,2 trains and scores only those folds now; a later run without it reuses them.
bench: install
	$(PY) -m benchmark bench $(bench_args) $(if $(FOLDS),--folds $(FOLDS)) \
	  $(if $(ONLY_FOLDS),--set data.only_folds=[$(ONLY_FOLDS)])

# WORKERS=N starts N local workers on one study (needs STORAGE=postgresql://...); worker 0 opens it.
sweep: install
	@pids=""; for i in $$(seq 0 $$(($(WORKERS) - 1))); do \
	  $(PY) -m benchmark sweep $(sweep_args) --worker $$i & pids="$$pids $$!"; sleep 1; done; \
	rc=0; for p in $$pids; do wait $$p || rc=1; done; exit $$rc

# A benchmark script, not a test: configs/four-class-fast.toml timed stage by stage, cold, warm and the
# seeds' way (results/perf.md; DATA= another 4-class folder). QUICK=1 for a small smoke run.
# YES_NO=1: vgg16 on the yes/no set, a sweep, inference (results/perf-yes-no.md; PERF_ARGS="--weights hed").
# MEMORY=path/to/4-class/Training: peak memory of a 224 px bench instead (results/perf-memory.md).
perf: install
	$(PY) -m benchmark perf $(if $(QUICK),--quick) $(if $(DATA),--data $(DATA)) $(if $(YES_NO),--yes-no) \
	  $(if $(MEMORY),--memory $(MEMORY)) $(PERF_ARGS)

report: install
	$(PY) -m benchmark report --source $(SOURCE) $(if $(DATA),--data $(DATA)) $(if $(RUNS),--runs $(RUNS)) --config $(CONFIG)

# Exact and near-duplicate images within and across classes and splits: results/<data set>/audit.md.
audit: install
	$(PY) -m benchmark audit $(or $(DATA),$(error give DATA=path/to/data)) $(if $(AGAINST),--against $(AGAINST))

# results/README.md and the README's leaderboard, from results/leaderboard.toml and the committed CSVs.
leaderboard: install
	$(PY) -m benchmark leaderboard

check-data: install
	$(PY) -m benchmark check-data $(DATA)

# Prints each data set's runs-table address (MLflow 3's UI otherwise opens on its GenAI overview).
ui: install
	$(PY) -m benchmark ui --host 127.0.0.1 --port 5000

dashboard: install
	$(VENV)/bin/pip install -q 'optuna-dashboard>=0.15'
	$(VENV)/bin/optuna-dashboard --host 127.0.0.1 --port 8080 $(or $(STORAGE),sqlite:///results/optuna.db)

# The documentation site (docs/ + an API reference from docstrings) into site/; --strict: a broken
# link or a page missing from the nav fails the build.
docs: install
	$(VENV)/bin/pip install -q -e '.[docs]'
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict

clean:
	rm -rf $(VENV) .cache .pytest_cache site
