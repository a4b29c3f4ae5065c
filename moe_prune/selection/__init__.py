"""selection: which experts run. Select: per input (Algorithm 1), per batch (Algorithm 2), static over calibration
data (rules, budgets).

scores.py: expert scores (combine-weight mass), `select_experts` (top k per input or per batch), `calibrate` (score
sums over a data set) and the static top k, and `PrunedSoftMoE` / `with_experts` / `with_selection`, which run a
layer with a fixed or a per-call subset. calibration.py: `choose_subsets`, the static subsets by one of four rules:
mass and output (ranks), reconstruct (rules.py), loss (loss_rule.py, per layer or one global FLOP budget).

May import: moe_prune.errors, moe_prune.core and moe_prune.data (batches, shards). Nothing here imports
compression, onnx, measurement, serving, flows or cli.
"""
