#!/usr/bin/env bash
# The calibration study of issue 12 over the models of benchmarks/train_study.sh, in the order they finish
# training (a model not trained yet is waited for). Resumable: models already in study.json are skipped.
# Usage: bash benchmarks/run_study.sh [RUNS_DIR] [THREADS] [s10|s1|all]   (the two groups can run side by side:
# scale-1 results go to their own folder, calibration_study_s1)
set -euo pipefail
RUNS=${1:-runs}
THREADS=${2:-2}
PY=${PYTHON:-python}
GROUP=${3:-all}
OUT=benchmarks/results/calibration_study
study() { $PY benchmarks/calibration_study.py --out "$OUT" --threads "$THREADS" "$@"; }
wait_for() { while [ ! -f "$1" ]; do sleep 20; done; }
# MNIST family: every rule at 1/8, 1/4, 1/2 (n = 256: 1/8 and 1/4; n = 512: 1/8, for time: the loss rule's
# search runs the model 9 times per kept expert); healed at 1/8 (scale 10 up to n = 128: every rule).
MNIST_ALL="--heal-rules loss,mass,output,reconstruct --heal-renorm-rules loss,mass"
MNIST_FEW="--heal-rules loss,mass --heal-renorm-rules loss"
# The ViTs: keep 1/8 only (their loss-rule search and healing cost minutes per model on one core).
VIT="--keeps 1/8 --random-keeps 1/8 --renorm-reuse"
if [ "$GROUP" != s1 ]; then
for n in 8 16 32 64 128; do study $MNIST_ALL "$RUNS/fmnist-s10/mnist-e$n-s10.safetensors"; done
wait_for "$RUNS/fmnist-vit-s10/vit-e8-s10.safetensors"; study $VIT $MNIST_FEW "$RUNS/fmnist-vit-s10/vit-e8-s10.safetensors"
study $MNIST_FEW --keeps 1/8,1/4 --random-keeps 1/8,1/4 "$RUNS/fmnist-s10/mnist-e256-s10.safetensors"
for n in 32 128; do
  wait_for "$RUNS/fmnist-vit-s10/vit-e$n-s10.safetensors"; study $VIT $MNIST_FEW "$RUNS/fmnist-vit-s10/vit-e$n-s10.safetensors"
done
wait_for "$RUNS/fmnist-s10/mnist-e512-s10.safetensors"
study $MNIST_FEW --keeps 1/8 --random-keeps 1/8 "$RUNS/fmnist-s10/mnist-e512-s10.safetensors"
fi
[ "$GROUP" = s10 ] && exit 0
OUT=benchmarks/results/calibration_study_s1
for n in 8 32 128; do
  wait_for "$RUNS/fmnist-s1/mnist-e$n.safetensors"; study $MNIST_FEW --keeps 1/8 --random-keeps 1/8 "$RUNS/fmnist-s1/mnist-e$n.safetensors"
done
wait_for "$RUNS/fmnist-vit-s1/vit-e32.safetensors"
study $VIT --heal-rules loss --heal-renorm-rules "" "$RUNS/fmnist-vit-s1/vit-e32.safetensors"
