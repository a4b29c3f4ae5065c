"""`moe-prune export`: a checkpoint file to an ONNX file, validated against PyTorch before it is published. The
checkpoint is loaded (optionally with Algorithm 1 or 2 inside the graph), exported by export.py, validated by
validate.py in a staging folder, and moved into place only when validation passes.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch
from torch import nn

from ..core.checkpoint import load
from ..core.files import check_output
from ..core.models import quantized_layers
from ..core.preprocess import Preprocess
from ..errors import ConfigError, ExportError
from ..selection.scores import with_selection
from .export import export_onnx, model_preprocess
from .validate import ValidationReport, validate_onnx


def export_checkpoint(
    checkpoint: str | os.PathLike,
    out: str | os.PathLike,
    *,
    keep: float | str | None = None,
    dynamic: bool = False,
    per: str = "batch",
    mode: str | None = None,
    opset: int = 18,
    dynamo: bool = False,
    atol: float = 1e-4,
    validate: bool = True,
    keep_invalid: bool = False,
    preprocess: bool = False,
    mean: tuple[float, ...] | None = None,
    std: tuple[float, ...] | None = None,
    interpolation: str | None = None,
    crop_pct: float | None = None,
    dtype: str = "fp32",
) -> tuple[Path, ValidationReport | None]:
    """Load a native checkpoint (full or compressed), export it to ONNX and validate it (`moe-prune export`).

    Args:
        checkpoint: a native .safetensors checkpoint.
        out: the .onnx file to write.
        keep: with `dynamic`, the experts kept in every layer, per batch or per input (count or fraction).
        dynamic: choose the experts inside the graph (needs `keep`).
        per: with `dynamic`, "batch" (Algorithm 2: one subset per batch) or "input" (Algorithm 1: each input
            its own subset, computed on its kept slots only; its answers do not depend on the rest of the batch).
        mode: "drop" (default) or "renorm", with `keep`.
        opset, dynamo: see `export_onnx`.
        atol: validation tolerance (rtol stays 1e-3).
        validate: run `validate_onnx` (without raising: the caller prints the report, then
            `report.raise_for_failure()`). The model is exported and validated in a hidden folder beside `out`
            and appears at `out` only when it passed (an old file there is kept otherwise).
        keep_invalid: put a model that failed validation at `out` anyway (for inspection; the report says so).
        preprocess: put the model's input preprocessing inside the graph (`moe-prune export --preprocess`): the
            input becomes uint8 pixels [B, H, W, C]. Without it the file still records the preprocessing.
        mean, std, interpolation, crop_pct: override the checkpoint's preprocessing (preprocess.for_model).
        dtype: "fp32" or "fp16": the graph's weights and float input (what a GPU without bf16 serves); it is
            validated against the PyTorch model in that dtype, with tolerances scaled to it (VALIDATION_TOLERANCE).
            A checkpoint with int8 experts (moe_prune.compression.quantize) exports as fp32 with integer matmuls, validated
            against torch with the same numerics at VALIDATION_TOLERANCE["int8"] (or --atol if looser).

    Returns:
        (the .onnx path, the ValidationReport or None).

    Raises:
        ExportError: keep without dynamic or the reverse, a negative atol, a failed export, preprocessing
            asked of a model that takes tokens, or int8 experts with dtype fp16. ConfigError: a bad mean, std,
            interpolation or crop_pct.
            CheckpointError: see `load`.
        SelectionError: a bad keep or mode. OutputError: `out` cannot be written safely.

    Example:
        >>> path, report = export_checkpoint("mnist-e128.safetensors", "fast.onnx", keep="1/8", dynamic=True)
        >>> print(report.format())
        >>> report.raise_for_failure()
        >>> export_checkpoint("vit.safetensors", "vit-pixels.onnx", preprocess=True)  # input uint8 [B, H, W, 3]
    """
    overrides = dict(mean=mean, std=std, interpolation=interpolation, crop_pct=crop_pct)
    check_export_options(keep=keep, dynamic=dynamic, per=per, mode=mode, atol=atol, **overrides)
    if dtype not in EXPORT_DTYPES:
        raise ExportError(f"--dtype {dtype!r}: choose {' or '.join(EXPORT_DTYPES)} (ONNX Runtime's CPU provider has "
                          "no bf16 MatMul)")
    out = check_output(out, inputs=(checkpoint,))
    model = load_for_export(checkpoint, keep=keep, dynamic=dynamic, per=per, mode=mode, dtype=EXPORT_DTYPES[dtype])
    atol, rtol = (atol, 1e-3) if dtype == "fp32" else VALIDATION_TOLERANCE[dtype]
    if quantized_layers(model):
        if dtype != "fp32":
            raise ExportError(f"{checkpoint}: its experts are int8; export it as --dtype fp32 (the integer matmuls "
                              "take fp32 activations and give fp32 results)")
        atol, rtol = max(atol, VALIDATION_TOLERANCE["int8"][0]), max(rtol, VALIDATION_TOLERANCE["int8"][1])
    pre = export_preprocess(model, checkpoint, preprocess, **overrides)
    options = dict(opset=opset, dynamo=dynamo, with_choice=dynamic, preprocess=pre, in_graph=preprocess)
    if not validate:
        return export_onnx(model, out, **options), None
    with tempfile.TemporaryDirectory(prefix=f".{out.name}.", suffix=".validating", dir=out.parent) as tmp:
        staged = export_onnx(model, Path(tmp) / out.name, **options)
        report = validate_onnx(staged, model, atol=atol, rtol=rtol, check=False, preprocess=pre)
        if report.passed or keep_invalid:
            for name in report.data_files:  # the data first: the new model is never visible without it
                os.replace(Path(tmp) / name, out.parent / name)
            os.replace(staged, out)
            report.outcome = "" if report.passed else f"; the failed model is kept at {out} (--keep-invalid)"
        else:
            report.outcome = f"; {out} was not written (--keep-invalid keeps a model that fails)"
    report.path = out
    return out, report


def check_export_options(*, keep=None, dynamic: bool = False, per: str = "batch", mode: str | None = None,
                         atol: float = 1e-4, mean=None, std=None, interpolation=None, crop_pct=None) -> None:
    """Refuse `moe-prune export` options that do not go together, before any work (both formats).

    Args:
        keep, dynamic, per, mode, atol, mean, std, interpolation, crop_pct: see `export_checkpoint`.

    Raises:
        ExportError: keep without dynamic or the reverse, mode without keep, a negative atol, an unknown per, or
            per="input" without dynamic. ConfigError: a mean or std of neither 1 nor 3 values, a std <= 0, an
            unknown interpolation, a crop_pct outside (0, 1].

    Example:
        >>> check_export_options(keep="1/8")  # ExportError: --dynamic and --keep go together ...
    """
    if dynamic != (keep is not None):
        raise ExportError(
            "--dynamic and --keep go together (Algorithm 2 keeps `keep` experts per batch); for a static subset, "
            "write a compressed checkpoint first and export that"
        )
    if mode is not None and keep is None:
        raise ExportError("--mode applies with --keep/--dynamic (a compressed checkpoint runs its held experts)")
    if not atol >= 0:  # also NaN; a negative tolerance fails every model after minutes of work
        raise ExportError(f"--atol {atol:g}: the validation tolerance must be 0 or more (default 1e-4)")
    if per not in ("batch", "input"):
        raise ExportError(f"per={per!r}: choose 'batch' (Algorithm 2) or 'input' (Algorithm 1)")
    if per != "batch" and not dynamic:
        raise ExportError("--per input applies with --keep and --dynamic (Algorithm 1 chooses each input's experts "
                          "inside the graph)")
    # The overrides' own checks (Preprocess's) on a stand-in of their channel count, before the checkpoint loads;
    # whether that count is the model's is known only then (preprocess.for_model says it).
    given = {k: v for k, v in dict(mean=mean, std=std, interpolation=interpolation, crop_pct=crop_pct).items()
             if v is not None}
    counts = {len(given[k]) for k in ("mean", "std") if k in given and not isinstance(given[k], (int, float))}
    if given:
        if not counts <= {1, 3}:
            raise ConfigError(f"--mean/--std: give 1 value (every channel) or 3 (R,G,B), got {sorted(counts)} values")
        Preprocess(size=1, channels=max(counts, default=1), **given)


def export_preprocess(model: nn.Module, checkpoint, in_graph: bool = False, **overrides) -> Preprocess | None:
    """The preprocessing `moe-prune export` records (and with `in_graph`, puts in the graph): the checkpoint's own
    (preprocess.for_model), with the user's overrides.

    Args:
        model: the loaded model (load_for_export). checkpoint: its file, for messages.
        in_graph: --preprocess was given.
        overrides: mean, std, interpolation, crop_pct (None: the checkpoint's).

    Returns:
        A Preprocess, or None for a model that takes tokens (and no preprocessing was asked for).

    Raises:
        ExportError: --preprocess or an override for a model that takes tokens. ConfigError: an override that does
            not fit the model (e.g. 3 means for a one-channel model).

    Example:
        >>> export_preprocess(load_for_export("vit.safetensors"), "vit.safetensors", True, mean=(0.5,)).describe()
    """
    given = sorted(k for k, v in overrides.items() if v is not None)
    pre = model_preprocess(model, **overrides)
    if pre is None and (in_graph or given):
        flags = ["--preprocess"] * in_graph + [f"--{k.replace('_', '-')}" for k in given]
        raise ExportError(f"{checkpoint}: {', '.join(flags)} apply to image models; this model takes tokens "
                          "(export it without them)")
    return pre


# The graph dtypes `export` writes, and the validation tolerance (atol, rtol) of each 16-bit one: a 16-bit model
# against PyTorch in the same dtype differs by a few of its ulps (fp16: 2**-11 relative) in every op, and a
# classifier's logits pass through a dozen of them.
EXPORT_DTYPES = {"fp32": torch.float32, "fp16": torch.float16}


# int8 experts: ONNX Runtime against torch with the same numerics (quantize.graph_numerics), where the integer
# matmuls agree exactly and only the float ops around them differ in their last bit; rarely that moves an
# activation across a rounding boundary and it becomes the next int8 step. Measured (benchmarks/quantize_int8.py):
# max abs error on the logits 7e-6 (the bundled model) and 4e-5 (a trained ViT, one such step), against 1e-6 to
# 2e-5 for the fp32 exports of the same models; atol 1e-3 leaves room for a few steps and still fails a wrong
# scale or a transposed weight, which moves the logits by whole units.
VALIDATION_TOLERANCE = {"fp16": (2e-2, 2e-2), "int8": (1e-3, 1e-3)}


def load_for_export(checkpoint: str | os.PathLike, *, keep=None, dynamic: bool = False, per: str = "batch",
                    mode: str | None = None, dtype: torch.dtype = torch.float32) -> nn.Module:
    """The model `moe-prune export` writes: the checkpoint as it loads (full or compressed), with Algorithm 2
    (per batch) or 1 (per input) in the graph when `dynamic`.

    Args:
        checkpoint, keep, dynamic, per, mode: see `export_checkpoint` (checked by `check_export_options`).

    Returns:
        The model to export.

    Raises:
        CheckpointError: see `load`. SelectionError: a bad keep or mode.

    Example:
        >>> fast = load_for_export("mnist-e128.safetensors", keep="1/8", dynamic=True, per="input")
    """
    model = load(checkpoint, dtype=dtype)  # the graph's dtype, whatever the file holds
    if dynamic:
        model = with_selection(model, keep, per=per, mode=mode or "drop")
    return model
