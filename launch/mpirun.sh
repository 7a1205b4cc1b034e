#!/usr/bin/env bash
# Cluster launch with a hostfile and the cluster's own MPI (Open MPI, MPICH/Hydra, Intel MPI) or SLURM.
#
#   launch/mpirun.sh -f hosts -n 16 [--mpi openmpi|mpich|slurm] [--dry-run] -- launch.train --pp 4 --ep 4
#
# hostfile: Open MPI "node slots=8" or Hydra "node:8" (one host per line), or --cluster FILE.toml with
# node kinds. Env: MPIRUN (launcher), PYTHON (default python3), EXTRA_MPI_ARGS (passed through).
# The supervisor and the progress collector run on this node; the ranks reach them at --head (default
# this host's name) on TCP --port 29600 and 29601 (see --help of launch.cluster for the flags).
# All logic (mapping, binding, local-rank device, precision per kind, supervision) is in launch/cluster.py.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
case "${1:-}" in -h|--help) sed -n '2,10p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;; esac
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"
exec "${PYTHON:-python3}" -m launch.cluster "$@"
