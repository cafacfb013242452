#!/usr/bin/env bash
# Usage: launch/local.sh NPROC DEVICES_PER_PROCESS [main.py args...]
#
# Starts NPROC CPU processes on this machine with DEVICES_PER_PROCESS CPU devices each, joined by jax.distributed:
# the multi-host code paths on one laptop, and in the tests. Process 0 prints to this console; process i > 0
# writes $LOG_DIR/process_i.log. When a process fails, the others are stopped and the script exits with the
# failed process's status (0 only if all processes succeed).
#
#   launch/local.sh 2 2 --config configs/pretrain.py --workdir /tmp/run    # 2 processes x 2 CPU devices
#
# Environment: PYTHON     interpreter (default: python)
#              PORT       coordinator port on localhost (default: a free one)
#              LOG_DIR    where processes 1.. log (default: a new directory under ${TMPDIR:-/tmp})
#              ENTRY      script to run instead of main.py (it must call onepfrac_jax.parallel.distributed.initialize)
#              STOP_GRACE seconds the others have, once one process fails, to save and exit after SIGTERM before
#                         they get SIGKILL (default 10)
set -euo pipefail

if [[ $# -lt 2 || ! $1 =~ ^[1-9][0-9]*$ || ! $2 =~ ^[1-9][0-9]*$ ]]; then
  echo "usage: $0 NPROC DEVICES_PER_PROCESS [main.py args...]   (see the comment at the top of $0)" >&2
  exit 2
fi
grace=${STOP_GRACE:-10}
if [[ ! $grace =~ ^[0-9]+$ ]]; then
  echo "$0: STOP_GRACE=$grace must be a whole number of seconds" >&2
  exit 2
fi
nproc=$1
devices=$2
shift 2
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
python=${PYTHON:-python}
entry=${ENTRY:-$root/main.py}
# A port free now; another program could take it before process 0 binds it, then process 0 says so and exits.
port=${PORT:-$("$python" -c 'import socket; s = socket.socket(); s.bind(("", 0)); print(s.getsockname()[1])')}
log_dir=${LOG_DIR:-$(mktemp -d "${TMPDIR:-/tmp}/onepfrac-local.XXXXXX")}
mkdir -p "$log_dir"

pids=()
stop_all() {
  local pid
  for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  # SIGTERM lets a process save; one stuck in a collective with a dead peer gets SIGKILL after STOP_GRACE s.
  for _ in $(seq $((grace * 5))); do
    local alive=0
    for pid in "${pids[@]}"; do kill -0 "$pid" 2>/dev/null && alive=1; done
    ((alive)) || return 0
    sleep 0.2
  done
  for pid in "${pids[@]}"; do kill -KILL "$pid" 2>/dev/null || true; done
}
trap 'stop_all; exit 130' INT TERM

# A laptop's GPU must not be claimed by every process: these are CPU processes.
export JAX_PLATFORMS=cpu
echo "local.sh: $nproc processes x $devices CPU devices, coordinator localhost:$port;" \
  "processes 1..$((nproc - 1)) log to $log_dir" >&2
for ((i = 0; i < nproc; i++)); do
  args=("$entry" "$@" "--coordinator_address=localhost:$port" "--num_processes=$nproc" "--process_id=$i"
    "--cpu_devices=$devices")
  if ((i == 0)); then
    "$python" "${args[@]}" &
  else
    "$python" "${args[@]}" >"$log_dir/process_$i.log" 2>&1 &
  fi
  pids+=($!)
done

# Poll rather than `wait -n`: bash 3.2 (macOS) lacks it. Bash reaps finished children and keeps their status.
status=0
finished=0
declare -a done_flags
while ((finished < nproc)); do
  for ((i = 0; i < nproc; i++)); do
    [[ -n ${done_flags[i]:-} ]] && continue
    kill -0 "${pids[i]}" 2>/dev/null && continue
    rc=0
    wait "${pids[i]}" || rc=$?
    done_flags[i]=1
    finished=$((finished + 1))
    if ((rc != 0 && status == 0)); then
      status=$rc
      where=$([[ $i == 0 ]] && echo "the console" || echo "$log_dir/process_$i.log")
      echo "local.sh: process $i exited with status $rc (its output: $where); stopping the others" >&2
      stop_all
    fi
  done
  sleep 0.2
done
exit "$status"
