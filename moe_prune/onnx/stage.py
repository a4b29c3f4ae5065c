"""The export stage as one verb with its config, as optimum's exporter does it: `export(model, path,
ExportConfig(...))` writes the ONNX file, then validates it against PyTorch in ONNX Runtime and returns the
checklist. `moe-prune export` runs the same on a checkpoint file, publishing only a file that passed
(export_file.export_checkpoint).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from ..core.preprocess import Preprocess
from .export import export_onnx
from .files import EMBED_LIMIT_BYTES
from .validate import ValidationReport, validate_onnx


@dataclass(frozen=True)
class ExportConfig:
    """How to export and validate (see export.export_onnx and validate.validate_onnx for each field's details).

    Args:
        dynamic_batch: the batch axis dynamic (else fixed at the example's).
        opset: the ONNX opset. dynamo: torch.export's exporter instead of TorchScript's.
        embed_limit_bytes: larger models keep their weights in an external data file beside the .onnx.
        with_choice: also output the experts each pruned layer ran (a model from with_selection / with_experts).
        preprocess: the model's input preprocessing, recorded in the file; with `in_graph`, computed in the graph
            (the input is then uint8 pixels [B, H, W, C]).
        validate: run ONNX Runtime against PyTorch on random batches after export.
        batch_sizes, atol, rtol: the validation's batch sizes and tolerance.
        raise_on_failure: raise ExportError when validation fails (else the failing report is returned).
    """

    dynamic_batch: bool = True
    opset: int = 18
    dynamo: bool = False
    embed_limit_bytes: int = EMBED_LIMIT_BYTES
    with_choice: bool = False
    preprocess: Preprocess | None = None
    in_graph: bool = True
    validate: bool = True
    batch_sizes: tuple[int, ...] = (1, 4)
    atol: float = 1e-4
    rtol: float = 1e-3
    raise_on_failure: bool = True


def export(model: nn.Module, out: str | os.PathLike,
           config: ExportConfig = ExportConfig()) -> tuple[Path, ValidationReport | None]:
    """Write `model` as an ONNX file at `out` (atomically), then validate it against PyTorch.

    Args:
        model: a native model or layer, possibly wrapped by with_experts / with_selection; not changed.
        out: the .onnx path.
        config: see ExportConfig.

    Returns:
        (the .onnx path, the ValidationReport; None when config.validate is False).

    Raises:
        ExportError: the exporter failed, or (with raise_on_failure) validation failed. OutputError: `out`
            cannot be written.

    Example:
        >>> path, report = export(with_selection(model, "1/8"), "fast.onnx")
        >>> print(report.format())
        >>> export(model, "pixels.onnx", ExportConfig(preprocess=for_model(model)))  # uint8 [B, H, W, C] in
    """
    path = export_onnx(model, out, dynamic_batch=config.dynamic_batch, opset=config.opset, dynamo=config.dynamo,
                       embed_limit_bytes=config.embed_limit_bytes, with_choice=config.with_choice,
                       preprocess=config.preprocess, in_graph=config.in_graph)
    if not config.validate:
        return path, None
    report = validate_onnx(path, model, batch_sizes=config.batch_sizes, atol=config.atol, rtol=config.rtol,
                           check=config.raise_on_failure, preprocess=config.preprocess)
    return path, report
