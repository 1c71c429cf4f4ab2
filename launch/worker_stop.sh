#!/usr/bin/env bash
# Runs on one machine (each TPU VM worker, via launch/tpu_stop.sh): stops the run that
# launch/worker_start.sh started there.
#
#   launch/worker_stop.sh [--force]
#
# Without --force it sends SIGTERM: the train loop finishes its step, saves a checkpoint and exits 0,
# so rerunning the same command resumes. --force sends SIGKILL to the run's whole process group
# (no checkpoint; the run resumes from the last saved one).
set -euo pipefail

[[ $# -eq 0 || ( $# -eq 1 && $1 == --force ) ]] || { echo "usage: $0 [--force]" >&2; exit 2; }
pid_file=${EASYPPO_RUNS_DIR:-$HOME/easyppo-runs}/running.pid
host=$(hostname)

if ! [[ -s $pid_file ]] || ! pid=$(cat "$pid_file") || ! kill -0 "$pid" 2>/dev/null; then
  echo "$host: no run is going"
  exit 0
fi
if [[ ${1:-} == --force ]]; then
  pgid=$(ps -o pgid= -p "$pid" | tr -d ' ')
  kill -KILL -- "-$pgid"
  echo "$host: killed process group $pgid"
else
  kill -TERM "$pid"
  echo "$host: sent SIGTERM to $pid; it saves a checkpoint, then exits"
fi
