"""8-bit experts: the kept experts' weights stored as int8 with one scale per output channel, quantized last.

    w1 [E, D, H1] -> q1 int8 [E, D, H1], w1_scale [E, H1]       w = q * scale, q in [-127, 127], symmetric:
    w2 [E, H, D_out] -> q2 int8 [E, H, D_out], w2_scale [E, D_out]   scale = max |w| over the input axis / 127

Only the experts' two weight matrices change (a quarter of their bytes, plus one scale per output channel); the
router (phi, scale), norms, biases, attention and head keep their dtype. Calibration and healing run on the float
model; quantization is the last step (`compress --quantize int8`, or `quantize_file` on a checkpoint as it is).

How the int8 experts run (see moe_prune.experts): eager torch with float activations is exactly the dequantized
model. An exported ONNX graph of large experts (ExecutionPolicy.graph_int8_min, 128K weights each) quantizes each
activation row to int8 as well and runs integer matmuls (MatMulInteger, one constant 2-D weight per expert),
which torch computes to the same integers. Measured in ONNX Runtime on the CPU (benchmarks/quantize_int8.py):
6.1x faster than fp32 weights at batch 1 for ViT-S-sized experts, 3.4x at 32; DynamicQuantizeMatMul was as fast
at batch 1 and faster at 32, and MatMulNBits (int8 activations) slower, and both change an input's answer with its
batch mates (one activation scale per batch; kernels per batch size), which a server that batches requests must not.
Below that size integer matmuls measured slower than float ones, so the graph keeps float activations and casts
the int8 weights, which ONNX Runtime folds into float weights at load (the file stays int8).
`graph_numerics(model)` runs eager torch with the graph's numerics, which is how an export is validated.

A quantized model is inference-only: compressing it again, or healing it, is refused (calibrate, compress and
heal the float model, then quantize).

    quantize_(model)                    in place: every Soft MoE layer's experts -> int8
    quantize_file(src, out)             a checkpoint (full or compressed) -> its int8 checkpoint
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import nn

from ..errors import ConfigError, SelectionError
from ..core.experts import StackedExperts
from ..core.layers import SoftMoE
from ..core.models import moe_layers, spec_quantized

QUANT_KINDS = ("int8",)
# The integers an int8 weight may take: symmetric, so that -w quantizes to -q (and -128 is never used).
QMAX = 127


@dataclass(frozen=True)
class QuantConfig:
    """How the experts are quantized.

    Args:
        kind: "int8": symmetric int8 with one scale per output channel of w1 and w2 (the only kind so far).

    Example:
        >>> quantize_(model, QuantConfig("int8"))
    """

    kind: str = "int8"

    def __post_init__(self):
        if self.kind not in QUANT_KINDS:
            raise ConfigError(f"quantize: kind {self.kind!r}; choose one of {', '.join(QUANT_KINDS)}")

    def record(self) -> dict:
        """What a checkpoint's metadata says about its quantization."""
        return {"kind": self.kind, "weights": "experts' w1 and w2: symmetric int8, one scale per output channel",
                "float": "router, norms, biases and every other tensor"}


def as_quant_config(quant) -> QuantConfig | None:
    """None, "int8" or a QuantConfig -> QuantConfig or None.

    Raises:
        ConfigError: anything else (one line, naming the kinds there are).
    """
    if quant is None or isinstance(quant, QuantConfig):
        return quant
    if isinstance(quant, str):
        return QuantConfig(quant)
    raise ConfigError(f"quantize: {quant!r}; give 'int8' or a moe_prune.QuantConfig")


def quantize_weights(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 quantization of stacked weights w [E, I, O], one scale per output channel (per e and o).

    The scale is stored in w's dtype, rounded up if needed so that max |w| / scale <= 127; q is computed in
    float64 against that stored scale, so |w - q * scale| <= scale / 2 for every element. A channel of zeros
    gets scale 0 and q 0.

    Args:
        w: float weights [E, I, O] (I the input features, O the output features).

    Returns:
        (q int8 [E, I, O], scale [E, O] in w's dtype).

    Example:
        >>> q, s = quantize_weights(layer.experts.w1.detach())
        >>> (q.double() * s.double().unsqueeze(1) - layer.experts.w1.double()).abs().max() <= s.max() / 2
    """
    if w.dim() != 3 or not w.is_floating_point():
        raise ConfigError(f"quantize: expected float weights [E, I, O], got {w.dtype} {list(w.shape)}")
    w64 = w.detach().double()
    amax = w64.abs().amax(dim=1)  # [E, O]
    scale = (amax / QMAX).to(w.dtype)
    low = scale.double() * QMAX < amax  # rounded down in w's dtype: the largest weight would need 128
    if bool(low.any()):
        scale = torch.where(low, torch.nextafter(scale, torch.full_like(scale, float("inf"))), scale)
    s64 = scale.double().unsqueeze(1)  # [E, 1, O]
    q = torch.where(s64 > 0, torch.round(w64 / torch.where(s64 > 0, s64, 1.0)), 0.0)
    return q.clamp(-QMAX, QMAX).to(torch.int8), scale


def dequantize(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """q int8 [E, I, O] with scales [E, O] -> float weights [E, I, O] (q * scale, in `dtype`).

    Example:
        >>> w1 = dequantize(layer.experts.w1, layer.experts.w1_scale)
    """
    return q.to(dtype) * scale.to(dtype).unsqueeze(1)


def quantize_layer_(layer: SoftMoE, config: QuantConfig = QuantConfig(), name: str = "") -> SoftMoE:
    """Quantize one Soft MoE layer's experts in place (a new int8 StackedExperts on the same device).

    Raises:
        ConfigError: the layer is already quantized.

    Example:
        >>> quantize_layer_(model.moe)
    """
    if layer.config.quant is not None:
        raise ConfigError(f"quantize: layer {name or '(layer)'!r} is already {layer.config.quant}; quantize the "
                          "float model once (quantizing twice would round the rounded weights again)")
    old, c = layer.experts, layer.config
    new = StackedExperts(c.expert, c.num_held, c.dim, c.hidden, c.out_features, c.has_bias, quant=config.kind)
    q1, s1 = quantize_weights(old.w1)
    q2, s2 = quantize_weights(old.w2)
    state = {"w1": q1, "w1_scale": s1, "w2": q2, "w2_scale": s2}
    if old.b1 is not None:
        state.update(b1=old.b1.detach().clone(), b2=old.b2.detach().clone())
    new.load_state_dict(state, strict=True, assign=True)
    new.use_triton, new.policy = old.use_triton, old.policy
    layer.experts = new.train(old.training)
    layer.config = replace(c, quant=config.kind)
    return layer


def quantize_(model: nn.Module, config: QuantConfig | str = QuantConfig()) -> nn.Module:
    """Quantize the experts of every Soft MoE layer of `model` in place (torchao's verb); returns the model.

    Args:
        model: a moe-prune model or layer (full or compressed), or a model of your own with moe-prune layers.
        config: a QuantConfig or "int8".

    Returns:
        `model`, its experts' w1 and w2 int8 with per-output-channel scales, every parameter frozen
        (requires_grad False: the model is inference-only); every other tensor unchanged.

    Raises:
        ConfigError: a layer is already quantized, or an unknown kind. SelectionError: no Soft MoE layer.

    Example:
        >>> small = quantize_(compress_model(model, subsets))
        >>> moe_prune.save(small, "small.int8.safetensors")
    """
    config = as_quant_config(config)
    layers = moe_layers(model)
    if not layers:
        raise SelectionError(f"{type(model).__name__} has no Soft MoE layer to quantize")
    already = [name for name, layer in layers.items() if layer.config.quant is not None]
    if already:  # all or nothing: a half-quantized model is never left behind
        quantize_layer_(layers[already[0]], config, already[0])
    for name, layer in layers.items():
        quantize_layer_(layer, config, name)
    return model.requires_grad_(False)  # inference-only: a call that asks for gradients is then training


@contextlib.contextmanager
def graph_numerics(model: nn.Module):
    """Run eager torch with the numerics an exported graph has: int8 experts left at their default
    (`int8_activations` None) quantize their activation rows too where the graph does (experts of at least
    ExecutionPolicy.graph_int8_min weights; smaller ones keep float activations in the graph as in eager torch).
    Validation compares ONNX Runtime with torch under this; a float model is unchanged.

    Example:
        >>> with graph_numerics(small), torch.no_grad():
        ...     ref = small(x)   # what the exported graph computes, to rounding
    """
    changed = [m for m in model.modules() if isinstance(m, StackedExperts) and m.quant is not None
               and m.int8_activations is None]
    for m in changed:
        m.int8_activations = m.graph_int8()
    try:
        yield model
    finally:
        for m in changed:
            m.int8_activations = None


def quantize_file(src, out: str | os.PathLike, config: QuantConfig | str = QuantConfig(), meta: dict | None = None,
                  create_folder: bool = False) -> dict:
    """Quantize the experts of a checkpoint as it is (full or compressed; any format `load` reads) and write
    the int8 checkpoint atomically (`moe-prune compress CKPT --quantize int8` without --calib).

    Args:
        src: the checkpoint (never modified): a path or a checkpoint.CheckpointFile.
        out: the .safetensors to write.
        config: a QuantConfig or "int8".
        meta: extra metadata (the source's is kept, and its quantization recorded under "quantize").
        create_folder: create out's folder for the run (removed again if it fails).

    Returns:
        {"path", "before" and "after" (checkpoint.summary of both)}.

    Raises:
        CheckpointError: see `load`. ConfigError: already quantized, or an unknown kind. OutputError: bad `out`.

    Example:
        >>> r = quantize_file("small.safetensors", "small.int8.safetensors")
        >>> r["after"]["weight_bytes"] / r["before"]["weight_bytes"]
    """
    from ..core.checkpoint import as_file, load, open_checkpoint, save
    from ..core.summary import summary
    from ..core.files import check_output, output_folder

    config = as_quant_config(config)
    src = as_file(src)
    out = Path(out)
    opened = open_checkpoint(src)
    if spec_quantized(opened.spec):
        raise ConfigError(f"{opened.path}: its experts are already int8 (quantizing twice would round the rounded "
                          "weights again); quantize the float checkpoint it came from")
    if out.parent.exists():
        check_output(out, inputs=(opened.path,))
    folder = output_folder(out.parent) if create_folder else contextlib.nullcontext()
    with folder:
        # In the source's own float dtype: the scales are rounded to it before q is computed against them.
        model = quantize_(load(src), config)
        record = {**opened.meta, **(meta or {}), "quantize": config.record()}
        path = save(model, out, meta=record, inputs=(opened.path,))
    return {"path": path, "before": summary(src), "after": summary(path)}
