#!/usr/bin/env bash
# Runs on one machine (each TPU VM worker, via launch/tpu_setup.sh): creates .venv in this checkout
# and installs easyppo with the Hugging Face extras and the TPU build of JAX.
#
#   launch/worker_setup.sh [EXTRA_PIP_REQUIREMENT...]
#
# `jax[tpu]` is pinned to the range setup.py gives for jax, so pip resolves jax, jaxlib and libtpu
# versions that belong together. Set EASYPPO_JAX_EXTRA=cuda12 to install for NVIDIA GPUs instead.
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
venv=$repo/.venv
jax_extra=${EASYPPO_JAX_EXTRA:-tpu}
host=$(hostname)

jax_range=$(sed -n 's/^[[:space:]]*"jax\([<>=!~][^"]*\)".*/\1/p' "$repo/setup.py" | head -n 1)
if [[ -z $jax_range ]]; then
  echo "$host: error: no \"jax...\" requirement found in $repo/setup.py" >&2
  exit 1
fi

if [[ ! -x $venv/bin/python ]]; then
  # Ubuntu images ship python3 without the venv module; TPU VM users have passwordless sudo.
  python3 -m venv "$venv" 2>/dev/null || {
    sudo apt-get update -qq && sudo apt-get install -y -qq python3-venv && python3 -m venv "$venv"
  }
fi
"$venv/bin/python" -m pip install --quiet --upgrade pip
"$venv/bin/python" -m pip install --quiet -e "${repo}[hf]" "jax[$jax_extra]$jax_range" "$@"
echo "$host: $("$venv/bin/python" -c 'import jax, easyppo; print("jax", jax.__version__, "easyppo", easyppo.__file__)')"
