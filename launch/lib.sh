# shellcheck shell=bash
# Shared by the launch/tpu_*.sh scripts (sourced, never run). They drive the `gcloud` CLI from your
# own machine; the launch/worker_*.sh scripts are what runs on each TPU VM worker.
#
# Settings (environment variables, the same for every tpu_*.sh script):
#   EASYPPO_REMOTE_DIR  the repository's directory on each worker, relative to the worker's home
#                       directory or absolute (default: easyppo)
#   GCLOUD_FLAGS        extra flags for every gcloud call, split on spaces, e.g.
#                       GCLOUD_FLAGS="--project=my-project --internal-ip"

# shellcheck disable=SC2034  # used by the scripts that source this file
REMOTE_DIR=${EASYPPO_REMOTE_DIR:-easyppo}
read -r -a GCLOUD_EXTRA_FLAGS <<< "${GCLOUD_FLAGS:-}"

die() {
  echo "error: $*" >&2
  exit 1
}

# quote_words WORD...: the words as one command line, each quoted with printf %q, so that arguments
# with spaces or quotes arrive unchanged on the worker.
quote_words() {
  local quoted
  printf -v quoted ' %q' "$@"
  printf '%s' "${quoted# }"
}

# on_workers TPU_NAME ZONE WORKERS COMMAND: runs COMMAND (one line of bash) on the chosen workers
# ("all", or an index such as 0) over ssh, through `bash -c` whatever the worker's login shell is.
# With "all", gcloud runs the workers in parallel (in batches of --batch-size on large slices).
on_workers() {
  gcloud compute tpus tpu-vm ssh "$1" --zone="$2" --worker="$3" "${GCLOUD_EXTRA_FLAGS[@]}" \
    --command="bash -c $(quote_words "$4")"
}

# copy_to_all_workers TPU_NAME ZONE LOCAL_FILE REMOTE_PATH (REMOTE_PATH relative to the home directory)
copy_to_all_workers() {
  gcloud compute tpus tpu-vm scp "$3" "$1:$4" --zone="$2" --worker=all "${GCLOUD_EXTRA_FLAGS[@]}"
}
