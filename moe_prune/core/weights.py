"""Weights into a model: the one float dtype a model computes in, and `assign_weights`, which puts checked tensors
into a model (every name, strictly; NaN/Inf, damaged int8 weights and negative scales refused).
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import CheckpointError, ConfigError


def float_dtype(value) -> torch.dtype | None:
    """A float dtype from its name ("fp16", "bfloat16", torch.float32, ...); None stays None."""
    if value is None or isinstance(value, torch.dtype):
        return value
    name = str(value).replace("torch.", "")
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16, "half": torch.float16}.get(name)
    dtype = dtype or getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ConfigError(f"dtype {value!r}: choose float32, float16 or bfloat16")
    return dtype


def checkpoint_dtype(state: dict[str, torch.Tensor]) -> torch.dtype:
    """The dtype a checkpoint's model computes in: its floating tensors' one dtype, or float32 when they mix
    (every float dtype converts to float32 exactly)."""
    kinds = {t.dtype for t in state.values() if t.is_floating_point()}
    return kinds.pop() if len(kinds) == 1 else torch.float32


def assign_weights(model: nn.Module, state: dict[str, torch.Tensor], where, device, dtype=None) -> None:
    """Put checked tensors into `model` (every name, strictly), on `device`, floats as `dtype`.

    Args:
        dtype: the floating dtype of every weight; None: `checkpoint_dtype(state)` (the file's own).

    Raises:
        CheckpointError: non-float weights (int8 ones where the layer is quantized), NaN/Inf values, int8 weights
            outside [-127, 127] or negative scales, naming `where` (the file or the model).
    """
    expected = model.state_dict()
    for name, t in state.items():
        if name in expected and expected[name].is_floating_point() and not t.is_floating_point():
            raise CheckpointError(f"{where}: tensor {name} is {t.dtype}; the model needs floating-point weights")
        if name in expected and expected[name].dtype == torch.int8 and t.dtype != torch.int8:
            raise CheckpointError(f"{where}: tensor {name} is {t.dtype}; its Soft MoE layer is quantized (quant "
                                  "int8 in the config) and needs int8 expert weights; the checkpoint is damaged")
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise CheckpointError(f"{where}: tensor {name} holds NaN or Inf values; the checkpoint is damaged")
        # int8 expert weights are symmetric (moe_prune.compression.quantize): -128 and negative scales are never written.
        if t.dtype == torch.int8 and t.numel() and int(t.min()) < -127:
            raise CheckpointError(f"{where}: tensor {name} holds -128; int8 expert weights lie in [-127, 127]; "
                                  "the checkpoint is damaged")
        if name.endswith(("experts.w1_scale", "experts.w2_scale")) and t.is_floating_point() and bool((t < 0).any()):
            raise CheckpointError(f"{where}: tensor {name} holds negative scales; the checkpoint is damaged")
    # One float dtype for the whole model (its matmuls need one): the file's, unless told.
    dtype = dtype or checkpoint_dtype(state)
    state = {k: v.to(device, dtype) if v.is_floating_point() else v.to(device) for k, v in state.items()}
    model.load_state_dict(state, strict=True, assign=True)


def model_dtype(model: nn.Module) -> torch.dtype:
    """The dtype of a model's floating weights (float32 for a model without any)."""
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
