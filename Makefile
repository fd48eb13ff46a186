# Two commands a new user needs: `make run` (the experiment) and `make test` (the suite).
# Both install what they need into .venv first (idempotent: a stamp file records the lock).
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
# `make run`: the main experiment, AutoNPO against its GRPO baseline from one warm-up.
CONFIGS ?= configs/toy_grpo.yaml configs/toy_autonpo.yaml
# Keep torch on the cores this machine has; tests pin their own thread count.
export OMP_NUM_THREADS ?= 2
export TOKENIZERS_PARALLELISM := false
export HF_HUB_OFFLINE := 1

.PHONY: install run test lint format bench lock clean services compile

install: $(STAMP)

$(STAMP): requirements.lock pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -qq -r requirements.lock
	$(PY) -m pip install -qq --no-deps --no-build-isolation -e .
	touch $(STAMP)

run: install
	$(VENV)/bin/npo compare $(CONFIGS) --name toy-comparison --threshold 0.8

test: install
	$(PY) -m pytest -q

lint: install
	$(VENV)/bin/ruff check src tests bench
	$(VENV)/bin/ruff format --check src tests bench

format: install
	$(VENV)/bin/ruff format src tests bench
	$(VENV)/bin/ruff check --fix src tests bench

bench: install
	$(PY) bench/throughput.py

# Local S3 (SeaweedFS) + PostgreSQL + MLflow server on 127.0.0.1, state in .services/:
# prints the `export ...` lines that point `npo run` at them (also in .services/env.sh);
# Ctrl-C stops all three. `$(PY) -m npo.devservices --check` starts, verifies and stops.
services: install
	$(PY) -m npo.devservices

# Kubeflow pipeline YAML of every configs/*.yaml into pipelines/compiled/ (committed; a test
# fails when it is stale). `npo submit CONFIG --host URL` compiles and runs one on a cluster.
compile: install
	$(VENV)/bin/npo compile --out pipelines/compiled

# Re-resolve the pinned set from pyproject.toml (needs network to PyPI).
lock:
	rm -rf /tmp/npo-lock-venv && $(PYTHON) -m venv /tmp/npo-lock-venv
	/tmp/npo-lock-venv/bin/pip install -qq torch==2.13.0 -e ".[cluster,dev]"
	/tmp/npo-lock-venv/bin/pip freeze --exclude-editable --all | grep -v "^pip==" | sed 's/^torch==.*/torch==2.13.0/' > requirements.lock

clean:
	rm -rf $(VENV) runs .pytest_cache
