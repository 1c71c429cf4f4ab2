#!/usr/bin/env bash
# Starts the same `python -m easyppo.train ...` on every worker of a Cloud TPU VM pod slice at once.
#
#   launch/tpu_run.sh TPU_NAME ZONE [-e NAME=VALUE]... -- TRAIN_ARGS...
#
# e.g. launch/tpu_run.sh my-v4-64 us-central2-b -e HF_HOME=/mnt/disk/hf -- \
#        --config=configs/dpo.py:tulu25_13b_uf_mean --config.output_dir=gs://my-bucket/dpo13b \
#        --config.model.init_from=/mnt/disk/tulu-2-13b
#
# Each worker runs launch/worker_start.sh from its copy of the code (put there by tpu_setup.sh), which
# starts the trainer detached and returns: the run survives the end of this command. Per-worker logs
# are in ~/easyppo-runs/RUN_ID/HOSTNAME.log on each worker; follow them with launch/tpu_logs.sh and
# stop the run with launch/tpu_stop.sh (SIGTERM: it checkpoints, and the same command resumes it).
#
# Environment on the workers: EASYPPO_DISTRIBUTED=always, so every process calls
# jax.distributed.initialize(), which finds the other workers through the TPU metadata server; plus
# every -e NAME=VALUE. Settings here: EASYPPO_RUN_ID (default: the UTC time), EASYPPO_REMOTE_DIR and
# GCLOUD_FLAGS (see launch/lib.sh).
#
# Every worker must see the same output directory: checkpoints are written by all hosts together.
# Use a gs:// bucket (or a file system mounted on every worker), never a worker's local disk.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source-path=SCRIPTDIR source=lib.sh
source "$here/lib.sh"

usage() {
  cat >&2 <<USAGE
usage: $0 TPU_NAME ZONE [-e NAME=VALUE]... -- TRAIN_ARGS...
  Runs python -m easyppo.train TRAIN_ARGS on every worker of TPU_NAME; -e sets an environment
  variable on every worker. Example TRAIN_ARGS:
    --config=configs/dpo.py:tulu25_13b_uf_mean --config.output_dir=gs://BUCKET/RUN
USAGE
  exit 2
}

[[ $# -ge 2 ]] || usage
tpu=$1 zone=$2
shift 2
env_pairs=("EASYPPO_DISTRIBUTED=always")
while [[ $# -gt 0 && $1 != -- ]]; do
  case $1 in
    -e)
      [[ $# -ge 2 && $2 =~ ^[A-Za-z_][A-Za-z0-9_]*= ]] || { echo "error: -e needs NAME=VALUE" >&2; usage; }
      env_pairs+=("$2")
      shift 2
      ;;
    *) echo "error: unexpected argument '$1' before --" >&2; usage ;;
  esac
done
[[ $# -ge 2 && $1 == -- ]] || usage
shift
train_args=("$@")

shared_output=false
for arg in "${train_args[@]}"; do
  [[ $arg =~ ^--config\.(output_dir|checkpoint\.directory)=gs:// ]] && shared_output=true
done
if [[ $shared_output == false ]]; then
  echo "warning: no --config.output_dir=gs://... (or --config.checkpoint.directory=gs://...): every" \
    "worker must write checkpoints to the same directory; a worker's local disk will not do" >&2
fi

run_id=${EASYPPO_RUN_ID:-$(date -u +%Y%m%d-%H%M%S)}
remote="cd $(quote_words "$REMOTE_DIR") && $(quote_words env "${env_pairs[@]}" bash launch/worker_start.sh "$run_id" -- "${train_args[@]}")"
echo "starting run $run_id on every worker of $tpu"
on_workers "$tpu" "$zone" all "$remote"
echo "follow worker 0: launch/tpu_logs.sh $tpu $zone 0    stop: launch/tpu_stop.sh $tpu $zone"
