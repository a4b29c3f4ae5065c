"""flows: runs that go through several stages, above them all. demo.py: `moe-prune demo`, the whole flow on the
bundled checkpoint (load, calibrate, compress, heal, evaluate, export, benchmark). train.py: `moe-prune train`, the
small Soft MoE models the studies measure.

May import: moe_prune.errors and every stage: core, data, selection, compression, onnx, measurement, serving.
Only the CLI imports flows.
"""
