#!/usr/bin/env bash
# Stops the run that launch/tpu_run.sh started, on every worker.
#
#   launch/tpu_stop.sh TPU_NAME ZONE [--force]
#
# Without --force: SIGTERM to the trainer on every worker. The train loop finishes its step, saves a
# checkpoint and exits 0; rerun the same tpu_run.sh command to resume. Watch it end with
# `launch/tpu_logs.sh TPU_NAME ZONE all`. --force: SIGKILL (no checkpoint, e.g. for a hung run).
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source-path=SCRIPTDIR source=lib.sh
source "$here/lib.sh"

if [[ $# -lt 2 || $# -gt 3 || ( $# -eq 3 && $3 != --force ) ]]; then
  echo "usage: $0 TPU_NAME ZONE [--force]" >&2
  exit 2
fi
on_workers "$1" "$2" all "cd $(quote_words "$REMOTE_DIR") && $(quote_words bash launch/worker_stop.sh "${@:3}")"
