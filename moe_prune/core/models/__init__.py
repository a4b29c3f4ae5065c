"""Model families and their serializable description ("spec").

A spec is a JSON-able dict: {"family": "mnist" | "vit" | "layer", "config": {...}, "moe": {name: {...}}}, where
"moe" holds the config of every Soft MoE layer by module name (they differ from the family default once
compressed). `build(spec)` makes the model; `model_spec(model)` gives the spec back. `moe_layers`, and which of
them are quantized, are read here too. May import: moe_prune.errors and core.layers (the families' layers).
"""

from __future__ import annotations

import dataclasses

from torch import nn

from ...errors import ConfigError, SelectionError
from ..layers import SoftMoE, SoftMoEConfig
from .mnist import MnistConfig, MnistSoftMoE
from .vit import SoftMoEViT, ViTConfig

FAMILIES = {"mnist": (MnistSoftMoE, MnistConfig), "vit": (SoftMoEViT, ViTConfig), "layer": (SoftMoE, SoftMoEConfig)}

__all__ = [
    "MnistConfig", "MnistSoftMoE", "SoftMoEViT", "ViTConfig", "build", "model_spec", "moe_layers", "FAMILIES",
]


def moe_layers(model: nn.Module) -> dict[str, SoftMoE]:
    """All Soft MoE layers of a model by module name, in model order ("" for a bare layer).

    Example:
        >>> list(moe_layers(MnistSoftMoE(MnistConfig(num_experts=8))))
        ['moe']
    """
    return {name: m for name, m in model.named_modules() if isinstance(m, SoftMoE)}


def model_spec(model: nn.Module) -> dict:
    """The JSON-able spec of a native model (see the module docstring)."""
    for family, (cls, _) in FAMILIES.items():
        if type(model) is cls:
            break
    else:
        raise ConfigError(f"{type(model).__name__} is not a moe-prune model (expected one of MnistSoftMoE, SoftMoEViT, SoftMoE)")
    spec = {"family": family, "config": model.config.to_dict()}
    if family != "layer":
        spec["moe"] = {name: layer.config.to_dict() for name, layer in moe_layers(model).items()}
    return spec


def _config(cls, d, what: str):
    if not isinstance(d, dict):
        raise ConfigError(f"{what}: expected a JSON object, got {type(d).__name__}")
    if cls is SoftMoEConfig:
        return SoftMoEConfig.from_dict(d)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = set(d) - known
    if unknown:
        raise ConfigError(f"{what}: unknown keys {sorted(unknown)}")
    try:
        return cls(**d)
    except TypeError as e:
        raise ConfigError(f"{what}: {e}") from None


def build(spec: dict) -> nn.Module:
    """Build the model a spec describes (random weights).

    Raises:
        ConfigError: unknown family, unknown or missing keys, or values that contradict each other.

    Example:
        >>> m = build({"family": "mnist", "config": {"num_experts": 8}})
        >>> build(model_spec(m)).config == m.config
        True
    """
    if not isinstance(spec, dict) or spec.get("family") not in FAMILIES:
        fam = spec.get("family") if isinstance(spec, dict) else None
        raise ConfigError(f"model spec: family must be one of {sorted(FAMILIES)}, got {fam!r}")
    cls, cfg_cls = FAMILIES[spec["family"]]
    config = _config(cfg_cls, spec.get("config", {}), f"{spec['family']} config")
    if spec["family"] == "layer":
        return cls(config)
    moe = {name: _config(SoftMoEConfig, d, f"Soft MoE config of {name!r}") for name, d in spec.get("moe", {}).items()}
    if spec["family"] == "mnist":
        extra = set(moe) - {"moe"}
        if extra:
            raise ConfigError(f"mnist config: Soft MoE configs given for {sorted(extra)}; the model has only 'moe'")
        return cls(config, moe.get("moe"))
    return cls(config, moe)


def quantized_layers(model: nn.Module) -> list[str]:
    """Names of the Soft MoE layers of `model` whose experts are quantized ("" for a bare layer)."""
    return [name for name, layer in moe_layers(model).items() if layer.config.quant is not None]


def spec_quantized(spec: dict) -> list[str]:
    """Names of the quantized Soft MoE layers of a checkpoint's spec (see above), read without a model."""
    moe = {"": spec.get("config")} if spec.get("family") == "layer" else spec.get("moe") or {}
    return [name for name, cfg in moe.items() if isinstance(cfg, dict) and cfg.get("quant") is not None]


def refuse_quantized(names: list[str], where, what: str) -> None:
    """Raise SelectionError when `names` (quantized layers) is not empty: `what` needs the float model.

    Example:
        >>> refuse_quantized(quantized_layers(model), "model.safetensors", "compressing")
    """
    if names:
        shown = ", ".join(repr(n or "(layer)") for n in names[:3])
        raise SelectionError(f"{where}: its experts are int8 (layers {shown}); {what} needs the float model: "
                             "calibrate, compress and heal the float checkpoint, then quantize last "
                             "(moe-prune compress ... --quantize int8)")
