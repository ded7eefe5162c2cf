#!/usr/bin/env bash
# The CIFAR-10-LT IF 100 reproduction table, 3 seeds, on one GPU in one command (docs/reproduction.md).
#
#   bash examples/reproduce/gpu_table.sh OUT_DIR [extra `ib run` arguments]
#   bash examples/reproduce/gpu_table.sh /tmp/rehearsal --smoke 1 --set trainer.device=cpu   # a CPU rehearsal
#
# Reads data/cifar10_lt100.npz (copy shared/data/cifar10_lt100.npz there; data/ is git-ignored), or IB_DATA.
# Trains the rows named in IB_RUNS (default: the six rows that fit a 10-minute command, see docs/reproduction.md)
# fused, in bf16, with CUDA graphs, then copies the tables, the log and the environment into OUT_DIR.
# On a machine without internet, ibcore's own dependencies (pydantic, ...) come as wheels in .whl/ (see the docs).
set -euo pipefail
out=${1:?usage: gpu_table.sh OUT_DIR [ib run arguments]}
shift
data=${IB_DATA:-data/cifar10_lt100.npz}
# 4 runs x 3 seeds fit one 10-minute command on an H200 (18 took 2.6 s per epoch there: 200 epochs did not fit);
# ce also gives the post-hoc LA and tau-norm rows. The next command: IB_RUNS=cb_focal,drs,crt, then lws,mixup,...
runs=${IB_RUNS:-ce,ldam_drw,balanced_softmax,la_loss}
recipe=${IB_RECIPE:-examples/reproduce/cifar10_lt_if100.yaml}
mkdir -p "$out"

if ! python3 -c "import ibcore.cli, pydantic" 2>/dev/null; then
  if [ -d .whl ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/ib-site .whl/*.whl
    export PYTHONPATH=/tmp/ib-site${PYTHONPATH:+:$PYTHONPATH}
  fi
  # entry points (how the built-in components are found) need an installed distribution
  python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . >/dev/null
fi

{
  date -u +"%Y-%m-%dT%H:%M:%SZ"
  git rev-parse HEAD 2>/dev/null || true
  python3 -c "import torch, platform; print('torch', torch.__version__, 'python', platform.python_version());
print(torch.cuda.get_device_name() if torch.cuda.is_available() else 'no CUDA')"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || true
} >"$out/environment.txt"

mean="[0.4914, 0.4822, 0.4465]"
std="[0.2023, 0.1994, 0.2010]"
started=$(date +%s)
python3 -m ibcore.cli run "$recipe" --only "$runs" --quiet --out "$out/runs" \
  --set "data.dataset={name: array_file, params: {path: $data, mean: $mean, std: $std}}" \
  --set trainer.precision=bf16 --set trainer.eval_every=50 --set trainer.checkpoint_every=25 \
  "$@" 2>&1 | tee "$out/console.txt"
echo "wall-clock seconds: $(( $(date +%s) - started ))" | tee -a "$out/console.txt"

run_dir=$(ls -d "$out"/runs/*/ | tail -n 1)
for name in results.md summary.csv results.json meta.json train.log; do
  cp "$run_dir/$name" "$out/"
done
