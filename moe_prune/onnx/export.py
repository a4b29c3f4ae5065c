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
    a compressed checkpoint's model    its layers run the experts they hold (SoftMoEConfig.held)

`export_onnx(..., with_choice=True)` adds one output per pruned layer, "experts.<layer name>": the router ids the
graph chose (int64 [k]); `validate_onnx` compares them with PyTorch's choice on the same batch.

`export_onnx(..., preprocess=Preprocess(...))` puts the model's input preprocessing into the graph
(`with_preprocess`): the input is then uint8 pixels [B, H, W, C] at the model's input size, and the graph does
/ 255, NHWC -> NCHW and (x - mean) / std before the model; resizing and cropping images of other sizes stays
outside (serve.Predictor does it with Pillow). Every image model's file records its preprocessing, in the graph or
not, in its metadata_props (onnx_files.set_preprocess), so a consumer without torch knows what to feed it.

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

from ..errors import ExportError, first_line
from ..core.files import check_output
from ..core.layers import SoftMoE
from ..core.models import MnistSoftMoE, SoftMoEViT
from .files import EMBED_LIMIT_BYTES, MAX_EMBED_LIMIT_BYTES, set_preprocess, strip_debug_info, write_onnx
from ..core.preprocess import Preprocess, for_model
from ..core.models import quantized_layers
from ..selection.scores import PrunedSoftMoE, pruned_layers, recorded_choices

if TYPE_CHECKING:
    import onnx

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
    preprocess: Preprocess | None = None,
    in_graph: bool = True,
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
            [2, 16, D] for a bare layer (its token count M is fixed by the example); with the preprocessing in
            the graph, random uint8 pixels [2, H, W, C].
        dynamic_batch: make the batch axis dynamic ("batch"); else it is fixed to the example's.
        opset: the ONNX opset (17 or newer: LayerNormalization).
        dynamo: True for torch.export's exporter (needs onnxscript), False for the TorchScript one.
        embed_limit_bytes: weights up to this size are embedded in the .onnx file; above it they go to
            NAME.onnx.data. At most 2 GiB - 64 MiB (the protobuf limit, with room for the graph).
        with_choice: add an int64 output "experts.<layer name>" ("experts" for a bare layer) per pruned layer
            with the router ids of the experts it ran.
        preprocess: the model's input preprocessing (see preprocess.for_model). With `in_graph` (the default) it
            goes inside the graph: the input becomes uint8 pixels [B, H, W, C] at the model's input size, and the
            graph does / 255, NHWC -> NCHW and (x - mean) / std (see `with_preprocess`). Either way it is
            recorded in the file's metadata ("moe_prune.preprocess"). None: the input stays float [B, C, H, W]
            and the file records preprocess.for_model(model), the checkpoint's own (an image model only).
        in_graph: False records `preprocess` without putting it in the graph (the caller normalizes).

    Returns:
        The path of the .onnx file.

    Raises:
        ExportError: the exporter failed, an unsupported model or option (int8 experts with dynamo=True),
            with_choice on a model with no pruned layer, or a preprocess for another input size or channel count
            than the model's, or for a model that takes tokens. OutputError: `out` cannot be written safely
            (nothing is changed then).

    Example:
        >>> fast = with_selection(model, "1/8", per="batch")
        >>> export_onnx(fast, "mnist-alg2.onnx")
        >>> validate_onnx("mnist-alg2.onnx", fast).passed
    """
    out = check_output(out)
    if dynamo and quantized_layers(model):
        raise ExportError(f"{out}: int8 experts export with the TorchScript exporter only (dynamo=False, --exporter "
                          "torchscript): their integer matmul is written by its ONNX symbolic")
    if not 17 <= opset <= 23:
        raise ExportError(f"{out}: opset {opset} is not supported; choose 17..23 (LayerNormalization needs 17)")
    if not 0 <= embed_limit_bytes <= MAX_EMBED_LIMIT_BYTES:
        raise ExportError(
            f"{out}: embed_limit_bytes={embed_limit_bytes} must be in [0, {MAX_EMBED_LIMIT_BYTES}] "
            "(one protobuf message holds at most 2 GiB)"
        )
    pixels = preprocess is not None and in_graph
    if preprocess is None:
        preprocess = model_preprocess(model)  # recorded only: the input stays float [B, C, H, W]
    else:
        check_preprocess(model, preprocess, out)
    if example is None:
        example = example_pixels(preprocess, 2) if pixels else example_input(model, 2)
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
        if pixels:
            graph = with_preprocess(graph, preprocess)
        if dynamo:
            proto = _export_dynamo(graph, example, out, opset, dynamic_batch, output_names)
        else:
            axes = {name: {0: "batch"} for name in batched} if dynamic_batch else None
            proto = _export_torchscript(graph, example, Path(tmp) / "model.onnx", opset, axes, output_names, out)
    _int8_weights_as_cast(proto)
    strip_debug_info(proto)
    if preprocess is not None:
        set_preprocess(proto, preprocess, in_graph=pixels)
    write_onnx(proto, out, embed_limit_bytes)
    return out


class Preprocessed(nn.Module):
    """A model behind its input normalization: uint8 pixels [B, H, W, C] -> the model's float [B, C, H, W].

    The graph computes what `Preprocess.normalize` computes, in the same order (/ 255, - mean, / std, in float32),
    so that ONNX Runtime on pixels and PyTorch on normalize(pixels) agree to rounding; validate_onnx checks it.
    Resizing and cropping are not here: they need the image's own size, which a batch of one shape has lost.
    """

    def __init__(self, model: nn.Module, preprocess: Preprocess):
        super().__init__()
        self.model = model
        self.preprocess = preprocess
        param = next(model.parameters(), None)
        device = param.device if param is not None else None
        self.dtype = param.dtype if param is not None else torch.float32
        c = preprocess.channels
        # Not persistent: the state dict stays the model's own; the exporter folds them into constants anyway.
        self.register_buffer("mean", torch.tensor(preprocess.mean, dtype=torch.float32, device=device).view(1, c, 1, 1),
                             persistent=False)
        self.register_buffer("std", torch.tensor(preprocess.std, dtype=torch.float32, device=device).view(1, c, 1, 1),
                             persistent=False)

    def forward(self, pixels):  # uint8 [B, H, W, C]
        x = pixels.permute(0, 3, 1, 2).to(torch.float32) / 255.0  # [B, C, H, W] in [0, 1]
        x = (x - self.mean) / self.std  # [B, C, H, W]
        return self.model(x.to(self.dtype))


def with_preprocess(model: nn.Module, preprocess: Preprocess) -> nn.Module:
    """`model` taking uint8 pixels [B, H, W, C]: / 255, NHWC -> NCHW and (x - mean) / std first.

    Args:
        model: an image model (possibly wrapped by with_experts / with_selection); not changed.
        preprocess: its preprocessing (only channels, mean and std are used here).

    Returns:
        A module whose forward takes uint8 [B, H, W, C] at the model's input size.

    Example:
        >>> p = preprocess.for_model(model)
        >>> logits = with_preprocess(model, p)(torch.from_numpy(p.pixels(PIL.Image.open("cat.jpg")))[None])
    """
    return Preprocessed(model, preprocess)


def model_preprocess(model: nn.Module, **overrides) -> Preprocess | None:
    """preprocess.for_model for a moe-prune image model (with_experts / with_selection wrappers included), with
    `overrides` (interpolation, crop_pct, mean, std); None for a bare layer or a model that is not moe-prune's.

    Example:
        >>> model_preprocess(load("vit.safetensors"), mean=(0.485, 0.456, 0.406)).describe()
    """
    native = model.layer if isinstance(model, PrunedSoftMoE) else model
    if not isinstance(native, (MnistSoftMoE, SoftMoEViT)):
        return None
    return for_model(model, **overrides)


def check_preprocess(model: nn.Module, preprocess: Preprocess, out) -> None:
    """Refuse a preprocessing whose input size or channels are not the model's (before any export work)."""
    if not isinstance(preprocess, Preprocess):
        raise ExportError(f"{out}: preprocess must be a moe_prune.preprocess.Preprocess, got "
                          f"{type(preprocess).__name__}")
    native = model.layer if isinstance(model, PrunedSoftMoE) else model
    if not isinstance(native, (MnistSoftMoE, SoftMoEViT)):
        raise ExportError(f"{out}: preprocessing applies to image models; {type(native).__name__} takes tokens "
                          "(export it without --preprocess)")
    want = tuple(example_input(model, 1).shape[1:])  # (C, H, W)
    got = (preprocess.channels, *preprocess.size)
    if got != want:
        raise ExportError(f"{out}: the preprocessing gives {list(got)} inputs, the model takes {list(want)}; use "
                          "preprocess.for_model(model) (the checkpoint's own) with your overrides")


def example_pixels(preprocess: Preprocess, batch_size: int = 2,
                   generator: torch.Generator | None = None) -> torch.Tensor:
    """Random uint8 pixels [B, H, W, C] at a preprocessing's input size (the input of a `with_preprocess` model)."""
    return torch.randint(0, 256, (batch_size, *preprocess.size, preprocess.channels), generator=generator,
                         dtype=torch.uint8)


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


def _int8_weights_as_cast(proto: onnx.ModelProto) -> None:
    """The placeholders of int8 weights converted to float (experts._Int8Weight) become ONNX Casts, in place: the
    exporter has not folded them into float initializers, and ONNX Runtime folds them when it loads the file."""
    from ..core.mlp import INT8_WEIGHT_OP

    domain, op_type = INT8_WEIGHT_OP
    for node in proto.graph.node:
        if node.domain == domain and node.op_type == op_type:  # its `to` attribute is the Cast's
            node.domain, node.op_type = "", "Cast"
    if any(o.domain == domain for o in proto.opset_import):
        keep = [o for o in proto.opset_import if o.domain != domain]
        del proto.opset_import[:]
        proto.opset_import.extend(keep)


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
