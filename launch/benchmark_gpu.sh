#!/usr/bin/env bash
# The benchmark on one GPU: ViT-B/16, bf16, clip_jax beside HF transformers (PyTorch), FLIP 50%.
#   launch/benchmark_gpu.sh OUT_DIR [BATCH]
# Expects jax[cuda], flax, optax, orbax-checkpoint, grain, ml-collections, torch and
# transformers importable (pip install -e '.[test]' plus the jax CUDA wheels).
set -euo pipefail
out=${1:-.}
batch=${2:-256}
mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_MEM_FRACTION=0.9
python3 -m clip_jax.benchmark --variant=ViT-B/16 --batch="$batch" --dtype=bfloat16 --steps=10 \
  --torch --flip=0.5 --json="$out/b16_bf16_b${batch}.json"
python3 -m clip_jax.benchmark --variant=ViT-B/16 --batch=$((batch * 2)) --dtype=bfloat16 --steps=5 \
  --remat=dots --json="$out/b16_bf16_b$((batch * 2))_remat.json"
