# Everything installs into a project venv from scratch; TORCH picks the torch build (CPU wheel by default;
# e.g. `make demo TORCH=torch` on a CUDA machine).
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install demo test test-slow bench lint format clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH)"
	$(PY) -m pip install --quiet -e ".[dev,sim]"
	$(PY) -m pip install --quiet --no-deps "robosuite==1.5.2"
	touch $(STAMP)

install: $(STAMP)

# MuJoCo renders headless through EGL (Mesa on the CPU when there is no GPU).
export MUJOCO_GL ?= egl

demo: $(STAMP)
	HF_HUB_OFFLINE=1 $(VENV)/bin/vla-steer demo --out demo_out

test: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) -m pytest

# Slower tests (real inductor compilation); CI runs them after the default suite.
test-slow: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) -m pytest -m slow

# Each benchmark writes benchmarks/results/<name>.json (or under --out DIR). BENCH_ARGS=--quick for a smoke run;
# transport_rtt builds a side venv for openpi-client (it needs numpy < 2) on first use.
bench: $(STAMP)
	$(PY) benchmarks/steering_overhead.py $(BENCH_ARGS)
	$(PY) benchmarks/projection_throughput.py $(BENCH_ARGS)
	$(PY) benchmarks/transport_rtt.py $(BENCH_ARGS)
	$(PY) benchmarks/sim_overhead.py $(BENCH_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: $(STAMP)
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

clean:
	rm -rf $(VENV) demo_out .pytest_cache .ruff_cache
