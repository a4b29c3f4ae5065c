"""ONNX export of Soft MoE models, and of a native checkpoint as `moe-prune export` does it (export, validate, place).

What can be exported (each takes one tensor named "input" and returns "output"; the batch axis is dynamic):

    MnistSoftMoE / SoftMoEViT          images [B, C, H, W] -> logits [B, classes]
    SoftMoE (a bare layer)             tokens [B, M, D]    -> tokens [B, M, D_out]   (M fixed by the example)
    with_experts(model, {name: ids})   a static subset: only the kept experts' weights are in the file
    with_selection(model, keep)        Chung et al.'s Algorithm 2 inside the graph, per batch:
                                       scores -> ReduceSum over B -> TopK -> Gather of the kept experts' weights,
                                       so only k experts are computed, whatever the batch
    with_selection(model, keep,        Algorithm 1 inside the graph, per input: scores -> TopK per input ->
                   per="input")        GatherElements of the kept slots' weights -> the B*K slot groups through
                                       their experts (small experts: weights gathered per group; large ones: the
                                       groups scattered into a [E, C, ...] batch padded to the busiest expert,
                                       one batched MatMul over the stack), so B*K expert evaluations
    a compressed checkpoint's model    its layers run the experts they hold (SoftMoEConfig.present)

`export_onnx(..., with_choice=True)` adds one output per pruned layer, "experts.<layer name>": the router ids the
graph chose (int64 [k]); `validate_onnx` compares them with PyTorch's choice on the same batch.

Files (one self-contained .onnx, or NAME.onnx + NAME.onnx.data for a large model) are written by
`onnx_files.write_onnx`; `validate.validate_onnx` checks them against PyTorch.
"""

from __future__ import annotations

import contextlib
import io
import os
import tempfile
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from .checkpoint import load
from .errors import ExportError, first_line
from .files import check_output
from .layers import SoftMoE
from .models import MnistSoftMoE, SoftMoEViT
from .onnx_files import EMBED_LIMIT_BYTES, MAX_EMBED_LIMIT_BYTES, strip_debug_info, write_onnx
from .selection import PrunedSoftMoE, pruned_layers, recorded_choices, with_selection

if TYPE_CHECKING:
    import onnx
    from .validate import ValidationReport

# The token count of a bare layer's default example (a layer has no natural M; pass `example` to choose).
DEFAULT_TOKENS = 16


# -- export --------------------------------------------------------------------------------------------------


def export_onnx(
    model: nn.Module,
    out: str | os.PathLike,
    *,
    example: torch.Tensor | None = None,
    dynamic_batch: bool = True,
    opset: int = 18,
    dynamo: bool = False,
    embed_limit_bytes: int = EMBED_LIMIT_BYTES,
    with_choice: bool = False,
) -> Path:
    """Export a Soft MoE model (full, a static expert subset, or Algorithm 2 per batch) to ONNX.

    The exporter: `dynamo=False` (the TorchScript exporter) is the default. Both exporters give the same
    numbers and, once ONNX Runtime has optimized the graph, the same kernels and latency (MatMul, no Einsum).
    The TorchScript exporter is chosen because (1) its constant folding gathers a static subset's weights at export time, so the file
    holds only the kept experts (a 4-of-16 MNIST model: 0.36 MB against 1.3 MB); (2) it exports in a fraction
    of a second instead of seconds. It is deprecated in torch >= 2.9; `dynamo=True` is supported and tested
    for the models it can trace, and becomes the default when the TorchScript exporter is removed.

    Args:
        model: MnistSoftMoE, SoftMoEViT, a SoftMoE layer, or one of them wrapped by `with_experts` /
            `with_selection` (per="batch" puts Algorithm 2 in the graph). It is run in eval mode.
        out: the .onnx file to write (atomically; NAME.onnx.data beside it for a large model).
        example: an input to trace with; default: random images [2, C, H, W] in [0, 1], or tokens
            [2, 16, D] for a bare layer (its token count M is fixed by the example).
        dynamic_batch: make the batch axis dynamic ("batch"); else it is fixed to the example's.
        opset: the ONNX opset (17 or newer: LayerNormalization).
        dynamo: True for torch.export's exporter (needs onnxscript), False for the TorchScript one.
        embed_limit_bytes: weights up to this size are embedded in the .onnx file; above it they go to
            NAME.onnx.data. At most 2 GiB - 64 MiB (the protobuf limit, with room for the graph).
        with_choice: add an int64 output "experts.<layer name>" ("experts" for a bare layer) per pruned layer
            with the router ids of the experts it ran.

    Returns:
        The path of the .onnx file.

    Raises:
        ExportError: the exporter failed, an unsupported model or option, or with_choice on a model with no
            pruned layer. OutputError: `out` cannot be written safely (nothing is changed then).

    Example:
        >>> fast = with_selection(model, "1/8", per="batch")
        >>> export_onnx(fast, "mnist-alg2.onnx")
        >>> validate_onnx("mnist-alg2.onnx", fast).passed
    """
    out = check_output(out)
    if not 17 <= opset <= 23:
        raise ExportError(f"{out}: opset {opset} is not supported; choose 17..23 (LayerNormalization needs 17)")
    if not 0 <= embed_limit_bytes <= MAX_EMBED_LIMIT_BYTES:
        raise ExportError(
            f"{out}: embed_limit_bytes={embed_limit_bytes} must be in [0, {MAX_EMBED_LIMIT_BYTES}] "
            "(one protobuf message holds at most 2 GiB)"
        )
    if example is None:
        example = example_input(model, 2)
    choices = pruned_layers(model) if with_choice else {}
    if with_choice and not choices:
        raise ExportError(
            f"{out}: with_choice needs a model wrapped by with_selection or with_experts (it has no pruned layer)"
        )
    output_names = ["output"] + [choice_output(name) for name in choices]
    # Algorithm 1 (per input) chooses [B, k] ids, so its choice outputs have a batch axis; the others are [k].
    batched = ["input", "output"] + [choice_output(n) for n, m in choices.items() if m.per == "input" and m.k]
    with eval_mode(model), tempfile.TemporaryDirectory(
        prefix=f".{out.name}.", suffix=".export", dir=out.parent
    ) as tmp:
        graph = _ChoiceOutputs(model).eval() if choices else model
        if dynamo:
            proto = _export_dynamo(graph, example, out, opset, dynamic_batch, output_names)
        else:
            axes = {name: {0: "batch"} for name in batched} if dynamic_batch else None
            proto = _export_torchscript(graph, example, Path(tmp) / "model.onnx", opset, axes, output_names, out)
    strip_debug_info(proto)
    write_onnx(proto, out, embed_limit_bytes)
    return out


def example_input(model: nn.Module, batch_size: int = 2, generator: torch.Generator | None = None) -> torch.Tensor:
    """A random input for a moe-prune model: images in [0, 1] [B, C, H, W], or tokens N(0, 1) [B, 16, D].

    Args:
        model: a native model or layer, possibly wrapped by with_experts / with_selection.
        batch_size: B.
        generator: the random generator (None: the global one).

    Returns:
        A float tensor on the model's device, in its dtype.

    Raises:
        ExportError: not a moe-prune model (pass `example` to `export_onnx` yourself).

    Example:
        >>> x = example_input(MnistSoftMoE(MnistConfig(num_experts=8)), 4)
        >>> x.shape
        torch.Size([4, 1, 28, 28])
    """
    native = model.layer if isinstance(model, PrunedSoftMoE) else model
    if isinstance(native, MnistSoftMoE):
        c = native.config
        rest = (c.in_chans, c.img_size, c.img_size)
    elif isinstance(native, SoftMoEViT):
        c = native.config
        rest = (c.in_chans, *((c.img_size, c.img_size) if isinstance(c.img_size, int) else c.img_size))
    elif isinstance(native, SoftMoE):
        rest = (DEFAULT_TOKENS, native.config.dim)
    else:
        raise ExportError(
            f"{type(model).__name__} is not a moe-prune model (MnistSoftMoE, SoftMoEViT, SoftMoE); "
            "pass an example input"
        )
    return random_input(model, (batch_size, *rest), generator)


def random_input(model: nn.Module, shape: tuple[int, ...], generator: torch.Generator | None) -> torch.Tensor:
    """Random input of `shape` for `model`: images uniform in [0, 1], tokens N(0, 1); its dtype and device."""
    native = model.layer if isinstance(model, PrunedSoftMoE) else model
    images = isinstance(native, (MnistSoftMoE, SoftMoEViT))
    x = torch.rand(shape, generator=generator) if images else torch.randn(shape, generator=generator)
    param = next(model.parameters(), None)
    return x if param is None else x.to(device=param.device, dtype=param.dtype)


@contextlib.contextmanager
def eval_mode(model: nn.Module):
    """Run in eval mode, then give every submodule back its own training flag."""
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, flag in flags:
            m.training = flag


def choice_output(name: str) -> str:
    """The graph output holding a pruned layer's expert choice: "experts.<layer name>" ("experts" for a bare layer)."""
    return f"experts.{name}" if name else "experts"


class _ChoiceOutputs(nn.Module):
    """The model, returning (output, experts of each pruned layer) so the graph exposes its expert choice.

    The hooks live only during one call and record into a local dict: no tensor is ever stored on a module
    (torch.export would warn about unregistered tensor attributes)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x):
        layers = pruned_layers(self.model)
        with recorded_choices(layers) as seen:
            y = self.model(x)
        return (y, *(seen[name] for name in layers))


def _export_torchscript(model, example, path: Path, opset, axes, output_names, out) -> onnx.ModelProto:
    import onnx

    with warnings.catch_warnings():
        # The legacy-exporter deprecation notice, and tracer warnings about shape checks on static axes
        # (`x.shape[-1] != dim`): the graph is correct for every batch, validation shows it.
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", FutureWarning)
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        try:
            torch.onnx.export(
                model, (example,), str(path), dynamo=False, opset_version=opset, input_names=["input"],
                output_names=output_names, dynamic_axes=axes, do_constant_folding=True,
            )
        except Exception as e:  # the exporter raises many types; report one line with the fix
            raise ExportError(f"{out}: the TorchScript ONNX exporter failed: {first_line(e)}") from e
    return onnx.load(str(path), load_external_data=True)


def _export_dynamo(model, example, out, opset, dynamic_batch, output_names) -> onnx.ModelProto:
    try:
        import onnxscript  # noqa: F401  (the dynamo exporter translates with it)
    except ImportError:
        raise ExportError(f"{out}: the dynamo exporter needs onnxscript: pip install onnxscript") from None
    shapes = ({0: torch.export.Dim("batch")},) if dynamic_batch else None
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore", FutureWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        try:
            program = torch.onnx.export(
                model, (example,), dynamo=True, opset_version=opset, input_names=["input"],
                output_names=output_names, dynamic_shapes=shapes, verbose=False, optimize=True,
            )
        except Exception as e:
            raise ExportError(
                f"{out}: the dynamo (torch.export) ONNX exporter failed: {first_line(e)}; the TorchScript "
                "exporter (dynamo=False, --exporter torchscript) handles more models"
            ) from e
    return program.model_proto


# -- from a checkpoint (the CLI) -----------------------------------------------------------------------------


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

    Returns:
        (the .onnx path, the ValidationReport or None).

    Raises:
        ExportError: keep without dynamic or the reverse, a negative atol, or a failed export.
            CheckpointError: see `load`.
        SelectionError: a bad keep or mode. OutputError: `out` cannot be written safely.

    Example:
        >>> path, report = export_checkpoint("mnist-e128.safetensors", "fast.onnx", keep="1/8", dynamic=True)
        >>> print(report.format())
        >>> report.raise_for_failure()
    """
    from .validate import validate_onnx  # here: validate.py imports this module's helpers

    check_export_options(keep=keep, dynamic=dynamic, per=per, mode=mode, atol=atol)
    out = check_output(out, inputs=(checkpoint,))
    model = load_for_export(checkpoint, keep=keep, dynamic=dynamic, per=per, mode=mode)
    if not validate:
        return export_onnx(model, out, opset=opset, dynamo=dynamo, with_choice=dynamic), None
    with tempfile.TemporaryDirectory(prefix=f".{out.name}.", suffix=".validating", dir=out.parent) as tmp:
        staged = export_onnx(model, Path(tmp) / out.name, opset=opset, dynamo=dynamo, with_choice=dynamic)
        report = validate_onnx(staged, model, atol=atol, check=False)
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
                         atol: float = 1e-4) -> None:
    """Refuse `moe-prune export` options that do not go together, before any work (both formats).

    Args:
        keep, dynamic, per, mode, atol: see `export_checkpoint`.

    Raises:
        ExportError: keep without dynamic or the reverse, mode without keep, a negative atol, an unknown per, or
            per="input" without dynamic.

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


def load_for_export(checkpoint: str | os.PathLike, *, keep=None, dynamic: bool = False, per: str = "batch",
                    mode: str | None = None) -> nn.Module:
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
    model = load(checkpoint, dtype=torch.float32)  # ONNX models are float32, whatever the file holds
    if dynamic:
        model = with_selection(model, keep, per=per, mode=mode or "drop")
    return model
