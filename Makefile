# Everything installs into a project venv from scratch; TORCH picks the torch build (CPU wheel by default;
# e.g. `make demo TORCH=torch` on a CUDA machine).
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

LIBERO_VENV ?= .venv-libero
LIBERO_STAMP := $(LIBERO_VENV)/.installed

.PHONY: install libero demo test test-slow bench lint format clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH)"
	$(PY) -m pip install --quiet -e ".[dev,sim,fuzz]"
	$(PY) -m pip install --quiet --no-deps "robosuite==1.5.2"
	touch $(STAMP)

install: $(STAMP)

# LIBERO pins robosuite 1.4 and an old MuJoCo, so its node gets its own venv (torch-free, ~2 GB with the
# scene assets, ~2 min). The tests drive it from the main venv.
$(LIBERO_STAMP): scripts/make_libero_venv.sh scripts/libero-requirements.txt scripts/libero-constraints.txt
	bash scripts/make_libero_venv.sh $(LIBERO_VENV)

libero: $(LIBERO_STAMP)

# MuJoCo renders headless through EGL (Mesa on the CPU when there is no GPU).
export MUJOCO_GL ?= egl

demo: $(STAMP)
	HF_HUB_OFFLINE=1 $(VENV)/bin/vla-steer demo --out demo_out

test: $(STAMP) $(LIBERO_STAMP)
	HF_HUB_OFFLINE=1 VLA_STEER_LIBERO_PYTHON=$(LIBERO_VENV)/bin/python $(PY) -m pytest

# Slower tests (inductor compilation, more robosuite tasks, a LIBERO env check); CI runs them too.
test-slow: $(STAMP) $(LIBERO_STAMP)
	HF_HUB_OFFLINE=1 VLA_STEER_LIBERO_PYTHON=$(LIBERO_VENV)/bin/python $(PY) -m pytest -m slow

# Each benchmark writes benchmarks/results/<name>.json (or under --out DIR). BENCH_ARGS=--quick for a smoke run;
# transport_rtt builds a side venv for openpi-client (it needs numpy < 2) on first use.
bench: $(STAMP)
	$(PY) benchmarks/steering_overhead.py $(BENCH_ARGS)
	$(PY) benchmarks/projection_throughput.py $(BENCH_ARGS)
	$(PY) benchmarks/transport_rtt.py $(BENCH_ARGS)
	$(PY) benchmarks/sim_overhead.py $(BENCH_ARGS)
	$(PY) benchmarks/demo_render.py $(BENCH_ARGS)
	$(PY) benchmarks/eval_throughput.py $(BENCH_ARGS)
	$(PY) benchmarks/openvla_step.py $(BENCH_ARGS)
	$(PY) benchmarks/pi0_step.py $(BENCH_ARGS)
	$(PY) benchmarks/pi0fast_step.py $(BENCH_ARGS)
	$(PY) benchmarks/pi05_step.py $(BENCH_ARGS)
	$(PY) benchmarks/servo_loop.py $(BENCH_ARGS)
	$(PY) benchmarks/node_soak.py $(BENCH_ARGS)
	$(PY) benchmarks/batched_infer.py $(BENCH_ARGS)

lint: $(STAMP)
	$(VENV)/bin/lint-imports
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: $(STAMP)
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

clean:
	rm -rf $(VENV) $(LIBERO_VENV) demo_out .pytest_cache .ruff_cache
