"""The whole flow on one checkpoint (the `moe-prune demo` command): load, select, compress, measure.

    load -> calibrate on half of the bundled sample, keep 1/8 of the experts per layer (the default rule, beside
    the paper's combine mass) -> compress -> heal by distillation on the same images -> accuracy kept on the other
    half (beside a random subset and no experts at all) -> export full and reduced models to ONNX, validate
    them -> benchmark -> one summary.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import torch

from ..measurement.bench import BenchSetup, benchmark
from ..measurement.reports import say
from ..measurement.timing import BenchConfig

DEFAULT_CHECKPOINT = "default.safetensors"


def default_checkpoint() -> Path:
    """The small trained checkpoint shipped with the package (see moe_prune/assets/README.md)."""
    return Path(str(resources.files("moe_prune") / "assets" / DEFAULT_CHECKPOINT))


@dataclass(frozen=True)
class DemoConfig:
    checkpoint: str | os.PathLike | None = None  # a path or checkpoint.CheckpointFile; None: the bundled default
    out_dir: str = "demo-output"
    keep: str = "1/8"
    mode: str = "drop"
    random_seeds: int = 10
    export: bool = True
    bench: bool = True
    heal_steps: int | None = 3000  # None: no healed checkpoint
    device: str | None = None  # where the demo computes ("auto"/None: a GPU when torch sees one); ONNX: the CPU


def run_demo(config: DemoConfig = DemoConfig()) -> dict:
    """Run the flow, write its summary to OUT_DIR/summary.json and return it (the CLI prints it).

    Example:
        >>> summary = run_demo(DemoConfig(out_dir="/tmp/demo"))
        >>> summary["accuracy"]["static"] / summary["accuracy"]["full"]
    """
    from ..core.files import output_folder
    from ..measurement.reports import write_json

    if config.random_seeds < 1:
        from ..errors import ConfigError

        raise ConfigError(f"random_seeds={config.random_seeds}: give at least 1")
    from ..core.checkpoint import as_file

    ckpt = as_file(config.checkpoint if config.checkpoint else default_checkpoint())
    _check_demo_model(ckpt)  # before any output exists
    with output_folder(config.out_dir) as out:  # a failed demo leaves no output behind
        result = _demo(config, ckpt, out)
        write_json(out / "summary.json", result)
    return result


def _check_demo_model(ckpt) -> None:
    """The demo measures accuracy on the bundled Fashion-MNIST images: refuse other models in one line."""
    from ..core.checkpoint import skeleton
    from ..data.inputs import check_inputs
    from ..core.preprocess import describe_input, model_input
    from ..data.mnist import load_images
    from ..errors import DataError

    model = skeleton(ckpt)
    try:
        check_inputs(model, load_images("sample", split="test")[0], "the bundled sample")
    except DataError:
        raise DataError(f"{ckpt}: the demo runs on the bundled 28x28 Fashion-MNIST images, but this model takes "
                        f"{describe_input(model_input(model))}; for other models use `moe-prune compress --calib "
                        "INPUTS.npy` and `moe-prune bench`") from None


def _demo(config: DemoConfig, ckpt, out: Path) -> dict:
    from ..selection.calibration import DEFAULT_RULE, choose_subsets
    from ..core.checkpoint import load, save
    from ..core.summary import summary
    from ..compression.compress import compress_and_heal, compress_file, static_subsets
    from ..compression.healing import HealConfig
    from ..data.mnist import iterate_batches, load_images
    from ..measurement.accuracy import accuracy
    from ..measurement.evaluate import mean_std, random_accuracies
    from ..core.models import moe_layers
    from ..selection.scores import with_experts, with_selection

    t0 = time.perf_counter()
    say("1/5 load", str(ckpt))
    from ..core.devices import resolve_device

    device = resolve_device(config.device)
    model = load(ckpt, dtype=torch.float32, device=device)  # float32; the compressed file keeps the source's dtype
    info = summary(ckpt)
    layers = moe_layers(model)
    images, labels = load_images("sample", split="test")
    calib, test = (images[:500], labels[:500]), (images[500:], labels[500:])

    say("2/5 select", f"calibrating on 500 sample images, keeping {config.keep} of the experts of every Soft MoE layer "
        f"(rule: {DEFAULT_RULE}; the paper's combine mass beside it)")
    batches = [x for x, _ in iterate_batches(calib[0], None, 250)]
    subsets, _ = choose_subsets(model, batches, config.keep, rule=DEFAULT_RULE, mode=config.mode)
    by_mass, _ = static_subsets(model, batches, config.keep)
    stem = f"{Path(ckpt).name.split('.')[0]}.keep{config.keep.replace('/', 'of')}.{config.mode}"
    small_path = out / f"{stem}.safetensors"
    say("3/5 compress", str(small_path))
    compress_file(ckpt, subsets, small_path, mode=config.mode,
                  meta={"keep": config.keep, "rule": DEFAULT_RULE, "calibration": "bundled sample, images 0-499"})
    small_info = summary(small_path)
    small = load(small_path, device=device)
    healed_path = None
    if config.heal_steps is not None:
        healed_path = out / f"{stem}.healed.safetensors"
        heal = HealConfig(steps=config.heal_steps)
        say("3/5 heal", f"distillation on the 500 calibration images (at most {heal.steps} steps and "
            f"{heal.max_epochs:g} passes) -> {healed_path}")
        healed, record = compress_and_heal(model, subsets, batches, mode=config.mode, config=heal)
        why = f", stopped early: {record['stopped']}" if record.get("stopped") else ""
        say("3/5 heal", f"healed: {record['steps_run']} of {record['steps_planned']} steps{why}")
        save(healed, healed_path, meta={"keep": config.keep, "rule": DEFAULT_RULE, "heal": record,
                                        "calibration": "bundled sample, images 0-499", "mode": config.mode})

    say("4/5 accuracy", "on sample images 500-999: full, static subsets, healed, Algorithm 1, random subsets, no experts")
    acc = {"full": accuracy(model, *test), "static": accuracy(small, *test),
           "static_mass": accuracy(with_experts(model, by_mass, mode=config.mode), *test),
           "alg1": accuracy(with_selection(model, config.keep, per="input", mode=config.mode), *test)}
    if healed_path is not None:
        acc["healed"] = accuracy(healed, *test)
    k = len(next(iter(subsets.values())))
    acc["random_mean"], acc["random_std"] = mean_std(list(random_accuracies(model, *test, k, config.random_seeds,
                                                                            config.mode)))
    acc["no_experts"] = accuracy(with_experts(model, {name: torch.zeros(0, dtype=torch.long) for name in layers}), *test)
    result = {
        "checkpoint": str(ckpt), "compressed": str(small_path), "keep": config.keep, "k": k, "mode": config.mode,
        "rule": DEFAULT_RULE, "healed": None if healed_path is None else str(healed_path),
        "experts": {name: layer.config.num_experts for name, layer in layers.items()},
        "kept_experts": {name: s.tolist() for name, s in subsets.items()},
        "accuracy": acc,
        "size": {"parameters": (info["parameters"], small_info["parameters"]),
                 "expert_parameters": (info["expert_parameters"], small_info["expert_parameters"]),
                 "bytes": (info["bytes"], small_info["bytes"])},
    }
    if config.export:
        say("5/5 export + bench", "ONNX export of the full, compressed, Algorithm 2 and Algorithm 1 models, validation, latency")
        setup = BenchSetup(keep=config.keep, mode=config.mode, out_dir=str(out / "onnx"), layers_alone=False,
                           bench=BenchConfig(batch_sizes=(1, 8, 32), min_seconds=1.0) if config.bench else None,
                           device=str(device))
        result["speed"] = benchmark(model, small, setup)
    result["seconds"] = time.perf_counter() - t0
    return result
