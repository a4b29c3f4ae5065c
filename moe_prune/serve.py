"""Serving reduced models on existing engines: a Triton Inference Server model repository, and a small ONNX
Runtime predictor for people who serve from their own code.

    REPO/NAME/config.pbtxt        inputs, outputs, dynamic batching, the onnxruntime backend, CPU or GPU instances
    REPO/NAME/1/model.onnx        the (static or Algorithm 2) reduced model, batch axis dynamic; with
                                  preprocess=True its input is uint8 pixels [B, H, W, C] (TYPE_UINT8)
Serve it with `tritonserver --model-repository REPO`.

The Predictor needs no torch (the serving environment has none): numpy, ONNX Runtime and Pillow. The repository
writers import torch when called.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from .errors import DataError, ExportError, OutputError, ServeError

if TYPE_CHECKING:
    from torch import nn

    from .preprocess import Preprocess

# ONNX TensorProto element types -> Triton's config data types.
_ONNX_DTYPES = {1: "TYPE_FP32", 2: "TYPE_UINT8", 3: "TYPE_INT8", 6: "TYPE_INT32", 7: "TYPE_INT64", 9: "TYPE_BOOL",
                10: "TYPE_FP16", 11: "TYPE_FP64"}
_PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider", "tensorrt": "TensorrtExecutionProvider"}


def model_config(name: str, onnx_path: str | os.PathLike, *, max_batch_size: int = 64, kind: str = "cpu",
                 instances: int = 1, preferred_batch_sizes: tuple = (), queue_delay_us: int = 100) -> str:
    """The config.pbtxt text for an ONNX model whose first axis is the batch.

    Args:
        name: the model's name in the repository.
        onnx_path: the exported model: inputs, outputs, dtypes and shapes are read from it.
        max_batch_size: the largest batch Triton forms (dynamic batching).
        kind: "cpu" (KIND_CPU instances) or "gpu" (KIND_GPU; ONNX Runtime's CUDA provider in Triton).
        instances: model instances per device.
        preferred_batch_sizes: batch sizes dynamic batching aims for (empty: none).
        queue_delay_us: how long a request may wait for others to batch with.

    Raises:
        ExportError: the model has a fixed batch axis, or an unsupported dtype.

    Example:
        >>> print(model_config("mnist_reduced", "reduced.onnx", kind="cpu"))
    """
    import onnx

    if kind not in ("cpu", "gpu"):
        raise ExportError(f"instance kind {kind!r}: choose cpu or gpu")
    if max_batch_size < 1:
        raise ExportError(f"--max-batch-size {max_batch_size}: must be at least 1 (the largest batch Triton forms)")
    graph = onnx.load(str(onnx_path), load_external_data=False).graph
    initializers = {t.name for t in graph.initializer}

    def tensors(values):
        out = []
        for v in values:
            if v.name in initializers:
                continue
            t = v.type.tensor_type
            dims = t.shape.dim
            if not dims or not dims[0].dim_param:
                raise ExportError(f"{onnx_path}: {v.name} has no dynamic batch axis; export with a dynamic batch")
            dtype = _ONNX_DTYPES.get(t.elem_type)
            if dtype is None:
                raise ExportError(f"{onnx_path}: {v.name} has ONNX element type {t.elem_type}, not supported here")
            shape = [d.dim_value if d.dim_value else -1 for d in dims[1:]]
            out.append(f'  {{\n    name: "{v.name}"\n    data_type: {dtype}\n    dims: [ {", ".join(map(str, shape))} ]\n  }}')
        return ",\n".join(out)

    preferred = f"\n  preferred_batch_size: [ {', '.join(map(str, preferred_batch_sizes))} ]" if preferred_batch_sizes else ""
    return (
        f'name: "{name}"\nbackend: "onnxruntime"\nmax_batch_size: {max_batch_size}\n'
        f"input [\n{tensors(graph.input)}\n]\noutput [\n{tensors(graph.output)}\n]\n"
        f"dynamic_batching {{{preferred}\n  max_queue_delay_microseconds: {queue_delay_us}\n}}\n"
        f"instance_group [\n  {{\n    count: {instances}\n    kind: KIND_{kind.upper()}\n  }}\n]\n"
    )


def parse_model_config(text: str):
    """Parse config.pbtxt with the ModelConfig protobuf that Triton's Python client ships (tritonclient[grpc]).

    Raises:
        ExportError: tritonclient is not installed, or the text is not a valid ModelConfig.
    """
    try:
        from google.protobuf import text_format
        from tritonclient.grpc import model_config_pb2
    except ImportError:
        raise ExportError("parsing a Triton model config needs tritonclient[grpc]: pip install 'moe-prune[serve]'") from None
    try:
        return text_format.Parse(text, model_config_pb2.ModelConfig())
    except text_format.ParseError as e:
        raise ExportError(f"the generated config.pbtxt is not a valid Triton ModelConfig: {e}") from None


def write_triton_repo(model: nn.Module, repo: str | os.PathLike, name: str, *, kind: str = "cpu",
                      max_batch_size: int = 64, opset: int = 18, validate: bool = True,
                      preprocess: Preprocess | None = None, in_graph: bool = True) -> Path:
    """Export a (reduced) model into a Triton Inference Server model repository and check the config.

    Args:
        model: the model to serve (e.g. a compressed checkpoint, or with_selection(model, "1/8", per="batch")).
        repo: the repository folder (created if missing); REPO/NAME is replaced as a whole, atomically.
        name: the model's name (letters, digits, '_', '-').
        kind: "cpu" or "gpu" instances.
        max_batch_size: see `model_config`.
        opset: ONNX opset.
        validate: validate the ONNX model against PyTorch (see validate.validate_onnx) and parse the config
            with Triton's protobuf.
        preprocess, in_graph: see `export.export_onnx`: with a Preprocess (and in_graph) the served model takes
            uint8 pixels [B, H, W, C] (TYPE_UINT8) and normalizes them itself.

    Returns:
        REPO/NAME.

    Example:
        >>> write_triton_repo(moe_prune.load("small.safetensors"), "models", "fmnist_small")
        >>> # then: tritonserver --model-repository models
        >>> write_triton_repo(vit, "models", "vit_pixels", preprocess=preprocess.for_model(vit))  # uint8 HWC in

    Raises:
        OutputError: `repo` is a file or cannot be written; a bad name. ExportError: export or validation failed
            (nothing is left behind: REPO/NAME keeps its old model, a folder this call created is removed).
    """
    from .files import output_folder

    _check_repo_options(repo, name, kind, max_batch_size)  # before minutes of exporting
    with output_folder(repo) as repo:  # a failed run leaves no folder it created
        return _write_repo(model, repo, name, kind, max_batch_size, opset, validate, preprocess, in_graph)


def export_triton_repo(checkpoint: str | os.PathLike, repo: str | os.PathLike, name: str | None = None, *,
                       keep=None, dynamic: bool = False, per: str = "batch", mode: str | None = None,
                       atol: float = 1e-4, kind: str = "cpu", max_batch_size: int = 64, opset: int = 18,
                       validate: bool = True, preprocess: bool = False, mean=None, std=None,
                       interpolation: str | None = None, crop_pct: float | None = None) -> Path:
    """A native checkpoint into a Triton Inference Server model repository (`moe-prune export --format triton-repo`).

    The options are checked as `export.export_checkpoint` checks them, and the repository's before the
    checkpoint is loaded; then the model `export.load_for_export` makes is written by `write_triton_repo`.

    Args:
        checkpoint: a native checkpoint (full or compressed).
        repo: the repository folder. name: the model's name (default: the checkpoint's file name up to its first dot).
        keep, dynamic, per, mode: see `export.export_checkpoint`. atol: checked only (validation uses the default).
        kind, max_batch_size, opset, validate: see `write_triton_repo`.
        preprocess, mean, std, interpolation, crop_pct: see `export.export_checkpoint` (preprocess: the served
            model takes uint8 pixels [B, H, W, C]).

    Returns:
        REPO/NAME.

    Raises:
        ExportError: options that do not go together, or a failed export or validation. OutputError: `repo` is
            a file, or a bad name. CheckpointError: see `load`. SelectionError: a bad keep or mode.

    Example:
        >>> export_triton_repo("small.safetensors", "models", "fmnist_small")
    """
    from .export import check_export_options, export_preprocess, load_for_export

    overrides = dict(mean=mean, std=std, interpolation=interpolation, crop_pct=crop_pct)
    check_export_options(keep=keep, dynamic=dynamic, per=per, mode=mode, atol=atol, **overrides)
    name = name or Path(checkpoint).name.split(".")[0]
    _check_repo_options(repo, name, kind, max_batch_size)
    model = load_for_export(checkpoint, keep=keep, dynamic=dynamic, per=per, mode=mode)
    pre = export_preprocess(model, checkpoint, preprocess, **overrides)
    return write_triton_repo(model, repo, name, kind=kind, max_batch_size=max_batch_size, opset=opset,
                             validate=validate, preprocess=pre, in_graph=preprocess)


def _check_repo_options(repo, name: str, kind: str, max_batch_size: int) -> None:
    if not name or not all(c.isalnum() or c in "_-" for c in name):
        raise OutputError(f"model name {name!r}: use letters, digits, '_' and '-'")
    if max_batch_size < 1:
        raise ExportError(f"--max-batch-size {max_batch_size}: must be at least 1 (the largest batch Triton forms)")
    if kind not in ("cpu", "gpu"):
        raise ExportError(f"instance kind {kind!r}: choose cpu or gpu")
    if Path(repo).exists() and not Path(repo).is_dir():
        raise OutputError(f"{repo}: exists and is not a folder; --out of triton-repo is the repository folder")


def _write_repo(model, repo: Path, name: str, kind: str, max_batch_size: int, opset: int, validate: bool,
                preprocess, in_graph: bool) -> Path:
    from .export import export_onnx
    from .validate import validate_onnx

    final = repo / name
    staging = repo / f".{name}.staging"
    shutil.rmtree(staging, ignore_errors=True)
    try:
        (staging / "1").mkdir(parents=True)
        onnx_path = export_onnx(model, staging / "1" / "model.onnx", opset=opset, preprocess=preprocess,
                                in_graph=in_graph)
        if validate:
            validate_onnx(onnx_path, model, preprocess=preprocess)
        text = model_config(name, onnx_path, max_batch_size=max_batch_size, kind=kind)
        if validate:
            parse_model_config(text)
        (staging / "config.pbtxt").write_text(text)
        old = repo / f".{name}.old"
        shutil.rmtree(old, ignore_errors=True)
        if final.exists():
            os.replace(final, old)  # two renames: a crash in between leaves the old model beside, never half a model
        os.replace(staging, final)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return final


def _session(path, provider: str, threads: int | None):
    """An ONNX Runtime session on the asked provider (no torch: timing.ort_session's module imports it)."""
    import onnxruntime as ort

    from .errors import first_line

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
        from .onnx_files import check_external_data, read_preprocess

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
