"""Triton kernels, shipped as `moe_prune.kernels` (the folder `kernels/` of the repository): the fused routing
(routing.py: dispatch, combine and expert scores in one launch) and the grouped experts (grouped_experts.py), each
beside its torch reference, and launch.py, their configurations and what both launchers share.

Importing this package does not import triton; each kernel module does, so the CPU-only install works.
May import: moe_prune.errors and core's torch references (core.routing, core.mlp), which import no kernel.
"""
