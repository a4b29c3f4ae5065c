"""Grouped experts: R slot rows, each through its own expert of a stacked bank, in one Triton launch.

Per-input expert subsets (Chung et al.'s Algorithm 1) keep K of E experts per input, so the B*K*S kept slot rows
(axes: R rows, D model dim, E experts, H expert hidden, D_out expert output dim) each belong to one expert:

    y[r] = act(x[r] @ w1[e] + b1[e]) @ w2[e] + b2[e]     e = expert_ids[r]
    act: "gelu_mlp" exact (erf) GELU; "relu_mlp" ReLU (no biases); "geglu" value * gelu(gate), where w1[e] is
    [D, 2H], its first H columns the value and its last H the gate.

This is token-choice MoE's grouped GEMM (vLLM's fused_moe, ScatterMoE) with slot rows in place of tokens, and the
same layout: the launcher sorts the rows by expert (stably), pads each expert's run to a multiple of BLOCK_M and
hands the kernel two small int32 maps,

    rows[T * BLOCK_M]      the original row of each padded sorted position, -1 for padding
    tile_experts[T]        the expert of each row tile, -1 for tiles past the last used one

so no [R, D] copy of x is ever made (the gather is fused into the kernel's loads) and the output rows are stored
straight to their original positions (the scatter is fused into its store). Experts with no rows get no tile.
T is an upper bound, min(R, R // BLOCK_M + min(E, R)), that needs no device->host sync; spare tiles exit at once.

Design: one launch, grid (T * cdiv(D_out, BLOCK_N),). A program owns one row tile of one expert and one output
tile [BLOCK_M, BLOCK_N]; it walks H in BLOCK_H chunks, each chunk computing

    h   = act(x_tile @ w1[e][:, chunk] + b1[e][chunk])     # [BLOCK_M, BLOCK_H], fp32, never leaves registers
    acc += h @ w2[e][chunk, out_tile]                      # [BLOCK_M, BLOCK_N], fp32

(for GEGLU the value and the gate chunks are the same hidden indices of the two halves, so the activation needs
nothing from another program), then adds b2 and stores. The hidden activations never go to global memory; the
price is that the first matmul is recomputed once per output tile, so the launcher picks BLOCK_N to cover D_out
when it can (see grouped_experts_config). The program ids of one row tile's output tiles are adjacent, so they run
side by side and share w1[e] through L2.
Why not two launches (ScatterMoE: x @ w1 into a grouped [T*BLOCK_M, H] buffer, then @ w2 scattered)? They compute
each product once and have more programs at small R, at the price of writing and reading the hidden activations
and a second launch. The fused launch recomputes nothing for experts with D_out <= BLOCK_N (ViT-S/16's D=384 in
2 output tiles of 256 costs the first matmul twice; every MNIST expert fits one tile); at ViT-B/16 (D_out=768)
it computes the first matmul 3 times (6 on the FMA path). benchmarks/kernel_bench.py on a GPU should decide
whether a two-launch variant for wide experts is worth its code.

The torch reference is `grouped_experts_ref`: a loop over the used experts, each through
`moe_prune.core.mlp.expert_mlp` (the expert MLP eager torch runs).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from moe_prune.core.mlp import expert_mlp

from .launch import DTYPES, TL_DTYPES, GroupedExpertsConfig, grouped_experts_config, interpreting

# Kind -> ACTIVATION constexpr of the kernel.
_ACTIVATIONS = {"gelu_mlp": 0, "relu_mlp": 1, "geglu": 2}


# -- kernel ------------------------------------------------------------------------------------------------------


@triton.jit
def _gelu(v):
    # Exact GELU (erf), as torch.nn.functional.gelu's default.
    return 0.5 * v * (1.0 + tl.math.erf(v * 0.7071067811865476))


@triton.jit
def _grouped_experts_kernel(
    x_ptr, w1_ptr, b1_ptr, w2_ptr, b2_ptr,  # inputs; b1/b2 are dummies when absent
    y_ptr,  # output [R, D_out], written at the original row positions
    rows_ptr, tile_experts_ptr,  # the launcher's layout maps (int32), see the module docstring
    D, H, D_OUT,  # H: the hidden width after the activation (w1 has 2H columns for GEGLU)
    stride_xm, stride_xd,
    stride_w1e, stride_w1d, stride_w1h,
    stride_b1e, stride_b1h,
    stride_w2e, stride_w2h, stride_w2n,
    stride_b2e, stride_b2n,
    stride_ym, stride_yn,
    # Rows per tile: the padding unit of each expert's run. Soft MoE experts get few rows each (B*K*S/E: 32 at
    # batch 256 with K=16 of 128 experts, S=1), so small tiles waste less on padding; 16 is tl.dot's smallest M.
    BLOCK_M: tl.constexpr,
    # Output columns per program: covers D_out when it fits (the first matmul is recomputed per output tile).
    BLOCK_N: tl.constexpr,
    # Hidden chunk: the K of the second matmul and the N of the first; sized so h (fp32, twice for GEGLU) and the
    # FMA path's dot operands fit in registers; see grouped_experts_config.
    BLOCK_H: tl.constexpr,
    # Reduction step over D of the first matmul.
    BLOCK_D: tl.constexpr,
    # 0 GELU, 1 ReLU, 2 GEGLU: a constexpr so each kind compiles only its own activation (GEGLU its gate loads).
    ACTIVATION: tl.constexpr,
    # Bias switches: an absent bias's loads are compiled out ("relu_mlp" has none).
    HAS_B1: tl.constexpr, HAS_B2: tl.constexpr,
    # tl.dot operand type: the input's own type (tensor cores for 16-bit), fp32 for bf16 under the interpreter.
    DOT_DTYPE: tl.constexpr,
):
    pid = tl.program_id(0)
    num_n = tl.cdiv(D_OUT, BLOCK_N)
    # Output tiles of one row tile are adjacent program ids: they run together and share w1[e] through L2.
    tile = pid // num_n
    pid_n = pid % num_n
    expert = tl.load(tile_experts_ptr + tile)
    if expert < 0:
        return  # a spare tile of the launcher's upper bound
    expert = expert.to(tl.int64)  # 64-bit: expert * stride_w1e passes 2**31 elements for large banks

    offs_m = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    rows = tl.load(rows_ptr + offs_m)  # [BLOCK_M] original row positions, -1 for padding
    row_ok = rows >= 0
    rows = tl.where(row_ok, rows, 0).to(tl.int64)  # padding points at row 0 (masked): no negative addresses
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < D_OUT

    w1_e = w1_ptr + expert * stride_w1e
    w2_e = w2_ptr + expert * stride_w2e
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for h0 in range(0, H, BLOCK_H):
        offs_h = h0 + tl.arange(0, BLOCK_H)
        h_ok = offs_h < H
        # First matmul over D for this hidden chunk (value, and gate for GEGLU).
        hv = tl.zeros((BLOCK_M, BLOCK_H), dtype=tl.float32)
        hg = tl.zeros((BLOCK_M, BLOCK_H), dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
            offs_d = d0 + tl.arange(0, BLOCK_D)
            d_ok = offs_d < D
            x = tl.load(
                x_ptr + rows[:, None] * stride_xm + offs_d[None, :] * stride_xd,
                mask=row_ok[:, None] & d_ok[None, :], other=0.0,
            )  # [BLOCK_M, BLOCK_D], gathered from the original rows
            w1_mask = d_ok[:, None] & h_ok[None, :]
            w1 = tl.load(w1_e + offs_d[:, None] * stride_w1d + offs_h[None, :] * stride_w1h,
                         mask=w1_mask, other=0.0)  # [BLOCK_D, BLOCK_H]
            # ieee: fp32 inputs must match torch's fp32 matmul (~1e-6), not TF32 (~1e-3); 16-bit inputs ignore it.
            hv = tl.dot(x.to(DOT_DTYPE), w1.to(DOT_DTYPE), hv, input_precision="ieee")
            if ACTIVATION == 2:
                w1g = tl.load(w1_e + offs_d[:, None] * stride_w1d + (offs_h + H)[None, :] * stride_w1h,
                              mask=w1_mask, other=0.0)  # [BLOCK_D, BLOCK_H], the gate half
                hg = tl.dot(x.to(DOT_DTYPE), w1g.to(DOT_DTYPE), hg, input_precision="ieee")
        if HAS_B1:
            b1_e = b1_ptr + expert * stride_b1e
            hv += tl.load(b1_e + offs_h * stride_b1h, mask=h_ok, other=0.0).to(tl.float32)[None, :]
            if ACTIVATION == 2:
                hg += tl.load(b1_e + (offs_h + H) * stride_b1h, mask=h_ok, other=0.0).to(tl.float32)[None, :]
        # Hidden columns past H are act(0) = 0 for every kind, and their w2 rows load as 0 besides.
        if ACTIVATION == 0:
            h = _gelu(hv)
        elif ACTIVATION == 1:
            h = tl.maximum(hv, 0.0)
        else:
            h = hv * _gelu(hg)
        # Second matmul: this hidden chunk's contribution to the output tile.
        w2 = tl.load(w2_e + offs_h[:, None] * stride_w2h + offs_n[None, :] * stride_w2n,
                     mask=h_ok[:, None] & n_ok[None, :], other=0.0)  # [BLOCK_H, BLOCK_N]
        acc = tl.dot(h.to(DOT_DTYPE), w2.to(DOT_DTYPE), acc, input_precision="ieee")
    if HAS_B2:
        acc += tl.load(b2_ptr + expert * stride_b2e + offs_n * stride_b2n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    # The scatter back to x's row order, fused into the store.
    tl.store(y_ptr + rows[:, None] * stride_ym + offs_n[None, :] * stride_yn,
             acc.to(y_ptr.dtype.element_ty), mask=row_ok[:, None] & n_ok[None, :])


def _offsets_fit(t: torch.Tensor) -> bool:
    """Whether every offset inside one expert (one row, for x and y) of `t` fits in int32: the kernel multiplies
    its 32-bit tile offsets by the strides and takes only the expert and row index in 64 bits."""
    return sum((n - 1) * abs(s) for n, s in zip(t.shape[1:], t.stride()[1:])) < 2**31


# -- launcher and reference --------------------------------------------------------------------------------------


def _check_args(x, expert_ids, w1, b1, w2, b2, kind):
    """Validate the arguments; return (E, D, H, D_out)."""
    if kind not in _ACTIVATIONS:
        raise ValueError(f"grouped_experts: kind must be one of {sorted(_ACTIVATIONS)}, got {kind!r}")
    if x.dim() != 2:
        raise ValueError(f"grouped_experts: x must be [R, D], got shape {list(x.shape)}")
    R, D = x.shape
    if expert_ids.shape != (R,) or expert_ids.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"grouped_experts: expert_ids must be int64 [R]=[{R}], got {expert_ids.dtype} "
                         f"{list(expert_ids.shape)}")
    if w1.dim() != 3 or w1.shape[1] != D:
        raise ValueError(f"grouped_experts: w1 must be [E, D, H1] with D={D}, got {list(w1.shape)}")
    if w2.dim() != 3 or w2.shape[0] != w1.shape[0]:
        raise ValueError(f"grouped_experts: w2 must be [E, H, D_out] with E={w1.shape[0]}, got {list(w2.shape)}")
    E, _, H1 = w1.shape
    H, D_out = w2.shape[1], w2.shape[2]
    if H1 != (2 * H if kind == "geglu" else H):
        raise ValueError(f"grouped_experts: kind {kind!r} needs w1 with {'2H' if kind == 'geglu' else 'H'} columns "
                         f"for w2's H={H}, got w1 {list(w1.shape)} (GEGLU: value half first, then gate)")
    if b1 is not None and tuple(b1.shape) != (E, H1):
        raise ValueError(f"grouped_experts: b1 must be [E, H1]=[{E}, {H1}], got {list(b1.shape)}")
    if b2 is not None and tuple(b2.shape) != (E, D_out):
        raise ValueError(f"grouped_experts: b2 must be [E, D_out]=[{E}, {D_out}], got {list(b2.shape)}")
    for name, t in (("expert_ids", expert_ids), ("w1", w1), ("b1", b1), ("w2", w2), ("b2", b2)):
        if t is not None and t.device != x.device:
            raise ValueError(f"grouped_experts: {name} is on {t.device} but x is on {x.device}")
    for name, t in (("w1", w1), ("b1", b1), ("w2", w2), ("b2", b2)):
        if t is not None and t.dtype != x.dtype:
            raise ValueError(f"grouped_experts: {name} is {t.dtype} but x is {x.dtype}; cast the weights once")
    if x.dtype not in DTYPES:
        raise ValueError(f"grouped_experts: x must be float32, float16 or bfloat16, got {x.dtype}")
    for name, t in (("x", x), ("w1", w1), ("b1", b1), ("w2", w2), ("b2", b2)):
        if t is not None and not _offsets_fit(t):
            raise ValueError(f"grouped_experts: {name} {list(t.shape)} with strides {list(t.stride())} has offsets "
                             f"past 2**31 elements inside one expert or row; make it contiguous")
    if not x.is_cuda and not interpreting():
        raise ValueError("grouped_experts: x is on the CPU; the kernel needs a CUDA tensor (or TRITON_INTERPRET=1); "
                         "use grouped_experts_ref on the CPU")
    return E, D, H, D_out


def grouped_experts_supported(x: torch.Tensor, w1: torch.Tensor, kind: str) -> bool:
    """Whether `grouped_experts` takes these inputs, so that a caller can fall back to `grouped_experts_ref`.

    True for float32/float16/bfloat16 x with w1 of the same dtype and device, x on CUDA (or any device under
    TRITON_INTERPRET=1), kind "gelu_mlp", "relu_mlp" or "geglu", D >= 1, H1 >= 1, and offsets inside one row of
    x and one expert of w1 below 2**31 elements (the kernel's 32-bit tile offsets). Any R, E and D_out are taken.
    w2 and the biases are not looked at here: the launcher raises ValueError on their shapes, dtypes, or offsets.

    Example:
        >>> x, w1 = torch.randn(8, 384, device="cuda"), torch.randn(16, 384, 1536, device="cuda")
        >>> grouped_experts_supported(x, w1, "gelu_mlp"), grouped_experts_supported(x.double(), w1, "gelu_mlp")
        (True, False)
    """
    return (
        kind in _ACTIVATIONS
        and x.dim() == 2 and w1.dim() == 3
        and x.dtype in DTYPES and w1.dtype == x.dtype
        and x.device == w1.device
        and (x.is_cuda or interpreting())
        and x.shape[1] == w1.shape[1]
        and w1.shape[1] >= 1 and w1.shape[2] >= 1
        and _offsets_fit(x) and _offsets_fit(w1)
    )


def expert_layout(expert_ids: torch.Tensor, num_experts: int, block_m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The launcher's layout (as vLLM's moe_align_block_size): rows sorted stably by expert, each expert's run
    padded to a multiple of `block_m`, with no device->host sync.

    Args:
        expert_ids: [R] positions into the expert stack, in [0, num_experts).
        num_experts: E.
        block_m: the row tile.

    Returns:
        rows [T * block_m] int32: the original row of each padded sorted position, -1 for padding;
        tile_experts [T] int32: each row tile's expert, -1 for spare tiles.
        T = min(R, R // block_m + min(E, R)) bounds sum_e cdiv(count_e, block_m): full tiles hold R // block_m
        rows at most, each used expert adds at most one partly filled tile, and no tile is empty.

    Example:
        >>> rows, tiles = expert_layout(torch.tensor([2, 0, 2]), 3, block_m=2)
        >>> rows.tolist(), tiles.tolist()
        ([1, -1, 0, 2, -1, -1], [0, 2, -1])
    """
    R = expert_ids.numel()
    device = expert_ids.device
    T = min(R, R // block_m + min(num_experts, R))
    sorted_ids, order = torch.sort(expert_ids, stable=True)  # [R], [R]: order[i] = original row of sorted row i
    counts = torch.zeros(num_experts, dtype=torch.int64, device=device).scatter_add_(
        0, expert_ids.long(), torch.ones_like(expert_ids, dtype=torch.int64))  # [E], no sync (unlike bincount)
    tiles_per_expert = (counts + block_m - 1) // block_m  # [E]
    tile_end = torch.cumsum(tiles_per_expert, 0)  # [E] inclusive
    run_start = torch.cumsum(counts, 0) - counts  # [E] first sorted row of each expert
    padded_start = (tile_end - tiles_per_expert) * block_m  # [E] first padded position of each expert
    rank = torch.arange(R, device=device) - run_start[sorted_ids]  # [R] position within its expert's run
    rows = torch.full((T * block_m,), -1, dtype=torch.int32, device=device)
    rows[padded_start[sorted_ids] + rank] = order.to(torch.int32)
    tile_experts = torch.searchsorted(tile_end, torch.arange(T, device=device), right=True)  # [T], E past the end
    tile_experts = torch.where(tile_experts < num_experts, tile_experts, -1).to(torch.int32)
    return rows, tile_experts


def kernel_args(x, w1, b1, w2, b2, y, rows, tile_experts, kind, config, dot_dtype):
    """Grid, positional arguments and constexprs of one launch (shared with benchmarks/kernel_compile.py, which
    compiles ahead of time exactly what the launcher would launch)."""
    D = x.shape[1]
    H, D_out = w2.shape[1], w2.shape[2]
    T = tile_experts.numel()
    grid = (T * triton.cdiv(D_out, config.block_n),)
    args = (
        # Absent biases get dummy pointers: their HAS_* constexpr is False, so they are never read.
        x, w1, b1 if b1 is not None else w1, w2, b2 if b2 is not None else w2,
        y, rows, tile_experts,
        D, H, D_out,
        x.stride(0), x.stride(1),
        w1.stride(0), w1.stride(1), w1.stride(2),
        b1.stride(0) if b1 is not None else 0, b1.stride(1) if b1 is not None else 0,
        w2.stride(0), w2.stride(1), w2.stride(2),
        b2.stride(0) if b2 is not None else 0, b2.stride(1) if b2 is not None else 0,
        y.stride(0), y.stride(1),
    )
    constexprs = dict(
        BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_H=config.block_h, BLOCK_D=config.block_d,
        ACTIVATION=_ACTIVATIONS[kind], HAS_B1=b1 is not None, HAS_B2=b2 is not None, DOT_DTYPE=dot_dtype,
    )
    return grid, args, constexprs


def grouped_experts(
    x: torch.Tensor,
    expert_ids: torch.Tensor,
    w1: torch.Tensor,
    b1: torch.Tensor | None,
    w2: torch.Tensor,
    b2: torch.Tensor | None,
    kind: str,
    *,
    out: torch.Tensor | None = None,
    config: GroupedExpertsConfig | None = None,
) -> torch.Tensor:
    """Each row of x through its own expert of a stacked bank, in one Triton launch (only used experts cost).

    Args:
        x: slot rows [R, D], float32, float16 or bfloat16 (CUDA; CPU under TRITON_INTERPRET=1).
        expert_ids: [R] int64 (or int32) positions into the stack's first axis, in any order.
        w1: [E, D, H1] (H1 = H, or 2H for "geglu": value columns first, then gate), x's dtype.
        b1: [E, H1] or None. w2: [E, H, D_out]. b2: [E, D_out] or None.
        kind: "gelu_mlp", "relu_mlp" or "geglu" (`moe_prune.core.mlp.expert_activation`).
        out: optional [R, D_out] output in x's dtype (any strides); every row is written.
        config: a `GroupedExpertsConfig` to launch with instead of `grouped_experts_config`'s pick (tests use
            small tiles to reach several loop trips with small shapes).

    Returns:
        y [R, D_out] in x's dtype and row order: y[r] = expert expert_ids[r] applied to x[r], accumulated in fp32.

    Raises:
        ValueError: a shape, dtype, device or stride the kernel does not take, or (on the CPU, where checking is
            free) an expert id outside [0, E); on CUDA an id out of range fails the layout's scatter_add_ device
            assert instead (checking would cost a device->host sync).

    Example:
        >>> w1, w2 = torch.randn(8, 64, 256, device="cuda"), torch.randn(8, 256, 64, device="cuda")
        >>> x, ids = torch.randn(10, 64, device="cuda"), torch.randint(0, 8, (10,), device="cuda")
        >>> y = grouped_experts(x, ids, w1, None, w2, None, "relu_mlp")  # [10, 64]
    """
    E, D, H, D_out = _check_args(x, expert_ids, w1, b1, w2, b2, kind)
    R = x.shape[0]
    if out is None:
        out = torch.empty(R, D_out, dtype=x.dtype, device=x.device)
    elif out.shape != (R, D_out) or out.dtype != x.dtype or out.device != x.device:
        raise ValueError(f"grouped_experts: out must be {x.dtype} [{R}, {D_out}] on {x.device}, got {out.dtype} "
                         f"{list(out.shape)} on {out.device}")
    if R == 0:
        return out
    if not expert_ids.is_cuda:
        lo, hi = int(expert_ids.min()), int(expert_ids.max())
        if lo < 0 or hi >= E:
            raise ValueError(f"grouped_experts: expert_ids must lie in [0, {E}), got [{lo}, {hi}]")
    if D_out == 0:
        return out
    dtype = DTYPES[x.dtype]
    if config is None:
        config = grouped_experts_config(dtype, torch.cuda.get_device_capability(x.device) if x.is_cuda else None,
                                        D_out)
    rows, tile_experts = expert_layout(expert_ids, E, config.block_m)
    dot_dtype = TL_DTYPES[dtype]
    if dtype == "bf16" and interpreting():
        dot_dtype = tl.float32  # the interpreter's tl.dot multiplies bf16 bit patterns as integers
    grid, args, constexprs = kernel_args(x, w1, b1, w2, b2, out, rows, tile_experts, kind, config, dot_dtype)
    _grouped_experts_kernel[grid](*args, **constexprs, **config.launch_options())
    return out


def grouped_experts_ref(
    x: torch.Tensor,
    expert_ids: torch.Tensor,
    w1: torch.Tensor,
    b1: torch.Tensor | None,
    w2: torch.Tensor,
    b2: torch.Tensor | None,
    kind: str,
) -> torch.Tensor:
    """`grouped_experts` in plain torch: a loop over the used experts, each on its rows, in x's dtype.

    Args and Returns: as `grouped_experts` (without `out` and `config`); the math is `moe_prune.core.mlp.expert_mlp`, as eager torch runs it.

    Example:
        >>> w1, w2 = torch.randn(3, 4, 6), torch.randn(3, 6, 5)
        >>> grouped_experts_ref(torch.randn(7, 4), torch.tensor([2, 0, 2, 1, 0, 0, 2]), w1, None, w2, None,
        ...                     "relu_mlp").shape
        torch.Size([7, 5])
    """
    y = x.new_zeros(x.shape[0], w2.shape[-1])  # [R, D_out]
    for e in torch.unique(expert_ids).tolist():
        idx = (expert_ids == e).nonzero().squeeze(1)  # [R_e]
        y[idx] = expert_mlp(kind, x[idx], w1[e], None if b1 is None else b1[e], w2[e],
                            None if b2 is None else b2[e])  # [R_e, D_out]
    return y
