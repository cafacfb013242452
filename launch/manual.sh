#!/usr/bin/env bash
# Usage: launch/manual.sh COORDINATOR_HOST:PORT NUM_PROCESSES PROCESS_ID [main.py args...]
#
# Starts this host's process of a multi-host run, for any scheduler (or none): run it once on every host, each with
# its own PROCESS_ID in 0..NUM_PROCESSES-1, all with the same address: process 0's host and a port open between the
# hosts. Start order does not matter; every process waits --distributed_timeout seconds (default 300) for the rest.
#
#   node001$ launch/manual.sh node001:29500 2 0 --config configs/pretrain.py --workdir /shared/run
#   node002$ launch/manual.sh node001:29500 2 1 --config configs/pretrain.py --workdir /shared/run
#
# Each process drives all of its host's GPUs; for one process per GPU, start one per GPU with
# LOCAL_DEVICE_IDS set to its GPU. Give every process the same main.py arguments and the same code.
#
# Environment: PYTHON            interpreter (default: python)
#              LOCAL_DEVICE_IDS  comma-separated GPUs for this process (default: all of this host's)
set -euo pipefail

if [[ $# -lt 3 || ! $2 =~ ^[0-9]+$ || ! $3 =~ ^[0-9]+$ ]]; then
  echo "usage: $0 COORDINATOR_HOST:PORT NUM_PROCESSES PROCESS_ID [main.py args...]   (see the top of $0)" >&2
  exit 2
fi
address=$1
nproc=$2
process_id=$3
shift 3
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
args=("$@" "--coordinator_address=$address" "--num_processes=$nproc" "--process_id=$process_id")
if [[ -n ${LOCAL_DEVICE_IDS:-} ]]; then
  args+=("--local_device_ids=$LOCAL_DEVICE_IDS")
fi
exec "${PYTHON:-python}" "$root/main.py" "${args[@]}"
