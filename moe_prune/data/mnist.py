r"""Image data: data sets of IDX files (MNIST, Fashion-MNIST), the bundled sample, calibration inputs, batches.

    IDX file (gzipped or not) -> idx.read_idx -> np.ndarray
    directory or name ("fashion-mnist", "mnist", "sample") -> load_images -> images uint8 [N, 28, 28], labels int64 [N]
    images uint8 [N, 28, 28] -> to_tensor -> float32 [N, 1, 28, 28] in [0, 1]   (what the models take)
    .npy / .npz calibration file -> load_inputs -> float32 [N, ...]

Nothing here downloads anything. A missing data set is a DataError whose message says how to get it.

The bundled sample (assets/fashion_mnist_sample.npz) is the first 1,000 images of the Fashion-MNIST test split
(t10k) with their labels, MIT-licensed by Zalando SE (assets/FASHION_MNIST_LICENSE.txt). It was made with

    python -c "from moe_prune.data import make_sample; \
        make_sample('/usr/share/datasets/fashion-mnist', 'moe_prune/assets/fashion_mnist_sample.npz')"
"""

from __future__ import annotations

import importlib.resources
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from ..errors import DataError
from ..core.files import atomic_output
from .idx import read_idx

_SPLIT_PREFIX = {"train": "train", "test": "t10k"}
_IMG_SIZE = 28
_NUM_CLASSES = 10

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
_SAMPLE_NAME = "fashion_mnist_sample.npz"


# --------------------------------------------------------------------------------------------------------------
# Data sets


def _missing_message(name: str, where: str) -> str:
    files = ", ".join(
        f"{p}-{k}-idx{n}-ubyte[.gz]" for p in ("train", "t10k") for k, n in (("images", 3), ("labels", 1))
    )
    tv_class, tv_dir = ("MNIST", "MNIST") if name == "mnist" else ("FashionMNIST", "FashionMNIST")
    apt = "" if name == "mnist" else "install it with `apt-get install -y dataset-fashion-mnist`, or "
    return (
        f"{name} data not found: {where}. To get it: {apt}pass (as --data or --calib) a folder "
        f"with the four IDX files ({files}), or, where torchvision and a network exist, run "
        f"`torchvision.datasets.{tv_class}(root, download=True)` and pass the folder ROOT/{tv_dir}/raw. "
        f"moe-prune never downloads anything"
    )


def _find_idx(directory: Path, stem: str) -> Path | None:
    for name in (stem, stem + ".gz"):
        if (directory / name).is_file():
            return directory / name
    return None


def load_images(
    dir_or_name: str | os.PathLike = "fashion-mnist", split: str = "train"
) -> tuple[np.ndarray, np.ndarray]:
    """Load one split of an MNIST-format image data set.

    `dir_or_name` is a directory holding the standard IDX files (`train-images-idx3-ubyte[.gz]`,
    `train-labels-idx1-ubyte[.gz]`, `t10k-images-idx3-ubyte[.gz]`, `t10k-labels-idx1-ubyte[.gz]`), or a name:
    "fashion-mnist" (/usr/share/datasets/fashion-mnist, from Debian's `dataset-fashion-mnist`), "mnist" (no
    default location: Debian ships no MNIST package, so pass its directory) or "sample" (the bundled 1,000
    Fashion-MNIST test images; it has only split="test"). To use a directory that is called like a name, write
    it as a path ("./sample").

    Args:
        dir_or_name: a directory, or "fashion-mnist", "mnist", "sample".
        split: "train" or "test" (the t10k files).

    Returns:
        images uint8 [N, 28, 28] (0 = background) and labels int64 [N] in 0..9.

    Raises:
        DataError: the data set is missing (the message says how to get it), a file is malformed, the image
            and label counts differ, an image is not 28x28, or a label is outside 0..9.

    Example:
        >>> images, labels = load_images("sample", split="test")
        >>> images.shape, labels.shape
        ((1000, 28, 28), (1000,))
    """
    if split not in _SPLIT_PREFIX:
        raise DataError(f"unknown split {split!r}; use 'train' or 'test'")
    if isinstance(dir_or_name, str):
        name = dir_or_name.lower().replace("_", "-")
        if name == "sample":
            return _load_sample(split)
        if name == "mnist":
            raise DataError(_missing_message("mnist", "it has no default location"))
        if name == "fashion-mnist":
            if not FASHION_MNIST_DIR.is_dir():
                raise DataError(_missing_message("fashion-mnist", f"{FASHION_MNIST_DIR} does not exist"))
            return _load_idx_dir(FASHION_MNIST_DIR, split, "fashion-mnist")
    directory = Path(dir_or_name)
    if not directory.is_dir():
        raise DataError(_missing_message("IDX", f"{directory} is not a directory"))
    return _load_idx_dir(directory, split, "IDX")


def _load_idx_dir(directory: Path, split: str, name: str) -> tuple[np.ndarray, np.ndarray]:
    prefix = _SPLIT_PREFIX[split]
    img_path = _find_idx(directory, f"{prefix}-images-idx3-ubyte")
    lbl_path = _find_idx(directory, f"{prefix}-labels-idx1-ubyte")
    for stem, p in ((f"{prefix}-images-idx3-ubyte", img_path), (f"{prefix}-labels-idx1-ubyte", lbl_path)):
        if p is None:
            raise DataError(_missing_message(name, f"{directory} has no {stem} (or {stem}.gz)"))
    return _check_images(read_idx(img_path), read_idx(lbl_path), img_path, lbl_path)


def _check_images(images: np.ndarray, labels: np.ndarray, img_src, lbl_src) -> tuple[np.ndarray, np.ndarray]:
    if images.dtype != np.uint8 or images.ndim != 3 or images.shape[1:] != (_IMG_SIZE, _IMG_SIZE):
        raise DataError(
            f"{img_src}: images are {images.dtype} {list(images.shape)}, expected uint8 [N, 28, 28]; "
            f"point to an MNIST-format images file"
        )
    if labels.ndim != 1 or labels.dtype.kind not in "iu":
        raise DataError(f"{lbl_src}: labels are {labels.dtype} {list(labels.shape)}, expected integers [N]; "
                        f"point to an MNIST-format labels file")
    if len(images) != len(labels):
        raise DataError(
            f"{img_src} has {len(images)} images but {lbl_src} has {len(labels)} labels; "
            f"use the images and labels files of the same split and data set"
        )
    bad = np.flatnonzero((labels < 0) | (labels >= _NUM_CLASSES))
    if bad.size:
        i = int(bad[0])
        raise DataError(
            f"{lbl_src}: {bad.size} labels outside 0..{_NUM_CLASSES - 1} (first: label {int(labels[i])} at "
            f"index {i}); use a 10-class MNIST-format labels file"
        )
    return images, labels.astype(np.int64)


def _load_sample(split: str) -> tuple[np.ndarray, np.ndarray]:
    if split != "test":
        raise DataError(
            "the bundled sample holds only Fashion-MNIST test images (the first 1,000 of t10k); "
            "use split='test', or a full data set for 'train'"
        )
    res = importlib.resources.files("moe_prune") / "assets" / _SAMPLE_NAME
    where = f"moe_prune/assets/{_SAMPLE_NAME}"
    try:
        with res.open("rb") as fh, np.load(fh, allow_pickle=False) as z:
            images, labels = z["images"], z["labels"]
    except FileNotFoundError as e:
        raise DataError(
            f"{where} is missing from the installed package; reinstall moe-prune, or remake it with "
            f"make_sample('/usr/share/datasets/fashion-mnist', '{where}')"
        ) from e
    except (OSError, ValueError, KeyError, EOFError) as e:
        raise DataError(f"{where} is unreadable ({e}); reinstall moe-prune or remake it with make_sample") from e
    return _check_images(images, labels, where, where)


def make_sample(src_dir: str | os.PathLike, out_path: str | os.PathLike, n: int = 1000) -> Path:
    """Write the first `n` test (t10k) images and labels of an IDX data set to a compressed .npz.

    This is how the bundled assets/fashion_mnist_sample.npz was made (keys `images` uint8 [n, 28, 28],
    `labels` uint8 [n]). The file is written atomically: a temporary file beside it, then os.replace.

    Args:
        src_dir: a directory with t10k-images-idx3-ubyte[.gz] and t10k-labels-idx1-ubyte[.gz].
        out_path: the .npz to write (written exactly there; no suffix is added).
        n: how many images, from the start of the test split.

    Returns:
        out_path as a Path.

    Raises:
        DataError: the source is missing or malformed, or holds fewer than `n` test images.

    Example:
        >>> out = make_sample("/usr/share/datasets/fashion-mnist", "/tmp/sample.npz", n=100)
        >>> np.load(out)["images"].shape
        (100, 28, 28)
    """
    images, labels = load_images(Path(src_dir), split="test")
    if not 1 <= n <= len(images):
        raise DataError(
            f"{src_dir}: cannot take {n} images from a test split of {len(images)}; choose n in 1..{len(images)}"
        )
    out = Path(out_path)
    with atomic_output(out, suffix=".npz") as tmp, open(tmp, "wb") as fh:  # a file object: numpy adds no suffix
        np.savez_compressed(fh, images=np.ascontiguousarray(images[:n]), labels=labels[:n].astype(np.uint8))
    return out


# --------------------------------------------------------------------------------------------------------------
# Tensors and batches


def to_tensor(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    """Turn uint8 images into the models' input: float32 [N, 1, H, W], pixel / 255, so values lie in [0, 1].

    No mean/std normalisation: the models are trained and evaluated on [0, 1] pixels.

    Args:
        images: uint8 [N, H, W] or [N, 1, H, W] (numpy or torch).

    Returns:
        a new float32 tensor [N, 1, H, W] in [0, 1].

    Raises:
        DataError: images are not uint8, or not 3-D / 4-D with one channel.

    Example:
        >>> x = to_tensor(np.full((2, 28, 28), 255, dtype=np.uint8))
        >>> x.shape, float(x.max())
        (torch.Size([2, 1, 28, 28]), 1.0)
    """
    t = torch.as_tensor(images)
    if t.dtype != torch.uint8:
        raise DataError(
            f"to_tensor takes uint8 images, got {t.dtype} {list(t.shape)}; float inputs are used as they are "
            f"(float32 [N, 1, H, W] in [0, 1])"
        )
    if t.ndim == 3:
        t = t.unsqueeze(1)  # [N, H, W] -> [N, 1, H, W]
    if t.ndim != 4 or t.shape[1] != 1:
        raise DataError(f"to_tensor takes uint8 images [N, H, W] or [N, 1, H, W], got {list(t.shape)}")
    return t.to(torch.float32).div_(255.0)


def iterate_batches(
    images: np.ndarray | torch.Tensor,
    labels: np.ndarray | torch.Tensor | None,
    batch_size: int,
    shuffle: bool = False,
    seed: int = 0,
) -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
    """Yield (inputs, labels) batches as torch tensors; the last batch may be smaller.

    uint8 images are converted per batch with `to_tensor` (float32 [b, 1, H, W] in [0, 1]), so the whole set is
    never held as float; float inputs are yielded as float32 unchanged.

    Args:
        images: uint8 [N, H, W] / [N, 1, H, W], or float inputs [N, ...].
        labels: [N] integers, or None (then each batch's labels are None).
        batch_size: at least 1.
        shuffle: visit the examples in a random order, fixed by `seed`.
        seed: the order's seed; the same seed gives the same batches.

    Returns:
        an iterator of (x float32 [b, ...], y int64 [b] or None).

    Raises:
        DataError: batch_size < 1, or images and labels differ in length.

    Example:
        >>> images, labels = load_images("sample", split="test")
        >>> x, y = next(iterate_batches(images, labels, batch_size=64))
        >>> x.shape, y.shape
        (torch.Size([64, 1, 28, 28]), torch.Size([64]))
    """
    batch_size = int(batch_size)
    if batch_size < 1:
        raise DataError(f"batch size {batch_size} is not positive; use a batch size of at least 1")
    n = len(images)
    if labels is not None and len(labels) != n:
        raise DataError(f"{n} inputs but {len(labels)} labels; pass labels of the same length as the inputs")
    order = np.random.default_rng(seed).permutation(n) if shuffle else np.arange(n)
    for start in range(0, n, batch_size):
        idx = order[start : start + batch_size]
        chunk = images[torch.as_tensor(idx)] if isinstance(images, torch.Tensor) else images[idx]
        t = torch.as_tensor(chunk)
        x = to_tensor(t) if t.dtype == torch.uint8 else t.to(torch.float32)
        y = None if labels is None else torch.as_tensor(
            labels[torch.as_tensor(idx)] if isinstance(labels, torch.Tensor) else labels[idx]
        ).to(torch.int64)
        yield x, y
