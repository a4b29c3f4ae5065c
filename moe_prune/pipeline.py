"""The whole flow on one checkpoint (the `moe-prune demo` command): load, select, compress, measure.

    load -> calibrate on half of the bundled sample, keep the top 1/8 experts per layer -> compress ->
    accuracy kept on the other half (beside a random subset and no experts at all) -> export full and
    reduced models to ONNX, validate them -> benchmark -> one summary.
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import torch

DEFAULT_CHECKPOINT = "default.safetensors"


def default_checkpoint() -> Path:
    """The small trained checkpoint shipped with the package (see moe_prune/assets/README.md)."""
    return Path(str(resources.files("moe_prune") / "assets" / DEFAULT_CHECKPOINT))


@dataclass(frozen=True)
class DemoConfig:
    checkpoint: str | None = None  # None: the bundled default
    out_dir: str = "demo-output"
    keep: str = "1/8"
    mode: str = "drop"
    random_seeds: int = 10
    export: bool = True
    bench: bool = True


def _say(step: str, text: str = "") -> None:
    print(f"[{step}] {text}", file=sys.stderr, flush=True)


def run_demo(config: DemoConfig = DemoConfig()) -> dict:
    """Run the flow and return its summary (also printed by the CLI).

    Example:
        >>> summary = run_demo(DemoConfig(out_dir="/tmp/demo"))
        >>> summary["accuracy"]["static"] / summary["accuracy"]["full"]
    """
    from .checkpoint import load, summary
    from .compress import compress_file, static_subsets
    from .data import iterate_batches, load_images
    from .evaluate import accuracy
    from .models import moe_layers
    from .selection import with_experts, with_selection

    t0 = time.perf_counter()
    ckpt = Path(config.checkpoint) if config.checkpoint else default_checkpoint()
    out = Path(config.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _say("1/5 load", str(ckpt))
    model = load(ckpt)
    info = summary(ckpt)
    layers = moe_layers(model)
    images, labels = load_images("sample", split="test")
    calib, test = (images[:500], labels[:500]), (images[500:], labels[500:])

    _say("2/5 select", f"calibrating on 500 sample images, keeping the top {config.keep} experts of every Soft MoE layer")
    subsets, _ = static_subsets(model, [x for x, _ in iterate_batches(calib[0], None, 250)], config.keep)
    small_path = out / f"{ckpt.stem}.keep{config.keep.replace('/', 'of')}.{config.mode}.safetensors"
    _say("3/5 compress", str(small_path))
    compress_file(ckpt, subsets, small_path, mode=config.mode, meta={"keep": config.keep, "calibration": "bundled sample, images 0-499"})
    small_info = summary(small_path)
    small = load(small_path)

    _say("4/5 accuracy", "on sample images 500-999: full, static subset, Algorithm 1, random subsets, no experts")
    acc = {"full": accuracy(model, *test), "static": accuracy(small, *test),
           "alg1": accuracy(with_selection(model, config.keep, per="input", mode=config.mode), *test)}
    k = len(next(iter(subsets.values())))
    rand = []
    for seed in range(config.random_seeds):
        g = torch.Generator().manual_seed(seed)
        subset = {name: torch.randperm(layer.config.num_experts, generator=g)[:k].sort().values for name, layer in layers.items()}
        rand.append(accuracy(with_experts(model, subset, mode=config.mode), *test))
    acc["random_mean"] = sum(rand) / len(rand)
    acc["random_std"] = math.sqrt(sum((r - acc["random_mean"]) ** 2 for r in rand) / max(1, len(rand) - 1))
    acc["no_experts"] = accuracy(with_experts(model, {name: torch.zeros(0, dtype=torch.long) for name in layers}), *test)
    result = {
        "checkpoint": str(ckpt), "compressed": str(small_path), "keep": config.keep, "k": k, "mode": config.mode,
        "experts": {name: layer.config.num_experts for name, layer in layers.items()},
        "kept_experts": {name: s.tolist() for name, s in subsets.items()},
        "accuracy": acc,
        "size": {"parameters": (info["parameters"], small_info["parameters"]),
                 "expert_parameters": (info["expert_parameters"], small_info["expert_parameters"]),
                 "bytes": (info["bytes"], small_info["bytes"])},
    }
    if config.export:
        from .pipeline_onnx import export_and_bench

        _say("5/5 export + bench", "ONNX export of the full and reduced models, validation, latency")
        result.update(export_and_bench(model, small, out, bench=config.bench))
    result["seconds"] = time.perf_counter() - t0
    return result
