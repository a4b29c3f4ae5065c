"""Triton kernels, shipped as `moe_prune.kernels` (the folder `kernels/` of the repository).

Importing this package does not import triton; each kernel module does, so the CPU-only install works.
"""
