#!/usr/bin/env bash
# Cluster launch with a hostfile and the cluster's own MPI (Open MPI, MPICH/Hydra, Intel MPI).
#
#   launch/mpirun.sh -f hosts -n 16 [-p ranks-per-node] -- launch.train --pp 8 --schedule dualpipe
#
# hostfile: Open MPI "node slots=8", Hydra/Intel "node:8" (one host per line).
# Env: MPIRUN (default: mpirun on PATH), PYTHON (default: python3), EXTRA_MPI_ARGS (passed through).
# Every rank runs `python -m mpi4py -m MODULE ...` so an uncaught exception aborts the whole job.
set -euo pipefail

usage() { sed -n '2,8p' "$0" | sed 's/^# \{0,1\}//'; exit "${1:-0}"; }

hostfile="" ; np="" ; ppn=""
while [ $# -gt 0 ]; do
  case "$1" in
    -f|--hostfile) hostfile="$2"; shift 2 ;;
    -n|--np) np="$2"; shift 2 ;;
    -p|--per-node) ppn="$2"; shift 2 ;;
    -h|--help) usage 0 ;;
    --) shift; break ;;
    *) echo "mpirun.sh: unknown option $1" >&2; usage 2 ;;
  esac
done
[ -n "$np" ] || { echo "mpirun.sh: -n RANKS is required" >&2; usage 2; }
[ $# -ge 1 ] || { echo "mpirun.sh: give the module to run after --" >&2; usage 2; }
[ -z "$hostfile" ] || [ -r "$hostfile" ] || { echo "mpirun.sh: hostfile $hostfile not readable" >&2; exit 2; }

MPIRUN=${MPIRUN:-mpirun}
PYTHON=${PYTHON:-python3}
root=$(cd "$(dirname "$0")/.." && pwd)
flavor=$("$MPIRUN" --version 2>&1 | grep -qi "open mpi" && echo openmpi || echo hydra)

args=(-n "$np")
if [ "$flavor" = openmpi ]; then
  [ -n "$hostfile" ] && args+=(--hostfile "$hostfile")
  [ -n "$ppn" ] && args+=(--map-by "ppr:${ppn}:node")
  args+=(-x PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}" -x HETEROPIPE_RUN_ID)
else
  [ -n "$hostfile" ] && args+=(-f "$hostfile")
  [ -n "$ppn" ] && args+=(-ppn "$ppn")
  args+=(-genv PYTHONPATH "$root${PYTHONPATH:+:$PYTHONPATH}")
fi
# One shared run id so every node's ranks write into the same logs/<run-id>/.
export HETEROPIPE_RUN_ID=${HETEROPIPE_RUN_ID:-$(date -u +%Y%m%d-%H%M%S)-$$}
[ "$flavor" = hydra ] && args+=(-genv HETEROPIPE_RUN_ID "$HETEROPIPE_RUN_ID")
module="$1"; shift
# shellcheck disable=SC2086
exec "$MPIRUN" "${args[@]}" ${EXTRA_MPI_ARGS:-} "$PYTHON" -m mpi4py -m "$module" "$@"
