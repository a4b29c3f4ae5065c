"""ONNX export of Soft MoE models, and validation of the exported graph against PyTorch.

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

Files: a model whose weights are below `embed_limit_bytes` is one self-contained file. A larger one is NAME.onnx
plus NAME.onnx.data beside it (the protobuf format cannot hold more than 2 GiB); the model records the data file
by its bare name, so the two travel together. Both are written completely to temporary files in the destination
folder, then renamed into place, the data file first: the new model is never visible without its data (only in
the instant between the two renames can an old model meet the new data file).
"""

from __future__ import annotations

import contextlib
import io
import math
import os
import tempfile
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

from .errors import ExportError
from .files import atomic_output, check_output
from .layers import SoftMoE
from .models import MnistSoftMoE, SoftMoEViT
from .selection import PrunedSoftMoE

if TYPE_CHECKING:
    import onnx

# Below this many bytes of weights the model is embedded in one .onnx file. The protobuf limit is 2 GiB for the
# whole message; the headroom is for the graph itself.
EMBED_LIMIT_BYTES = 1_500_000_000
_PROTOBUF_LIMIT = 2**31 - 1
_GRAPH_HEADROOM = 64 << 20
# Tensors smaller than this stay inside the .onnx file even when the weights go to NAME.onnx.data (onnx's own
# default threshold); larger ones are aligned so ONNX Runtime can memory-map them.
_EXTERNAL_MIN_BYTES = 1024
_EXTERNAL_ALIGN = 4096
# The token count of a bare layer's default example (a layer has no natural M; pass `example` to choose).
_DEFAULT_TOKENS = 16


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
    if not 0 <= embed_limit_bytes <= _PROTOBUF_LIMIT - _GRAPH_HEADROOM:
        raise ExportError(
            f"{out}: embed_limit_bytes={embed_limit_bytes} must be in [0, {_PROTOBUF_LIMIT - _GRAPH_HEADROOM}] "
            "(one protobuf message holds at most 2 GiB)"
        )
    if example is None:
        example = example_input(model, 2)
    choices = _choice_layers(model) if with_choice else {}
    if with_choice and not choices:
        raise ExportError(
            f"{out}: with_choice needs a model wrapped by with_selection or with_experts (it has no pruned layer)"
        )
    output_names = ["output"] + [_choice_output(name) for name in choices]
    # Algorithm 1 (per input) chooses [B, k] ids, so its choice outputs have a batch axis; the others are [k].
    batched = ["input", "output"] + [_choice_output(n) for n, m in choices.items() if m.per == "input" and m.k]
    with _eval_mode(model), tempfile.TemporaryDirectory(
        prefix=f".{out.name}.", suffix=".export", dir=out.parent
    ) as tmp:
        graph = _ChoiceOutputs(model).eval() if choices else model
        if dynamo:
            proto = _export_dynamo(graph, example, out, opset, dynamic_batch, output_names)
        else:
            axes = {name: {0: "batch"} for name in batched} if dynamic_batch else None
            proto = _export_torchscript(graph, example, Path(tmp) / "model.onnx", opset, axes, output_names, out)
    _strip_debug_info(proto)
    _write(proto, out, embed_limit_bytes)
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
        rest = (_DEFAULT_TOKENS, native.config.dim)
    else:
        raise ExportError(
            f"{type(model).__name__} is not a moe-prune model (MnistSoftMoE, SoftMoEViT, SoftMoE); "
            "pass an example input"
        )
    return _random_input(model, (batch_size, *rest), generator)


def _random_input(model: nn.Module, shape: tuple[int, ...], generator: torch.Generator | None) -> torch.Tensor:
    """Random input of `shape` for `model`: images uniform in [0, 1], tokens N(0, 1); its dtype and device."""
    native = model.layer if isinstance(model, PrunedSoftMoE) else model
    images = isinstance(native, (MnistSoftMoE, SoftMoEViT))
    x = torch.rand(shape, generator=generator) if images else torch.randn(shape, generator=generator)
    param = next(model.parameters(), None)
    return x if param is None else x.to(device=param.device, dtype=param.dtype)


@contextlib.contextmanager
def _eval_mode(model: nn.Module):
    """Run in eval mode, then give every submodule back its own training flag."""
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, flag in flags:
            m.training = flag


def _choice_layers(model: nn.Module) -> dict[str, PrunedSoftMoE]:
    """The pruned layers by module name; each calls its inner SoftMoE with the chosen experts as a keyword."""
    return {name: m for name, m in model.named_modules() if isinstance(m, PrunedSoftMoE)}


def _choice_output(name: str) -> str:
    return f"experts.{name}" if name else "experts"


@contextlib.contextmanager
def _recording(layers: dict[str, PrunedSoftMoE]):
    """Record the experts each pruned layer runs (the output of its `choice` identity), by layer name."""
    seen: dict[str, torch.Tensor] = {}

    def hook(name):
        def fn(module, args, output):
            seen[name] = output
        return fn

    handles = [m.choice.register_forward_hook(hook(name)) for name, m in layers.items()]
    try:
        yield seen
    finally:
        for h in handles:
            h.remove()


class _ChoiceOutputs(nn.Module):
    """The model, returning (output, experts of each pruned layer) so the graph exposes its expert choice.

    The hooks live only during one call and record into a local dict: no tensor is ever stored on a module
    (torch.export would warn about unregistered tensor attributes)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x):
        layers = _choice_layers(self.model)
        with _recording(layers) as seen:
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
            raise ExportError(f"{out}: the TorchScript ONNX exporter failed: {_first_line(e)}") from e
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
                f"{out}: the dynamo (torch.export) ONNX exporter failed: {_first_line(e)}; the TorchScript "
                "exporter (dynamo=False, --exporter torchscript) handles more models"
            ) from e
    return program.model_proto


def _first_line(e: BaseException) -> str:
    """The root cause of an exporter error in one line (torch.export wraps it in pages of advice)."""
    while e.__cause__ is not None:
        e = e.__cause__
    line = next((ln.strip() for ln in str(e).splitlines() if ln.strip()), "")
    text = f"{type(e).__name__}: {line[:300]}" if line else type(e).__name__
    if "data-dependent" in line:
        text += " (the model branches in Python on a tensor value)"
    return text


# -- writing -------------------------------------------------------------------------------------------------


def _graphs(proto):
    """Every graph of a model: the main graph and the subgraphs in node attributes, recursively."""
    stack = [proto.graph]
    while stack:
        g = stack.pop()
        yield g
        for node in g.node:
            for a in node.attribute:
                stack.extend([a.g] if a.HasField("g") else [])
                stack.extend(a.graphs)


def _nodes(proto):
    """Every node of a model: in all its graphs and in its local functions (whose subgraphs are rare enough)."""
    for g in _graphs(proto):
        yield from g.node
    for fn in proto.functions:
        yield from fn.node


def _tensors(proto) -> list:
    """Every TensorProto of a model: initializers, sparse initializers, and Constant/attribute tensors, also in
    subgraphs and local functions."""
    found = []
    for g in _graphs(proto):
        found.extend(g.initializer)
        for sparse in g.sparse_initializer:
            found.extend((sparse.values, sparse.indices))
    for node in _nodes(proto):
        for a in node.attribute:
            if a.HasField("t"):
                found.append(a.t)
            found.extend(a.tensors)
    return found


def _strip_debug_info(proto) -> None:
    """Drop per-node debug records: the dynamo exporter stores Python stack traces there, with this checkout's
    absolute paths and FX codegen counters (`<eval_with_key>.80`) that change from one export to the next; without
    them two exports of one model are byte-identical."""
    for node in _nodes(proto):
        node.ClearField("doc_string")
        del node.metadata_props[:]


def _write(proto, out: Path, embed_limit_bytes: int) -> None:
    """Write `proto` as one file, or as out + out.data when its weights exceed the limit; atomically."""
    weights = sum(len(t.raw_data) for t in _tensors(proto))
    if weights <= embed_limit_bytes:
        with atomic_output(out, suffix=".onnx") as tmp:
            tmp.write_bytes(proto.SerializeToString())
        return
    data = out.with_name(out.name + ".data")
    # Nested: both temporary files are complete before either rename; the inner (data) rename runs first.
    with atomic_output(out, suffix=".onnx") as tmp_model, atomic_output(data, suffix=".data") as tmp_data:
        _externalize(proto, tmp_data, data.name)
        tmp_model.write_bytes(proto.SerializeToString())


def _externalize(proto, data_path: Path, location: str) -> None:
    """Move every tensor of >= 1 KiB into `data_path`, recording the bare file name `location`."""
    from onnx import TensorProto

    offset = 0
    with open(data_path, "wb") as f:
        for t in _tensors(proto):
            if len(t.raw_data) < _EXTERNAL_MIN_BYTES:
                continue
            pad = -offset % _EXTERNAL_ALIGN
            f.write(b"\0" * pad)
            offset += pad
            f.write(t.raw_data)
            length = len(t.raw_data)
            del t.external_data[:]
            for key, value in (("location", location), ("offset", str(offset)), ("length", str(length))):
                entry = t.external_data.add()
                entry.key, entry.value = key, value
            t.data_location = TensorProto.EXTERNAL
            t.ClearField("raw_data")
            offset += length


# -- checks --------------------------------------------------------------------------------------------------


def check_external_data(path: str | os.PathLike) -> list[str]:
    """Refuse an ONNX model whose external data lies outside its folder; list the data files it uses.

    Reads only the model's protobuf (no tensor data), so it is safe on files from anywhere.

    Args:
        path: an .onnx file.

    Returns:
        The external data files it names, relative to its folder (empty for a self-contained model).

    Raises:
        ExportError: the file is missing or not an ONNX model; an external-data location is absolute, goes
            up with '..', or resolves (through a link) outside the model's folder; or a data file is missing.

    Example:
        >>> check_external_data("model.onnx")
        ['model.onnx.data']
        >>> check_external_data("evil.onnx")  # location "../../etc/passwd" -> ExportError
    """
    import onnx

    p = Path(path)
    if not p.is_file():
        raise ExportError(f"{p}: no such file" if not p.exists() else f"{p}: is not a file; give the .onnx file")
    try:
        proto = onnx.load(str(p), load_external_data=False)
    except Exception as e:
        raise ExportError(f"{p}: not an ONNX model (it does not parse as an ONNX protobuf: {_first_line(e)})") from e
    if not proto.HasField("graph") or not proto.opset_import or proto.ir_version <= 0:
        raise ExportError(f"{p}: not an ONNX model (no graph, opset or IR version in it)")
    folder = p.resolve().parent
    files = []
    for t in _tensors(proto):
        if t.data_location != onnx.TensorProto.EXTERNAL:
            continue
        entries = {e.key: e.value for e in t.external_data}
        loc = entries.get("location", "")
        where = f"{p}: tensor {t.name!r} keeps its data in {loc!r}"
        parts = loc.replace("\\", "/").split("/")
        drive = len(loc) > 1 and loc[1] == ":" and loc[0].isalpha()  # C:\\... or C:..., absolute on Windows
        if not loc or os.path.isabs(loc) or loc.startswith(("/", "\\")) or drive or ".." in parts:
            raise ExportError(f"{where}, outside the model's folder; refusing to load it (re-export the model, "
                              "or move the data beside it and record its bare file name)")
        target = (folder / loc).resolve()
        if folder not in target.parents:
            raise ExportError(f"{where}, which resolves outside the model's folder ({target}); refusing to load it")
        if not target.is_file():
            raise ExportError(f"{where}, which is missing; copy {loc} beside the model (they travel together)")
        if loc not in files:
            files.append(loc)
    return files


def op_histogram(path_or_proto) -> dict[str, int]:
    """Count the operators of an ONNX graph (subgraphs and local functions included), most frequent first.

    Example:
        >>> op_histogram("model.onnx")
        {'MatMul': 6, 'Softmax': 3, ...}
    """
    import onnx

    proto = path_or_proto
    if not isinstance(proto, onnx.ModelProto):
        proto = onnx.load(str(path_or_proto), load_external_data=False)
    ops = Counter(node.op_type for node in _nodes(proto))
    return dict(sorted(ops.items(), key=lambda kv: (-kv[1], kv[0])))


@dataclass
class BatchCheck:
    """ONNX Runtime against PyTorch at one batch size, over `batches` random batches."""

    batch_size: int
    batches: int
    max_abs: float
    max_rel: float  # over elements with |torch| > atol; informative only: the rule is `worst`
    passed: bool
    choice_match: bool | None = None  # None: the graph has no "experts.*" outputs
    worst: float = 0.0  # max over elements of |onnx - torch| / (atol + rtol * |torch|): passed iff <= 1


@dataclass
class ValidationReport:
    """The checklist `validate_onnx` returns: checker, external data, numerics per batch size, expert choice, ops."""

    path: Path
    atol: float
    rtol: float
    data_files: list[str]
    ops: dict[str, int]
    checks: list[BatchCheck] = field(default_factory=list)
    choice_outputs: list[str] = field(default_factory=list)
    batch_note: str = ""
    data_bytes: int = 0  # size of the external data files, measured when validated
    outcome: str = ""  # where the model is after validation (set by export_checkpoint), said on failure

    @property
    def passed(self) -> bool:
        return all(c.passed and c.choice_match is not False for c in self.checks)

    def format(self) -> str:
        """The checklist, one line per check."""
        import onnxruntime

        def mark(ok: bool) -> str:
            return "[x]" if ok else "[ ]"

        lines = [
            (f"ONNX validation of {self.path} (ONNX Runtime {onnxruntime.__version__} CPU vs PyTorch; an element "
             f"passes when |onnx - torch| <= atol + rtol * |torch|, atol {self.atol:g}, rtol {self.rtol:g})"),
            "  [x] onnx.checker.check_model(full_check=True) passed",
        ]
        if self.data_files:
            lines.append(f"  [x] external data inside the model's folder: {', '.join(self.data_files)} "
                         f"({self.data_bytes / 1e6:.1f} MB; keep it beside the model)")
        else:
            lines.append("  [x] self-contained (no external data)")
        for c in self.checks:
            # The mark, the number beside it and the verdict follow one rule: worst <= 1 (numpy.allclose).
            lines.append(f"  {mark(c.passed)} batch size {c.batch_size}: worst element at {c.worst:.2f} of its "
                         f"tolerance (max abs error {c.max_abs:.2e}) over {c.batches} batches"
                         f"{'' if c.passed else '  FAIL'}")
        if self.batch_note:
            lines.append(f"      ({self.batch_note})")
        if self.choice_outputs:
            ok = all(c.choice_match for c in self.checks)
            lines.append(f"  {mark(ok)} expert choice ({', '.join(self.choice_outputs)}) "
                         f"{'equals' if ok else 'DIFFERS from'} PyTorch's on every batch")
        einsum = self.ops.get("Einsum", 0)
        lines.append(f"  {mark(not einsum)} {'no Einsum' if not einsum else f'{einsum} Einsum nodes (slow in ORT)'}; "
                     "ops: " + ", ".join(f"{k} {v}" for k, v in self.ops.items()))
        lines.append("  PASSED" if self.passed else "  FAILED")
        return "\n".join(lines)

    def raise_for_failure(self) -> None:
        """Raise ExportError (one line) if a check failed."""
        if self.passed:
            return
        bad = [c for c in self.checks if not c.passed]
        if bad:
            worst = max(bad, key=lambda c: c.max_abs)
            raise ExportError(
                f"{self.path}: ONNX Runtime differs from PyTorch beyond atol {self.atol:g} / rtol {self.rtol:g}: "
                f"max abs error {worst.max_abs:.2e} at batch size {worst.batch_size}{self.outcome}; if that is "
                "expected (e.g. float16), loosen it with --atol"
            )
        raise ExportError(f"{self.path}: the graph's expert choice differs from PyTorch's Algorithm 2 choice{self.outcome}")


def validate_onnx(
    onnx_path: str | os.PathLike,
    model: nn.Module,
    *,
    batch_sizes: tuple[int, ...] = (1, 4),
    n_batches: int = 3,
    atol: float = 1e-4,
    rtol: float = 1e-3,
    seed: int = 0,
    check: bool = True,
) -> ValidationReport:
    """Check an exported model: the ONNX checker, then ONNX Runtime (CPU) against PyTorch on random batches.

    An element passes when |onnx - torch| <= atol + rtol * |torch| (numpy.allclose). The max rel error is
    reported over elements with |torch| > atol (relative error of values near 0 says nothing). If the graph has
    "experts.*" outputs (export_onnx(with_choice=True)) they must equal the experts PyTorch ran.

    Args:
        onnx_path: the .onnx file (its external data, if any, beside it).
        model: the PyTorch model it was exported from (run in eval mode).
        batch_sizes: batch sizes to try (the exported batch size only, if the batch axis is fixed).
        n_batches: random batches per batch size; images uniform in [0, 1], tokens N(0, 1).
        atol, rtol: the tolerance.
        seed: seed of the random inputs.
        check: raise ExportError if a check fails (else return the failing report).

    Returns:
        A ValidationReport; `print(report.format())` prints the checklist.

    Raises:
        ExportError: not an ONNX file, external data outside its folder or missing, the checker fails,
            ONNX Runtime cannot run it, or (with check=True) the outputs or expert choice differ.

    Example:
        >>> export_onnx(model, "model.onnx")
        >>> report = validate_onnx("model.onnx", model)
        >>> print(report.format())
    """
    import onnx
    import onnxruntime as ort

    path = Path(onnx_path)
    data_files = check_external_data(path)  # before anything reads tensor data
    try:
        onnx.checker.check_model(str(path), full_check=True)  # the path form follows external data
    except Exception as e:
        raise ExportError(f"{path}: the ONNX checker rejects it: {_first_line(e)}") from e
    options = ort.SessionOptions()
    # A check, not a benchmark: idle threads should sleep rather than spin against the PyTorch reference.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    try:
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as e:
        raise ExportError(f"{path}: ONNX Runtime cannot load it: {_first_line(e)}") from e
    inputs, outputs = session.get_inputs(), [o.name for o in session.get_outputs()]
    if len(inputs) != 1 or "output" not in outputs:
        raise ExportError(f"{path}: expected one input and an output named 'output'; it has inputs "
                          f"{[i.name for i in inputs]} and outputs {outputs}")
    shape = inputs[0].shape
    if not all(isinstance(d, int) for d in shape[1:]):
        raise ExportError(f"{path}: only the batch axis may be dynamic; input shape is {shape}")
    note = ""
    if isinstance(shape[0], int):
        note = f"the batch axis is fixed at {shape[0]}; only that batch size was run"
        batch_sizes = (shape[0],)
    choice_names = [o for o in outputs if o == "experts" or o.startswith("experts.")]
    choices = _choice_layers(model)
    by_output = {_choice_output(name): name for name in choices}
    missing = [o for o in choice_names if o not in by_output]
    if missing:
        raise ExportError(f"{path}: outputs {missing} name no pruned layer of the model ({sorted(choices)})")
    report = ValidationReport(path, atol, rtol, data_files, op_histogram(path), choice_outputs=choice_names,
                              batch_note=note, data_bytes=sum((path.parent / f).stat().st_size for f in data_files))
    gen = torch.Generator().manual_seed(seed)
    with _eval_mode(model), _recording(choices) as seen, torch.no_grad():
        for B in batch_sizes:
            check_b = BatchCheck(B, n_batches, 0.0, 0.0, True, True if choice_names else None)
            for _ in range(n_batches):
                x = _random_input(model, (B, *shape[1:]), gen)
                ref = model(x).float().cpu().numpy()
                got = dict(zip(outputs, session.run(None, {inputs[0].name: x.cpu().numpy()})))
                _compare(check_b, got["output"], ref, atol, rtol)
                for o in choice_names:  # the ids this very call ran, recorded by the hooks
                    want = seen.get(by_output[o])
                    check_b.choice_match &= want is not None and np.array_equal(got[o], want.cpu().numpy())
            report.checks.append(check_b)
    if check:
        report.raise_for_failure()
    return report


def _compare(check: BatchCheck, y: np.ndarray, ref: np.ndarray, atol: float, rtol: float) -> None:
    """Fold one batch into `check`: numpy.allclose's rule; relative error only where |ref| > atol."""
    if y.shape != ref.shape:
        check.passed, check.max_abs, check.max_rel = False, math.inf, math.inf
        return
    err = np.abs(y.astype(np.float64) - ref)
    check.max_abs = max(check.max_abs, float(err.max(initial=0.0)))
    big = np.abs(ref) > atol
    if big.any():
        check.max_rel = max(check.max_rel, float((err[big] / np.abs(ref[big])).max()))
    tol = atol + rtol * np.abs(ref.astype(np.float64))
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.where(tol > 0, err / np.where(tol > 0, tol, 1.0), np.where(err > 0, np.inf, 0.0))
    ratio = np.where(np.isnan(ratio), np.inf, ratio)  # a NaN output is as bad as it gets
    check.worst = max(check.worst, float(ratio.max(initial=0.0)))
    check.passed &= bool(np.all(err <= tol))


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
    from .checkpoint import load
    from .selection import with_selection

    if dynamic != (keep is not None):
        raise ExportError(
            "--dynamic and --keep go together (Algorithm 2 keeps `keep` experts per batch); for a static subset, "
            "write a compressed checkpoint first and export that"
        )
    if mode is not None and keep is None:
        raise ExportError("--mode applies with --keep/--dynamic (a compressed checkpoint runs its held experts)")
    if not atol >= 0:  # also NaN; a negative tolerance fails every model after minutes of work
        raise ExportError(f"--atol {atol:g}: the validation tolerance must be 0 or more (default 1e-4)")
    out = check_output(out, inputs=(checkpoint,))
    model = load(checkpoint)
    if per not in ("batch", "input"):
        raise ExportError(f"per={per!r}: choose 'batch' (Algorithm 2) or 'input' (Algorithm 1)")
    if dynamic:
        model = with_selection(model, keep, per=per, mode=mode or "drop")
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
