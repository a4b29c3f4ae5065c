"""Serving reduced models on existing engines: a Triton Inference Server model repository (the predictor for people
who serve from their own code is in predictor.py).

    REPO/NAME/config.pbtxt        inputs, outputs, dynamic batching, the onnxruntime backend, CPU or GPU instances
    REPO/NAME/1/model.onnx        the (static or Algorithm 2) reduced model, batch axis dynamic; with
                                  preprocess=True its input is uint8 pixels [B, H, W, C] (TYPE_UINT8)
Serve it with `tritonserver --model-repository REPO`.

The repository writers import torch when called (they export the model first); reading a config needs no torch.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import ExportError, OutputError

if TYPE_CHECKING:
    from torch import nn

    from ..core.preprocess import Preprocess

# ONNX TensorProto element types -> Triton's config data types.
_ONNX_DTYPES = {1: "TYPE_FP32", 2: "TYPE_UINT8", 3: "TYPE_INT8", 6: "TYPE_INT32", 7: "TYPE_INT64", 9: "TYPE_BOOL",
                10: "TYPE_FP16", 11: "TYPE_FP64"}


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
    from ..core.files import output_folder

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
    from ..onnx.export_file import check_export_options, export_preprocess, load_for_export

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
    from ..onnx.export import export_onnx
    from ..onnx.validate import validate_onnx

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
