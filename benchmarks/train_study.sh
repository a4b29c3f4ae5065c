#!/usr/bin/env bash
# The models of the calibration study (issue 12), trained here on the full Fashion-MNIST (60,000 training images)
# with `moe-prune train` on two CPU cores. Every command is resumable (OUT.resume after each epoch); rerun to
# continue. Usage: bash benchmarks/train_study.sh [RUNS_DIR]   (default: runs)
set -euo pipefail
RUNS=${1:-runs}
MP=${MOE_PRUNE:-moe-prune}
# Chung et al.'s MNIST family, 15 epochs, router scale started at 10 and at 1.
$MP train --model mnist --experts 8,16,32,64,128,256,512 --scale-init 10 --out-dir "$RUNS/fmnist-s10"
# The Soft MoE ViT of many small experts: Soft MoE in the last half of the blocks (2 and 3 of 4), one slot per
# expert, expert hidden width x n = 4096 fixed (n = 8: 512, n = 32: 128, n = 128: 32), 6 epochs (time on 2 cores).
for scale in 10 1; do
  for pair in 8:8 32:2 128:0.5; do
    n=${pair%%:*}; ratio=${pair##*:}
    $MP train --model vit --experts "$n" --scale-init "$scale" --epochs 6 --out-dir "$RUNS/fmnist-vit-s$scale" \
      --vit "{\"moe_layer_index\": 2, \"moe_mlp_ratio\": $ratio}"
  done
done
$MP train --model mnist --experts 8,32,128,512 --scale-init 1 --out-dir "$RUNS/fmnist-s1"
