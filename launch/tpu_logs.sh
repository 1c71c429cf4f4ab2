#!/usr/bin/env bash
# Shows the logs of the latest run that launch/tpu_run.sh started.
#
#   launch/tpu_logs.sh TPU_NAME ZONE [WORKER]
#
# WORKER a number (default 0): follow that worker's log (Ctrl-C stops following, not the run).
# WORKER "all": the last 20 lines of every worker's log and its exit status, if it has ended.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source-path=SCRIPTDIR source=lib.sh
source "$here/lib.sh"

if [[ $# -lt 2 || $# -gt 3 ]] || [[ $# -eq 3 && ! $3 =~ ^([0-9]+|all)$ ]]; then
  echo "usage: $0 TPU_NAME ZONE [WORKER number | all]" >&2
  exit 2
fi
worker=${3:-0}
# Paths are expanded on the worker ($HOME, $(hostname)), hence the single quotes.
# shellcheck disable=SC2016
log='"$HOME/easyppo-runs/latest/$(hostname).log"'
if [[ $worker == all ]]; then
  # shellcheck disable=SC2016
  status='"$HOME/easyppo-runs/latest/$(hostname).exit"'
  on_workers "$1" "$2" all "echo \"== \$(hostname)\"; tail -n 20 $log; if [ -f $status ]; then echo \"exit status \$(cat $status)\"; fi"
else
  on_workers "$1" "$2" "$worker" "tail -n 200 -F $log"
fi
