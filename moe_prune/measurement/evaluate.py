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

from ..core.models import moe_layers
from .accuracy import accuracy, as_examples, check_labels, measure
from ..selection.scores import (
    keep_per_layer, parse_keep, random_subsets, static_from_sums, with_experts, with_selection,
)


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
    from ..selection.scores import replace_layers

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
        from ..errors import ConfigError

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


def study(model: nn.Module, test_set, calib_sums: dict, config: StudyConfig = StudyConfig(),
          progress: bool = True, cache_mb: float = 1024.0) -> dict:
    """Accuracy of expert subsets chosen by Algorithms 1 and 2, static calibration and at random.

    Args:
        model: the full model.
        test_set: (images, labels), or datasets.Examples with labels (an image folder: decoded per batch).
        calib_sums: {layer name: score sums [E]} from `calibrate` (defines the static subsets).
        config: what to measure.
        progress: show a progress bar.
        cache_mb: keep the test set decoded in memory when it fits (it is read once per row).

    Returns:
        {"experts": n, "full": top-1, "no_experts": top-1, "full_top5", "no_experts_top5", "per_class" (the full
        model's), "rows": [{"k", "fraction", "mode", "method", "batch_size", "accuracy" (top-1), "top5", "std",
        "per_class"}], "config": ...}. Methods: "alg1" (per input), "alg2" (per batch), "static", "random" (mean
        over seeds, with std; no per-class).

    Example:
        >>> sums = calibrate(model, calib_batches)
        >>> report = study(model, load_images("sample", split="test"), sums)
    """
    from ..data.examples import Batches
    from ..core.progress import progress as progress_bar

    examples = as_examples(model, *test_set) if isinstance(test_set, tuple) else as_examples(model, test_set)
    check_labels(model, examples, where=examples.where)
    examples = Batches(examples, config.eval_batch_size, progress=None).cached(cache_mb).examples
    layers = moe_layers(model)
    n = min(layer.config.num_held for layer in layers.values())
    ks = _ks(n, config)
    empty = {name: torch.zeros(0, dtype=torch.long) for name in layers}
    jobs = [(k, mode) for k in ks for mode in config.modes]
    steps = len(jobs) * (1 + len(config.batch_sizes) + 1 + config.random_seeds) + 2
    bar = progress_bar(enabled=progress, total=steps, desc=f"study (n={n})")

    def measured(m, bs=config.eval_batch_size):
        out = measure(m, examples, batch_size=bs)
        bar.update()
        return out

    full, none = measured(model), measured(with_experts(model, empty))
    report = {"experts": n, "full": full["top1"], "no_experts": none["top1"], "full_top5": full["top5"],
              "no_experts_top5": none["top5"], "per_class": full["per_class"], "rows": [], "config": asdict(config)}
    if examples.classes:
        report["classes"] = list(examples.classes)
    for k, mode in jobs:
        def row(method, m=None, bs=None, std=None, top1=None, top5=None):
            report["rows"].append({"k": k, "fraction": k / n, "mode": mode, "method": method, "batch_size": bs,
                                   "accuracy": m["top1"] if m else top1, "top5": m["top5"] if m else top5,
                                   "std": std, "per_class": m["per_class"] if m else None})

        row("alg1", measured(with_selection(model, k, per="input", mode=mode)))
        for bs in config.batch_sizes:
            row("alg2", measured(with_selection(model, k, per="batch", mode=mode), bs), bs=bs)
        row("static", measured(with_experts(model, static_from_sums(model, calib_sums, k), mode=mode)))
        rand = [measured(with_experts(model, random_subsets(model, k, torch.Generator().manual_seed(seed)), mode=mode))
                for seed in range(config.random_seeds)]
        mean, std = mean_std([r["top1"] for r in rand])
        row("random", std=std, top1=mean, top5=mean_std([r["top5"] for r in rand])[0])
    bar.close()
    return report


def eval_checkpoints(checkpoints: list, *, data: str = "fashion-mnist", calib: str | None = None,
                     calib_limit: int = 10000, config: StudyConfig = StudyConfig(), out_dir: str = "eval",
                     command: str = "", options=None, device=None) -> dict:
    """The paper's accuracy study of several checkpoints, written to files (the `moe-prune eval` command).

    Every input is checked against every model first (before minutes of work); then each checkpoint is
    calibrated on `calib` and studied on the test split of `data`. Writes OUT_DIR/eval.json (the reports, the
    command, versions), eval.md (the table) and eval.png (with matplotlib); a failed run leaves no output.

    Args:
        checkpoints: checkpoints of image classifiers (paths or checkpoint.CheckpointFile).
        data: the test data: a folder of images in class folders (its val/ or test/ if it has one), a data set
            name ("fashion-mnist", "mnist", "sample"), an IDX folder, or an .npz with `labels`.
        calib: calibration data for the static subsets (see `data.calibration_batches`; a folder's train/);
            None: `data`.
        calib_limit: at most this many calibration inputs.
        config: what the study measures.
        out_dir: the folder the files go to.
        command: the command line, recorded in eval.json and eval.md.
        options: a datasets.DataOptions (workers, skip_bad, cache, preprocessing overrides).
        device: where the models run ("auto": a GPU when torch sees one).

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
    from ..core.checkpoint import load, skeleton
    from ..data.sources import calibration_batches
    from ..data.inputs import check_examples
    from ..data.examples import DataOptions
    from ..data.sources import open_data, report_skipped
    from ..errors import ConfigError
    from ..core.files import output_folder
    from ..core.preprocess import for_model
    from .reports import study_markdown, study_plot, write_json, write_text
    from ..selection.scores import calibrate

    from ..core.devices import resolve_device

    options = options or DataOptions()
    device = resolve_device(device)
    if calib_limit < 1:
        raise ConfigError(f"--calib-limit {calib_limit}: give at least 1")
    calib_src = calib or data
    prepared = []
    for path in checkpoints:  # every input checked against every model before minutes of work
        model = skeleton(path)
        pre = for_model(model, **options.preprocess_overrides())
        test = open_data(data, "test", pre, options, labelled=True)
        check_examples(model, test, data)
        batches = calibration_batches(calib_src, limit=calib_limit, batch_size=256, model=model, options=options)
        for keep in config.keeps:
            keep_per_layer(model, keep)
        prepared.append((path, test, batches, pre))
    if any(test.where == batches.examples.where for _, test, batches, _ in prepared):
        print(f"moe-prune: note: calibrating and measuring on the same data ({data}); pass --calib with other "
              "images for a static subset chosen on data it is not scored on", file=sys.stderr)
    reports = []
    with output_folder(out_dir) as out:  # a failed run leaves no output behind
        for i, (path, test, batches, pre) in enumerate(prepared, 1):
            model = load(path, dtype=torch.float32, device=device)  # float32, whatever the file holds
            print(f"[eval {i}/{len(checkpoints)}] {path}: calibrating on {batches.num_inputs} inputs of {calib_src}, "
                  f"then the study on {len(test)} test inputs of {test.where}", file=sys.stderr, flush=True)
            sums = calibrate(model, batches, progress=True)
            report = study(model, test, sums, config, cache_mb=options.cache_mb)
            report.update(name=Path(path).name, checkpoint=str(path), data=str(data), calib=str(calib_src),
                          calib_limit=calib_limit, test_set=test.where,
                          preprocess=None if pre is None else pre.to_dict())
            for ex in (test, batches.examples):
                report_skipped(ex)
            reports.append(report)
            print(f"{path}: n={report['experts']} full {report['full']:.4f} (top-5 {report['full_top5']:.4f}), "
                  f"no experts {report['no_experts']:.4f}", file=sys.stderr)
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

    from ..version import __version__

    return {"versions": {"moe_prune": __version__, "torch": torch.__version__, "python": platform.python_version()},
            "machine": {"cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads()}}
