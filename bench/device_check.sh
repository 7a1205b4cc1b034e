#!/usr/bin/env bash
# The GPU check of issue 14, one script, <= 5 minutes on one H100/H200 (a rerun fits a 15-minute
# loan). Runs from the source tree on the machine's own python3 (torch 2.11 / CUDA 13, Triton 3.6
# there); wheels it lacks are carried in .whl/ (bash bench/device_wheels.sh, here, first).
#
#   device run: command "bash bench/device_check.sh", carry [".whl"], timeout_s 590
#   (typically ~5 min; the per-step timeouts below bound it at ~9)
#
# Steps (each under its own timeout, a failure recorded and the next step still run):
#   1. facts: GPU, driver, torch/triton versions, whether F.scaled_mm blockwise is present and right;
#   2. the GPU tests (compiled Triton kernels vs the reference, FP8 linear vs the CPU emulation,
#      deferral on CUDA, 2 ranks on one GPU vs the CPU emulation);
#   3. bench.kernels (V3-shape GEMMs vs BF16 cuBLAS and blockwise cuBLASLt, grouped, dgrad/wgrad,
#      quantizer bandwidth);
#   4. 20 training steps at fp8 and at bf16 (bench/device_train.toml: hidden 2048, 2 ranks sharing
#      the GPU): losses and tokens/s.
# Writes $OUT/device_check.json (everything; "steps" holds each step's exit status) plus facts.json,
# kernels.json, tests.xml, the two training outputs and log.txt (all console output) beside it. A dry run without a
# GPU (plumbing only): PYTHON=.venv/bin/python DEVICE_CHECK_CONFIG=small.toml OUT=/tmp/dc bash ...
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
OUT=${OUT:-$ROOT/bench/results/device}
SCRATCH=$(mktemp -d)  # step statuses and full outputs; only <= 8 files go to $OUT (the device tool's limit)
mkdir -p "$OUT"
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=4
if compgen -G ".whl/*.whl" >/dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || echo "wheel install failed" >&2
  export PYTHONPATH=/tmp/site
  [ -d /tmp/site/lib ] && export LD_LIBRARY_PATH=/tmp/site/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
  [ -x /tmp/site/bin/mpiexec ] && export PATH=/tmp/site/bin:$PATH HETEROPIPE_MPIEXEC=/tmp/site/bin/mpiexec
  if ! "$PY" -c "from mpi4py import MPI; MPI.Get_library_version()" >/dev/null 2>&1; then
    # the carried mpi4py found no MPI library here: fall back to the image's own mpi4py and MPI
    echo "carried mpi4py/mpich unusable; using the image's" >&2
    rm -rf /tmp/site/mpi4py* /tmp/site/mpich* /tmp/site/bin/mpiexec*
    unset HETEROPIPE_MPIEXEC
  fi
fi
export PYTHONPATH=$ROOT${PYTHONPATH:+:$PYTHONPATH}
log() { echo "[device_check $(date +%T)] $*" | tee -a "$OUT/log.txt"; }
status() { echo "$1 $2" >> "$SCRATCH/steps.txt"; }

log "1/4 facts"
timeout 120 "$PY" - > "$OUT/facts.json" 2>> "$OUT/log.txt" <<'PY'
import json, subprocess, torch, triton
from kernels import scaled_mm
from runtime.device import describe_device
facts = {"torch": torch.__version__, "cuda": torch.version.cuda, "triton": triton.__version__,
         "gpu": describe_device("cuda") if torch.cuda.is_available() else None,
         "scaled_mm_function": hasattr(torch.nn.functional, "scaled_mm"),
         "scaled_mm_blockwise_unavailable": scaled_mm.unavailable_reason("cuda:0") if torch.cuda.is_available()
                                            else "no CUDA device"}
try:
    facts["nvidia_smi"] = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,clocks.max.sm",
                                          "--format=csv,noheader"], capture_output=True, text=True).stdout.strip()
except OSError as exc:
    facts["nvidia_smi"] = str(exc)
print(json.dumps(facts))
PY
status facts $?
cat "$OUT/facts.json" | tee -a "$OUT/log.txt"

log "2/4 GPU tests"
timeout 200 "$PY" -m pytest -q -p no:cacheprovider --junitxml="$OUT/tests.xml" \
  tests/test_kernels_gpu.py tests/test_kernels_triton.py \
  "tests/test_kernels_wgrad.py::test_deferral_on_cuda" "tests/test_device.py::test_staging_reuses_pinned_buffers_on_cuda" \
  "tests/test_fp8_training.py::test_two_ranks_on_one_gpu_track_the_cpu_emulation" > "$SCRATCH/tests.txt" 2>&1
status tests $?
cat "$SCRATCH/tests.txt" >> "$OUT/log.txt"; tail -n 25 "$SCRATCH/tests.txt"

log "3/4 kernel bench"
timeout 120 "$PY" -m bench.kernels --json "$OUT/kernels.json" > "$SCRATCH/kernels.txt" 2>&1
status bench $?
tee -a "$OUT/log.txt" < "$SCRATCH/kernels.txt"

log "4/4 training, 20 steps at fp8 and bf16"
for prec in fp8 bf16; do
  timeout 100 "$PY" -m launch.local -n 2 launch.train --config "${DEVICE_CHECK_CONFIG:-bench/device_train.toml}" --precision "$prec" \
    --device auto --share-device --log-dir /tmp/heteropipe-logs --run-id "device-$prec" > "$OUT/train-$prec.txt" 2>&1
  status "train-$prec" $?
  tail -n 6 "$OUT/train-$prec.txt" | tee -a "$OUT/log.txt"
done

"$PY" - "$OUT" "$SCRATCH" <<'PY'
import json, re, sys, xml.etree.ElementTree as ET
from pathlib import Path
out, scratch = Path(sys.argv[1]), Path(sys.argv[2])
def read_json(name):
    try:
        return json.loads((out / name).read_text())
    except (OSError, ValueError) as exc:
        return {"error": str(exc)}
result = {"steps": dict(line.split() for line in (scratch / "steps.txt").read_text().splitlines()),
          "facts": read_json("facts.json"), "kernels": read_json("kernels.json")}
try:
    root = ET.parse(out / "tests.xml").getroot()
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    result["tests"] = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    result["tests"]["failed"] = [f"{c.get('classname')}::{c.get('name')}" for c in suite.iter("testcase")
                                 if c.find("failure") is not None or c.find("error") is not None]
except (OSError, ET.ParseError) as exc:
    result["tests"] = {"error": str(exc)}
train = {}
for prec in ("fp8", "bf16"):
    text = (out / f"train-{prec}.txt").read_text() if (out / f"train-{prec}.txt").exists() else ""
    steps = [(float(m.group(1)), float(m.group(2))) for m in
             re.finditer(r"^step\s+\d+/\d+\s+loss\s+(\S+).*?(\d+) tokens/s", text, re.M)]
    train[prec] = {"steps": len(steps), "losses": [s[0] for s in steps],
                   # median over steps 5.. (compilation and autotuning land in the first ones)
                   "tokens_per_s_median": sorted(s[1] for s in steps[4:])[len(steps[4:]) // 2] if len(steps) > 4 else None}
if train["fp8"]["tokens_per_s_median"] and train["bf16"]["tokens_per_s_median"]:
    train["fp8_over_bf16_tokens_per_s"] = train["fp8"]["tokens_per_s_median"] / train["bf16"]["tokens_per_s_median"]
if train["fp8"]["losses"] and train["bf16"]["losses"]:
    a, b = train["fp8"]["losses"][-1], train["bf16"]["losses"][-1]
    train["final_loss_rel_gap_fp8_vs_bf16"] = abs(a - b) / b
result["train"] = train
(out / "device_check.json").write_text(json.dumps(result, indent=2))
print(json.dumps({k: result[k] for k in ("steps", "tests", "train")}, indent=1))
print("targets:", json.dumps(result["kernels"].get("targets")))
PY
log "done: $OUT/device_check.json"
