#!/usr/bin/env bash
# The GPU checks, one script for a lent accelerator machine (JAX, Flax, Optax, Orbax and
# pytest already installed there; nothing fetched). Run from the repository root:
#   bash benchmarks/gpu.sh [OUT_DIR]
# Writes versions, the attention/model tests on the GPU (cuDNN paths included), the
# sharding benchmark for the tiny and the wide model, and tiny.yaml's time to solve.
set -u
out=${1:-${OUT:-/tmp/gpu_out}}
mkdir -p "$out"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
export XLA_PYTHON_CLIENT_PREALLOCATE=false  # several pytest workers share the GPU
py=${PYTHON:-python3}
{
  nvidia-smi -L
  $py -c "import jax, flax, optax, orbax.checkpoint as o; print('jax', jax.__version__, \
'flax', flax.__version__, 'optax', optax.__version__, 'orbax', o.__version__); print(jax.devices())"
} 2>&1 | tee "$out/versions.txt"
timeout 150 $py -m pytest -q -p no:cacheprovider -n 4 --maxfail 30 --timeout 120 \
  tests/test_attention.py tests/test_jax_nn_suite.py tests/test_flash.py tests/nn \
  -k "not refuses_off_gpu" 2>&1 | tail -25 | tee "$out/tests.txt"
for model in tiny wide; do
  timeout 120 $py benchmarks/sharding.py --model "$model" --rounds 3 2>&1 \
    | tee "$out/sharding_$model.txt"
done
timeout 60 $py benchmarks/train_speed.py --runs 1 2>&1 | tee "$out/train_speed.txt"
