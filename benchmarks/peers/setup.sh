#!/usr/bin/env bash
# The peer libraries of benchmarks/step_time.py (JAX + jax_privacy, PyTorch + Opacus) in their own
# virtual environment, benchmarks/peers/.venv (or the directory given as the first argument).
# Never a dependency of tfdp_prune: only step_time.py's peer arms and check_dp.py use it.
#
#   bash benchmarks/peers/setup.sh            # PYTHON=python3.11 by default
#
# PyTorch is installed first and pinned, so that Opacus' requirement is met by it: an open range
# (or plain `torch`) can pull a multi-GB CUDA build. On the project's machines pip finds the CPU
# build of torch 2.13.0 as a local wheel; elsewhere pass pip the options that select a CPU build
# in TORCH_PIP_ARGS (e.g. PyTorch's CPU package index).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
venv="${1:-$here/.venv}"
python="${PYTHON:-python3.11}"

start=$(date +%s)
"$python" -m venv "$venv"
"$venv/bin/python" -m pip install --quiet --upgrade pip
# shellcheck disable=SC2086  # TORCH_PIP_ARGS is a list of options
"$venv/bin/python" -m pip install --quiet ${TORCH_PIP_ARGS:-} "torch==2.13.0"
"$venv/bin/python" -m pip install --quiet -r "$here/requirements.txt"
"$venv/bin/python" - <<'PY'
import jax, jax_privacy, opacus, optax, torch
print(f"jax {jax.__version__} ({jax.default_backend()}), jax_privacy {jax_privacy.__version__}, "
      f"optax {optax.__version__}, torch {torch.__version__} (CUDA: {torch.version.cuda}), "
      f"opacus {opacus.__version__}")
PY
echo "peers environment: $venv ($(du -sh "$venv" | cut -f1), $(( $(date +%s) - start )) s)"
