# heteropipe: make setup && make run (train a small MoE with DualPipe pp=2 x expert parallelism ep=2
#             on 4 local MPI ranks, 2 emulated nodes per EP group)
#             make test (the whole suite: pure functions, then real mpiexec runs)
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
RANKS  ?= 4
ARGS   ?=
# make run's layout: both dimensions on the 4 ranks (ARGS come after it and win, e.g.
# ARGS='--pp 4 --ep 1 --nodes 1' for the pure pipeline; RANKS must equal pp x ep)
RUN_LAYOUT ?= --schedule dualpipe --pp 2 --ep 2 --nodes 2

.PHONY: help setup run demo test test-fast bench bench-transport bench-kernels bench-pipeline bench-peer bench-telemetry bench-moe bench-placement schedule topology plan cluster analyze clean

help:
	@echo "make setup   - create $(VENV) with torch 2.13.0 (CPU build here), mpi4py + mpich wheel, the rest"
	@echo "make run     - train the small MoE on $(RANKS) local ranks: $(RUN_LAYOUT) (ARGS='--steps 50 ...' win)"
	@echo "make analyze - figures, Perfetto trace and timeline PNG of the newest run in logs/ (ARGS='--steps 3:10')"
	@echo "make demo    - actors pass tensors around a ring on $(RANKS) ranks (runtime smoke test)"
	@echo "make test    - run the test suite (pytest; multi-rank tests launch real mpiexec)"
	@echo "make bench   - transport, kernel, pipeline, telemetry, EP dispatch/combine and expert placement benchmarks (tables + JSON in bench/results/)"
	@echo "make bench-peer - the project's pipeline vs torch.distributed.pipelining (DualPipeV, 1F1B) on the same stages"
	@echo "make schedule ARGS='dualpipe --pp 8 --microbatches 20' - print a pipeline schedule"
	@echo "make topology ARGS='--nodes 8 --devices-per-node 8 --max-nodes 4' - rank layout, expert placement, predicted EP traffic"
	@echo "make plan ARGS='--cluster v3-2048.toml' - DeepSeek-V3 at full scale priced without the hardware"
	@echo "make cluster HOSTFILE=hosts NP=16 CONFIG=run.toml [MPI=openmpi|mpich|slurm] [DRY=1] [HEAD=host PORT=29600] - launch on a cluster (supervised from this node)"
	@echo "make clean   - remove logs, caches and bench results (keeps $(VENV))"

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip >/dev/null
	# torch first and pinned: a looser requirement can pull several GB of CUDA wheels
	$(PY) -m pip install torch==2.13.0
	$(PY) -m pip install -e ".[test]"

setup: $(PY)
	@$(PY) -c "import torch, mpi4py, triton, msgpack, zmq, structlog; from mpi4py import MPI; print('setup ok: torch', torch.__version__, '|', MPI.Get_library_version().splitlines()[0])"

run: setup
	$(PY) -m launch.local -n $(RANKS) launch.train $(RUN_LAYOUT) $(ARGS)

analyze: setup
	$(PY) -m launch.analyze logs --trace --png $(ARGS)

demo: setup
	$(PY) -m launch.local -n $(RANKS) launch.ring $(ARGS)

test: setup
	OMP_NUM_THREADS=1 $(PY) -m pytest $(ARGS)

test-fast: setup
	OMP_NUM_THREADS=1 $(PY) -m pytest -m "not mpi and not slow" $(ARGS)

bench: bench-transport bench-kernels bench-pipeline bench-telemetry bench-moe bench-placement

bench-transport: setup
	$(PY) -m launch.local -n 2 bench.transport

bench-kernels: setup
	$(PY) -m bench.kernels

# The GPU check (issue 14): fetch the cp312 wheels a registry-less GPU machine lacks into .whl/,
# then run bench/device_check.sh there (carry .whl); `make device-check` runs it on this machine.
.PHONY: device-wheels device-check
device-wheels: setup
	PYTHON=$(PY) bash bench/device_wheels.sh

device-check:
	bash bench/device_check.sh

bench-pipeline: setup
	$(PY) -m bench.pipeline

bench-peer: setup
	OMP_NUM_THREADS=1 $(PY) -m bench.peer_pipelining

bench-telemetry: setup
	$(PY) -m bench.telemetry

bench-moe: setup
	OMP_NUM_THREADS=1 $(PY) -m launch.local -n 4 bench.moe
	OMP_NUM_THREADS=1 $(PY) -m launch.local -n 4 bench.ep_step

bench-placement: setup
	OMP_NUM_THREADS=1 $(PY) -m bench.placement

schedule: setup
	$(PY) -m launch.schedule $(ARGS)

topology: setup
	$(PY) -m launch.topology $(ARGS)

plan: setup
	$(PY) -m launch.plan $(or $(ARGS),--cluster v3-2048.toml)

cluster: setup
	@test -n "$(HOSTFILE)" -a -n "$(NP)" || { echo "make cluster: give HOSTFILE=hosts NP=ranks [CONFIG=run.toml]"; exit 2; }
	PYTHON=$(PY) $(PY) -m launch.cluster -f $(HOSTFILE) -n $(NP) $(if $(MPI),--mpi $(MPI)) $(if $(DRY),--dry-run) \
		$(if $(HEAD),--head $(HEAD)) $(if $(PORT),--port $(PORT)) \
		-- launch.train $(if $(CONFIG),--config $(CONFIG)) $(ARGS)

clean:
	rm -rf logs bench/results .pytest_cache .hypothesis
	find . -name __pycache__ -not -path "./$(VENV)/*" -prune -exec rm -rf {} +
