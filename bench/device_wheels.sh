#!/usr/bin/env bash
# Download (here, where PyPI is reachable) the wheels bench/device_check.sh needs on a GPU machine
# that reaches no registry: CPython 3.12, x86-64 manylinux. Its image already has torch, triton,
# numpy, msgpack, pytest and pytest-timeout; these are what it lacks or may lack (structlog and
# pyzmq are not in its package list; mpi4py and the mpich wheel are carried so that MPI and
# mpiexec are the ones this project is tested with). Output: .whl/ (git-ignored), ~25 MB.
#   bash bench/device_wheels.sh            # then: device run with carry [".whl"]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
mkdir -p .whl
plats=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64; do
  plats+=(--platform "$p")
done
"$PY" -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp "${plats[@]}" \
  -d .whl structlog==26.1.0 pyzmq==27.3.0 mpi4py==4.1.2 mpich==5.0.2
ls -la .whl
