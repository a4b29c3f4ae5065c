"""A Soft MoE layer cut down to the experts it keeps: the plan (new config, expert rows, router columns), one tensor
reduced by it, and `compress_layer`. Compression (whole models and files) and `convert(model, experts=...)` both
cut layers here.

    drop mode:   the router keeps all of Phi [D, E, S] (the combine denominator needs every slot)
    renorm mode: Phi keeps only the kept columns [D, K, S]; the layer becomes an ordinary K-expert layer
In both, the config's `origin` records each held expert's id in the original model.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from ..errors import SelectionError
from .layers import MODES, SoftMoE, SoftMoEConfig
from .models import refuse_quantized
from .weights import assign_weights, model_dtype


EXPERT_TENSORS = ("experts.w1", "experts.b1", "experts.w2", "experts.b2")


def layer_plan(cfg: SoftMoEConfig, kept, mode: str, name: str) -> tuple[SoftMoEConfig, list[int], list[int] | None]:
    """(new layer config, rows of the expert stack to keep, Phi's expert columns to keep or None for all)."""
    if mode not in MODES:
        raise SelectionError(f"mode={mode!r}: choose 'drop' or 'renorm'")
    kept = sorted(int(e) for e in torch.as_tensor(kept).flatten().tolist())
    held = list(cfg.held_ids)
    if not kept or len(set(kept)) != len(kept) or not set(kept) <= set(held):
        raise SelectionError(f"layer {name!r}: the subset {kept} must be distinct experts among those it holds ({len(held)})")
    rows = [held.index(e) for e in kept]
    origin = [(cfg.origin[r] if cfg.origin is not None else held[r]) for r in rows]
    if mode == "drop":
        return replace(cfg, held=tuple(kept), origin=tuple(origin)), rows, None
    return replace(cfg, num_experts=len(kept), held=None, origin=tuple(origin)), rows, kept


def reduce_tensor(name: str, tensor_name: str, get, plan) -> torch.Tensor:
    """One tensor of a layer, reduced by its plan; `get(rows or None, phi_cols or None)` reads from the source."""
    _, rows, cols = plan
    suffix = tensor_name[len(name) + 1:] if name else tensor_name
    if suffix in EXPERT_TENSORS:
        return get(rows, None)
    if suffix == "phi" and cols is not None:
        return get(None, cols)
    return get(None, None)


def compress_layer(layer: SoftMoE, kept, mode: str = "drop", name: str = "") -> SoftMoE:
    """A new Soft MoE layer holding only the `kept` experts of `layer` (router ids), on its device, in its dtype.

    Raises:
        SelectionError: ids out of range or repeated, bad mode.

    Example:
        >>> small = compress_layer(model.moe, [2, 5])
    """
    # Refused rather than sliced: the subsets are chosen on the float model's outputs, and quantizing is last.
    refuse_quantized([name] if layer.config.quant is not None else [], "compress_model", "compressing")
    plan = layer_plan(layer.config, kept, mode, name)
    new = {}
    for key, t in layer.state_dict().items():
        def get(rows, cols, t=t):
            if rows is not None:
                return t.index_select(0, torch.tensor(rows, device=t.device))
            return t.index_select(1, torch.tensor(cols, device=t.device)) if cols is not None else t

        new[key] = reduce_tensor("", key, get, plan).clone()  # never shared with the source: healing trains the copy
    with torch.device("meta"):
        out = SoftMoE(plan[0])
    param = next(layer.parameters())
    assign_weights(out, new, "compressed model", param.device, model_dtype(layer))
    out.use_triton = layer.use_triton
    out.experts.use_triton = layer.experts.use_triton
    return out.train(layer.training)
