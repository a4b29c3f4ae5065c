"""What `moe-prune info` prints: a checkpoint's architecture, sizes and metadata, read from its header (native or
not) without loading a tensor.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path

import torch

from .checkpoint import dtype_name, open_checkpoint
from .models import build


def summary(path) -> dict:
    """Architecture, Soft MoE layers and parameter counts of a checkpoint (a native one loads no tensor).

    Returns:
        A JSON-able dict: path, bytes (the file's), weight_bytes (its tensors'), native, family, config, dtype,
        parameters, expert_parameters, expert_bytes (the experts' tensors', scales included), moe_layers (per
        layer: name, experts in the router, experts held, slots, hidden, kind, original ids of the held experts,
        parameters, expert_parameters, expert_bytes, quant), meta, and for another library's file `found` (format, library, prefix, each argument's
        source: see `open_checkpoint`).

    Example:
        >>> s = summary("model.safetensors")
        >>> s["moe_layers"][0]["experts_held"]
        16
    """
    opened = open_checkpoint(path)
    spec, meta, header = opened.spec, opened.meta, opened.header
    count = {name: math.prod(shape) for name, (_, shape) in header.items()}
    weight_bytes = sum(n * _itemsize(header[name][0]) for name, n in count.items())
    dtypes = Counter()
    for name, (dt, shape) in header.items():
        dtypes[dtype_name(dt)] += math.prod(shape)
    layers = []
    moe = spec.get("moe") if spec["family"] != "layer" else {"": spec["config"]}
    for name, cfg in moe.items():
        prefix = f"{name}." if name else ""
        ids = cfg.get("held") or cfg.get("present")  # `present`: its name before format version 2
        held = len(ids) if ids else cfg["num_experts"]
        origin = cfg.get("origin") or ids
        layers.append({
            "name": name or "(layer)", "router_experts": cfg["num_experts"], "experts_held": held,
            "slots_per_expert": cfg["slots_per_expert"], "hidden": cfg["hidden"], "expert": cfg["expert"],
            "kept_original_ids": origin,
            "parameters": sum(n for k, n in count.items() if k.startswith(prefix)),
            "expert_parameters": sum(n for k, n in count.items() if k.startswith(prefix + "experts.")),
            "expert_bytes": sum(n * _itemsize(header[k][0]) for k, n in count.items() if k.startswith(prefix + "experts.")),
            "quant": cfg.get("quant"),
        })
    out = {
        "path": str(path), "bytes": _size(opened.path), "weight_bytes": weight_bytes, "native": opened.native,
        "family": spec["family"], "config": spec.get("config", {}),
        "dtype": ", ".join(d for d, _ in dtypes.most_common()),
        "parameters": sum(count.values()), "expert_parameters": sum(layer["expert_parameters"] for layer in layers),
        "expert_bytes": sum(layer["expert_bytes"] for layer in layers),
        "moe_layers": layers, "meta": meta,
    }
    if spec["family"] == "module":
        out["class"] = spec.get("class")
    else:
        from .preprocess import for_model

        with torch.device("meta"):
            probe = build(spec)
        probe.checkpoint_meta = meta
        pre = for_model(probe)
        out["preprocess"] = None if pre is None else {**pre.to_dict(), "text": pre.describe()}
    if opened.found:
        out["found"] = opened.found
    return out


def _size(p: Path) -> int:
    """Bytes on disk: the file, or for a sharded index the index and every shard."""
    if p.name.endswith(".index.json"):
        try:
            shards = set(json.loads(p.read_text())["weight_map"].values())
            return p.stat().st_size + sum((p.parent / s).stat().st_size for s in shards)
        except (OSError, ValueError, KeyError, AttributeError):
            pass
    return p.stat().st_size


def _itemsize(dt: str) -> int:
    name = dtype_name(dt)
    dtype = getattr(torch, name, None)
    return dtype.itemsize if isinstance(dtype, torch.dtype) else 4
