"""Soft MoE layers inside a user's own model, replaced in place by moe-prune's (experts stacked).

    model (the user's class)                       model (same object)
      .encoder.blocks[3].moe: soft_moe.SoftMoELayerWrapper   -> moe_prune SoftMoE
      .decoder.moe: soft_moe_pytorch.SoftMoE                 -> moe_prune SoftMoE
      everything else                                        -> untouched

Layers are recognised by class name and parameter layout, never by importing the libraries (they stay
optional): soft-moe's SoftMoELayerWrapper (experts: timm's Mlp, or any two-Linear MLP with GELU or ReLU
between), soft-moe-pytorch's SoftMoE (RMSNorm or LayerNorm, GELU or GEGLU experts). Every replaced layer is
checked on a random input against the layer it replaces before the swap: a layer whose experts do something
else (a residual, a functional activation) is refused rather than converted wrong.

After `convert(model)`, everything moe-prune does with its own models works on `model`: scores, Algorithms 1
and 2, calibration rules, healing, compression, ONNX export and validation.
"""

from __future__ import annotations

from torch import nn

import torch

from ..errors import ConfigError
from .layers import SoftMoE, SoftMoEConfig
from .models import moe_layers


def recognise(module: nn.Module) -> str | None:
    """"bwconrad" (soft-moe SoftMoELayerWrapper), "lucidrains" (soft-moe-pytorch SoftMoE), or None."""
    if isinstance(module, SoftMoE):
        return None
    name = type(module).__name__
    if (name == "SoftMoELayerWrapper" and isinstance(getattr(module, "phi", None), nn.Parameter)
            and isinstance(getattr(module, "experts", None), nn.ModuleList)):
        return "bwconrad"
    experts = getattr(module, "experts", None)
    if (isinstance(getattr(module, "slot_embeds", None), nn.Parameter) and hasattr(module, "norm")
            and hasattr(module, "slot_norm") and isinstance(getattr(experts, "experts", None), nn.ModuleList)):
        return "lucidrains"
    return None


_ACTIVATIONS = {nn.ReLU: "relu"}


def _activation(expert: nn.Module, where: str) -> str:
    """The activation module between an expert's two Linear layers: "gelu", "relu" or "geglu"."""
    found = []
    for m in expert.modules():
        if isinstance(m, nn.GELU):
            if m.approximate != "none":
                raise ConfigError(f"{where}: GELU(approximate={m.approximate!r}) experts are not supported; moe-prune's "
                                  "GELU experts are exact (erf)")
            found.append("gelu")
        elif type(m) in _ACTIVATIONS:
            found.append(_ACTIVATIONS[type(m)])
        elif type(m).__name__ == "GEGLU":
            found.append("geglu")
        elif not isinstance(m, (nn.Linear, nn.Dropout, nn.Identity, nn.Sequential)) and m is not expert:
            raise ConfigError(f"{where}: the experts hold a {type(m).__name__}; moe-prune converts two-Linear MLPs "
                              "with GELU, ReLU or GEGLU between")
    if len(set(found)) != 1:
        raise ConfigError(f"{where}: the experts' activation is {'not a module' if not found else found}; moe-prune "
                          "converts two-Linear MLPs with an nn.GELU or nn.ReLU module between them")
    return found[0]


def _native(module: nn.Module, kind: str, where: str) -> tuple[SoftMoE, dict]:
    """The moe-prune layer equal to a library layer, on its device and in its dtype."""
    from .weights import assign_weights, model_dtype
    from .libraries import bwconrad_layer, lucidrains_layer

    state = module.state_dict()
    if kind == "bwconrad":
        act = _activation(module.experts[0], where)
        if act == "geglu":
            raise ConfigError(f"{where}: GEGLU experts inside a SoftMoELayerWrapper are not supported")
        converted = bwconrad_layer(state, {"activation": act}, where)
        if bool(getattr(module, "normalize", True)) != ("scale" in state):
            raise ConfigError(f"{where}: normalize={module.normalize} but scale is {'absent' if module.normalize else 'present'}")
    else:
        act = _activation(module.experts.experts[0], where)
        converted = lucidrains_layer(state, None, where)
        if (act == "geglu") != (converted.kwargs["geglu"]):
            raise ConfigError(f"{where}: the experts' shapes and their activation ({act}) disagree")
    config = SoftMoEConfig.from_dict(converted.spec["config"])
    with torch.device("meta"):
        layer = SoftMoE(config)
    param = next(module.parameters())
    assign_weights(layer, converted.state, where, param.device, model_dtype(module))
    layer.train(module.training)
    info = {"name": where, "library": converted.library, "class": type(module).__name__,
            "experts": config.num_experts, "slots_per_expert": config.slots_per_expert, "dim": config.dim,
            "hidden": config.hidden, "expert": config.expert, "expert_bias": config.has_bias}
    return layer, info


@torch.no_grad()
def _check_equal(original: nn.Module, layer: SoftMoE, where: str) -> float:
    """Run both on one random input [2, 13, D]; refuse the conversion when they differ (relative error)."""
    training = [(m, m.training) for m in original.modules()]
    original.eval()
    layer_training = layer.training
    layer.eval()
    try:
        p = next(layer.parameters())
        x = torch.randn(2, 13, layer.config.dim, generator=torch.Generator().manual_seed(0)).to(p.device, p.dtype)
        want = original(x).float()
        got = layer(x).float()
    finally:
        for m, flag in training:
            m.training = flag
        layer.train(layer_training)
    err = float((got - want).norm() / want.norm().clamp_min(1e-30))
    tol = 1e-4 if p.dtype == torch.float32 else (1e-9 if p.dtype == torch.float64 else 5e-2)
    if not err <= tol:
        raise ConfigError(f"{where}: the converted layer does not reproduce the original (relative error {err:.2e}); "
                          "its experts or routing do something moe-prune's Soft MoE layer does not")
    return err


def convert(model: nn.Module, *, experts: dict | None = None, mode: str = "drop",
            configs: dict[str, SoftMoEConfig] | None = None) -> list[dict]:
    """Replace, in place, every soft-moe / soft-moe-pytorch Soft MoE layer of `model` by moe-prune's.

    Args:
        model: any nn.Module (the user's own class); a library layer itself cannot be replaced in place: use
            `moe_prune.from_bwconrad` / `from_lucidrains`, or wrap it.
        experts: optional {layer name: kept router expert ids}: then those layers are also compressed to their
            kept experts (as `compress_model` does), so that a compressed checkpoint's weights load into a freshly
            built model with `model.load_state_dict`.
        mode: "drop" or "renorm", with `experts`.
        configs: {layer name: SoftMoEConfig}: replace those layers by fresh moe-prune layers of exactly these
            configs (weights to be loaded after; used by `moe_prune.load(path, model=...)`).

    Returns:
        What was replaced: one dict per layer (name, library, class, experts, slots_per_expert, dim, hidden,
        expert kind, the relative error of the check against the original).

    Raises:
        ConfigError: a library layer whose experts are not a supported MLP, or whose conversion does not
            reproduce it; no Soft MoE layer at all; unknown layer names in `experts` or `configs`.

    Example:
        >>> report = moe_prune.convert(model)          # model: your nn.Module with Soft MoE layers inside
        >>> [r["name"] for r in report]
        ['blocks.3.mlp', 'blocks.5.mlp']
    """
    if recognise(model) is not None:
        raise ConfigError(f"convert: {type(model).__name__} is itself a library Soft MoE layer and cannot be replaced "
                          "in place; convert the model holding it, or use moe_prune.from_bwconrad / from_lucidrains")
    report = []
    for name, module in list(model.named_modules()):
        kind = recognise(module)
        if kind is None or not name:
            continue
        if configs is not None:
            continue  # replaced below from the configs
        layer, info = _native(module, kind, name)
        if not any(p.is_meta for p in module.parameters()):
            info["relative_error"] = _check_equal(module, layer, name)
        _replace(model, name, layer)
        report.append(info)
    if configs is not None:
        report = _from_configs(model, configs)
    if not moe_layers(model):
        raise ConfigError(f"convert: {type(model).__name__} holds no Soft MoE layer moe-prune recognises (soft-moe "
                          "SoftMoELayerWrapper, soft-moe-pytorch SoftMoE)")
    if experts is not None:
        _compress_in_place(model, experts, mode)
    return report


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


def _from_configs(model: nn.Module, configs: dict[str, SoftMoEConfig]) -> list[dict]:
    modules = dict(model.named_modules())
    unknown = sorted(n for n in configs if n not in modules or not (recognise(modules[n]) or isinstance(modules[n], SoftMoE)))
    if unknown:
        raise ConfigError(f"the checkpoint has Soft MoE layers {unknown} that your model does not have (its Soft MoE "
                          f"layers: {sorted(n for n, m in modules.items() if recognise(m) or isinstance(m, SoftMoE))})")
    report = []
    for name, config in configs.items():
        old = modules[name]
        param = next(old.parameters(), None)
        layer = SoftMoE(config).to(device=param.device if param is not None else "cpu",
                                   dtype=param.dtype if param is not None else torch.float32)
        layer.train(old.training)
        _replace(model, name, layer)
        report.append({"name": name, "library": "moe-prune", "class": type(old).__name__,
                       "experts": config.num_held, "slots_per_expert": config.slots_per_expert, "dim": config.dim,
                       "hidden": config.hidden, "expert": config.expert, "expert_bias": config.has_bias})
    return report


def _compress_in_place(model: nn.Module, experts: dict, mode: str) -> None:
    from .subsets import compress_layer

    layers = moe_layers(model)
    unknown = sorted(set(experts) - set(layers))
    if unknown:
        raise ConfigError(f"convert: experts names layers {unknown} the model does not have (it has {sorted(layers)})")
    for name, ids in experts.items():
        _replace(model, name, compress_layer(layers[name], ids, mode, name))
