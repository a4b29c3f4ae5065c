"""Accuracy: of a model, and the paper's study of the same model run with expert subsets.

For every k the study measures, in `drop` and `renorm` mode: Algorithm 1 (each input keeps its own top k),
Algorithm 2 (each batch keeps one top k; at several batch sizes), the static calibrated subset, and a random
subset of the same size (several seeds, mean and std); beside them the full model and the k = 0 baseline (every
expert output zeroed), so a reader sees whether the experts carry accuracy at all.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from .models import moe_layers
from .selection import keep_per_layer, parse_keep, random_subsets, static_from_sums, with_experts, with_selection


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


def random_accuracies(model: nn.Module, images, labels, k, seeds: int, mode: str = "drop",
                      batch_size: int = 256) -> Iterator[float]:
    """Accuracy with a random subset of k experts in every layer, one seed after another (seeds 0..seeds-1).

    Args:
        model: the full model. images, labels: the test set. k: experts per layer (int, or {layer name: k}).
        seeds: how many random subsets. mode: "drop" or "renorm". batch_size: see `accuracy`.

    Returns:
        An iterator of accuracies, one per seed, each computed when it is asked for (progress bars follow it).

    Example:
        >>> mean_std(list(random_accuracies(model, images, labels, 16, seeds=10)))
        (0.3018, 0.0787)
    """
    for seed in range(seeds):
        subset = random_subsets(model, k, torch.Generator().manual_seed(seed))
        yield accuracy(with_experts(model, subset, mode=mode), images, labels, batch_size)


class _RandomPerInput(nn.Module):
    """A Soft MoE layer run with k experts drawn at random for every input (Chung et al.'s baseline for Algorithm 1)."""

    def __init__(self, layer, k: int, generator: torch.Generator, mode: str):
        super().__init__()
        self.layer, self.k, self.generator, self.mode = layer, k, generator, mode

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        held = self.layer.held_experts(x.device)
        draw = torch.rand(x.shape[0], len(held), generator=self.generator).argsort(dim=1)[:, :self.k]
        return self.layer.mix(self.layer.route(x, mask), held[draw.sort(dim=1).values.to(x.device)], self.mode)


def random_per_input_accuracies(model: nn.Module, images, labels, k, seeds: int, mode: str = "drop",
                                batch_size: int = 256) -> Iterator[float]:
    """Accuracy with k experts drawn at random for every input and every layer, one seed after another.

    The baseline for Algorithm 1 (which also gives each input its own k), as `random_accuracies` is for one
    shared subset. k: an int, or {layer name: k}.

    Example:
        >>> mean_std(list(random_per_input_accuracies(model, images, labels, 16, seeds=10)))
    """
    from .selection import replace_layers

    for seed in range(seeds):
        gen = torch.Generator().manual_seed(seed)
        wrapped = replace_layers(model, lambda name, layer: _RandomPerInput(
            layer, k[name] if isinstance(k, dict) else k, gen, mode))
        yield accuracy(wrapped, images, labels, batch_size)


def mean_std(values: list[float]) -> tuple[float, float]:
    """The mean and the sample standard deviation (n - 1 in the denominator; 0 for a single value)."""
    mean = sum(values) / len(values)
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / max(1, len(values) - 1))


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
        row("static", measured(acc(with_experts(model, static_from_sums(model, calib_sums, k), mode=mode))))
        rand = [measured(a) for a in random_accuracies(model, images, labels, k, config.random_seeds, mode,
                                                        config.eval_batch_size)]
        mean, std = mean_std(rand)
        row("random", mean, std=std)
    bar.close()
    return report


def eval_checkpoints(checkpoints: list, *, data: str = "fashion-mnist", calib: str | None = None,
                     calib_limit: int = 10000, config: StudyConfig = StudyConfig(), out_dir: str = "eval",
                     command: str = "") -> dict:
    """The paper's accuracy study of several checkpoints, written to files (the `moe-prune eval` command).

    Every input is checked against every model first (before minutes of work); then each checkpoint is
    calibrated on `calib` and studied on the test split of `data`. Writes OUT_DIR/eval.json (the reports, the
    command, versions), eval.md (the table) and eval.png (with matplotlib); a failed run leaves no output.

    Args:
        checkpoints: native checkpoints of image classifiers.
        data: the test data: a data set name ("fashion-mnist", "mnist", "sample") or an IDX folder.
        calib: calibration data for the static subsets (a data set's train split, "sample", or a .npy/.npz of
            inputs); None: `data`.
        calib_limit: at most this many calibration inputs.
        config: what the study measures.
        out_dir: the folder the files go to.
        command: the command line, recorded in eval.json and eval.md.

    Returns:
        {"reports": [one `study` report per checkpoint], "markdown": the table, "files": [paths written],
        "plot": OUT_DIR/eval.png, "plotted": whether it was written (False without matplotlib)}.

    Raises:
        ConfigError: calib_limit < 1. DataError: inputs or labels that do not fit a model. CheckpointError:
            see `load`. SelectionError: a keep that does not fit a model. OutputError: see `files.output_folder`.

    Example:
        >>> r = eval_checkpoints(["mnist-e128.safetensors"], data="sample", config=StudyConfig(keeps=("1/8",)))
        >>> print(r["markdown"])
    """
    from .checkpoint import load, skeleton
    from .data import calibration_inputs, check_inputs, iterate_batches, load_images
    from .errors import ConfigError
    from .files import output_folder
    from .reports import study_markdown, study_plot, write_json, write_text
    from .selection import calibrate

    if calib_limit < 1:
        raise ConfigError(f"--calib-limit {calib_limit}: give at least 1")
    test_set = load_images(data, split="test")
    calib_src = calib or data
    calib_x = calibration_inputs(calib_src, limit=calib_limit)
    for path in checkpoints:  # every input checked against every model before minutes of work
        model = skeleton(path)
        check_inputs(model, test_set[0], data)
        check_inputs(model, calib_x, calib_src)
        for keep in config.keeps:
            keep_per_layer(model, keep)
    batches = [x for x, _ in iterate_batches(calib_x, None, 256)]
    reports = []
    with output_folder(out_dir) as out:  # a failed run leaves no output behind
        for i, path in enumerate(checkpoints, 1):
            model = load(path, dtype=torch.float32)  # the study computes in float32, whatever the file holds
            check_labels(model, *test_set, where=data)
            print(f"[eval {i}/{len(checkpoints)}] {path}: calibrating on {len(calib_x)} inputs of {calib_src}, "
                  f"then the study on {len(test_set[0])} test images", file=sys.stderr, flush=True)
            sums = calibrate(model, batches, progress=True)
            report = study(model, test_set, sums, config)
            report.update(name=Path(path).name, checkpoint=str(path), data=data, calib=calib_src,
                          calib_limit=calib_limit)
            reports.append(report)
            print(f"{path}: n={report['experts']} full {report['full']:.4f}, no experts {report['no_experts']:.4f}",
                  file=sys.stderr)
        record = {"command": command, "reports": reports, **_versions()}
        write_json(out / "eval.json", record)
        md = study_markdown(reports)
        write_text(out / "eval.md", f"Command: `{record['command']}`\n\n{md}\n")
        plotted = study_plot(reports, out / "eval.png")
    files = [out / "eval.json", out / "eval.md"] + ([out / "eval.png"] if plotted else [])
    return {"reports": reports, "markdown": md, "files": files, "plot": out / "eval.png", "plotted": plotted}


def _versions() -> dict:
    """The versions and machine an eval.json records."""
    import platform

    from . import __version__

    return {"versions": {"moe_prune": __version__, "torch": torch.__version__, "python": platform.python_version()},
            "machine": {"cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads()}}
