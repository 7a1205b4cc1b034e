#!/usr/bin/env bash
# Cluster launch with a hostfile and the cluster's own MPI (Open MPI, MPICH/Hydra, Intel MPI) or SLURM.
#
#   launch/mpirun.sh -f hosts -n 16 [--mpi openmpi|mpich|slurm] [--dry-run] -- launch.train --pp 4 --ep 4
#
# hostfile: Open MPI "node slots=8" or Hydra "node:8" (one host per line), or --cluster FILE.toml with
# node kinds. Env: MPIRUN (launcher), PYTHON (default python3), EXTRA_MPI_ARGS (passed through).
# All logic (mapping, binding, local-rank device, precision per kind) is in launch/cluster.py.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
case "${1:-}" in -h|--help) sed -n '2,8p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;; esac
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"
exec "${PYTHON:-python3}" -m launch.cluster "$@"
