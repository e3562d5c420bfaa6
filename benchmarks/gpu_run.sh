#!/usr/bin/env bash
# The GPU numbers of the training issue in one call (about 6 minutes on an H100).
#
# Runs on a lent GPU machine that has torch and transformers but maybe not optree/opacus:
# carry `.gpu/wheels` (cp312 wheels of optree<0.20 and opacus, e.g.
# `pip download --no-deps --python-version 3.12 --only-binary=:all: \
#   --platform manylinux2014_x86_64 "optree<0.20" opacus -d .gpu/wheels`) and run
#   bash benchmarks/gpu_run.sh
# Results go to $OUT (or ./artifacts/gpu when OUT is unset).
set -u
out="${OUT:-artifacts/gpu}"
mkdir -p "$out"
site=/tmp/fnllm-site
if ! python3 -c "import optree, opacus" 2>/dev/null && ls .gpu/wheels/*.whl >/dev/null 2>&1; then
    pip install -q --no-index --no-deps --target "$site" .gpu/wheels/*.whl
fi
export PYTHONPATH="$site:$PWD"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)" | tee -a "$out/gpu.txt"
run() {  # name, time limit (s), module and flags
    local name=$1 limit=$2
    shift 2
    timeout "$limit" python3 -m "$@" 2>&1 | grep -v USDT | tee "$out/$name.txt"
}
run full_step_bf16 300 benchmarks.full_step --device cuda --dtype bf16 --compile --runs 20
run per_example 120 benchmarks.per_example --device cuda --compile --runs 10
run optim 60 benchmarks.optim --device cuda
