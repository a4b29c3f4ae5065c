"""The user's data, read a batch at a time: image folders, image lists, arrays, the IDX data sets, the sample.

    source                                   -> Examples (N inputs, labels or None), decoded per batch
      "fashion-mnist" | "mnist" | IDX folder -> the split's uint8 images and labels (held in memory: 47 MB)
      "sample"                               -> the bundled 1,000 Fashion-MNIST test images, in halves:
                                                calibration reads 0-499, evaluation 500-999
      X.npy / X.npz                          -> uint8 images (NHW, NHWC or NCHW; memory-mapped .npy) or float
                                                model inputs as they are; an .npz's `labels` array is used
      LIST.txt                               -> image paths, one per line (relative to the list's folder)
      FOLDER/train, FOLDER/val (or test)     -> calibration reads train/, evaluation val/ (or test/)
      FOLDER/<class>/*.png|jpg|...           -> labelled (ImageFolder: classes sorted by name, or FOLDER's
                                                classes.txt naming the model's class of each index)
      FOLDER/**/*.png|jpg|...                -> unlabelled (calibration only), recursive
    Examples -> Batches: a sequence of float32 batches; a file's image is decoded (Pillow) and preprocessed
    (moe_prune.preprocess) only when its batch is read, by a few threads, the next batch while the model
    runs on this one. Memory is one batch, unless the whole set fits `cache_mb` and is kept decoded.

A file Pillow cannot decode stops the run with one line naming it, or with `skip_bad` is left out and counted.
"""

from __future__ import annotations

import math
import os
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..errors import DataError
from ..core.preprocess import Preprocess


@dataclass(frozen=True)
class DataOptions:
    """How to read the user's data.

    Args:
        workers: threads decoding images (None: up to 4, one per core).
        skip_bad: leave out images Pillow cannot decode (counted and reported) instead of stopping.
        cache_mb: keep a data set decoded in memory when it fits this many MB (else it is decoded again at each
            pass): calibration rules and healing read their inputs several times.
        interpolation, crop_pct, mean, std: override the model's recorded preprocessing (see preprocess).
    """

    workers: int | None = None
    skip_bad: bool = False
    cache_mb: float = 1024.0
    interpolation: str | None = None
    crop_pct: float | None = None
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None

    def __post_init__(self):
        from ..errors import ConfigError

        if self.workers is not None and self.workers < 1:
            raise ConfigError(f"--workers {self.workers}: give at least 1")
        if not self.cache_mb >= 0:
            raise ConfigError(f"--cache-mb {self.cache_mb}: give 0 or more")

    def preprocess_overrides(self) -> dict:
        return {"interpolation": self.interpolation, "crop_pct": self.crop_pct, "mean": self.mean, "std": self.std}

    def threads(self) -> int:
        return self.workers or max(1, min(4, os.cpu_count() or 1))


class Examples:
    """N model inputs and their labels (or None), read lazily.

    Attributes:
        where: the source, for messages. labels: int64 [N] or None. classes: class names by index, or None.
        skipped: files left out because they could not be decoded (with skip_bad).
    """

    where: str
    labels: np.ndarray | None = None
    classes: list[str] | None = None

    def __len__(self) -> int:
        raise NotImplementedError

    def batch(self, idx: np.ndarray) -> tuple[torch.Tensor, np.ndarray | None]:
        """The inputs at positions idx as float32 [b, ...], and their labels (b may be smaller with skip_bad)."""
        raise NotImplementedError

    def input_shape(self) -> tuple[int, ...]:
        """The shape of one input, known without decoding the set."""
        raise NotImplementedError

    carried_skips: tuple[str, ...] = ()  # files a decoded copy's source left out

    @property
    def skipped(self) -> list[str]:
        return list(self.carried_skips)

    def subset(self, idx: np.ndarray) -> "Examples":
        return _Subset(self, np.asarray(idx))


class ArrayExamples(Examples):
    """Inputs from an array: uint8 images (preprocessed per batch) or float model inputs (used as they are)."""

    def __init__(self, array: np.ndarray, labels=None, preprocess: Preprocess | None = None, where: str = "the data",
                 classes=None):
        self.array, self.preprocess, self.where, self.classes = array, preprocess, where, classes
        self.labels = None if labels is None else np.asarray(labels).astype(np.int64)
        if self.labels is not None and len(self.labels) != len(array):
            raise DataError(f"{where}: {len(array)} inputs but {len(self.labels)} labels")

    def __len__(self) -> int:
        return len(self.array)

    def batch(self, idx):
        if self.array.dtype == np.uint8 and self.preprocess is None:
            raise DataError(f"{self.where}: uint8 images need a model's preprocessing (a model that takes tokens "
                            "takes float arrays)")
        chunk = self.array[np.sort(idx)] if isinstance(self.array, np.memmap) else self.array[idx]
        if isinstance(self.array, np.memmap):  # read in file order, then put back in the asked order
            chunk = chunk[np.argsort(np.argsort(idx))]
        x = self.preprocess.array(chunk) if self.array.dtype == np.uint8 else np.asarray(chunk, dtype=np.float32)
        return torch.from_numpy(np.ascontiguousarray(x)), None if self.labels is None else self.labels[idx]

    def input_shape(self):
        if self.array.dtype == np.uint8 and self.preprocess is not None:
            return (self.preprocess.channels, *self.preprocess.size)
        return tuple(self.array.shape[1:])


class FileExamples(Examples):
    """Image files, decoded with Pillow and preprocessed when their batch is read."""

    def __init__(self, paths: list[Path], labels, preprocess: Preprocess, where: str, *, classes=None,
                 options: DataOptions = DataOptions()):
        if preprocess is None:
            raise DataError(f"{where}: image files need a model that takes images (this one takes tokens)")
        self.paths, self.preprocess, self.where, self.classes = list(paths), preprocess, where, classes
        self.labels = None if labels is None else np.asarray(labels, dtype=np.int64)
        self.options = options
        self._skipped: list[str] = []
        self._lock = threading.Lock()
        self._pool = None

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def skipped(self) -> list[str]:
        return list(self._skipped)

    def input_shape(self):
        return (self.preprocess.channels, *self.preprocess.size)

    def _decode(self, path: Path) -> np.ndarray | None:
        from PIL import Image, UnidentifiedImageError

        try:
            with Image.open(path) as img:
                img.seek(0)  # a GIF's first frame
                return self.preprocess.image(img)
        except (OSError, UnidentifiedImageError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
            if not self.options.skip_bad:
                why = str(e).splitlines()[0][:160] if str(e) else type(e).__name__
                raise DataError(f"{path}: cannot be decoded as an image ({why}); fix or remove it, or pass "
                                "--skip-bad to leave such files out") from None
            with self._lock:
                self._skipped.append(str(path))
            return None

    def batch(self, idx):
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.options.threads(), thread_name_prefix="moe-prune-decode")
        images = list(self._pool.map(self._decode, [self.paths[i] for i in idx]))
        keep = [i for i, im in enumerate(images) if im is not None]
        if not keep:
            shape = (0, *self.input_shape())
            return torch.zeros(shape), None if self.labels is None else self.labels[idx][:0]
        x = np.stack([images[i] for i in keep])
        y = None if self.labels is None else self.labels[np.asarray(idx)[keep]]
        return torch.from_numpy(x), y


class _Subset(Examples):
    def __init__(self, base: Examples, idx: np.ndarray):
        self.base, self.idx = base, idx
        self.where, self.classes = base.where, base.classes
        self.labels = None if base.labels is None else base.labels[idx]

    def __len__(self):
        return len(self.idx)

    def batch(self, idx):
        return self.base.batch(self.idx[np.asarray(idx)])

    def input_shape(self):
        return self.base.input_shape()

    @property
    def skipped(self):
        return self.base.skipped


class Batches(Sequence):
    """Examples in batches of `batch_size`, in order: a sequence of float32 tensors, each decoded when read.

    Iterating reads the next batch in a background thread while the caller works on this one. `labelled()`
    gives (inputs, labels) pairs. `cached(budget)` keeps the whole set decoded when it fits.

    Example:
        >>> batches = Batches(open_data("photos/", "train", preprocess), 64)
        >>> sums = calibrate(model, batches)   # streamed: one batch in memory
    """

    def __init__(self, examples: Examples, batch_size: int, *, progress: str | None = None, cache_mb: float = 1024.0,
                 device: torch.device | str | None = None):
        if int(batch_size) < 1:
            raise DataError(f"batch size {batch_size} is not positive; use a batch size of at least 1")
        self.examples, self.batch_size, self.progress = examples, int(batch_size), progress
        self.cache_mb = cache_mb  # what later readers (the loss rule, healing) may keep decoded
        self.device = device  # where batches are handed out (the model's device); decoded and cached on the host

    def on(self, device) -> "Batches":
        """These batches handed out on `device` (the data stays where it is until a batch is read)."""
        out = Batches(self.examples, self.batch_size, progress=self.progress, cache_mb=self.cache_mb, device=device)
        return out

    def _to(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.device is None or x.device == torch.device(self.device) else x.to(self.device)

    def __len__(self) -> int:
        return math.ceil(len(self.examples) / self.batch_size)

    @property
    def num_inputs(self) -> int:
        return len(self.examples)

    def _idx(self, i: int) -> np.ndarray:
        return np.arange(i * self.batch_size, min((i + 1) * self.batch_size, len(self.examples)))

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        if not -len(self) <= i < len(self):
            raise IndexError(i)
        return self._to(self.examples.batch(self._idx(i % len(self)))[0])

    def labelled(self):
        """(inputs float32 [b, ...], labels int64 [b] or None) per batch, prefetched."""
        bar = None
        if self.progress:
            from ..core.progress import progress as progress_bar

            bar = progress_bar(total=len(self.examples), desc=self.progress, unit="img")
        with ThreadPoolExecutor(1, thread_name_prefix="moe-prune-prefetch") as ahead:
            pending = ahead.submit(self.examples.batch, self._idx(0)) if len(self) else None
            for i in range(len(self)):
                x, y = pending.result()
                pending = ahead.submit(self.examples.batch, self._idx(i + 1)) if i + 1 < len(self) else None
                if bar is not None:
                    bar.update(len(self._idx(i)))
                if len(x):
                    labels = None if y is None else torch.as_tensor(np.asarray(y) if not isinstance(y, torch.Tensor) else y)
                    yield self._to(x), None if labels is None else self._to(labels)
        if bar is not None:
            bar.close()

    def __iter__(self):
        for x, _ in self.labelled():
            yield x

    def input_bytes(self) -> int:
        return len(self.examples) * 4 * math.prod(self.examples.input_shape())

    def cached(self, budget_mb: float | None = None) -> "Batches":
        """These batches decoded once and kept in memory, if they take at most `budget_mb` MB (default: this
        one's cache_mb); else self."""
        budget_mb = self.cache_mb if budget_mb is None else budget_mb
        if isinstance(self.examples, TensorExamples) or (isinstance(self.examples, ArrayExamples)
                                                         and self.examples.array.dtype != np.uint8
                                                         and not isinstance(self.examples.array, np.memmap)):
            return self  # float inputs in memory already
        if self.input_bytes() > budget_mb * 1e6:
            return self
        xs, ys = [], []
        for x, y in self.on(None).labelled():  # decoded where the examples are (the host for files)
            xs.append(x)
            ys.append(None if y is None else y.cpu().numpy())
        labels = None if self.examples.labels is None or any(y is None for y in ys) else np.concatenate(ys)
        x = torch.cat(xs) if xs else torch.zeros((0, *self.examples.input_shape()))
        decoded = TensorExamples(x, labels, self.examples.where, self.examples.classes)
        decoded.carried_skips = tuple(self.examples.skipped)
        return Batches(decoded, self.batch_size, progress=self.progress, cache_mb=self.cache_mb, device=self.device)

    def subset(self, idx: np.ndarray, batch_size: int | None = None) -> "Batches":
        """The inputs at positions idx, in batches of batch_size (default: this one's)."""
        return Batches(self.examples.subset(np.asarray(idx)), batch_size or self.batch_size, progress=None,
                       cache_mb=self.cache_mb, device=self.device)

    def rows(self, idx) -> torch.Tensor:
        """The inputs at positions idx (random access, e.g. healing's shuffled batches)."""
        return self._to(self.examples.batch(np.asarray(idx))[0])


def spread(n_all: int, n: int, exclude: np.ndarray | None = None) -> np.ndarray:
    """n positions of 0 .. n_all - 1, spread evenly over them (all of them when there are at most n), leaving out
    `exclude`. A sample of a folder read class by class then holds every class, not the first ones.

    Example:
        >>> spread(10, 3)
        array([0, 3, 6])
    """
    pool = np.arange(n_all) if exclude is None else np.setdiff1d(np.arange(n_all), exclude)
    if len(pool) <= n:
        return pool
    return pool[(np.arange(n) * len(pool)) // n]


def as_batches(inputs, batch_size: int = 256, device=None) -> Batches:
    """Batches as they are; a list of batch tensors or one tensor [N, ...] of model inputs (on any device) as
    Batches; handed out on `device` when given (the model's)."""
    if isinstance(inputs, Batches):
        return inputs if device is None else inputs.on(device)
    if isinstance(inputs, (list, tuple)):
        sizes = [len(b) for b in inputs]
        x = torch.cat([torch.as_tensor(b) for b in inputs]) if inputs else torch.zeros(0)
        batch_size = max(sizes) if sizes else batch_size
    else:
        x = torch.as_tensor(inputs)
    return Batches(TensorExamples(x.detach()), batch_size, device=device)


class TensorExamples(Examples):
    """Model inputs already in a tensor (on any device), e.g. batches a caller made."""

    def __init__(self, x: torch.Tensor, labels=None, where: str = "the inputs", classes=None):
        self.x, self.where, self.classes = x, where, classes
        self.labels = None if labels is None else np.asarray(labels.cpu() if isinstance(labels, torch.Tensor) else labels)

    def __len__(self):
        return len(self.x)

    def batch(self, idx):
        idx = np.asarray(idx, dtype=np.int64)
        if len(idx) and idx[-1] - idx[0] + 1 == len(idx) and np.all(np.diff(idx) == 1):
            rows = self.x[int(idx[0]):int(idx[-1]) + 1]  # a run of positions: a view, no copy
        else:
            rows = self.x[torch.as_tensor(idx)]
        return rows, None if self.labels is None else self.labels[idx]

    def input_shape(self):
        return tuple(self.x.shape[1:])
