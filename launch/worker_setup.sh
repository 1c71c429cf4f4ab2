#!/usr/bin/env bash
# Runs on one machine (each TPU VM worker, via launch/tpu_setup.sh): creates .venv in this checkout
# with Python >= 3.11 (a standalone build through uv where the image has only 3.10) and installs
# easyppo with the Hugging Face extras and the TPU build of JAX.
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

# jax and flax need Python >= 3.11 (setup.py's python_requires). EASYPPO_PYTHON names an interpreter;
# otherwise python3 if it is new enough, else the newest python3.1x >= 3.11 on the PATH.
find_python() {
  local candidate
  for candidate in ${EASYPPO_PYTHON:-} python3 python3.13 python3.12 python3.11; do
    if command -v "$candidate" > /dev/null 2>&1 &&
      "$candidate" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2> /dev/null; then
      echo "$candidate"
      return 0
    fi
  done
  return 1
}

if [[ ! -x $venv/bin/python ]]; then
  if python=$(find_python); then
    # Ubuntu images ship python3 without the venv module; TPU VM users have passwordless sudo.
    "$python" -m venv "$venv" 2> /dev/null || {
      sudo apt-get update -qq && sudo apt-get install -y -qq "$(basename "$python")-venv" && "$python" -m venv "$venv"
    }
  else
    # The TPU VM images (tpu-ubuntu2204-base, v2-alpha-tpuv5-lite) ship Python 3.10: take a standalone
    # CPython 3.11 build through uv, which needs neither root nor a PPA.
    echo "$host: no Python >= 3.11 on the PATH; installing CPython 3.11 with uv" >&2
    python3 -m pip install --quiet --user uv
    "$HOME/.local/bin/uv" venv --quiet --seed --python 3.11 "$venv"
  fi
fi
"$venv/bin/python" -m pip install --quiet --upgrade pip
"$venv/bin/python" -m pip install --quiet -e "${repo}[hf,gcs]" "jax[$jax_extra]$jax_range" "$@"
echo "$host: $("$venv/bin/python" -c 'import jax, easyppo; print("jax", jax.__version__, "easyppo", easyppo.__file__)')"
