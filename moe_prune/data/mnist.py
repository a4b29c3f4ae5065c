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
import zlib
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
_NPZ_KEYS = ("x", "inputs", "images")


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
# Tensors, batches, calibration inputs


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


def load_inputs(path: str | os.PathLike) -> torch.Tensor:
    """Load calibration inputs from a .npy or .npz file as model inputs, float32 [N, ...].

    A .npz gives its array `x`, `inputs` or `images` (first found), or its only array. uint8 arrays are images
    and go through `to_tensor` ([N, 1, H, W] in [0, 1]); float arrays are taken as model inputs and cast to
    float32. Pickled data and object arrays are refused (np.load with allow_pickle=False).

    Args:
        path: a .npy or .npz file.

    Returns:
        a float32 tensor [N, ...] with N >= 1 and only finite values.

    Raises:
        DataError: the file is missing, pickled, not a numpy file, has no usable array, is empty, is of
            another dtype than uint8 or float, or holds NaN or infinity.

    Example:
        >>> np.save("/tmp/calib.npy", np.zeros((4, 28, 28), dtype=np.uint8))
        >>> load_inputs("/tmp/calib.npy").shape
        torch.Size([4, 1, 28, 28])
    """
    arr, src = _load_array(path)
    if arr.dtype == np.uint8:
        if arr.ndim not in (3, 4) or (arr.ndim == 4 and arr.shape[1] != 1):
            raise DataError(f"{src}: uint8 images must be [N, H, W] or [N, 1, H, W], got {list(arr.shape)}")
        return to_tensor(arr)
    return torch.from_numpy(arr)


def _load_array(path) -> tuple[np.ndarray, str]:
    """(the file's inputs as uint8 or float32 numpy, its name for messages): see `load_inputs`."""
    path = Path(path)
    fix = "save a plain numeric array with np.save / np.savez (float32 [N, ...] inputs or uint8 [N, 28, 28] images)"
    try:
        loaded = np.load(path, allow_pickle=False)
    except FileNotFoundError as e:
        raise DataError(f"{path}: calibration file not found; check the path") from e
    except ValueError as e:
        # numpy refuses pickled files and object arrays with a ValueError when allow_pickle=False.
        raise DataError(f"{path}: cannot load without pickle ({e}); {fix}") from e
    except (OSError, EOFError) as e:
        raise DataError(f"{path}: not a readable .npy/.npz file ({e}); {fix}") from e
    if isinstance(loaded, np.lib.npyio.NpzFile):
        with loaded:
            keys = list(loaded.files)
            key = next((k for k in _NPZ_KEYS if k in keys), keys[0] if len(keys) == 1 else None)
            if key is None:
                raise DataError(
                    f"{path}: .npz holds {keys or 'no arrays'}; name the inputs array one of {list(_NPZ_KEYS)} "
                    f"or save only one array"
                )
            try:
                arr = loaded[key]
            except (ValueError, OSError, EOFError, zlib.error) as e:
                raise DataError(f"{path}: array {key!r} cannot be loaded without pickle ({e}); {fix}") from e
        src = f"{path}[{key!r}]"
    else:
        arr, src = loaded, str(path)
    if arr.ndim < 1 or arr.shape[0] == 0:
        raise DataError(f"{src}: no inputs (shape {list(arr.shape)}); {fix}")
    if arr.dtype == np.uint8:
        return arr, src
    if arr.dtype.kind != "f":
        raise DataError(f"{src}: dtype {arr.dtype} is neither uint8 images nor float inputs; {fix}")
    x = np.ascontiguousarray(arr, dtype=np.float32)
    if not np.isfinite(x).all():
        raise DataError(f"{src}: holds NaN or infinite values; clean the inputs before calibrating")
    return x, src


def calibration_inputs(source: str | os.PathLike, limit: int | None = None):
    """Calibration inputs as one array (labels are never used): a .npy/.npz of inputs, the train split of a data
    set name or IDX folder, or "sample" (the bundled sample's images). At most `limit` inputs, from the start.
    For image folders and streaming, see `calibration_batches`.

    Returns:
        uint8 images [N, 28, 28] or float inputs [N, ...].

    Raises:
        DataError: see `load_inputs` and `load_images`.

    Example:
        >>> calibration_inputs("fashion-mnist", limit=5000).shape
        (5000, 28, 28)
    """
    text = str(source)
    if text.endswith((".npy", ".npz")):
        x = _load_array(source)[0]  # uint8 images stay uint8 (converted per batch), as a data set's do
    elif text == "sample":
        x = load_images("sample", split="test")[0]
    else:
        x = load_images(source, split="train")[0]
    if limit is not None and limit < 1:
        raise DataError(f"calibration limit {limit} must be at least 1")
    return x[:limit] if limit is not None else x


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
    from .datasets import ArrayExamples, Batches, DataOptions, open_data, spread
    from .preprocess import Preprocess, for_model

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
        from .datasets import FileExamples

        idx = spread(len(examples), limit) if isinstance(examples, FileExamples) else np.arange(limit)
        examples = examples.subset(idx)
    files = type(examples).__name__ != "ArrayExamples"
    return Batches(examples, batch_size, progress="reading calibration images" if files else None).cached(options.cache_mb)


def check_examples(model, examples, src) -> None:
    """`check_inputs` for a data source: float arrays are checked as they are; images are preprocessed into the
    model's input shape, so only a model that takes tokens can refuse them."""
    from .datasets import ArrayExamples
    from .preprocess import _as_nhwc

    want = model_input(model)
    if isinstance(examples, ArrayExamples) and examples.array.dtype != np.uint8:
        check_inputs(model, examples.array, src)
    elif want["kind"] == "tokens":
        raise DataError(f"{src}: images, but the model takes {describe_input(want)}")
    elif isinstance(examples, ArrayExamples):
        try:
            _as_nhwc(examples.array[:1])
        except DataError:
            raise DataError(f"{src}: inputs are uint8 {list(examples.array.shape)}, but the model takes "
                            f"{describe_input(want)}; save images as [N, H, W], [N, H, W, C] or [N, C, H, W]") from None


def model_input(model) -> dict:
    """What a model takes: {"kind": "images", "shape": [C, H, W], "range": (0.0, 1.0) or None} or
    {"kind": "tokens", "shape": [None, D]} (None: any token count). `range` is known for the models trained
    here (pixels / 255); a converted soft-moe ViT has its own normalization, so it is None there.

    Example:
        >>> model_input(MnistSoftMoE(MnistConfig(num_experts=8)))
        {'kind': 'images', 'shape': [1, 28, 28], 'range': (0.0, 1.0)}
    """
    from ..core.layers import SoftMoE
    from ..selection.scores import PrunedSoftMoE

    native = model.layer if isinstance(model, PrunedSoftMoE) else model
    if isinstance(native, SoftMoE):
        return {"kind": "tokens", "shape": [None, native.config.dim]}
    c = native.config
    size = (c.img_size, c.img_size) if isinstance(c.img_size, int) else tuple(c.img_size)
    from .preprocess import recorded_fact

    converted = recorded_fact(getattr(native, "checkpoint_meta", {}), "converted_from") is not None
    return {"kind": "images", "shape": [c.in_chans, *size], "range": None if converted else (0.0, 1.0)}


def describe_input(want: dict) -> str:
    """`model_input` in words: "images [N, 1, 28, 28] (float in [0, 1], or uint8 [N, 28, 28])"."""
    if want["kind"] == "tokens":
        return f"tokens [N, M, {want['shape'][1]}] (float; a bare Soft MoE layer)"
    c, h, w = want["shape"]
    text = f"images [N, {c}, {h}, {w}]"
    extra = []
    if want.get("range"):
        extra.append(f"float in [{want['range'][0]:g}, {want['range'][1]:g}]")
    extra.append("or uint8 images of any size through its preprocessing")
    return text + (f" ({', '.join(extra)})" if extra else "")


def check_inputs(model, inputs, src) -> None:
    """Refuse inputs the model cannot take, in one line naming `src`, the shape found and the shape it takes.

    uint8 [N, H, W] / [N, 1, H, W] images count as [N, 1, H, W] in [0, 1] (see `to_tensor`). Float images
    outside the model's input range (0-255 pixels given to a model trained on [0, 1]) are refused; where the
    range is not known (a converted checkpoint) values that look like 0-255 pixels get a warning on stderr.

    Raises:
        DataError: wrong rank, channels, size or token width; or float pixels outside the model's range.

    Example:
        >>> check_inputs(model, np.zeros((4, 32, 32), np.uint8), "calib.npy")  # DataError: ... takes [N, 1, 28, 28]
    """
    import sys

    want = model_input(model)
    t = torch.as_tensor(inputs) if not isinstance(inputs, torch.Tensor) else inputs
    found = f"{str(t.dtype).replace('torch.', '')} {list(t.shape)}"
    shape = list(t.shape)
    if want["kind"] == "images" and t.dtype == torch.uint8 and t.ndim == 3:
        shape = [shape[0], 1, *shape[1:]]
    takes = describe_input(want)
    if want["kind"] == "tokens":
        ok = len(shape) == 3 and shape[2] == want["shape"][1]
        hint = "save float32 tokens [N, M, D] with np.save (a bare layer takes no images)"
    else:
        ok = len(shape) == 4 and shape[1:] == want["shape"]
        hint = ("add the channel axis (x[:, None])" if len(shape) == 3 and [1, *shape[1:]] == want["shape"]
                else "resize or reshape the inputs to that shape")
    if not ok:
        raise DataError(f"{src}: inputs are {found}, but the model takes {takes}; {hint}")
    if want["kind"] != "images" or t.dtype == torch.uint8 or t.numel() == 0:
        return
    lo, hi = float(t.min()), float(t.max())
    rng = want.get("range")
    if rng is not None and (lo < rng[0] - 1e-3 or hi > rng[1] + 1e-3):
        raise DataError(
            f"{src}: float pixels span [{lo:g}, {hi:g}], but the model takes [{rng[0]:g}, {rng[1]:g}] "
            f"(pixels / 255); divide the inputs by 255, or save them as uint8 images"
        )
    if rng is None and hi > 10:
        print(f"moe-prune: warning: {src}: float pixels go up to {hi:g}; if they are 0-255 values, normalize "
              "them as the model was trained", file=sys.stderr)
