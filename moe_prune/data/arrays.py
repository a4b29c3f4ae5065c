"""Calibration inputs from arrays: a .npy or .npz of uint8 images or float model inputs, read without pickle, and
the one-array form of any data source (`calibration_inputs`).
"""

from __future__ import annotations

import os
import zlib
from pathlib import Path

import numpy as np
import torch

from ..errors import DataError
from .mnist import load_images, to_tensor

_NPZ_KEYS = ("x", "inputs", "images")


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
    arr, src = load_array(path)
    if arr.dtype == np.uint8:
        if arr.ndim not in (3, 4) or (arr.ndim == 4 and arr.shape[1] != 1):
            raise DataError(f"{src}: uint8 images must be [N, H, W] or [N, 1, H, W], got {list(arr.shape)}")
        return to_tensor(arr)
    return torch.from_numpy(arr)


def load_array(path) -> tuple[np.ndarray, str]:
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
        x = load_array(source)[0]  # uint8 images stay uint8 (converted per batch), as a data set's do
    elif text == "sample":
        x = load_images("sample", split="test")[0]
    else:
        x = load_images(source, split="train")[0]
    if limit is not None and limit < 1:
        raise DataError(f"calibration limit {limit} must be at least 1")
    return x[:limit] if limit is not None else x
