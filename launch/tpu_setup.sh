#!/usr/bin/env bash
# Puts easyppo and its Python dependencies on every worker of a Cloud TPU VM (one host or a pod slice).
#
#   launch/tpu_setup.sh TPU_NAME ZONE [LOCAL_PATH | GIT_URL]
#
# Where the code comes from (third argument):
#   * a local directory, by default the checkout this script belongs to: packed (without .git, .venv,
#     runs/ and caches), copied to every worker with `gcloud compute tpus tpu-vm scp --worker=all` and
#     unpacked into $EASYPPO_REMOTE_DIR, replacing the code there but keeping its .venv and runs/;
#   * a git URL: cloned into $EASYPPO_REMOTE_DIR on every worker, or fast-forwarded if already there.
# Then every worker runs launch/worker_setup.sh from that code: a virtualenv in .venv with
# `pip install -e .[hf,gcs]` (gs:// paths need gcsfs) and the `jax[tpu]` wheel in setup.py's jax version range.
#
# Run it again after changing the code: every worker must run the same version.
# Settings: EASYPPO_REMOTE_DIR, GCLOUD_FLAGS (see launch/lib.sh), and EASYPPO_PIP_EXTRA (more pip
# requirements for every worker, e.g. "torch wandb"; torch is needed only for .bin checkpoints).
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source-path=SCRIPTDIR source=lib.sh
source "$here/lib.sh"

usage() {
  cat >&2 <<USAGE
usage: $0 TPU_NAME ZONE [LOCAL_PATH | GIT_URL]
  Installs easyppo on every worker of the TPU VM TPU_NAME in ZONE.
  The code comes from LOCAL_PATH (default: $(dirname "$here")) or is cloned from GIT_URL.
USAGE
  exit 2
}

[[ $# -eq 2 || $# -eq 3 ]] || usage
tpu=$1 zone=$2 source=${3:-$(dirname "$here")}
pip_extra=${EASYPPO_PIP_EXTRA:-}

read -r -a pip_extra_words <<< "$pip_extra"
setup_cmd=$(quote_words bash launch/worker_setup.sh "${pip_extra_words[@]}")
dir_q=$(quote_words "$REMOTE_DIR")

if [[ -d $source ]]; then
  [[ -f $source/setup.py && -f $source/launch/worker_setup.sh ]] || die "$source is not an easyppo checkout"
  tarball=$(mktemp "${TMPDIR:-/tmp}/easyppo-src.XXXXXX")
  trap 'rm -f "$tarball"' EXIT
  tar -czf "$tarball" -C "$source" --exclude=./.git --exclude=./.venv --exclude=./runs \
    --exclude=./.jax_cache --exclude=./.pytest_cache --exclude=./.ruff_cache \
    --exclude='*.egg-info' --exclude=__pycache__ .
  remote_tarball=easyppo-src.tar.gz  # in each worker's home directory
  echo "copying $source ($(du -h "$tarball" | cut -f1)) to every worker of $tpu"
  copy_to_all_workers "$tpu" "$zone" "$tarball" "$remote_tarball"
  # Replace the code but keep the worker's virtualenv and any local run outputs.
  fetch="mkdir -p $dir_q && find $dir_q -mindepth 1 -maxdepth 1 ! -name .venv ! -name runs -exec rm -rf {} + \
&& tar -xzf $remote_tarball -C $dir_q && rm -f $remote_tarball"
elif [[ $source == *://* || $source =~ ^[^/]+@[^/:]+: ]]; then
  url_q=$(quote_words "$source")
  fetch="if [ -d $dir_q/.git ]; then git -C $dir_q pull --ff-only; else git clone $url_q $dir_q; fi"
else
  die "$source is neither a directory nor a git URL"
fi

echo "installing on every worker of $tpu (this takes a few minutes)"
on_workers "$tpu" "$zone" all "set -euo pipefail; $fetch; cd $dir_q; $setup_cmd"
echo "done: run training with launch/tpu_run.sh $tpu $zone -- --config=..."
