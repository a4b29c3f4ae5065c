"""Data sources opened by name: image folders (with classes, or train/ and val/ splits), image lists, arrays, the
IDX data sets and the bundled sample, each as Examples (examples.py); and the calibration batches of any source,
checked against the model and preprocessed for it.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np

from ..core.preprocess import Preprocess, for_model
from ..errors import DataError
from .arrays import calibration_inputs, load_array
from .examples import ArrayExamples, Batches, DataOptions, Examples, FileExamples
from .inputs import check_examples
from .mnist import load_images

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif")
SAMPLE_HALF = 500  # the bundled sample: images 0-499 calibrate, 500-999 are scored
_TRAIN_DIRS, _EVAL_DIRS = ("train",), ("val", "valid", "validation", "test")


def _images_under(folder: Path, recursive: bool) -> list[Path]:
    found = folder.rglob("*") if recursive else folder.iterdir()
    return sorted(p for p in found if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith("."))


def split_folder(root: Path, split: str) -> Path:
    """FOLDER itself, or its train/ (split "train") or val/ / test/ (split "test") when it has them."""
    names = _TRAIN_DIRS if split == "train" else _EVAL_DIRS
    for name in names:
        if (root / name).is_dir():
            return root / name
    other = _EVAL_DIRS if split == "train" else _TRAIN_DIRS
    if any((root / name).is_dir() for name in other):
        want = "a train/ folder" if split == "train" else "a val/ or test/ folder"
        raise DataError(f"{root}: has {'/'.join(n for n in other if (root / n).is_dir())}/ but not {want}")
    return root


def _class_list(root: Path, folder: Path) -> list[str] | None:
    for where in (folder, root):
        f = where / "classes.txt"
        if f.is_file():
            names = [line.strip() for line in f.read_text().splitlines() if line.strip()]
            if len(set(names)) != len(names):
                raise DataError(f"{f}: names a class twice")
            return names
    return None


def image_folder(root: Path, split: str, preprocess: Preprocess, options: DataOptions = DataOptions(),
                 labelled: bool = True) -> FileExamples:
    """The images of a folder (see the module docstring); labelled when it is laid out as one folder per class.

    Raises:
        DataError: no images, an empty class folder, classes.txt that does not name a class folder, or
            (labelled=True) images that are not in class folders.
    """
    folder = split_folder(root, split)
    subdirs = sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    loose = _images_under(folder, recursive=False)
    if subdirs and not loose:  # ImageFolder: one sub-folder per class
        names = [d.name for d in subdirs]
        empty = [d.name for d in subdirs if not _images_under(d, recursive=True)]
        if empty:
            raise DataError(f"{folder}: class folder(s) {', '.join(empty[:5])} hold no images ({', '.join(IMAGE_SUFFIXES)}); "
                            "add images or remove the folder (class indices come from the sorted folder names)")
        order = _class_list(root, folder)
        if order is not None:
            unknown = [n for n in names if n not in order]
            if unknown:
                raise DataError(f"{folder}: class folder(s) {unknown[:5]} are not in classes.txt; add them there")
        else:
            order = names  # torchvision's ImageFolder: sorted by name
        index = {n: i for i, n in enumerate(order)}
        paths, labels = [], []
        for d in subdirs:
            files = _images_under(d, recursive=True)
            paths += files
            labels += [index[d.name]] * len(files)
        return FileExamples(paths, labels, preprocess, str(folder), classes=order, options=options)
    if labelled:
        raise DataError(f"{folder}: images are not in class folders; evaluation needs one sub-folder per class "
                        "(FOLDER/<class>/*.png), as torchvision's ImageFolder reads")
    paths = _images_under(folder, recursive=True)
    if not paths:
        raise DataError(f"{folder}: no images ({', '.join(IMAGE_SUFFIXES)}) in it or below it")
    return FileExamples(paths, None, preprocess, str(folder), options=options)


def image_list(path: Path, preprocess: Preprocess, options: DataOptions = DataOptions()) -> FileExamples:
    """A text file listing image paths, one per line (relative ones are relative to its folder)."""
    lines = [line.strip() for line in path.read_text().splitlines() if line.strip() and not line.startswith("#")]
    paths = [p if p.is_absolute() else path.parent / p for p in map(Path, lines)]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise DataError(f"{path}: lists {len(missing)} missing file(s), e.g. {missing[0]}")
    if not paths:
        raise DataError(f"{path}: lists no images")
    return FileExamples(paths, None, preprocess, str(path), options=options)


def _npy(path: Path):
    """A .npy memory-mapped (a .npz read whole): (inputs, labels or None, where)."""
    if path.suffix == ".npy":  # uint8 images stay on disk until their batch is read
        try:
            arr = np.load(path, mmap_mode="r", allow_pickle=False)
        except (ValueError, OSError, EOFError):
            arr = None  # read whole below, which gives the clear error
        if arr is not None and arr.dtype == np.uint8 and arr.ndim >= 1 and len(arr):
            return arr, None, str(path)
    arr, where = load_array(path)
    labels = None
    if path.suffix == ".npz":
        with np.load(path, allow_pickle=False) as z:
            if "labels" in z.files:
                labels = np.asarray(z["labels"])
                if labels.ndim != 1 or len(labels) != len(arr) or labels.dtype.kind not in "iu":
                    raise DataError(f"{path}['labels']: expected {len(arr)} integer labels, got {labels.dtype} {list(labels.shape)}")
    return arr, labels, where


def open_data(source, split: str, preprocess: Preprocess | None, options: DataOptions = DataOptions(),
              labelled: bool = False) -> Examples:
    """The examples of a data source (see the module docstring), for `split` "train" (calibration, healing) or
    "test" (evaluation).

    Args:
        source: a name ("fashion-mnist", "mnist", "sample"), a folder, a .npy/.npz or a .txt list.
        split: "train" or "test"; a plain folder or array is both.
        preprocess: the model's (None for a model that takes tokens).
        options: workers, skip_bad, cache.
        labelled: labels are needed (evaluation): sources without them are refused.

    Raises:
        DataError: a missing or unreadable source, or one that does not fit (see the readers).

    Example:
        >>> ex = open_data("photos/", "test", preprocess, labelled=True)
        >>> len(ex), ex.classes[:3]
    """
    text = os.fspath(source)
    path = Path(text)
    if text == "sample":
        # The bundled 1,000 test images, in halves: calibration reads 0-499, evaluation 500-999 (as the demo does).
        images, labels = load_images("sample", split="test")
        half = slice(0, SAMPLE_HALF) if split == "train" else slice(SAMPLE_HALF, None)
        where = "sample (images 0-499)" if split == "train" else "sample (images 500-999)"
        return ArrayExamples(images[half], labels[half], preprocess, where)
    if text in ("fashion-mnist", "mnist") or (path.is_dir() and _is_idx(path)):
        images, labels = load_images(source, split=split)
        return ArrayExamples(images, labels, preprocess, f"{text} ({split} split)")
    if text.endswith((".npy", ".npz")):
        arr, labels, where = _npy(path)
        if labelled and labels is None:
            raise DataError(f"{where}: no labels; save them in the .npz as `labels`, or evaluate an image folder")
        return ArrayExamples(arr, labels, preprocess if arr.dtype == np.uint8 else None, where)
    if not path.exists():
        raise DataError(f"{text}: not found (a data source is a folder of images, a .txt list of "
                        "images, a .npy/.npz, an IDX folder, or 'fashion-mnist', 'mnist', 'sample')")
    if path.is_file() and path.suffix.lower() == ".txt":
        if labelled:
            raise DataError(f"{path}: an image list has no labels; evaluate a folder with one sub-folder per class")
        return image_list(path, preprocess, options)
    if path.is_dir():
        return image_folder(path, split, preprocess, options, labelled=labelled)
    raise DataError(f"{path}: not a data source moe-prune reads (a folder of images, a .txt list, .npy/.npz, IDX)")


def _is_idx(folder: Path) -> bool:
    return any(p.name.startswith(("train-images-idx3", "t10k-images-idx3")) for p in folder.iterdir())


def spread(n: int, limit: int | None) -> np.ndarray:
    """`limit` positions spread evenly over n (all of them if limit is None or >= n): a calibration subset of a
    folder sorted by class still covers every class."""
    if limit is None or limit >= n:
        return np.arange(n)
    return np.unique(np.floor(np.arange(limit) * (n / limit)).astype(np.int64))


def report_skipped(examples: Examples) -> None:
    """One line on stderr when images were left out (skip_bad)."""
    bad = examples.skipped
    if bad:
        print(f"moe-prune: skipped {len(bad)} unreadable image(s) in {examples.where} (--skip-bad), e.g. {bad[0]}",
              file=sys.stderr)


def calibration_batches(source: str | os.PathLike, limit: int | None = None, batch_size: int = 256, model=None,
                        options=None):
    """The calibration inputs of `source` as a sequence of float32 batches, read per batch (see datasets.py).

    Any data source: a folder of images (its train/ if it has one), a .txt list of images, a .npy/.npz, an IDX
    data set, "sample". Images go through the model's own preprocessing (`preprocess.for_model`, with the
    overrides in `options`); the set stays decoded in memory only when it fits `options.cache_mb`, else each
    pass decodes it again (memory: one batch). With `limit`, the first `limit` inputs of an array or IDX data
    set, or `limit` images spread evenly over a folder (which is sorted by class).

    Args:
        source: the data source. limit: at most this many inputs. batch_size: inputs per batch.
        model: the model (or its skeleton) the inputs are for: checked against it, preprocessed for it. Without
            one, uint8 images are pixels / 255 at their own size.
        options: a datasets.DataOptions (workers, skip_bad, cache_mb, preprocessing overrides).

    Returns:
        A datasets.Batches (a sequence of tensors: len, indexing, iteration; `rows(idx)` for random access).

    Raises:
        DataError: a missing or unreadable source, inputs the model cannot take, a limit below 1.

    Example:
        >>> batches = calibration_batches("photos/", limit=5000, model=skeleton("vit.safetensors"))
        >>> len(batches), batches.num_inputs
        (20, 5000)
    """
    options = options or DataOptions()
    if limit is not None and limit < 1:
        raise DataError(f"calibration limit {limit} must be at least 1")
    pre = for_model(model, **options.preprocess_overrides()) if model is not None else None
    if model is None and not str(source).endswith((".npy", ".npz")):
        first = calibration_inputs(source, limit)  # the old meaning: uint8 pixels / 255 at their own size
        pre = Preprocess(size=first.shape[-2:], channels=1, crop_pct=1.0, interpolation="bilinear") \
            if first.dtype == np.uint8 else None
        return Batches(ArrayExamples(first, None, pre, str(source)), batch_size).cached(options.cache_mb)
    examples = open_data(source, "train", pre, options)
    if model is not None:
        check_examples(model, examples, source)
    if limit is not None and limit < len(examples):
        idx = spread(len(examples), limit) if isinstance(examples, FileExamples) else np.arange(limit)
        examples = examples.subset(idx)
    files = type(examples).__name__ != "ArrayExamples"
    return Batches(examples, batch_size, progress="reading calibration images" if files else None).cached(options.cache_mb)
