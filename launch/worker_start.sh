#!/usr/bin/env bash
# Runs on one machine (each TPU VM worker, via launch/tpu_run.sh): starts
# `python -m easyppo.train TRAIN_ARGS...` from this checkout, detached from the terminal, and returns.
#
#   launch/worker_start.sh RUN_ID -- TRAIN_ARGS...
#
# The run keeps going when the ssh session that started it ends. Files, in $EASYPPO_RUNS_DIR
# (default ~/easyppo-runs):
#   RUN_ID/HOSTNAME.log   everything the run prints
#   RUN_ID/HOSTNAME.exit  its exit status, written when it ends (0 also after a SIGTERM: it saved)
#   latest                a link to the newest RUN_ID
#   running.pid           the training process while it runs (launch/worker_stop.sh reads it)
# The environment is passed on unchanged: launch/tpu_run.sh sets EASYPPO_DISTRIBUTED there.
# EASYPPO_PYTHON picks the interpreter (default: this checkout's .venv/bin/python).
set -euo pipefail

if [[ ${1:-} == --supervise ]]; then
  # Internal: the detached supervisor started below. Records the trainer's pid for worker_stop.sh,
  # waits for it and records how it ended. Signals go to the trainer, not to this shell.
  pid_file=$2 exit_file=$3
  shift 3
  "$@" &
  echo "$!" > "$pid_file"
  status=0
  wait "$!" || status=$?
  rm -f "$pid_file"
  echo "$status" > "$exit_file"  # last, so that it existing means the run is over
  exit "$status"
fi

usage() {
  echo "usage: $0 RUN_ID -- TRAIN_ARGS...   (e.g. $0 dpo-1 -- --config=configs/dpo.py:demo)" >&2
  exit 2
}
[[ $# -ge 3 && $2 == -- ]] || usage
run_id=$1
shift 2
[[ $run_id =~ ^[A-Za-z0-9._-]+$ ]] || { echo "error: RUN_ID must be letters, digits, '.', '_' or '-'" >&2; exit 2; }

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
python=${EASYPPO_PYTHON:-$repo/.venv/bin/python}
runs_dir=${EASYPPO_RUNS_DIR:-$HOME/easyppo-runs}
pid_file=$runs_dir/running.pid
host=$(hostname)

[[ -x $python ]] || { echo "$host: error: no $python; run launch/tpu_setup.sh (or worker_setup.sh) first" >&2; exit 1; }
if [[ -s $pid_file ]] && kill -0 "$(cat "$pid_file")" 2>/dev/null; then
  echo "$host: error: a run is still going (pid $(cat "$pid_file")); stop it with launch/tpu_stop.sh" >&2
  exit 1
fi

run_dir=$runs_dir/$run_id
log=$run_dir/$host.log
mkdir -p "$run_dir"
rm -f "$pid_file" "$run_dir/$host.exit"
ln -sfn "$run_id" "$runs_dir/latest"
cd "$repo"  # config paths such as configs/dpo.py are relative to the checkout
# setsid: a new session without a terminal, so the end of the ssh session (SIGHUP) does not reach it.
PYTHONUNBUFFERED=1 setsid "$BASH" "${BASH_SOURCE[0]}" --supervise "$pid_file" "$run_dir/$host.exit" \
  "$python" -m easyppo.train "$@" > "$log" 2>&1 < /dev/null &

# Wait (up to 10 s) for the supervisor to record the pid, so that a stop right after a start works.
for _ in $(seq 100); do
  [[ -s $pid_file || -e $run_dir/$host.exit ]] && break
  sleep 0.1
done
echo "$host: started run $run_id (pid $(cat "$pid_file" 2>/dev/null || echo '?')); log: $log"
