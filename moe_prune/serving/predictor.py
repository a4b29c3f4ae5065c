"""A small ONNX Runtime predictor for people who serve a reduced model from their own code.

It needs no torch (the serving environment has none): numpy, ONNX Runtime and Pillow, and the preprocessing the
ONNX file records (moe_prune.data.preprocess, read through moe_prune.onnx.files).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ..errors import DataError, ServeError

if TYPE_CHECKING:
    from ..core.preprocess import Preprocess

_PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider", "tensorrt": "TensorrtExecutionProvider"}


def _session(path, provider: str, threads: int | None):
    """An ONNX Runtime session on the asked provider (no torch: timing.ort_session's module imports it)."""
    import onnxruntime as ort

    from ..errors import first_line

    if provider not in _PROVIDERS:
        raise ServeError(f"provider {provider!r}: choose one of {', '.join(_PROVIDERS)}")
    name = _PROVIDERS[provider]
    if name not in ort.get_available_providers():
        raise ServeError(f"ONNX Runtime has no {name} here (available: {ort.get_available_providers()}); for cuda "
                         "or tensorrt install onnxruntime-gpu instead of onnxruntime and run on an NVIDIA GPU")
    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
    providers = [name] + (["CPUExecutionProvider"] if name != "CPUExecutionProvider" else [])
    try:
        return ort.InferenceSession(str(path), opts, providers=providers)
    except Exception as e:  # ONNX Runtime's own exception types
        raise ServeError(f"{path}: ONNX Runtime cannot load it ({first_line(e)}); give an .onnx file from "
                         "moe-prune export") from None


class Predictor:
    """An ONNX Runtime session of a (reduced) image classifier, fed through the model's own preprocessing.

    Images of any size go in: PIL images, image files, uint8 arrays [H, W], [H, W, C], [N, H, W], [N, H, W, C] or
    [N, C, H, W] (C: 1, 3 or 4; alpha is dropped), or a list of such images of different sizes. Each is converted
    to the model's channels, resized and center-cropped (Preprocess, Pillow), then fed as the graph takes it:
    uint8 pixels [N, H, W, C] to a graph with the preprocessing inside (`moe-prune export --preprocess`), float32
    [N, C, H, W] after / 255 and (x - mean) / std otherwise. A 3-axis array is one image [H, W, C] when its last
    axis is 1, 3 or 4, else [N, H, W]. Float arrays are taken as the model's input, already preprocessed: at its
    input shape ([N, C, H, W] or [C, H, W]; [N, H, W] or [H, W] for one channel) they pass unchanged (a graph
    taking pixels refuses them).

    The preprocessing is the one the file records (metadata "moe_prune.preprocess", written by every
    `moe-prune export`), or `preprocess`. A float graph without either takes float input only: guessing
    / 255 would give a model trained on normalized images wrong inputs without a word.

    Args:
        onnx_path: the exported model (its .onnx.data beside it, if any).
        provider: "cpu", "cuda" or "tensorrt".
        threads: intra-op threads (None: ONNX Runtime's default).
        preprocess: a `preprocess.Preprocess` to use instead of the recorded one (e.g. for a file exported
            before the record existed). For a graph with the preprocessing inside only its resize and crop
            (interpolation, crop_pct) may differ from the record: the graph's mean and std are fixed.

    Raises:
        ServeError: the provider is missing, ONNX Runtime cannot load the file, or `preprocess` contradicts the
            graph (input size, channels, or an in-graph mean/std). ExportError: external data outside the
            model's folder, or a broken record.

    Example:
        >>> p = Predictor("vit-pixels.onnx")           # exported with --preprocess: uint8 [B, 224, 224, 3] in
        >>> p.predict(["cat.jpg", PIL.Image.open("dog.png"), np.zeros((300, 200, 3), np.uint8)])  # class ids [3]
        >>> Predictor("demo-output/onnx/compressed.onnx").predict(images)  # uint8 [N, 28, 28] -> class ids [N]
    """

    def __init__(self, onnx_path: str | os.PathLike, provider: str = "cpu", threads: int | None = None,
                 preprocess: Preprocess | None = None):
        from ..onnx.files import check_external_data, read_preprocess

        # Without the onnx package (the serving environment) ONNX Runtime's own check refuses external data
        # outside the model's folder, as `moe-prune serve` relies on; with it, ours says so before anything loads.
        try:
            import onnx  # noqa: F401
        except ImportError:
            pass
        else:
            check_external_data(onnx_path)
        self.path = Path(onnx_path)
        self.session = _session(onnx_path, provider, threads)
        inp = self.session.get_inputs()[0]
        self.input_name = inp.name
        self.input_shape = list(inp.shape[1:])  # float graph: [C, H, W]; pixel graph: [H, W, C]
        self.pixels = inp.type == "tensor(uint8)"  # the graph normalizes uint8 pixels itself
        self.dtype = np.float16 if inp.type == "tensor(float16)" else np.float32
        recorded, in_graph = read_preprocess(self.session.get_modelmeta().custom_metadata_map, onnx_path)
        if recorded is not None and in_graph != self.pixels:
            raise ServeError(f"{onnx_path}: its preprocessing record says {'' if in_graph else 'not '}in the graph, "
                             f"but the graph takes {inp.type} {inp.shape}; re-export it with moe-prune export")
        if preprocess is not None and self.pixels and recorded is not None:
            fixed = ("size", "channels", "mean", "std")
            if any(getattr(preprocess, k) != getattr(recorded, k) for k in fixed):
                raise ServeError(f"{onnx_path}: normalizes inside its graph as {recorded.describe()}; a preprocess= "
                                 "may change only interpolation and crop_pct (re-export with --mean/--std instead)")
        self.preprocessing: Preprocess | None = preprocess or recorded
        p = self.preprocessing
        if p is not None:
            want = [*p.size, p.channels] if self.pixels else [p.channels, *p.size]
            if want != self.input_shape:
                raise ServeError(f"{onnx_path}: takes {self.input_shape} per image, but the preprocessing gives "
                                 f"{want} ({p.describe()})")

    # -- input -----------------------------------------------------------------------------------------------
    def preprocess(self, images) -> np.ndarray:
        """Images (see the class) -> what the graph takes: uint8 [N, H, W, C] or float32 [N, C, H, W].

        Raises:
            DataError: images of no form above, a file Pillow cannot read, float input at another shape (or to a
                graph that takes pixels), or images that need resizing when no preprocessing is known.
        """
        if hasattr(images, "detach") and hasattr(images, "numpy"):  # a torch tensor, without importing torch
            images = images.detach().cpu().numpy()
        if isinstance(images, np.ndarray) and images.dtype.kind == "f":
            return self._float(images)
        pixels = np.stack([self._pixels(one) for one in _each_image(images)])  # uint8 [N, H, W, C]
        if self.pixels:
            return pixels
        return self.preprocessing.normalize(pixels).astype(self.dtype, copy=False)  # [N, C, H, W]

    def _float(self, x: np.ndarray) -> np.ndarray:
        if self.pixels:
            raise DataError(f"{self.path} takes uint8 pixels (its preprocessing is inside the graph); give uint8 "
                            "images, PIL images or files, not float arrays")
        shape = self.input_shape  # [C, H, W]
        if list(x.shape) == shape:
            x = x[None]  # one image [C, H, W]
        elif shape[0] == 1 and list(x.shape) == shape[1:]:
            x = x[None, None]  # one image [H, W]
        elif shape[0] == 1 and x.ndim == 3 and list(x.shape[1:]) == shape[1:]:
            x = x[:, None]  # [N, H, W] -> [N, 1, H, W]
        if list(x.shape[1:]) != shape:
            raise DataError(f"float input is taken as {self.path}'s own input, already preprocessed: [N, "
                            f"{', '.join(map(str, shape))}], got {list(x.shape)}; give images of other sizes as uint8 "
                            "arrays, PIL images or files (resized and normalized here)")
        return np.ascontiguousarray(x, dtype=self.dtype)

    def _pixels(self, one) -> np.ndarray:
        """One image (PIL, path, uint8 array [H, W(, C)]) -> uint8 [H, W, C] at the model's input size."""
        from PIL import Image

        p = self.preprocessing
        if isinstance(one, (str, os.PathLike)):
            if p is None:
                raise DataError(self._no_preprocess(f"the image file {one}"))
            try:
                with Image.open(one) as img:
                    return p.pixels(img)
            except (OSError, Image.DecompressionBombError) as e:  # missing, unreadable, not an image
                raise DataError(f"{one}: not an image file Pillow can read ({e})") from None
        if isinstance(one, np.ndarray):
            hwc = one[..., None] if one.ndim == 2 else one[..., :3] if one.shape[-1] == 4 else one
            if p is None:
                if self.pixels and list(hwc.shape) == self.input_shape:
                    return hwc  # already what the graph takes
                raise DataError(self._no_preprocess(f"images of shape {list(one.shape)}"))
            if hwc.shape[:2] == p.size and hwc.shape[-1] == p.channels and p.identity_at_size:
                return hwc  # resize and crop would not change it: skip Pillow, as Preprocess.array does
            one = Image.fromarray(hwc[..., 0] if hwc.shape[-1] == 1 else hwc)
        if p is None:
            raise DataError(self._no_preprocess("PIL images"))
        return p.pixels(one)

    def _no_preprocess(self, what: str) -> str:
        return (f"{self.path} records no preprocessing (exported before moe-prune recorded it), so {what} cannot "
                f"be resized or normalized for it; pass Predictor(..., preprocess=Preprocess(...)), re-export it with "
                f"moe-prune export, or give float input [N, {', '.join(map(str, self.input_shape))}]")

    # -- output ----------------------------------------------------------------------------------------------
    def logits(self, images) -> np.ndarray:
        """Raw model outputs [N, classes]."""
        return self.session.run(None, {self.input_name: self.preprocess(images)})[0]

    def predict_proba(self, images) -> np.ndarray:
        """Softmax of the logits [N, classes]."""
        z = self.logits(images)
        z = np.exp(z - z.max(axis=-1, keepdims=True))
        return z / z.sum(axis=-1, keepdims=True)

    def predict(self, images) -> np.ndarray:
        """Class ids [N]."""
        return self.logits(images).argmax(axis=-1)


def _each_image(images) -> list:
    """The images of a Predictor input, one by one: PIL images, paths, uint8 arrays [H, W] or [H, W, C]."""
    from PIL import Image

    if isinstance(images, (Image.Image, str, os.PathLike)):
        return [images]
    if isinstance(images, (list, tuple)):
        out = [im if isinstance(im, (Image.Image, str, os.PathLike)) else np.asarray(im) for im in images]
        for im in out:
            if isinstance(im, np.ndarray) and not (im.dtype == np.uint8 and (
                    im.ndim == 2 or (im.ndim == 3 and im.shape[-1] in (1, 3, 4)))):
                raise DataError(f"a list holds single images: PIL images, files, or uint8 arrays [H, W] or [H, W, C] "
                                f"(C 1, 3 or 4); got a {im.dtype} array of shape {list(im.shape)}")
        if not out:
            raise DataError("no images given (an empty list)")
        return out
    a = np.asarray(images)
    if a.dtype != np.uint8:
        raise DataError(f"images must be uint8 pixels (0..255), PIL images or files, or float32 at the model's input "
                        f"shape; got a {a.dtype} array of shape {list(a.shape)}")
    if a.ndim == 2 or (a.ndim == 3 and a.shape[-1] in (1, 3, 4)):
        return [a]  # one image [H, W] or [H, W, C]
    if a.ndim == 3:
        return list(a)  # [N, H, W]
    if a.ndim == 4 and a.shape[-1] in (1, 3, 4):
        return list(a)  # [N, H, W, C]
    if a.ndim == 4 and a.shape[1] in (1, 3, 4):
        return list(np.moveaxis(a, 1, -1))  # [N, C, H, W]
    raise DataError(f"uint8 images must be [H, W], [H, W, C], [N, H, W], [N, H, W, C] or [N, C, H, W] (C 1, 3 or 4), "
                    f"got {list(a.shape)}")
