#!/usr/bin/env bash
# The suite on a lent GPU machine, run from a snapshot folder holding rlhf_jax/, experiments/ and whl/
# (an ml_collections wheel; the machine's own jax 0.11 and flax 0.12.10 are used; flax 0.12.8 fails on jax 0.11):
#   bash experiments/benchmarks/gpu.sh [--only=...] [--size=gpu-350m] [--set=model.attention_impl=cudnn]
set -uo pipefail
rm -rf /tmp/site_bench; python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site_bench whl/*.whl || exit 1
export PYTHONPATH=/tmp/site_bench:$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.max.sm --format=csv
python3 -c "import jax, flax; print('jax', jax.__version__, 'flax', flax.__version__, jax.devices())"
python3 experiments/benchmarks/run.py --size=gpu-350m "$@" 2> "${OUT:-/tmp}/gpu.log" | tee "${OUT:-/tmp}/gpu.jsonl"
tail -5 "${OUT:-/tmp}/gpu.log"
