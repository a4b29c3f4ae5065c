#!/usr/bin/env bash
# The models of the calibration study (issue 12), trained here on the full Fashion-MNIST (60,000 training images)
# with `moe-prune train` on the 2-core development machine (OMP_NUM_THREADS=1, beside the study on the other
# core). Resumable: a finished checkpoint is skipped, and a killed model resumes from its last epoch.
# Usage: bash benchmarks/train_study.sh [RUNS_DIR]   (default: runs)
set -euo pipefail
RUNS=${1:-runs}
MP=${MOE_PRUNE:-moe-prune}
mnist() {  # scale n: Chung et al.'s MNIST family (experts of width 784/n), 15 epochs
  [ -f "$RUNS/fmnist-s$1/mnist-e$2-s$1.safetensors" ] && return
  [ "$1" = 1 ] && [ -f "$RUNS/fmnist-s1/mnist-e$2.safetensors" ] && return
  $MP train --model mnist --experts "$2" --scale-init "$1" --out-dir "$RUNS/fmnist-s$1"
}
vit() {  # scale n: the Soft MoE ViT of many small experts: Soft MoE in the last half of the blocks (2 and 3 of
  # 4), one slot per expert, expert hidden width x n = 4096 fixed (n = 8: 512, 32: 128, 128: 32), 6 epochs
  local name="vit-e$2-s$1"; [ "$1" = 1 ] && name="vit-e$2"
  [ -f "$RUNS/fmnist-vit-s$1/$name.safetensors" ] && return
  $MP train --model vit --experts "$2" --scale-init "$1" --epochs 6 --out-dir "$RUNS/fmnist-vit-s$1" \
    --vit "{\"moe_layer_index\": 2, \"moe_mlp_ratio\": $(python3 -c "print(4096 / $2 / 64)")}"
}
for n in 8 16 32 64 128 256; do mnist 10 "$n"; done
for n in 8 32 128; do vit 10 "$n"; done
mnist 10 512
# Router scale started at 1 (soft-moe's default), for time only n = 8, 32, 128 of the MNIST family and n = 32 of
# the ViT (the earlier runs in benchmarks/results/eval_mnist_s1 and eval_vit_s1 have more).
for n in 8 32 128; do mnist 1 "$n"; done
vit 1 32
