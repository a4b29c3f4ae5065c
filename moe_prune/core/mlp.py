"""The expert MLP's math, written once: the nonlinearity, the linear layer (float, or int8 weights with one scale
per output channel), and the int8-activation matmul that exports as ONNX MatMulInteger.

    y = act(x @ w1 + b1) @ w2 + b2      x [..., N, D], w1 [..., D, H1], w2 [..., H, D_out]; act GELU, ReLU or GEGLU

Eager torch (`StackedExperts`) and the grouped kernel's torch reference (moe_prune.kernels.grouped_experts) both
run `expert_mlp`. This module imports no kernel.
"""

from __future__ import annotations

from typing import Literal, Optional

import torch
import torch.nn.functional as F

from .tracing import in_graph


ExpertKind = Literal["gelu_mlp", "relu_mlp", "geglu"]


EXPERT_KINDS = ("gelu_mlp", "relu_mlp", "geglu")


def default_bias(kind: ExpertKind) -> bool:
    """Whether experts of this kind have biases unless told: timm's and soft-moe-pytorch's MLPs do, Chung et al.'s
    ReLU experts do not."""
    return kind != "relu_mlp"


def expert_activation(kind: str, h: torch.Tensor) -> torch.Tensor:
    """The nonlinearity between an expert's two matmuls: GELU, ReLU, or GEGLU (value * gelu(gate), halving H).
    TorchScript compiles it too (see float_mlp)."""
    if kind == "gelu_mlp":
        return F.gelu(h)
    if kind == "relu_mlp":
        return F.relu(h)
    value, gate = h.chunk(2, dim=-1)
    return value * F.gelu(gate)


def float_linear(x: torch.Tensor, w: torch.Tensor, b: Optional[torch.Tensor], fused: bool) -> torch.Tensor:
    """x [..., N, I] @ w [..., I, O] + b [..., O] with float weights; `fused`: the bias added inside the matmul
    where torch can (addmm, baddbmm: one pass over the output instead of two; the separate add was 16% of a
    many-rows expert layer's time on a CPU); else MatMul + Add, which ONNX Runtime fuses. TorchScript compiles it."""
    if b is None:
        return torch.matmul(x, w)
    if fused and x.dim() == 2 and w.dim() == 2:
        return torch.addmm(b, x, w)
    if fused and x.dim() == 3 and w.dim() == 3:
        return torch.baddbmm(b.unsqueeze(1), x, w)
    return torch.matmul(x, w) + b.unsqueeze(-2)


def float_mlp(kind: str, x: torch.Tensor, w1: torch.Tensor, b1: Optional[torch.Tensor], w2: torch.Tensor,
              b2: Optional[torch.Tensor], fused: bool) -> torch.Tensor:
    """The expert MLP with float weights, written once: `expert_mlp` runs it eagerly (fused) and the TorchScript
    function of an exported graph (core.experts) compiles it (unfused)."""
    return float_linear(expert_activation(kind, float_linear(x, w1, b1, fused)), w2, b2, fused)


def int8_matmul(a: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """a [..., N, I] int8 @ w [..., I, O] int8 -> int32, exactly (what ONNX MatMulInteger computes).

    torch._int_mm on the CPU (2-D; a 3-D batch row by row); elsewhere a float matmul, exact for these integers:
    every product is at most 127 * 127 in size, so a sum of I of them stays below 2**24 (float32) for I <= 1040
    and below 2**53 (float64) beyond.

    Example:
        >>> int8_matmul(torch.ones(2, 3, dtype=torch.int8), torch.ones(3, 4, dtype=torch.int8))  # all 3
    """
    if a.device.type == "cpu" and a.dim() == w.dim() == 2:
        return torch._int_mm(a, w)
    if a.device.type == "cpu" and a.dim() == w.dim() == 3 and a.shape[0] > 0:
        return torch.stack([torch._int_mm(a[r], w[r]) for r in range(a.shape[0])])
    dtype = torch.float32 if a.shape[-1] * 127 * 127 < 2**24 else torch.float64
    return torch.matmul(a.to(dtype), w.to(dtype)).to(torch.int32)


class _MatMulInteger(torch.autograd.Function):
    """a [..., N, I] uint8 with zero point 128 (a - 128 in [-127, 127]) @ w [..., I, O] int8 -> int32.

    In an exported graph it is one ONNX MatMulInteger; uint8 activations, because ONNX Runtime's CPU kernels for
    uint8 x int8 are the fast ones (int8 x int8 ran 7x slower on a ViT-S layer)."""

    @staticmethod
    def forward(ctx, a: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return int8_matmul((a.to(torch.int16) - 128).to(torch.int8), w)

    @staticmethod
    def symbolic(g, a, w):
        zero_point = g.op("Constant", value_t=torch.tensor(128, dtype=torch.uint8))
        return g.op("MatMulInteger", a, w, zero_point)


class _Int8Weight(torch.autograd.Function):
    """int8 weights converted to a float dtype. In a traced graph it is a `moe_prune::Int8Weight` node, which the
    exporter's constant folding leaves alone (it would fold a Cast of the int8 initializer into a float one in the
    file); export.export_onnx then turns it into the ONNX Cast that ONNX Runtime folds when it loads the model."""

    @staticmethod
    def forward(ctx, w: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return w.to(dtype)

    @staticmethod
    def symbolic(g, w, dtype):
        to = {torch.float32: 1, torch.float16: 10, torch.bfloat16: 16}[dtype]  # ONNX TensorProto data types
        return g.op(f"{INT8_WEIGHT_OP[0]}::{INT8_WEIGHT_OP[1]}", w, to_i=to).setType(w.type().with_dtype(dtype))


# The placeholder node of _Int8Weight in a traced graph: (domain, op type).
INT8_WEIGHT_OP = ("moe_prune", "Int8Weight")


# The floor of an activation row's scale: an all-zero row quantizes to zeros instead of 0 / 0.
_ROW_SCALE_FLOOR = 1e-30


def int8_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 quantization of each row of x [..., N, I]: (q + 128 as uint8 [..., N, I], scale [..., N, 1]),
    x ~ (q - 128) * scale, scale = max |row| / 127 (float32). Each row's own scale: an input's result does not
    depend on what else is in its batch."""
    x = x.float()
    scale = (x.abs().amax(-1, keepdim=True) / 127.0).clamp_min(_ROW_SCALE_FLOOR)  # [..., N, 1]
    return (torch.round(x / scale) + 128.0).to(torch.uint8), scale


def w8a8_linear(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, b: torch.Tensor | None,
                per_expert: bool = False) -> torch.Tensor:
    """x [K, N, I] through int8 weights q [K, I, O] with scales [K, O] (and biases b [K, O]), the activations
    quantized per row: float32 [K, N, O] = (int32 (q_x @ q) * x's row scale) * scale + b.

    per_expert: one 2-D integer matmul per expert (in a graph each expert's weights are then a constant 2-D
    matrix, which ONNX Runtime prepacks); else one batched matmul (weights gathered at run time)."""
    xq, sx = int8_rows(x)  # [K, N, I] uint8, [K, N, 1]
    if per_expert:
        acc = torch.stack([_MatMulInteger.apply(xq[k], q[k]) for k in range(q.shape[0])])  # [K, N, O] int32
    else:
        acc = _MatMulInteger.apply(xq, q)
    y = acc.float() * sx * scale.float().unsqueeze(-2)
    return y if b is None else y + b.float().unsqueeze(-2)


def linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, s: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., N, I] @ w [..., I, O] + b [..., O] (float weights: float_linear, fused outside a graph).

    With per-output-channel scales s [..., O] (int8 weights): (x @ w) * s + b, the weights converted to x's dtype
    (integers up to 127 are exact in every float dtype) and the scale applied to the [N, O] output rather than
    to the [I, O] weights. In a traced graph: x @ (w * s) + b instead, which ONNX Runtime runs exactly as it runs
    float weights (it folds the Cast and the Mul of the int8 initializer into one float weight at load)."""
    if s is not None and torch.jit.is_tracing() and w.dtype == torch.int8:
        return linear(x, _Int8Weight.apply(w, x.dtype) * s.to(x.dtype).unsqueeze(-2), b)
    if s is not None:
        if w.dtype == torch.int8:
            w = w.to(x.dtype)
        y = torch.matmul(x, w)
        s = s.to(x.dtype).unsqueeze(-2)
        return y * s if b is None else torch.addcmul(b.to(x.dtype).unsqueeze(-2), y, s)
    return float_linear(x, w, b, fused=not in_graph())


def expert_mlp(kind: ExpertKind, x: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor | None, w2: torch.Tensor,
               b2: torch.Tensor | None, s1: torch.Tensor | None = None, s2: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., N, D] through experts of `kind` with weights w1 [..., D, H1], b1 [..., H1], w2 [..., H, D_out],
    b2 [..., D_out] (int8 with per-output-channel scales s1 [..., H1], s2 [..., D_out], if given).

    Returns:
        [..., N, D_out], in x's dtype.

    Example:
        >>> y = expert_mlp("gelu_mlp", torch.randn(4, 3, 8), torch.randn(4, 8, 16), None, torch.randn(4, 16, 8), None)
        >>> y.shape
        torch.Size([4, 3, 8])
    """
    if s1 is None and s2 is None:
        return float_mlp(kind, x, w1, b1, w2, b2, fused=not in_graph())
    h = linear(x, w1, b1, s1)  # [..., N, H or 2H]
    h = expert_activation(kind, h)
    return linear(h, w2, b2, s2)  # [..., N, D_out]
