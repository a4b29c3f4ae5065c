"""Validation of an exported ONNX model against the PyTorch model it came from: the checklist optimum prints.

    the ONNX checker (full_check) -> external data inside the model's folder -> the preprocessing record
    (metadata "moe_prune.preprocess") -> ONNX Runtime (CPU) against PyTorch on random batches of each batch size
    (numpy.allclose's rule) -> the graph's expert choice ("experts.*" outputs) against PyTorch's -> the operator
    histogram (no Einsum: slow in ONNX Runtime)

A graph with its preprocessing inside (`export --preprocess`: uint8 pixels [B, H, W, C] in) is fed random
pixels, and PyTorch runs the model on the same pixels through `Preprocess.normalize` (numpy): a wrong
normalization in the graph (mean, std, channel order, the axis permutation) shows as a numerical failure.

`validate_onnx` returns a `ValidationReport`; `report.format()` is the checklist, `report.raise_for_failure()`
the one-line ExportError.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..errors import ExportError, first_line
from .export import choice_output, eval_mode, random_input
from .files import PREPROCESS_KEY, check_external_data, op_histogram, read_preprocess
from ..core.preprocess import Preprocess
from ..compression.quantize import graph_numerics
from ..selection.scores import pruned_layers, recorded_choices


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
    preprocess: Preprocess | None = None  # what the file records (or, if it records nothing, what was expected)
    pixels: bool = False  # the graph takes uint8 [B, H, W, C] and normalizes inside
    record_problem: str = ""  # why the preprocessing record is wrong ("": it is right, or there is none to check)

    @property
    def passed(self) -> bool:
        return not self.record_problem and all(c.passed and c.choice_match is not False for c in self.checks)

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
        if self.record_problem:
            lines.append(f"  [ ] preprocessing record: {self.record_problem}")
        elif self.preprocess is not None:
            where = ("inside the graph: it takes uint8 pixels [B, H, W, C], checked against PyTorch on the same "
                     "pixels through Preprocess.normalize" if self.pixels else
                     "recorded for the caller: the graph takes normalized float [B, C, H, W]")
            lines.append(f"  [x] preprocessing ({self.preprocess.describe()}) {where}")
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
        if self.record_problem:
            raise ExportError(f"{self.path}: its preprocessing record is wrong: {self.record_problem}{self.outcome}")
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
    preprocess: Preprocess | None = None,
) -> ValidationReport:
    """Check an exported model: the ONNX checker, then ONNX Runtime (CPU) against PyTorch on random batches.

    A model with int8 experts runs in torch with the graph's numerics (`quantize.graph_numerics`: activation rows
    quantized to int8 where the graph runs integer matmuls, i.e. for experts of ExecutionPolicy.graph_int8_min
    weights or more).
    An element passes when |onnx - torch| <= atol + rtol * |torch| (numpy.allclose). The max rel error is
    reported over elements with |torch| > atol (relative error of values near 0 says nothing). If the graph has
    "experts.*" outputs (export_onnx(with_choice=True)) they must equal the experts PyTorch ran.

    Args:
        onnx_path: the .onnx file (its external data, if any, beside it).
        model: the PyTorch model it was exported from (run in eval mode).
        batch_sizes: batch sizes to try (the exported batch size only, if the batch axis is fixed).
        n_batches: random batches per batch size; images uniform in [0, 1], tokens N(0, 1); a graph taking
            uint8 pixels [B, H, W, C] (its preprocessing inside): uniform pixels 0..255, which PyTorch gets
            through `preprocess.normalize`.
        atol, rtol: the tolerance.
        seed: seed of the random inputs.
        check: raise ExportError if a check fails (else return the failing report).
        preprocess: the preprocessing the file must record (and, for a pixel graph, compute); None: whatever
            it records. A record that differs from it fails the validation, as does a pixel graph's record that
            says "not in the graph" or a float graph's that says "in the graph".

    Returns:
        A ValidationReport; `print(report.format())` prints the checklist.

    Raises:
        ExportError: not an ONNX file, external data outside its folder or missing, the checker fails,
            ONNX Runtime cannot run it, a pixel graph with no preprocessing recorded or given, or (with
            check=True) the outputs, the expert choice or the preprocessing record differ.

    Example:
        >>> export_onnx(model, "model.onnx", preprocess=preprocess.for_model(model))  # uint8 [B, H, W, C] in
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
        raise ExportError(f"{path}: the ONNX checker rejects it: {first_line(e)}") from e
    options = ort.SessionOptions()
    # A check, not a benchmark: idle threads should sleep rather than spin against the PyTorch reference.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    try:
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as e:
        raise ExportError(f"{path}: ONNX Runtime cannot load it: {first_line(e)}") from e
    inputs, outputs = session.get_inputs(), [o.name for o in session.get_outputs()]
    if len(inputs) != 1 or "output" not in outputs:
        raise ExportError(f"{path}: expected one input and an output named 'output'; it has inputs "
                          f"{[i.name for i in inputs]} and outputs {outputs}")
    shape = inputs[0].shape
    if not all(isinstance(d, int) for d in shape[1:]):
        raise ExportError(f"{path}: only the batch axis may be dynamic; input shape is {shape}")
    pixels = inputs[0].type == "tensor(uint8)"
    recorded, in_graph = read_preprocess(session.get_modelmeta().custom_metadata_map, path)
    problem = _record_problem(recorded, in_graph, preprocess, pixels)
    pre = preprocess or recorded  # what a pixel graph must compute
    if pixels and pre is None:
        raise ExportError(f"{path}: takes uint8 pixels but records no preprocessing ({PREPROCESS_KEY}); pass "
                          "preprocess= (the one it was exported with), or re-export it with moe-prune export")
    if pixels and list(shape[1:]) != [*pre.size, pre.channels]:
        raise ExportError(f"{path}: takes uint8 pixels {shape} but its preprocessing is for [B, {pre.size[0]}, "
                          f"{pre.size[1]}, {pre.channels}]; re-export it with moe-prune export --preprocess")
    note = ""
    if isinstance(shape[0], int):
        note = f"the batch axis is fixed at {shape[0]}; only that batch size was run"
        batch_sizes = (shape[0],)
    choice_names = [o for o in outputs if o == "experts" or o.startswith("experts.")]
    choices = pruned_layers(model)
    by_output = {choice_output(name): name for name in choices}
    missing = [o for o in choice_names if o not in by_output]
    if missing:
        raise ExportError(f"{path}: outputs {missing} name no pruned layer of the model ({sorted(choices)})")
    report = ValidationReport(path, atol, rtol, data_files, op_histogram(path), choice_outputs=choice_names,
                              batch_note=note, data_bytes=sum((path.parent / f).stat().st_size for f in data_files),
                              preprocess=recorded or preprocess, pixels=pixels, record_problem=problem)
    gen = torch.Generator().manual_seed(seed)
    param = next(model.parameters(), None)
    # int8 experts: torch with the graph's numerics (activation rows quantized too), so that like meets like
    with eval_mode(model), graph_numerics(model), recorded_choices(choices) as seen, torch.no_grad():
        for B in batch_sizes:
            check_b = BatchCheck(B, n_batches, 0.0, 0.0, True, True if choice_names else None)
            for _ in range(n_batches):
                if pixels:  # the graph normalizes: PyTorch gets the same pixels, normalized by numpy
                    feed = torch.randint(0, 256, (B, *shape[1:]), generator=gen, dtype=torch.uint8).numpy()
                    x = torch.from_numpy(pre.normalize(feed))  # [B, C, H, W]
                    x = x if param is None else x.to(device=param.device, dtype=param.dtype)
                else:
                    x = random_input(model, (B, *shape[1:]), gen)
                    feed = x.cpu().numpy()
                ref = model(x).float().cpu().numpy()
                got = dict(zip(outputs, session.run(None, {inputs[0].name: feed})))
                compare_batch(check_b, got["output"], ref, atol, rtol)
                for o in choice_names:  # the ids this very call ran, recorded by the hooks
                    want = seen.get(by_output[o])
                    check_b.choice_match &= want is not None and np.array_equal(got[o], want.cpu().numpy())
            report.checks.append(check_b)
    if check:
        report.raise_for_failure()
    return report


def _record_problem(recorded: Preprocess | None, in_graph: bool, expected: Preprocess | None, pixels: bool) -> str:
    """What is wrong with a file's preprocessing record ("" if nothing): it must say where the preprocessing
    is (in the graph exactly when the graph takes uint8 pixels) and, when one is expected, be that one."""
    if recorded is None:
        return f"none recorded ({PREPROCESS_KEY}), expected {expected.describe()}" if expected is not None else ""
    if in_graph != pixels:
        return (f"it says the preprocessing is {'' if in_graph else 'not '}in the graph, but the graph takes "
                f"{'uint8 pixels' if pixels else 'float input'}")
    if expected is not None and _values(recorded) != _values(expected):
        return f"it records {recorded.describe()}, expected {expected.describe()}"
    return ""


def _values(p: Preprocess) -> dict:
    """A preprocessing's values without where they came from (`source` is for reports)."""
    d = p.to_dict()
    d.pop("source")
    return d


def compare_batch(check: BatchCheck, y: np.ndarray, ref: np.ndarray, atol: float, rtol: float) -> None:
    """Fold one batch into `check`: numpy.allclose's rule; relative error only where |ref| > atol.

    Args:
        check: the BatchCheck of this batch size, updated in place (max_abs, max_rel, worst, passed).
        y: ONNX Runtime's output. ref: PyTorch's, as float numpy.
        atol, rtol: the tolerance.

    Example:
        >>> check = BatchCheck(1, 1, 0.0, 0.0, True)
        >>> compare_batch(check, ref + 5e-5, ref, atol=1e-4, rtol=1e-3); check.passed
        True
    """
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
