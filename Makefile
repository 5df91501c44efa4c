# Every target sets itself up: a fresh machine needs only python3 (>= 3.11).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp

.PHONY: demo test sim bench proto lint clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m dcsim.demo

test: $(STAMP)
	$(PY) -m pytest $(PYTEST_ARGS)

# The deterministic simulation: SEED=<n> replays one seed; without it, SEEDS seeds from a random start.
STEPS ?= 300
SEEDS ?= 1000
sim: $(STAMP)
	PYTHONPATH=tests $(PY) -m sim.run --steps $(STEPS) $(if $(SEED),--seed $(SEED),--seeds $(SEEDS))

bench: $(STAMP)
	$(PY) -m mlchat.bench
	$(PY) -m mlchat.bench_processes
	$(PY) -m dcsim.bench
	$(PY) -m dcsim.bench_replication

proto: $(STAMP)
	$(PY) -m mlchat.protoc

lint: $(STAMP)
	$(VENV)/bin/ruff check mlchat tests dc-sim

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
