"""Reports for people: terminal tables, markdown, JSON files (written atomically)."""

from __future__ import annotations

import json
import os
from typing import Any, Sequence

from .files import atomic_output


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    return f"{n:.2f} GB"


def human_count(n: float) -> str:
    for unit, div in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.2f}{unit}"
    return f"{n:.0f}"


def table(rows: Sequence[Sequence[Any]], header: Sequence[str], markdown: bool = False) -> str:
    """A plain-text (aligned) or markdown table."""
    cells = [[str(c) for c in header]] + [[str(c) for c in r] for r in rows]
    if markdown:
        lines = ["| " + " | ".join(cells[0]) + " |", "|" + "|".join("---" for _ in header) + "|"]
        lines += ["| " + " | ".join(r) + " |" for r in cells[1:]]
        return "\n".join(lines)
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    fmt = lambda r: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))  # noqa: E731
    return "\n".join([fmt(cells[0]), "  ".join("-" * w for w in widths)] + [fmt(r) for r in cells[1:]])


def format_summary(s: dict) -> str:
    """The text `moe-prune info` prints for a checkpoint summary (see checkpoint.summary)."""
    cfg = s["config"]
    if s["family"] == "vit":
        arch = (f"Soft MoE ViT: {cfg['depth']} blocks, width {cfg['embed_dim']}, {cfg['num_heads']} heads, "
                f"image {cfg['img_size']} patch {cfg['patch_size']}, {cfg['num_classes']} classes")
    elif s["family"] == "mnist":
        arch = (f"Chung et al. MNIST model: {(cfg['img_size'] // cfg['patch_size']) ** 2} tokens of "
                f"{cfg['in_chans'] * cfg['patch_size'] ** 2}, one Soft MoE layer, {cfg['num_classes']} classes")
    else:
        arch = f"a single Soft MoE layer of width {cfg['dim']}"
    lines = [
        f"{s['path']}  ({human_bytes(s['bytes'])})",
        f"  architecture: {arch}",
        f"  parameters:   {s['parameters']:,} ({human_count(s['parameters'])}), of which experts "
        f"{s['expert_parameters']:,} ({100 * s['expert_parameters'] / max(1, s['parameters']):.1f}%)",
        "",
    ]
    rows = []
    for layer in s["moe_layers"]:
        held = layer["experts_held"]
        kept = layer["kept_original_ids"]
        rows.append([
            layer["name"], layer["router_experts"], held, layer["slots_per_expert"], layer["hidden"], layer["expert"],
            f"{layer['parameters']:,}",
            "all" if kept is None else ",".join(map(str, kept)) if len(kept) <= 16 else f"{len(kept)} ids (see --json)",
        ])
    lines.append(table(rows, ["Soft MoE layer", "router E", "held", "slots", "hidden", "kind", "params", "kept (original ids)"]))
    meta = {k: v for k, v in s["meta"].items() if k not in ("source_kwargs",)}
    if meta:
        lines += ["", "  metadata:"] + [f"    {k}: {json.dumps(v) if not isinstance(v, str) else v}" for k, v in sorted(meta.items())]
    return "\n".join(lines)


def write_json(path: str | os.PathLike, obj: Any) -> None:
    with atomic_output(path, suffix=".json") as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n")


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_output(path) as tmp:
        tmp.write_text(text)
