"""Fused Soft MoE routing: dispatch weights, combine weights and per-input expert scores in one Triton launch.

For every input b of a batch (axes: B batch, M tokens, D model dim, E experts, S slots per expert, N = E*S):

    logits   = norm(X[b]) * gain @ (scale * Phi / |Phi|)   # [M, N], never written to global memory
    dispatch = softmax(logits, over tokens)                # [M, N], each slot (column) sums to 1
    combine  = softmax(logits, over slots)                 # [M, N], each token (row) sums to 1
    scores   = combine summed over tokens and each expert's S slots   # [E], fp32

Design: one launch, grid (row programs + column programs per input, B). Axis 0 varies fastest, so the programs
of one input are scheduled side by side and should find its X in L2 after the first reads it (not yet measured:
benchmarks/kernel_bench.py does that on a GPU).
- A *row program* owns ROW_M tokens and all N slots: every row of its logits is complete, so it writes those
  combine rows and adds their column sums to the scores: fp32 atomics into a [B, E] buffer the launcher zeroes
  (a memset before the launch; with several row programs per input the summation order, hence the last bit of
  a score, can vary from run to run).
- A *column program* owns COL_N slots and all M tokens: every column of its logits is complete, so it writes
  those dispatch columns.
- Neither kind waits for the other, so nothing needs two programs resident at once (a spin-wait would deadlock
  the interpreter, which runs programs one by one, and a GPU running more programs than fit); the price is that
  each logit is computed twice, once per softmax, and each column program reads all of its input's X. A grid of
  (B,), one program per input, computes each logit once but must hold a whole [197, 128] fp32 tile (128 KiB of
  registers: compiled at 16 warps it spilled on every target) and runs on one SM at batch 1. At the ViT shapes
  (M=197, N=128) an input gets 4 row + 4 column programs of equal work with tensor cores (7 + 8 on the FMA path):
  8 programs at batch 1, 2048 at batch 256.
- A softmax whose axis does not fit one tile (N > ROW_N, M > COL_M) takes two passes over it: an online max/sum
  pass, then a pass that recomputes the logits and writes. The statistics stay in registers; no scratch buffers,
  and no logit ever goes to global memory.

The torch reference is `soft_moe_routing_ref`, built on `moe_prune.core.routing.routing_ref`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from moe_prune.core.routing import normalize_tokens, router_weight, routing_ref

from .launch import DTYPES, TL_DTYPES, RoutingConfig, interpreting, routing_config

# Softmax floor for padded (masked-out) tokens in the dispatch softmax: torch.finfo(float32).min, as routing_ref
# fills them (a finite floor: a slot whose every token is padded gets uniform weights, not NaN).
_MASKED_LOGIT = tl.constexpr(-3.4028234663852886e38)


# -- kernel ------------------------------------------------------------------------------------------------------


@triton.jit
def _logits_tile(
    x_ptr, phi_ptr, scale_ptr, gain_ptr, offs_m, offs_n, M, N, D,
    stride_xm, stride_xd, stride_pd, stride_pn, eps,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    TOKEN_L2: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_GAIN: tl.constexpr, DOT_DTYPE: tl.constexpr,
    GAIN_ON_PHI: tl.constexpr,
):
    """Normalized logits [BLOCK_M, BLOCK_N] of tokens offs_m and slots offs_n (x_ptr already at input b), fp32."""
    m_ok = offs_m < M
    n_ok = offs_n < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    x_sq = tl.zeros((BLOCK_M,), dtype=tl.float32)
    phi_sq = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        d_ok = offs_d < D
        x = tl.load(
            x_ptr + offs_m[:, None] * stride_xm + offs_d[None, :] * stride_xd,
            mask=m_ok[:, None] & d_ok[None, :], other=0.0,
        )  # [BLOCK_M, BLOCK_D]
        phi = tl.load(
            phi_ptr + offs_d[:, None] * stride_pd + offs_n[None, :] * stride_pn,
            mask=d_ok[:, None] & n_ok[None, :], other=0.0,
        )  # [BLOCK_D, BLOCK_N]
        # Both norms are per-row / per-column scalars of the product, so they are applied after the dot: the
        # sums of squares ride along with the loads and the tiles go to tl.dot in their own 16-bit type.
        if TOKEN_L2:
            xf = x.to(tl.float32)
            x_sq += tl.sum(xf * xf, axis=1)
        if HAS_SCALE:
            pf = phi.to(tl.float32)
            phi_sq += tl.sum(pf * pf, axis=0)
        if HAS_GAIN:
            gain = tl.load(gain_ptr + offs_d, mask=d_ok, other=0.0).to(tl.float32)  # [BLOCK_D]
            if GAIN_ON_PHI:
                # 16-bit operands: the gain goes to Phi's rows, not the raw tokens. A token times a gain (about
                # 28 for a converted soft-moe-pytorch layer at D=768) passes fp16's 65504 at |x| ~ 2.4k; the
                # token alone is representable (it is an fp16 input), and gain * Phi stays near 1.
                phi = phi.to(tl.float32) * gain[:, None]
            else:
                x = x.to(tl.float32) * gain[None, :]
        # ieee: fp32 inputs must match torch's fp32 matmul (~1e-6), not TF32 (~1e-3); 16-bit inputs ignore it.
        acc = tl.dot(x.to(DOT_DTYPE), phi.to(DOT_DTYPE), acc, input_precision="ieee")
    if TOKEN_L2:
        acc = acc / tl.maximum(tl.sqrt(x_sq), eps)[:, None]
    if HAS_SCALE:
        scale = tl.load(scale_ptr).to(tl.float32)
        acc = acc * (scale / tl.maximum(tl.sqrt(phi_sq), eps))[None, :]
    return acc


@triton.jit
def _combine_rows(
    x_ptr, phi_ptr, scale_ptr, gain_ptr, mask_ptr, combine_ptr, scores_ptr, row_block, M, N, D, S, eps,
    stride_xm, stride_xd, stride_pd, stride_pn, stride_km, stride_cm, stride_cn,
    ROW_M: tl.constexpr, ROW_N: tl.constexpr, BLOCK_D: tl.constexpr, ONE_PASS_ROWS: tl.constexpr,
    TOKEN_L2: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_GAIN: tl.constexpr, HAS_MASK: tl.constexpr,
    DOT_DTYPE: tl.constexpr, GAIN_ON_PHI: tl.constexpr,
):
    """Row program: tokens [row_block*ROW_M, +ROW_M) x all slots -> their combine rows and scores."""
    offs_m = row_block * ROW_M + tl.arange(0, ROW_M)
    m_ok = offs_m < M
    keep = m_ok
    if HAS_MASK:
        keep = keep & (tl.load(mask_ptr + offs_m * stride_km, mask=m_ok, other=0) != 0)
    if ONE_PASS_ROWS:
        # One tile holds whole rows (N <= ROW_N): one pass.
        offs_n = tl.arange(0, ROW_N)
        n_ok = offs_n < N
        logits = _logits_tile(x_ptr, phi_ptr, scale_ptr, gain_ptr, offs_m, offs_n, M, N, D,
                              stride_xm, stride_xd, stride_pd, stride_pn, eps,
                              ROW_M, ROW_N, BLOCK_D, TOKEN_L2, HAS_SCALE, HAS_GAIN, DOT_DTYPE, GAIN_ON_PHI)  # [ROW_M, ROW_N]
        logits = tl.where(n_ok[None, :], logits, float("-inf"))  # padded slots get no weight
        p = tl.exp(logits - tl.max(logits, axis=1)[:, None])
        combine = p / tl.sum(p, axis=1)[:, None]
        combine = tl.where(keep[:, None], combine, 0.0)  # padded tokens and rows past M: a zero row
        stored = combine.to(combine_ptr.dtype.element_ty)
        tl.store(combine_ptr + offs_m[:, None] * stride_cm + offs_n[None, :] * stride_cn,
                 stored, mask=m_ok[:, None] & n_ok[None, :])
        # Slot n belongs to expert n // S; lanes of one atomic that share an address are all added. The scores
        # sum the weights as stored (rounded to x's type), as torch sums its combine tensor: both rank the same.
        tl.atomic_add(scores_ptr + offs_n // S, tl.sum(stored.to(tl.float32), axis=0), mask=n_ok)
    else:
        # N > ROW_N: online row max/sum over the slot blocks, then recompute each block and write it.
        row_max = tl.full((ROW_M,), float("-inf"), dtype=tl.float32)
        row_sum = tl.zeros((ROW_M,), dtype=tl.float32)
        for n0 in range(0, N, ROW_N):
            offs_n = n0 + tl.arange(0, ROW_N)
            logits = _logits_tile(x_ptr, phi_ptr, scale_ptr, gain_ptr, offs_m, offs_n, M, N, D,
                                  stride_xm, stride_xd, stride_pd, stride_pn, eps,
                                  ROW_M, ROW_N, BLOCK_D, TOKEN_L2, HAS_SCALE, HAS_GAIN, DOT_DTYPE, GAIN_ON_PHI)
            logits = tl.where((offs_n < N)[None, :], logits, float("-inf"))
            new_max = tl.maximum(row_max, tl.max(logits, axis=1))  # finite: every block has a real slot
            row_sum = row_sum * tl.exp(row_max - new_max) + tl.sum(tl.exp(logits - new_max[:, None]), axis=1)
            row_max = new_max
        inv_sum = tl.where(keep, 1.0 / row_sum, 0.0)  # padded tokens: a zero combine row
        for n0 in range(0, N, ROW_N):
            offs_n = n0 + tl.arange(0, ROW_N)
            n_ok = offs_n < N
            logits = _logits_tile(x_ptr, phi_ptr, scale_ptr, gain_ptr, offs_m, offs_n, M, N, D,
                                  stride_xm, stride_xd, stride_pd, stride_pn, eps,
                                  ROW_M, ROW_N, BLOCK_D, TOKEN_L2, HAS_SCALE, HAS_GAIN, DOT_DTYPE, GAIN_ON_PHI)
            combine = tl.exp(logits - row_max[:, None]) * inv_sum[:, None]
            combine = tl.where(n_ok[None, :], combine, 0.0)
            stored = combine.to(combine_ptr.dtype.element_ty)
            tl.store(combine_ptr + offs_m[:, None] * stride_cm + offs_n[None, :] * stride_cn,
                     stored, mask=m_ok[:, None] & n_ok[None, :])
            tl.atomic_add(scores_ptr + offs_n // S, tl.sum(stored.to(tl.float32), axis=0), mask=n_ok)


@triton.jit
def _dispatch_columns(
    x_ptr, phi_ptr, scale_ptr, gain_ptr, mask_ptr, dispatch_ptr, col_block, M, N, D, eps,
    stride_xm, stride_xd, stride_pd, stride_pn, stride_km, stride_dm, stride_dn,
    COL_M: tl.constexpr, COL_N: tl.constexpr, BLOCK_D: tl.constexpr, ONE_PASS_COLS: tl.constexpr,
    TOKEN_L2: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_GAIN: tl.constexpr, HAS_MASK: tl.constexpr,
    DOT_DTYPE: tl.constexpr, GAIN_ON_PHI: tl.constexpr,
):
    """Column program: all tokens x slots [col_block*COL_N, +COL_N) -> their dispatch columns."""
    offs_n = col_block * COL_N + tl.arange(0, COL_N)
    n_ok = offs_n < N
    if ONE_PASS_COLS:
        # One tile holds whole columns (M <= COL_M): one pass.
        offs_m = tl.arange(0, COL_M)
        m_ok = offs_m < M
        keep = m_ok
        if HAS_MASK:
            keep = keep & (tl.load(mask_ptr + offs_m * stride_km, mask=m_ok, other=0) != 0)
        logits = _logits_tile(x_ptr, phi_ptr, scale_ptr, gain_ptr, offs_m, offs_n, M, N, D,
                              stride_xm, stride_xd, stride_pd, stride_pn, eps,
                              COL_M, COL_N, BLOCK_D, TOKEN_L2, HAS_SCALE, HAS_GAIN, DOT_DTYPE, GAIN_ON_PHI)  # [COL_M, COL_N]
        logits = tl.where(keep[:, None], logits, _MASKED_LOGIT)
        logits = tl.where(m_ok[:, None], logits, float("-inf"))  # rows past M do not exist
        q = tl.exp(logits - tl.max(logits, axis=0)[None, :])
        dispatch = q / tl.sum(q, axis=0)[None, :]
        tl.store(dispatch_ptr + offs_m[:, None] * stride_dm + offs_n[None, :] * stride_dn,
                 dispatch.to(dispatch_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])
    else:
        # M > COL_M: online column max/sum over the token blocks, then recompute each block and write it.
        col_max = tl.full((COL_N,), float("-inf"), dtype=tl.float32)
        col_sum = tl.zeros((COL_N,), dtype=tl.float32)
        for m0 in range(0, M, COL_M):
            offs_m = m0 + tl.arange(0, COL_M)
            m_ok = offs_m < M
            keep = m_ok
            if HAS_MASK:
                keep = keep & (tl.load(mask_ptr + offs_m * stride_km, mask=m_ok, other=0) != 0)
            logits = _logits_tile(x_ptr, phi_ptr, scale_ptr, gain_ptr, offs_m, offs_n, M, N, D,
                                  stride_xm, stride_xd, stride_pd, stride_pn, eps,
                                  COL_M, COL_N, BLOCK_D, TOKEN_L2, HAS_SCALE, HAS_GAIN, DOT_DTYPE, GAIN_ON_PHI)
            logits = tl.where(keep[:, None], logits, _MASKED_LOGIT)
            logits = tl.where(m_ok[:, None], logits, float("-inf"))
            new_max = tl.maximum(col_max, tl.max(logits, axis=0))  # finite: every block has a real token
            col_sum = col_sum * tl.exp(col_max - new_max) + tl.sum(tl.exp(logits - new_max[None, :]), axis=0)
            col_max = new_max
        inv_sum = 1.0 / col_sum
        for m0 in range(0, M, COL_M):
            offs_m = m0 + tl.arange(0, COL_M)
            m_ok = offs_m < M
            keep = m_ok
            if HAS_MASK:
                keep = keep & (tl.load(mask_ptr + offs_m * stride_km, mask=m_ok, other=0) != 0)
            logits = _logits_tile(x_ptr, phi_ptr, scale_ptr, gain_ptr, offs_m, offs_n, M, N, D,
                                  stride_xm, stride_xd, stride_pd, stride_pn, eps,
                                  COL_M, COL_N, BLOCK_D, TOKEN_L2, HAS_SCALE, HAS_GAIN, DOT_DTYPE, GAIN_ON_PHI)
            logits = tl.where(keep[:, None], logits, _MASKED_LOGIT)
            dispatch = tl.exp(logits - col_max[None, :]) * inv_sum[None, :]
            tl.store(dispatch_ptr + offs_m[:, None] * stride_dm + offs_n[None, :] * stride_dn,
                     dispatch.to(dispatch_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


@triton.jit
def _soft_moe_routing_kernel(
    x_ptr, phi_ptr, scale_ptr, gain_ptr, mask_ptr,  # inputs; scale/gain/mask are dummies when absent
    dispatch_ptr, combine_ptr, scores_ptr,  # outputs; scores must be zeroed (fp32 atomics add into it)
    M, N, D, S, eps,
    stride_xb, stride_xm, stride_xd,
    stride_pd, stride_pn,
    stride_kb, stride_km,
    stride_db, stride_dm, stride_dn,
    stride_cb, stride_cm, stride_cn,
    stride_sb,
    # Row programs' tile [ROW_M, ROW_N]: ROW_N=128 holds the ViT routers' N=128 slots, so combine is one pass.
    ROW_M: tl.constexpr, ROW_N: tl.constexpr,
    # Column programs' tile [COL_M, COL_N]: COL_M=256 holds M=197 tokens, so dispatch is one pass; the tile has
    # as many logits as a row program's, so both kinds take the same time.
    COL_M: tl.constexpr, COL_N: tl.constexpr,
    # Reduction step over D: sized so the operand registers of tl.dot (FMA path: rows + columns per thread times
    # BLOCK_D) do not spill; see routing_config.
    BLOCK_D: tl.constexpr,
    # N <= ROW_N, M <= COL_M: set by the launcher, so the one-pass case (the ViT shapes) compiles without the
    # two-pass code, whose loop-carried statistics cost ~50 registers a thread more (~180 instead of 128).
    ONE_PASS_ROWS: tl.constexpr, ONE_PASS_COLS: tl.constexpr,
    # Feature switches (token_norm "l2", scale, gain, mask) are constexprs so that an absent feature's loads and
    # arithmetic are compiled out rather than branched over.
    TOKEN_L2: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_GAIN: tl.constexpr, HAS_MASK: tl.constexpr,
    # tl.dot operand type: the input's own type (tensor cores for 16-bit), fp32 for bf16 under the interpreter.
    DOT_DTYPE: tl.constexpr,
    # 16-bit inputs with a gain: the gain scales Phi's rows, not the raw tokens, before the 16-bit cast (see
    # _logits_tile).
    GAIN_ON_PHI: tl.constexpr,
):
    pid = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)  # 64-bit: b * stride_xb can pass 2**31 elements
    num_row_programs = tl.cdiv(M, ROW_M)
    if pid < num_row_programs:
        _combine_rows(x_ptr + b * stride_xb, phi_ptr, scale_ptr, gain_ptr, mask_ptr + b * stride_kb,
                      combine_ptr + b * stride_cb, scores_ptr + b * stride_sb, pid, M, N, D, S, eps,
                      stride_xm, stride_xd, stride_pd, stride_pn, stride_km, stride_cm, stride_cn,
                      ROW_M, ROW_N, BLOCK_D, ONE_PASS_ROWS, TOKEN_L2, HAS_SCALE, HAS_GAIN, HAS_MASK, DOT_DTYPE,
                      GAIN_ON_PHI)
    else:
        _dispatch_columns(x_ptr + b * stride_xb, phi_ptr, scale_ptr, gain_ptr, mask_ptr + b * stride_kb,
                          dispatch_ptr + b * stride_db, pid - num_row_programs, M, N, D, eps,
                          stride_xm, stride_xd, stride_pd, stride_pn, stride_km, stride_dm, stride_dn,
                          COL_M, COL_N, BLOCK_D, ONE_PASS_COLS, TOKEN_L2, HAS_SCALE, HAS_GAIN, HAS_MASK, DOT_DTYPE,
                          GAIN_ON_PHI)


# -- launcher and reference --------------------------------------------------------------------------------------


def _check_args(x, phi, scale, gain, token_norm, mask, slots_per_expert):
    """Validate the arguments; return phi as [D, N] and S."""
    if x.dim() != 3:
        raise ValueError(f"soft_moe_routing: x must be [B, M, D], got shape {list(x.shape)}")
    B, M, D = x.shape
    if phi.dim() == 3:
        if phi.shape[2] != slots_per_expert and slots_per_expert != 1:
            raise ValueError(f"soft_moe_routing: phi {list(phi.shape)} has S={phi.shape[2]} slots per expert "
                             f"but slots_per_expert={slots_per_expert}")
        slots_per_expert = phi.shape[2]
        phi = phi.flatten(1)
    if phi.dim() != 2 or phi.shape[0] != D:
        raise ValueError(f"soft_moe_routing: phi must be [D, N] or [D, E, S] with D={D}, got {list(phi.shape)}")
    if phi.shape[1] % slots_per_expert:
        raise ValueError(f"soft_moe_routing: N={phi.shape[1]} slots is not a multiple of "
                         f"slots_per_expert={slots_per_expert}")
    if token_norm == "layer":
        raise NotImplementedError("soft_moe_routing: token_norm='layer' has no kernel; use routing_ref")
    if token_norm not in ("l2", "none"):
        raise ValueError(f"soft_moe_routing: token_norm must be 'l2', 'none' (or 'layer'), got {token_norm!r}")
    if gain is not None and tuple(gain.shape) != (D,):
        raise ValueError(f"soft_moe_routing: gain must be [D]=[{D}], got {list(gain.shape)}")
    if scale is not None and scale.numel() != 1:
        raise ValueError(f"soft_moe_routing: scale must hold one number, got shape {list(scale.shape)}")
    if mask is not None and (mask.dtype != torch.bool or tuple(mask.shape) != (B, M)):
        raise ValueError(f"soft_moe_routing: mask must be bool [B, M]=[{B}, {M}], got {mask.dtype} "
                         f"{list(mask.shape)}")
    for name, t in (("phi", phi), ("scale", scale), ("gain", gain), ("mask", mask)):
        if t is not None and t.device != x.device:
            raise ValueError(f"soft_moe_routing: {name} is on {t.device} but x is on {x.device}")
    if x.dtype not in DTYPES:
        raise ValueError(f"soft_moe_routing: x must be float32, float16 or bfloat16, got {x.dtype}")
    if not x.is_cuda and not interpreting():
        raise ValueError("soft_moe_routing: x is on the CPU; the kernel needs a CUDA tensor (or TRITON_INTERPRET=1); "
                         "use soft_moe_routing_ref on the CPU")
    return phi, slots_per_expert


def kernel_args(x, phi, scale, gain, mask, dispatch, combine, scores, S, eps, token_norm, config, dot_dtype):
    """Grid, positional arguments and constexprs of one launch (shared with benchmarks/kernel_compile.py, which
    compiles ahead of time exactly what the launcher would launch). phi is [D, N]."""
    B, M, D = x.shape
    N = phi.shape[1]
    if not config.tensor_cores:
        dot_dtype = tl.float32  # the FMA path multiplies in fp32 anyway: fp32 operands cost no speed, and need no cast
    grid = (triton.cdiv(M, config.row_m) + triton.cdiv(N, config.col_n), B)
    args = (
        # Absent scale, gain and mask get dummy pointers: their HAS_* constexpr is False, so they are never read.
        x, phi, scale if scale is not None else phi, gain if gain is not None else phi, mask if mask is not None else x,
        dispatch, combine, scores,
        M, N, D, S, eps,
        x.stride(0), x.stride(1), x.stride(2),
        phi.stride(0), phi.stride(1),
        mask.stride(0) if mask is not None else 0, mask.stride(1) if mask is not None else 0,
        dispatch.stride(0), dispatch.stride(1), dispatch.stride(2),
        combine.stride(0), combine.stride(1), combine.stride(2),
        scores.stride(0),
    )
    constexprs = dict(
        ROW_M=config.row_m, ROW_N=config.row_n, COL_M=config.col_m, COL_N=config.col_n, BLOCK_D=config.block_d,
        ONE_PASS_ROWS=config.one_pass_rows, ONE_PASS_COLS=config.one_pass_cols,
        TOKEN_L2=token_norm == "l2", HAS_SCALE=scale is not None, HAS_GAIN=gain is not None,
        HAS_MASK=mask is not None, DOT_DTYPE=dot_dtype,
        GAIN_ON_PHI=gain is not None and dot_dtype != tl.float32,
    )
    return grid, args, constexprs


def soft_moe_routing(
    x: torch.Tensor,
    phi: torch.Tensor,
    scale: torch.Tensor | None = None,
    gain: torch.Tensor | None = None,
    *,
    token_norm: str = "l2",
    eps: float = 1e-6,
    mask: torch.Tensor | None = None,
    slots_per_expert: int = 1,
    out: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    config: RoutingConfig | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Dispatch weights, combine weights and expert scores of a Soft MoE router, in one fused Triton launch.

    Args:
        x: tokens [B, M, D], float32, float16 or bfloat16.
        phi: router parameters [D, E, S] or [D, N] (N = E*S), raw.
        scale: learned scalar [1]: Phi's columns are l2-normalized over D (floor eps) and multiplied by it;
            None uses Phi as it is.
        gain: per-channel gain [D] applied to the normalized tokens, or None.
        token_norm: "l2" (x / max(|x|, eps)) or "none".
        eps: norm floor.
        mask: optional bool [B, M], True for real tokens: padded tokens get no dispatch weight, a zero combine
            row and no score.
        slots_per_expert: S when phi is [D, N] (taken from phi when it is [D, E, S]).
        out: optional preallocated (dispatch [B, M, N] in x.dtype, combine [B, M, N] in x.dtype, scores [B, E]
            float32); scores is zeroed here before the kernel adds into it.
        config: a `RoutingConfig` to launch with instead of `routing_config`'s pick (tests use small tiles to
            reach the two-pass paths with small shapes).

    Returns:
        (dispatch_weights [B, M, N], combine_weights [B, M, N], scores [B, E] float32): every dispatch column
        and every unpadded combine row sums to 1; scores[b, e] sums expert e's combine weights over tokens and
        slots (so scores[b].sum() is the number of real tokens; scores.sum(0) ranks experts over the batch).

    Raises:
        NotImplementedError: token_norm="layer" (use `routing_ref`).
        ValueError: a shape, dtype or device the kernel does not take.

    Example:
        >>> x, phi = torch.randn(2, 197, 384, device="cuda"), torch.randn(384, 128, 1, device="cuda")
        >>> dispatch, combine, scores = soft_moe_routing(x, phi, torch.ones(1, device="cuda"))
        >>> top = scores.sum(0).topk(16).indices  # the batch's 16 busiest experts
    """
    phi, S = _check_args(x, phi, scale, gain, token_norm, mask, slots_per_expert)
    gain = gain.contiguous() if gain is not None else None  # the kernel reads it with unit stride
    B, M, D = x.shape
    N = phi.shape[1]
    E = N // S
    dtype = DTYPES[x.dtype]
    if config is None:
        config = routing_config(dtype, torch.cuda.get_device_capability(x.device) if x.is_cuda else None, M, N)
    if (config.one_pass_rows and N > config.row_n) or (config.one_pass_cols and M > config.col_m):
        raise ValueError(f"soft_moe_routing: {config} is one-pass for M={M}, N={N} slots that do not fit its tiles")
    if out is None:
        dispatch = torch.empty(B, M, N, dtype=x.dtype, device=x.device)
        combine = torch.empty(B, M, N, dtype=x.dtype, device=x.device)
        scores = torch.zeros(B, E, dtype=torch.float32, device=x.device)
    else:
        dispatch, combine, scores = out
        if dispatch.shape != (B, M, N) or combine.shape != (B, M, N) or scores.shape != (B, E):
            raise ValueError(f"soft_moe_routing: out must be shaped ([{B}, {M}, {N}], [{B}, {M}, {N}], [{B}, {E}])")
        if scores.dtype != torch.float32 or scores.stride(1) != 1:
            raise ValueError("soft_moe_routing: out's scores must be float32 with unit stride over experts")
        scores.zero_()
    if B == 0 or M == 0:
        return dispatch, combine, scores
    dot_dtype = TL_DTYPES[dtype]
    if dtype == "bf16" and interpreting():
        dot_dtype = tl.float32  # the interpreter's tl.dot multiplies bf16 bit patterns as integers
    grid, args, constexprs = kernel_args(x, phi, scale, gain, mask, dispatch, combine, scores, S, eps, token_norm,
                                         config, dot_dtype)
    _soft_moe_routing_kernel[grid](*args, **constexprs, **config.launch_options())
    return dispatch, combine, scores


def soft_moe_routing_ref(
    x: torch.Tensor,
    phi: torch.Tensor,
    scale: torch.Tensor | None = None,
    gain: torch.Tensor | None = None,
    *,
    token_norm: str = "l2",
    eps: float = 1e-6,
    mask: torch.Tensor | None = None,
    slots_per_expert: int = 1,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`soft_moe_routing` in plain torch: `moe_prune.core.routing.routing_ref` plus the expert scores, summed in fp32.

    Args and Returns: as `soft_moe_routing` (without `out` and `config`); dispatch and combine are exactly
    routing_ref's.

    Example:
        >>> d, c, scores = soft_moe_routing_ref(torch.randn(2, 5, 8), torch.randn(8, 4, 1), torch.ones(1))
        >>> scores.sum(-1)  # 5 tokens per input
        tensor([5., 5.])
    """
    S = phi.shape[2] if phi.dim() == 3 else slots_per_expert
    dispatch, combine = routing_ref(x, phi, scale, gain, token_norm=token_norm, eps=eps, mask=mask)
    B, M, N = combine.shape
    scores = combine.float().reshape(B, M, N // S, S).sum(dim=(1, 3))  # [B, E]
    return dispatch, combine, scores


def expert_scores_ref(
    x: torch.Tensor,
    phi: torch.Tensor,
    scale: torch.Tensor | None = None,
    gain: torch.Tensor | None = None,
    *,
    token_norm: str = "l2",
    eps: float = 1e-6,
    mask: torch.Tensor | None = None,
    slots_per_expert: int = 1,
) -> torch.Tensor:
    """Expert scores [B, E] (fp32) alone, in torch: only the combine softmax, no dispatch (the CPU scoring path).

    Equal to `soft_moe_routing_ref(...)[2]` up to summation order.

    Example:
        >>> scores = expert_scores_ref(torch.randn(2, 5, 8), torch.randn(8, 4, 1), torch.ones(1))
        >>> scores.shape
        torch.Size([2, 4])
    """
    S = phi.shape[2] if phi.dim() == 3 else slots_per_expert
    logits = normalize_tokens(x, token_norm, gain, eps) @ router_weight(phi, scale, eps)  # [B, M, N]
    combine = logits.softmax(dim=-1)  # [B, M, N]
    if mask is not None:
        combine = combine * mask.unsqueeze(-1)
    B, M, N = combine.shape
    return combine.sum(dim=1, dtype=torch.float32).reshape(B, N // S, S).sum(dim=-1)  # [B, E]
