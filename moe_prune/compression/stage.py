"""The compress stage as one verb with its config (torchao's shape: `quantize_(model, config)`):
`compress(model, calib, CompressConfig(...))` chooses each layer's experts on the calibration data, cuts the model
down to them, heals it if asked and quantizes it last if asked, and returns the model with the record a checkpoint
stores. `moe-prune compress` runs the same steps on files (compress.compress_checkpoint).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn

from ..core.devices import device_of, resolve_device
from ..core.models import quantized_layers, refuse_quantized
from ..core.weights import model_dtype
from ..selection.calibration import DEFAULT_RULE, choose_subsets
from ..selection.scores import keep_per_layer
from .compress import quant_record, quantize_last, compress_and_heal, compress_model, kept_record
from .healing import HealConfig
from .quantize import QuantConfig, as_quant_config


@dataclass(frozen=True)
class CompressConfig:
    """How to compress: which experts each layer keeps, and what happens to the smaller model.

    Args:
        keep: experts kept per layer: a count (16), a fraction (0.125) or "1/8" (see parse_keep).
        rule: how the static subsets are chosen: "loss" (the default), "reconstruct", "output" or "mass" (see
            selection.calibration).
        budget: "per-layer" (every layer keeps `keep`) or "global" (the loss rule spends the same expert FLOPs
            where they lower the loss most).
        mode: "drop" (the paper: dropped experts' outputs are zero, the router keeps every slot) or "renorm".
        heal: a HealConfig to distil the compressed model from the full one on the calibration data; None: no.
        quantize: "int8" or a QuantConfig to store the kept experts' weights as int8, last; None: float.
        device: where calibration, healing and the compressed model run: "cpu", "cuda", "cuda:N" or "auto" (a copy
            of the model goes there; the inputs follow a batch at a time); None: the model's own device.
        progress: show progress bars.
    """

    keep: int | float | str = "1/8"
    rule: str = DEFAULT_RULE
    budget: str = "per-layer"
    mode: str = "drop"
    heal: HealConfig | None = None
    quantize: str | QuantConfig | None = None
    device: str | None = None
    progress: bool = False


def compress(model: nn.Module, calib, config: CompressConfig = CompressConfig()) -> tuple[nn.Module, dict]:
    """A smaller copy of `model` holding only the experts `config` keeps (the input model is unchanged).

    Args:
        model: a float native model or bare Soft MoE layer (full, or compressed before), in the dtype calibration
            runs in, on the device it runs on unless config.device says another.
        calib: calibration inputs: a sequence of batches, a tensor [N, ...] or data.examples.Batches.
        config: see CompressConfig.

    Returns:
        (the compressed model in eval mode, its record: "keep", the rule and its scores or losses, "heal" when
        healed, "mode", "kept_experts" and "quantize" when quantized; what `moe-prune compress` stores in the
        checkpoint's metadata).

    Raises:
        SelectionError: a bad keep, rule, budget or mode, no Soft MoE layer, or a model whose experts are already
            int8 (compress the float model, then quantize last). ConfigError: a bad quantize or heal setting, or a
            device this machine lacks.

    Example:
        >>> small, record = compress(model, batches, CompressConfig(keep="1/8", heal=HealConfig(steps=500)))
        >>> record["kept_experts"]["moe"][:4]
        [3, 17, 21, 40]
    """
    refuse_quantized(quantized_layers(model), type(model).__name__, "calibrating and compressing")
    if config.device is not None:
        target = resolve_device(config.device)
        if target.type == "cuda" and target.index is None:
            target = torch.device("cuda", torch.cuda.current_device())
        if target != device_of(model):
            model = _copy_to(model, target)  # the caller's model stays where it is
    as_quant_config(config.quantize)  # a bad kind is an error before the calibration runs
    keep_per_layer(model, config.keep)  # a bad keep too
    subsets, calibration = choose_subsets(model, calib, config.keep, rule=config.rule, mode=config.mode,
                                          progress=config.progress, budget=config.budget)
    record = {"keep": str(config.keep), **calibration}
    if config.heal is None:
        small = compress_model(model, subsets, config.mode)
    else:
        small, healed = compress_and_heal(model, subsets, calib, mode=config.mode, config=config.heal,
                                          progress=config.progress)
        record["heal"] = healed
    small = quantize_last(small, config.quantize, model_dtype(model))
    record.update(mode=config.mode, kept_experts=kept_record(small), **quant_record(config.quantize))
    return small, record


def _copy_to(model: nn.Module, device: torch.device) -> nn.Module:
    """A deep copy of `model` whose parameters and buffers are made on `device` directly (a copy made where the
    model is, then moved, would need twice the model's memory there)."""
    memo = {}
    for t in [*model.parameters(), *model.buffers()]:
        if id(t) not in memo:
            moved = t.detach().to(device)
            memo[id(t)] = nn.Parameter(moved, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else moved
    return copy.deepcopy(model, memo)
