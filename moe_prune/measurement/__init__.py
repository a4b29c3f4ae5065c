"""measurement: how good and how fast. Measure: accuracy (eval) and latency against FLOP, bytes and roofline bounds
(bench).

accuracy.py: top-1, top-5 and per-class accuracy, one batch in memory at a time (compression imports it, so it
imports nothing from compression or onnx). evaluate.py: the paper's study of a model run with expert subsets
(`moe-prune eval`). bench.py and timing.py: latency of the full, compressed and selecting models in PyTorch and
ONNX Runtime (`moe-prune bench`), beside the bounds from core.flops. reports.py: tables, JSON, plots.

May import: moe_prune.errors, core, kernels, data, selection, compression and onnx. Nothing here imports serving,
flows or cli.
"""
