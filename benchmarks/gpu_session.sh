#!/usr/bin/env bash
# The throughput benchmarks on one GPU in one command of at most 9 minutes (not a test).
#
# Here, once, before the GPU command: a copy of CIFAR-10-LT (IR 100) small enough to travel with the working tree
# (the whole npz is 59 MiB, over the 64 MiB the tree may weigh with .whl/; the benchmark trains on all 12,406
# training images and evaluates, untimed, on the first 1,000 test images):
#
#   bash benchmarks/gpu_session.sh --prepare /work/shared/data/cifar10_lt100.npz   # writes data_local/cifar10_lt100.npz
#
# On the GPU machine, from the repository root (carry .whl, with ibcore's dependencies, and data_local if git
# ignores it), with timeout_s of 560 to 600:
#
#   bash benchmarks/gpu_session.sh
#
# Steps, in order, each under its own `timeout` (the limits add up to 525 s, 549 s with the kill grace), each run
# whether or not the one before it failed:
#   1. environment: nvidia-smi, python, torch and CUDA versions;
#   2. install: ibcore's dependencies from .whl/ when python3 lacks them, ibcore itself (entry points need an
#      installed distribution);
#   3. K scan, plain scenario: K = 1, 8, 16, 32, 64, one timed epoch, fused path only;
#   4-6. the mixers, adam and crt scenarios at K = 8: plain loops and the fused path;
#   7. benchmarks/jpeg_pipeline.py --device cuda --images 2000;
#   8. benchmarks/stacked_update.py: the fused optimizer update, per parameter against flat, for each K.
# Everything printed goes to $OUT/session.log, each benchmark's numbers to $OUT/throughput_<step>.json (written after
# every measurement, so a step stopped by its timeout keeps what it measured), jpeg_pipeline.py's to
# $OUT/jpeg_pipeline.json when it takes --json. At most 8 files come back from $OUT: this script writes 6.
set -u

if [ "${1:-}" = "--prepare" ]; then
  source_npz=${2:?usage: gpu_session.sh --prepare PATH/cifar10_lt100.npz}
  mkdir -p data_local
  "${PYTHON:-python3}" - "$source_npz" data_local/cifar10_lt100.npz <<'EOF'
import sys

import numpy as np

with np.load(sys.argv[1]) as archive:
    arrays = {
        "train_images": archive["train_images"],
        "train_labels": archive["train_labels"],
        "test_images": archive["test_images"][:1000],
        "test_labels": archive["test_labels"][:1000],
    }
np.savez(sys.argv[2], **arrays)
EOF
  ls -l data_local/cifar10_lt100.npz
  if git check-ignore -q data_local/cifar10_lt100.npz; then
    echo "data_local/ is git-ignored: name it in the run's carry"
  else
    echo "data_local/ is not git-ignored: it travels as an untracked file"
  fi
  exit 0
fi

cd "$(dirname "$0")/.." || exit 1
OUT=${OUT:-/tmp/gpu_session}
mkdir -p "$OUT"
log="$OUT/session.log"
: >"$log"
export PYTHONUNBUFFERED=1
python=${PYTHON:-python3}
data=data_local/cifar10_lt100.npz
# A CPU rehearsal of the plumbing: BENCH_DEVICE=cpu KSCAN_RUNS=1,2 SCENARIO_RUNS=2 PYTHON=.venv/bin/python
device=${BENCH_DEVICE:-cuda}
kscan_runs=${KSCAN_RUNS:-1,8,16,32,64}
scenario_runs=${SCENARIO_RUNS:-8}
session_started=$SECONDS

# step NAME LIMIT_SECONDS COMMAND...: runs COMMAND under timeout, its output into the log and on the screen.
step() {
  local name=$1 limit=$2
  shift 2
  local started=$SECONDS
  echo "=== $name (limit ${limit} s, $((SECONDS - session_started)) s into the session): $*" | tee -a "$log"
  timeout -k 3 "$limit" "$@" 2>&1 | tee -a "$log"
  local status=${PIPESTATUS[0]}
  local verdict="exit status $status"
  if [ "$status" -eq 124 ] || [ "$status" -eq 137 ]; then
    verdict="stopped by its ${limit}-s timeout"
  fi
  echo "=== $name: $verdict after $((SECONDS - started)) s" | tee -a "$log"
}

install() {
  local check="import ibcore, importlib.metadata as m
assert m.entry_points(group='ibcore.losses'), 'no entry points: ibcore is not installed'
print('ibcore', ibcore.__file__)"
  if "$python" -c "$check" 2>/dev/null; then
    return 0 # an installed ibcore (a rehearsal in a developer's venv): nothing to do
  fi
  if ! "$python" -c "import pydantic, yaml, rich, importlib_metadata" 2>/dev/null && [ -d .whl ]; then
    "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/ib-site .whl/*.whl
  fi
  export PYTHONPATH=/tmp/ib-site${PYTHONPATH:+:$PYTHONPATH}
  "$python" -m pip install -q --no-deps --no-build-isolation --no-index -e . && "$python" -c "$check"
}

environment() {
  nvidia-smi
  "$python" -c "import platform, torch
print('python', platform.python_version(), '| torch', torch.__version__, '| CUDA', torch.version.cuda,
      '| cuDNN', torch.backends.cudnn.version())
print('device:', torch.cuda.get_device_name() if torch.cuda.is_available() else 'no CUDA')"
  git rev-parse HEAD 2>/dev/null
  git status --short 2>/dev/null | head -n 20
}

export python
export -f install environment  # `timeout` runs programs, not functions: a child bash runs them
step environment 15 bash -c environment
step install 25 bash -c install
if [ -d /tmp/ib-site ]; then
  export PYTHONPATH=/tmp/ib-site${PYTHONPATH:+:$PYTHONPATH}
fi

data_flag=--data=$data
if [ ! -f "$data" ]; then
  echo "no $data: the benchmarks train on random CIFAR-shaped images" | tee -a "$log"
  data_flag=--data=
fi
benchmark=(benchmarks/throughput.py --device "$device" "$data_flag" --epochs 1)

# The scan is about how the fused path scales: the sequential path is K times slower and known, and the
# graph-less path was measured before (docs/performance.md).
step plain_kscan 200 "$python" "${benchmark[@]}" --scenario plain --runs "$kscan_runs" \
  --no-sequential --no-fused-eager --json "$OUT/throughput_plain_kscan.json"
# These scenarios trained on the sequential path before the engine fused them, and on a GPU that path is as fast
# as the plain loops (1.01x at K = 8, docs/performance.md): the plain loops are the reference, and the fused path's
# log lines, kept in the json, say which runs were stacked.
scenario_options=(--runs "$scenario_runs" --no-sequential --no-fused-eager)
step mixers 75 "$python" "${benchmark[@]}" --scenario mixers "${scenario_options[@]}" \
  --json "$OUT/throughput_mixers.json"
step adam 60 "$python" "${benchmark[@]}" --scenario adam "${scenario_options[@]}" --json "$OUT/throughput_adam.json"
step crt 70 "$python" "${benchmark[@]}" --scenario crt "${scenario_options[@]}" --json "$OUT/throughput_crt.json"

step jpeg_pipeline 50 "$python" benchmarks/jpeg_pipeline.py --device "$device" --images 2000 \
  --json "$OUT/jpeg_pipeline.json"
# The fused update, parameter by parameter against one flat update (milliseconds and operators per K).
step stacked_update 30 "$python" benchmarks/stacked_update.py --device "$device" --runs "$kscan_runs"
echo "=== session done after $((SECONDS - session_started)) s; files in $OUT:" | tee -a "$log"
ls -l "$OUT" | tee -a "$log"
