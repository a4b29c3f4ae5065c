"""Accuracy: of a model, and the paper's study of the same model run with expert subsets.

For every k the study measures, in `drop` and `renorm` mode: Algorithm 1 (each input keeps its own top k),
Algorithm 2 (each batch keeps one top k; at several batch sizes), the static calibrated subset, and a random
subset of the same size (several seeds, mean and std); beside them the full model and the k = 0 baseline (every
expert output zeroed), so a reader sees whether the experts carry accuracy at all.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
from torch import nn

from .models import moe_layers
from .selection import parse_keep, with_experts, with_selection


@torch.no_grad()
def predict(model: nn.Module, images, batch_size: int = 256) -> torch.Tensor:
    """Class predictions [N] for images (uint8 [N, 28, 28] or float model inputs [N, ...])."""
    from .data import iterate_batches

    was_training = model.training
    model.eval()
    preds = [model(x).argmax(-1) for x, _ in iterate_batches(images, None, batch_size)]
    model.train(was_training)
    return torch.cat(preds)


def check_labels(model: nn.Module, images, labels, where: str = "the data") -> None:
    """Raise DataError when the labels do not fit the classifier's outputs (e.g. 10 classes, a 5-class head)."""
    from .data import iterate_batches
    from .errors import DataError

    x, _ = next(iterate_batches(images[:1], None, 1))
    with torch.no_grad():
        classes = model.eval()(x).shape[-1]
    top = int(torch.as_tensor(labels).max())
    if top >= classes:
        raise DataError(f"{where}: labels go up to {top}, but the model has {classes} classes; evaluate it on data "
                        "with its own classes")


def accuracy(model: nn.Module, images, labels, batch_size: int = 256) -> float:
    """Top-1 accuracy of a classifier.

    Example:
        >>> accuracy(model, *load_images("sample", split="test"))
        0.871
    """
    preds = predict(model, images, batch_size)
    return (preds == torch.as_tensor(labels).long()).float().mean().item()


@dataclass(frozen=True)
class StudyConfig:
    """What the study measures.

    Args:
        keeps: fractions or counts of experts to keep (see parse_keep).
        modes: "drop" (the paper) and/or "renorm".
        batch_sizes: batch sizes at which Algorithm 2 is measured.
        random_seeds: random subsets per k (mean and std reported).
        every_k_below: for models with at most this many experts, every k from 1 to n - 1 is measured too.
        eval_batch_size: batch size for everything that does not depend on it.
    """

    keeps: tuple = ("1/2", "1/4", "1/8")
    modes: tuple = ("drop", "renorm")
    batch_sizes: tuple = (1, 32, 256)
    random_seeds: int = 10
    every_k_below: int = 16
    eval_batch_size: int = 256

    def __post_init__(self):
        from .errors import ConfigError

        if self.random_seeds < 1:
            raise ConfigError(f"--random-seeds {self.random_seeds}: give at least 1 (random subsets per k, for "
                              "their mean and std)")
        if not self.batch_sizes or min(self.batch_sizes) < 1 or self.eval_batch_size < 1:
            raise ConfigError(f"batch sizes {list(self.batch_sizes)}: give positive integers, e.g. 1,32,256")
        bad = [m for m in self.modes if m not in ("drop", "renorm")]
        if bad or not self.modes:
            raise ConfigError(f"--modes {','.join(self.modes)}: choose drop and/or renorm")


def _ks(n: int, config: StudyConfig) -> list[int]:
    ks = {parse_keep(keep, n) for keep in config.keeps}
    if n <= config.every_k_below:
        ks |= set(range(1, n))
    return sorted(k for k in ks if k < n) or [n]


def study(model: nn.Module, test_set: tuple, calib_sums: dict, config: StudyConfig = StudyConfig(),
          progress: bool = True) -> dict:
    """Accuracy of expert subsets chosen by Algorithms 1 and 2, static calibration and at random.

    Args:
        model: the full model.
        test_set: (images, labels).
        calib_sums: {layer name: score sums [E]} from `calibrate` (defines the static subsets).
        config: what to measure.
        progress: show a progress bar.

    Returns:
        {"experts": n, "full": acc, "no_experts": acc, "rows": [{"k", "fraction", "mode", "method",
        "batch_size", "accuracy", "std"}], "config": ...}. Methods: "alg1" (per input), "alg2" (per batch),
        "static", "random" (mean over seeds, with std).

    Example:
        >>> sums = calibrate(model, calib_batches)
        >>> report = study(model, load_images("sample", split="test"), sums)
    """
    from .reports import progress as progress_bar
    from .selection import select_experts

    images, labels = test_set
    check_labels(model, images, labels)
    layers = moe_layers(model)
    n = min(layer.config.num_held for layer in layers.values())
    ks = _ks(n, config)
    acc = lambda m, bs=config.eval_batch_size: accuracy(m, images, labels, bs)  # noqa: E731
    empty = {name: torch.zeros(0, dtype=torch.long) for name in layers}
    jobs = [(k, mode) for k in ks for mode in config.modes]
    steps = len(jobs) * (1 + len(config.batch_sizes) + 1 + config.random_seeds) + 2
    bar = progress_bar(enabled=progress, total=steps, desc=f"study (n={n})")

    def measured(value):
        bar.update()
        return value

    report = {"experts": n, "full": measured(acc(model)), "no_experts": measured(acc(with_experts(model, empty))),
              "rows": [], "config": asdict(config)}
    for k, mode in jobs:
        row = lambda method, value, bs=None, std=None: report["rows"].append(  # noqa: E731
            {"k": k, "fraction": k / n, "mode": mode, "method": method, "batch_size": bs, "accuracy": value, "std": std})
        row("alg1", measured(acc(with_selection(model, k, per="input", mode=mode))))
        for bs in config.batch_sizes:
            row("alg2", measured(acc(with_selection(model, k, per="batch", mode=mode), bs)), bs=bs)
        static = {name: _static(layers[name], calib_sums[name], k, select_experts) for name in layers}
        row("static", measured(acc(with_experts(model, static, mode=mode))))
        rand = []
        for seed in range(config.random_seeds):
            g = torch.Generator().manual_seed(seed)
            subset = {name: layer.held_experts()[torch.randperm(layer.config.num_held, generator=g)[:k]].sort().values
                      for name, layer in layers.items()}
            rand.append(measured(acc(with_experts(model, subset, mode=mode))))
        mean = sum(rand) / len(rand)
        std = math.sqrt(sum((r - mean) ** 2 for r in rand) / max(1, len(rand) - 1))
        row("random", mean, std=std)
    bar.close()
    return report


def _static(layer, sums, k, select_experts):
    held = layer.held_experts()
    return held[select_experts(sums[held], k, per="batch")]
