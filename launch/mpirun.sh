#!/usr/bin/env bash
# Usage: launch/mpirun.sh NP NPERNODE [main.py args...]
#
# Open MPI, like the original code's `mpiexec -npernode NPERNODE -np NP python main.py ...`: NP processes in all,
# NPERNODE on each node. NPERNODE is either the GPUs per node (one process per GPU: JAX gives each the GPU numbered
# by its local rank) or 1 (one process drives all of its node's GPUs).
#
#   HOSTFILE=hosts.txt launch/mpirun.sh 8 4 --config configs/pretrain.py --workdir /shared/run   # 2 nodes x 4 GPUs
#   HOSTFILE=hosts.txt launch/mpirun.sh 2 1 --config configs/pretrain.py --workdir /shared/run   # same GPUs
#
# Hosts come from HOSTFILE (mpirun --hostfile) or, inside a scheduler's allocation, from mpirun itself. Rank 0 runs on
# the first host and serves as coordinator at COORDINATOR:PORT (default: HOSTFILE's first host, else this host; a
# random port in 20000-39999); naming it here works with Open MPI 4 and 5 alike. Rank 0's output comes to this
# console, rank i's goes to $LOG_DIR/process_i.log (default: mpirun-logs/DATE-TIME). If one rank fails, mpirun stops
# the others.
#
# Environment: PYTHON (default: python), HOSTFILE, COORDINATOR, PORT, LOG_DIR,
#              GPUS_PER_NODE (with NPERNODE=1; default: what nvidia-smi counts here), MPIRUN_ARGS (more mpirun
#              options, split on spaces). NCCL_*, XLA_*, JAX_*, TF_CPP_*, CUDA_*, PATH, LD_LIBRARY_PATH, PYTHONPATH
#              and VIRTUAL_ENV are passed on to every rank.
set -euo pipefail

if [[ $# -lt 2 || ! $1 =~ ^[1-9][0-9]*$ || ! $2 =~ ^[1-9][0-9]*$ ]]; then
  echo "usage: $0 NP NPERNODE [main.py args...]   (see the comment at the top of $0)" >&2
  exit 2
fi
np=$1
npernode=$2
shift 2
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

mpi_args=(-np "$np" --map-by "ppr:$npernode:node")
if [[ -n ${HOSTFILE:-} ]]; then
  mpi_args+=(--hostfile "$HOSTFILE")
  first_host=$(awk '!/^[[:space:]]*(#|$)/ {print $1; exit}' "$HOSTFILE")
fi
while IFS= read -r name; do
  case $name in
    NCCL_* | XLA_* | JAX_* | TF_CPP_* | CUDA_* | PATH | LD_LIBRARY_PATH | PYTHONPATH | VIRTUAL_ENV) mpi_args+=(-x "$name") ;;
  esac
done < <(compgen -e)
if [[ -n ${MPIRUN_ARGS:-} ]]; then
  read -r -a more <<<"$MPIRUN_ARGS"
  mpi_args+=("${more[@]}")
fi

coordinator=${COORDINATOR:-${first_host:-$(hostname)}}:${PORT:-$((20000 + RANDOM % 20000))}
extra=("--coordinator_address=$coordinator")
gpus=${GPUS_PER_NODE:-$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)}
# Launched by mpirun, a process drives the GPU of its local rank only: one process per node must name all of them.
if ((npernode == 1 && ${gpus:-0} > 1)); then
  extra+=("--local_device_ids=$(seq -s, 0 $((gpus - 1)))")
fi
log_dir=${LOG_DIR:-mpirun-logs/$(date +%Y%m%d-%H%M%S)}
mkdir -p "$log_dir"
log_dir=$(cd "$log_dir" && pwd)
echo "mpirun.sh: $np processes, $npernode per node, coordinator $coordinator; ranks 1.. log to $log_dir" >&2

# shellcheck disable=SC2016  # $OMPI_COMM_WORLD_RANK and $1 expand in each rank's shell, not here
exec mpirun "${mpi_args[@]}" bash -c '
  log_dir=$1
  shift
  mkdir -p "$log_dir"
  if [[ $OMPI_COMM_WORLD_RANK == 0 ]]; then exec "$@"; fi
  exec "$@" >"$log_dir/process_$OMPI_COMM_WORLD_RANK.log" 2>&1
' _ "$log_dir" "${PYTHON:-python}" "$root/main.py" "$@" "${extra[@]}"
