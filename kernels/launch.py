"""What the two kernels share: the dtypes they take, whether Triton's interpreter runs them, and their launch
configurations (one frozen dataclass per kernel and the one function that picks it for a dtype and a GPU).

benchmarks/kernel_compile.py compiles every configuration these functions return, ahead of time, for sm_75, sm_86
and sm_90, with the same `launch_options`, and reports registers and spills.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

# The input dtypes the kernels take, and their names in the configurations and in Triton.
DTYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
TL_DTYPES = {"fp32": tl.float32, "fp16": tl.float16, "bf16": tl.bfloat16}


def interpreting() -> bool:
    """Whether Triton's interpreter runs the kernels (TRITON_INTERPRET=1: CPU tensors, for the tests)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def launch_options(num_warps: int, num_stages: int, maxnreg: int | None) -> dict:
    """Compile options of a launch (the same for kernel_compile.py's ahead-of-time compile)."""
    # FP fusion pinned on: Triton 3.10 turns its default off, and the kernels' tolerances assume FMAs.
    options = dict(num_warps=num_warps, num_stages=num_stages, enable_fp_fusion=True)
    if maxnreg is not None:
        options["maxnreg"] = maxnreg
    return options


_DTYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


TL_DTYPES = {"fp32": tl.float32, "fp16": tl.float16, "bf16": tl.bfloat16}


@dataclass(frozen=True)
class RoutingConfig:
    """One shipped launch configuration of `_soft_moe_routing_kernel` (pick one with `routing_config`).

    Args:
        dtype: "fp32", "fp16" or "bf16" (the input's type).
        tensor_cores: whether tl.dot runs on tensor cores (16-bit inputs on sm_80 and newer) or as FMAs (fp32,
            whose ieee precision has no tensor-core path, and any input on sm_75, where Triton emits no MMA); the
            FMA path takes fp32 operands whatever the input (see kernel_args).
        row_m, row_n: the row programs' tile. col_m, col_n: the column programs' tile.
        one_pass_rows, one_pass_cols: N <= row_n, M <= col_m (the compiled variant; see the kernel).
        block_d: the reduction step over D. num_warps, num_stages, maxnreg: as in triton.Config (maxnreg None:
            ptxas chooses).
    """

    dtype: str
    tensor_cores: bool
    row_m: int
    row_n: int
    col_m: int
    col_n: int
    one_pass_rows: bool
    one_pass_cols: bool
    block_d: int
    num_warps: int
    num_stages: int
    maxnreg: int | None

    def launch_options(self) -> dict:
        """Compile options of a launch (the same for kernel_compile.py's ahead-of-time compile)."""
        return launch_options(self.num_warps, self.num_stages, self.maxnreg)


def routing_config(dtype: str, capability: tuple[int, int] | None, tokens: int, slots: int) -> RoutingConfig:
    """The launch configuration for `dtype` inputs of M=`tokens`, N=`slots` on a GPU of compute `capability`
    (None: the interpreter, configured as sm_90).

    The one function that picks launch parameters: benchmarks/kernel_compile.py compiles what it returns for
    every dtype, target and variant. Tiles: row_n=128 holds the ViT routers' N=128 slots and col_m=256 their
    M=197 tokens, so both softmaxes take one pass there; a row and a column tile hold equally many logits, so an
    input's programs take equal time (at M=197, N=128: 4 row + 4 column programs with tensor cores, 7 + 8
    without). FMA tiles are half as large: Triton's FMA dot holds each thread's rows and columns for all BLOCK_D
    steps in registers, so BLOCK_D is the smallest K tl.dot allows and the tile shrinks until nothing spills.
    With tensor cores the operands go through shared memory and BLOCK_D=32 keeps the 256-row X tile at 32
    registers a thread. maxnreg, because ptxas's own choice spills in places: 128 (two programs of 8 warps per
    SM) on sm_75, where ptxas otherwise picks fewer registers and spills the two-pass variants, and for the
    one-pass tensor-core variant (ptxas would take 136 on sm_90); 255 for the two-pass tensor-core variants
    (ptxas capped itself at 128 and spilled 8 bytes on sm_86; they need up to ~200); ptxas's choice for FMA on
    sm_80+ (80 registers for the one-pass variant, no spills anywhere). benchmarks/kernel_compile.py checks all.

    Example:
        >>> cfg = routing_config("fp16", (8, 6), tokens=197, slots=128)
        >>> cfg.tensor_cores, cfg.row_m, cfg.col_n, cfg.block_d, cfg.one_pass_rows, cfg.one_pass_cols
        (True, 64, 32, 32, True, True)
    """
    if dtype not in TL_DTYPES:
        raise ValueError(f"routing_config: dtype must be one of {sorted(TL_DTYPES)}, got {dtype!r}")
    major = 9 if capability is None else capability[0]
    tensor_cores = dtype != "fp32" and major >= 8
    if tensor_cores:
        row_m, row_n, col_m, col_n, block_d = 64, 128, 256, 32, 32
    else:
        row_m, row_n, col_m, col_n = 32, 128, 256, 16
        block_d = 8 if dtype == "fp32" else 16  # the smallest K of an fp32 / a 16-bit tl.dot
    one_pass_rows, one_pass_cols = slots <= row_n, tokens <= col_m
    if major < 8:
        maxnreg = 128
    elif tensor_cores:
        maxnreg = 128 if one_pass_rows and one_pass_cols else 255
    else:
        maxnreg = None
    return RoutingConfig(dtype, tensor_cores, row_m, row_n, col_m, col_n, one_pass_rows, one_pass_cols, block_d,
                         num_warps=8, num_stages=2, maxnreg=maxnreg)


@dataclass(frozen=True)
class GroupedExpertsConfig:
    """One shipped launch configuration of `_grouped_experts_kernel` (pick one with `grouped_experts_config`).

    Args:
        dtype: "fp32", "fp16" or "bf16" (the input's type).
        tensor_cores: whether tl.dot runs on tensor cores (16-bit inputs on sm_80 and newer) or as FMAs (fp32,
            whose ieee precision has no tensor-core path, and any input on sm_75, where Triton emits no MMA).
        block_m, block_n, block_h, block_d: the kernel's tiles (see its constexprs).
        num_warps, num_stages, maxnreg: as in triton.Config (maxnreg None: ptxas chooses).
    """

    dtype: str
    tensor_cores: bool
    block_m: int
    block_n: int
    block_h: int
    block_d: int
    num_warps: int
    num_stages: int
    maxnreg: int | None = None

    def launch_options(self) -> dict:
        """Compile options of a launch (the same for kernel_compile.py's ahead-of-time compile)."""
        return launch_options(self.num_warps, self.num_stages, self.maxnreg)


def grouped_experts_config(dtype: str, capability: tuple[int, int] | None, out_dim: int) -> GroupedExpertsConfig:
    """The launch configuration for `dtype` inputs and experts of output width `out_dim` on a GPU of compute
    `capability` (None: the interpreter, configured as sm_90).

    The one function that picks launch parameters: benchmarks/kernel_compile.py compiles what it returns for
    every dtype, target and kind. BLOCK_N is D_out rounded up to a power of two (at least 16), capped where the
    kernel still compiles without spills; 8 warps throughout, since at 4 the [32, 256] accumulator and GEGLU's
    two hidden chunks took all 255 registers and spilled on sm_90. With tensor cores the operands go through
    shared memory: BLOCK_N up to 256 (ViT-S/16's D_out=384 in 2 output tiles, ViT-B/16's 768 in 3),
    BLOCK_H=BLOCK_D=64 (half the loop trips of 32), about 126 registers a thread and 37 KiB of shared memory.
    On the FMA path Triton's dot holds each thread's rows and columns of both operands for all K steps in
    registers, so BLOCK_H and BLOCK_D are the smallest K tl.dot allows (8 for fp32, 16 for 16-bit; BLOCK_H at
    least 16 as the N of the first dot), BLOCK_N stops at 128 and maxnreg=128 (ptxas picked 80 on sm_90 for
    fp32 GEGLU and spilled 16 bytes). benchmarks/kernel_compile.py checks every choice on sm_75, sm_86, sm_90.

    Example:
        >>> cfg = grouped_experts_config("fp16", (8, 6), out_dim=384)
        >>> cfg.tensor_cores, cfg.block_m, cfg.block_n, cfg.block_h
        (True, 32, 256, 64)
    """
    if dtype not in TL_DTYPES:
        raise ValueError(f"grouped_experts_config: dtype must be one of {sorted(TL_DTYPES)}, got {dtype!r}")
    major = 9 if capability is None else capability[0]
    tensor_cores = dtype != "fp32" and major >= 8
    block_n = max(16, triton.next_power_of_2(max(1, out_dim)))
    if tensor_cores:
        return GroupedExpertsConfig(dtype, True, block_m=32, block_n=min(block_n, 256), block_h=64, block_d=64,
                                    num_warps=8, num_stages=2)
    k = 8 if dtype == "fp32" else 16  # the smallest K of an fp32 / a 16-bit tl.dot
    return GroupedExpertsConfig(dtype, False, block_m=32, block_n=min(block_n, 128), block_h=16, block_d=k,
                                num_warps=8, num_stages=2, maxnreg=128)
