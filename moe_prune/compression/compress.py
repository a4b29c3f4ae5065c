"""Compression: a smaller native checkpoint that holds only the kept experts of every Soft MoE layer.

    drop mode:   the router keeps all of Phi [D, E, S] (the combine denominator needs every slot); the layer
                 records the kept experts as `held`, and runs exactly like the full model with that subset.
    renorm mode: Phi keeps only the kept columns [D, K, S]; the layer becomes an ordinary K-expert layer.
In both, `origin` records each held expert's id in the original model. Reading a file, only the kept experts'
rows are read (safetensors slices): dropped experts are never loaded. Outputs are written atomically.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from ..core.checkpoint import as_file, file_dtype, load, native_info, open_checkpoint, save
from ..core.weights import assign_weights
from ..errors import CheckpointError, SelectionError
from ..core.layers import SoftMoE, SoftMoEConfig
from ..core.models import build, moe_layers
from ..core.subsets import compress_layer, layer_plan, reduce_tensor
from ..selection.calibration import DEFAULT_RULE, choose_subsets
from ..selection.scores import calibrate, keep_per_layer, static_from_sums


def _new_spec(spec: dict, plans: dict) -> dict:
    if spec["family"] == "layer":
        return {**spec, "config": plans[""][0].to_dict()}
    return {**spec, "moe": {**spec["moe"], **{name: p[0].to_dict() for name, p in plans.items()}}}


def _check_subsets(names, subsets: dict) -> None:
    if set(subsets) != set(names):
        raise SelectionError(f"subsets name layers {sorted(subsets)}; the model's Soft MoE layers are {sorted(names)}")


def compress_model(model: nn.Module, subsets: dict, mode: str = "drop") -> nn.Module:
    """A new model holding only the given experts of each Soft MoE layer (the input model is unchanged).

    Args:
        model: a native model, one converted from soft-moe or soft-moe-pytorch, or any model of your own whose
            Soft MoE layers are moe-prune's (see `moe_prune.convert`).
        subsets: {layer name: router expert ids to keep}, every Soft MoE layer named (see `moe_layers`).
        mode: "drop" (router keeps all of Phi) or "renorm" (router keeps the kept columns only).

    Returns:
        The compressed model, on the model's device and in its dtype; its outputs equal
        `with_experts(model, subsets, mode)`. Its other weights are copies, never shared with `model`.

    Raises:
        SelectionError: unknown or missing layers, ids out of range or repeated, bad mode.

    Example:
        >>> small = compress_model(model, {"moe": torch.tensor([2, 5])})
        >>> moe_prune.save(small, "small.safetensors")
    """
    import copy

    layers = moe_layers(model)
    _check_subsets(layers, subsets)
    if isinstance(model, SoftMoE):
        out = compress_layer(model, subsets[""], mode)
    else:
        # deepcopy with the compressed layers in its memo: they take the full layers' places, which are never copied
        memo = {id(layer): compress_layer(layer, subsets[name], mode, name) for name, layer in layers.items()}
        out = copy.deepcopy(model, memo)
    out.checkpoint_meta = dict(getattr(model, "checkpoint_meta", {}))
    return out.eval()


def _owner(key: str, names) -> str | None:
    """The Soft MoE layer a tensor belongs to, or None (a bare layer is named "" and owns every tensor)."""
    return next((n for n in names if n == "" or key.startswith(f"{n}.")), None)


def compress_file(src: str | os.PathLike, subsets: dict, out: str | os.PathLike, mode: str = "drop",
                  meta: dict | None = None, dtype=None, quantize=None) -> Path:
    """Write a compressed checkpoint from a native one, reading only the kept experts' tensors.

    A checkpoint of another library (see `checkpoint.open_checkpoint`) is converted in memory first. The output
    keeps the source's dtypes.

    Args:
        src: a checkpoint (never modified): a path or a checkpoint.CheckpointFile.
        subsets: {layer name: router expert ids to keep} for every Soft MoE layer.
        out: the output .safetensors (written atomically: a temporary file, then a rename).
        mode: "drop" or "renorm".
        meta: extra metadata (merged over the source's, which is kept under "source_meta").
        dtype: the output's float dtype (None: the source's; "fp16", "bf16", "fp32" or a torch dtype).
        quantize: None, or "int8" (a quantize.QuantConfig): the kept experts' weights are quantized last.

    Returns:
        The output path.

    Raises:
        CheckpointError, SelectionError (also: a source whose experts are already int8), OutputError.

    Example:
        >>> compress_file("model.safetensors", {"moe": [3, 9]}, "small.safetensors")
    """
    from ..core.models import refuse_quantized, spec_quantized

    opened = open_checkpoint(src)
    refuse_quantized(spec_quantized(opened.spec), opened.path, "compressing")
    if not opened.native:
        model = load(src)
        small = quantize_last(compress_model(model, subsets, mode), quantize, dtype or file_dtype(opened))
        record = {**(meta or {}), "source_meta": opened.meta, "mode": mode, "kept_experts": kept_record(small),
                  **quant_record(quantize)}
        return save(small, out, meta=record, inputs=(opened.path,), dtype=dtype or file_dtype(opened))
    spec, src_meta, header = opened.spec, opened.meta, opened.header
    src = opened.path
    names = list(spec["moe"]) if spec["family"] != "layer" else [""]
    _check_subsets(names, subsets)
    configs = spec["moe"] if spec["family"] != "layer" else {"": spec["config"]}
    plans = {name: layer_plan(SoftMoEConfig.from_dict(configs[name]), subsets[name], mode, name) for name in names}
    new_spec = _new_spec(spec, plans)
    with torch.device("meta"):
        target = build(new_spec)
    state = {}
    try:
        with safe_open(str(src), framework="pt") as f:
            for key in header:
                name = _owner(key, plans)
                if name is None:
                    state[key] = f.get_tensor(key)
                    continue
                sl = f.get_slice(key)

                def get(rows, cols, sl=sl, key=key):
                    if rows is not None:  # contiguous runs of kept experts, read as slices of the leading axis
                        return torch.cat([sl[a:b] for a, b in _runs(rows)])
                    if cols is not None:  # Phi [D, E, S]: the kept experts' columns
                        return torch.cat([sl[:, a:b] for a, b in _runs(cols)], dim=1)
                    return f.get_tensor(key)

                state[key] = reduce_tensor(name, key, get, plans[name])
    except (CheckpointError, SelectionError):
        raise
    except Exception as e:
        raise CheckpointError(f"{src}: could not read tensors ({e}); is the file truncated or corrupted?") from None
    assign_weights(target, state, src, "cpu")  # in the source's dtype (float32 if it mixes dtypes), as `load` does
    target = quantize_last(target, quantize, dtype)
    record = {**(meta or {}), "source_meta": src_meta, "mode": mode,
              "kept_experts": kept_record(target), **quant_record(quantize)}
    return save(target, out, meta=record, inputs=(src,), dtype=dtype)


def quantize_last(model: nn.Module, quantize, dtype=None) -> nn.Module:
    """The compressed model with its experts quantized (quantize: None, "int8" or a QuantConfig), in the output's
    float dtype first, so that each scale is rounded to that dtype before the int8 weights are computed from it."""
    from ..core.weights import float_dtype
    from .quantize import as_quant_config, quantize_

    config = as_quant_config(quantize)
    if config is None:
        return model
    dtype = float_dtype(dtype)
    return quantize_(model.to(dtype) if dtype is not None else model, config)


def quant_record(quantize) -> dict:
    """{"quantize": what was done} for the metadata of a quantized output; {} for a float one."""
    from .quantize import as_quant_config

    config = as_quant_config(quantize)
    return {} if config is None else {"quantize": config.record()}


def _runs(ids: list[int]) -> list[tuple[int, int]]:
    """Sorted ids -> half-open contiguous ranges: [1, 2, 3, 7] -> [(1, 4), (7, 8)]."""
    runs = []
    for i in ids:
        if runs and runs[-1][1] == i:
            runs[-1] = (runs[-1][0], i + 1)
        else:
            runs.append((i, i + 1))
    return runs


def static_subsets(model: nn.Module, batches, keep, progress: bool = False) -> tuple[dict, dict]:
    """Calibrate (sum each layer's combine-mass scores over the batches) and keep the top k per layer: the
    paper's rule (`calibration.choose_subsets` has the others).

    Returns:
        (subsets {layer name: ids [k]}, score sums {layer name: [E]}). For a compressed layer only the experts
        it holds can be chosen.

    Example:
        >>> subsets, sums = static_subsets(model, (x for x, _ in batches), "1/8")
    """
    sums = calibrate(model, batches, progress=progress)
    return static_from_sums(model, sums, keep), sums


def kept_record(model: nn.Module) -> dict:
    """{layer name or "(layer)": original ids of the experts it holds}: what a compressed checkpoint records."""
    return {name or "(layer)": list(layer.config.origin if layer.config.origin is not None else layer.config.held_ids)
            for name, layer in moe_layers(model).items()}


def compress_and_heal(model: nn.Module, subsets: dict, calib_batches, mode: str = "drop", config=None,
                      check: tuple | None = None, progress: bool = True) -> tuple[nn.Module, dict]:
    """`compress_model`, then recover by distillation from the full model (see `healing.heal`).

    Args:
        model: the full model (the teacher; unchanged). subsets, mode: see `compress_model`.
        calib_batches: the unlabeled calibration inputs (a list of batches) the student is trained on.
        config: a `healing.HealConfig` (None: the defaults).
        check: optional held-out (images, labels) or datasets.Examples with labels, to measure accuracy before and
            after (reported, never used).
        progress: a progress bar.

    Returns:
        (the healed compressed model, record: heal settings, losses, seconds and, with `check`, accuracies of
        the full model and of the compressed one before and after).

    Example:
        >>> small, record = compress_and_heal(full, subsets, batches, check=load_images("fashion-mnist", "test"))
        >>> record["accuracy_after"]
    """
    from ..measurement.accuracy import accuracy
    from .healing import HealConfig, heal

    config = config or HealConfig()
    small = compress_model(model, subsets, mode=mode)
    acc = lambda m: accuracy(m, *check) if isinstance(check, tuple) else accuracy(m, check)  # noqa: E731
    before = acc(small) if check is not None else None
    result = heal(small, model, calib_batches, config, progress=progress)
    record = {k: result[k] for k in ("config", "loss_before", "loss_after", "seconds", "trained", "held_out",
                                           "steps_run", "steps_planned", "stopped")}
    if check is not None:
        record.update(accuracy_full=acc(model), accuracy_before=before, accuracy_after=acc(small))
    return small, record


def compress_checkpoint(src, out, keep, calib_batches, mode: str = "drop", progress: bool = True,
                        meta: dict | None = None, rule: str = DEFAULT_RULE, heal=None,
                        check: tuple | None = None, device=None, dtype=None,
                        budget: str = "per-layer", quantize=None, search: dict | None = None) -> tuple[Path, dict]:
    """Calibrate on data by `rule` (the loss rule with `search`, see choose_subsets), then write the compressed checkpoint, healed if `heal` (a HealConfig) is given,
    its kept experts quantized last if `quantize` ("int8" or a quantize.QuantConfig) is given.

    The full model is loaded for calibration (a Soft MoE layer's input depends on the earlier layers). Without
    healing it is then released and the output assembled from slices of the source file; with healing it is
    the teacher, and the healed model is written.

    Under torchrun (torch.distributed initialized, see `process_group_from_env`), the calibration and the
    healing are sharded over the ranks (healing as data-parallel training: each rank a share of every batch, the
    gradients summed), and rank 0 writes the output.

    Returns:
        (output path, or None on ranks other than 0; subsets).

    Example:
        >>> compress_checkpoint("model.safetensors", "small.safetensors", "1/8", batches_of_images, rule="greedy")
    """
    import torch.distributed as dist

    # Calibration and healing compute in float32 (half-precision matmuls on a CPU are slow and coarse); the output
    # keeps the checkpoint's own dtype.
    from ..core.devices import resolve_device

    from .quantize import as_quant_config
    from ..core.models import refuse_quantized, spec_quantized

    opened = open_checkpoint(src)
    refuse_quantized(spec_quantized(opened.spec), opened.path, "calibrating and compressing")
    as_quant_config(quantize)  # a bad kind is an error before the calibration runs
    model = load(src, dtype=torch.float32, device=resolve_device(device))
    keep_per_layer(model, keep)  # a bad `keep` is an error before the calibration runs
    subsets, calibration = choose_subsets(model, calib_batches, keep, rule=rule, mode=mode, progress=progress,
                                          budget=budget, search=search)
    writer = not (dist.is_available() and dist.is_initialized() and dist.get_rank() != 0)  # rank 0 writes
    if not writer and heal is None:
        return None, subsets  # under torchrun every rank has the same subsets
    record = {**(meta or {}), "keep": str(keep), **calibration}  # the rule and its scores or output errors
    if heal is None and opened.native:  # assembled from slices of the file: the dropped experts are never read again
        del model
        return compress_file(src, subsets, out, mode=mode, meta=record, dtype=dtype, quantize=quantize), subsets
    if heal is None:  # another library's file was converted in memory: compress what is loaded
        small = compress_model(model, subsets, mode)
        small = quantize_last(small, quantize, dtype or file_dtype(opened))
        record = {**record, "source_meta": opened.meta, "mode": mode, "kept_experts": kept_record(small),
                  **quant_record(quantize)}
        return save(small, out, meta=record, inputs=(opened.path,), dtype=dtype or file_dtype(opened)), subsets
    small, healed = compress_and_heal(model, subsets, calib_batches, mode=mode, config=heal, check=check,
                                      progress=progress)  # every rank: data-parallel under torchrun
    if not writer:
        return None, subsets
    small = quantize_last(small, quantize, dtype or file_dtype(opened))  # healed in float, quantized last
    record = {**record, "heal": healed, "source_meta": opened.meta, "mode": mode, "kept_experts": kept_record(small),
              **quant_record(quantize)}
    return save(small, out, meta=record, inputs=(opened.path,), dtype=dtype or file_dtype(opened)), subsets


def compress_from_data(checkpoint: str | os.PathLike, out: str | os.PathLike, keep, calib, *,
                       calib_limit: int | None = 10000, batch_size: int = 256, mode: str = "drop",
                       rule: str = DEFAULT_RULE, heal=None, create_folder: bool = False,
                       meta: dict | None = None, options=None, device=None, dtype=None,
                       budget: str = "per-layer", quantize=None, search: dict | None = None) -> dict | None:
    """Check everything, calibrate on `calib`, write the compressed checkpoint (the `moe-prune compress` command).

    `keep` and the calibration inputs are checked against the checkpoint's header before the model is loaded;
    under torchrun the calibration is sharded over the ranks (see `process_group_from_env`) and rank 0 writes.

    Args:
        checkpoint: the native checkpoint. out: the .safetensors to write (never the input).
        keep: see `parse_keep`. calib: calibration data (see `data.calibration_inputs`).
        calib_limit: at most this many calibration inputs. batch_size: calibration batch size.
        mode: "drop" or "renorm". rule: the calibration rule (see `calibration.RULES`).
        heal: a `healing.HealConfig` to recover by distillation on the calibration inputs, or None. With a data
            set name or IDX folder as `calib`, accuracy before and after is measured on its test split (held
            out: reported in the metadata, never used to choose or train).
        create_folder: create out's folder for the run (removed again if it fails).
        meta: extra metadata for the checkpoint (the calibration's source and limit are added).
        options: a datasets.DataOptions: decoding workers, --skip-bad, the cache budget, and preprocessing
            overrides (mean, std, interpolation, crop_pct), which the output checkpoint records.
        device: where calibration and healing compute ("auto": a GPU when torch sees one; see devices.py).
        dtype: the output's float dtype ("fp16", "bf16", "fp32"; None: the checkpoint's own).
        budget: "per-layer" or "global" (the loss rule's one budget across layers; see calibration.choose_subsets).
        search: the loss rule's search settings (see calibration.choose_subsets; None: DEFAULT_SEARCH).
        quantize: None, or "int8" (a quantize.QuantConfig): the kept experts' weights are written as int8 with
            per-output-channel scales, after calibration and healing (which run in float).

    Returns:
        {"path", "subsets" {layer name: ids}, "before" and "after" (checkpoint.summary of both), "heal" (the
        heal record, or None)}; None on ranks other than 0.

    Raises:
        SelectionError: a bad keep or rule. DataError: calibration inputs the model cannot take.
            CheckpointError: see `load`. OutputError: `out` cannot be written safely. ConfigError: bad heal settings.

    Example:
        >>> r = compress_from_data("model.safetensors", "small.safetensors", "1/8", "fashion-mnist", heal=HealConfig())
        >>> r["subsets"]["blocks.3.mlp"]
    """
    from ..selection.calibration import RULES
    from ..core.checkpoint import skeleton
    from ..core.summary import summary
    from ..data.sources import calibration_batches
    from ..data.examples import DataOptions
    from ..data.sources import report_skipped
    from ..core.files import check_output, output_folder
    from ..core.preprocess import for_model

    from ..core.devices import resolve_device

    if rule not in RULES:
        raise SelectionError(f"rule={rule!r}: choose one of {', '.join(RULES)}")
    if budget == "global" and rule != "loss":
        raise SelectionError("--budget global spends one budget across Soft MoE layers by the loss rule: use it with "
                             "--rule loss")
    device = resolve_device(device)  # a device this machine lacks fails before any work
    src, out = as_file(checkpoint), Path(out)
    model = skeleton(src)  # what the checkpoint takes, read from its header: the checks below come first
    from .quantize import as_quant_config
    from ..core.models import quantized_layers, refuse_quantized

    refuse_quantized(quantized_layers(model), src, "calibrating and compressing")
    as_quant_config(quantize)
    keep_per_layer(model, keep)
    if out.parent.exists():
        check_output(out, inputs=(src,))
    options = options or DataOptions()
    pre = for_model(model, **options.preprocess_overrides())
    batches = calibration_batches(calib, limit=calib_limit, batch_size=batch_size, model=model, options=options)
    check = _held_out(calib, model, options) if heal is not None else None
    folder = output_folder(out.parent) if create_folder else contextlib.nullcontext()
    record = {**(meta or {}), "calibration": {"data": str(calib), "limit": calib_limit, "inputs": batches.num_inputs}}
    if pre is not None:
        record["preprocess"] = pre.to_dict()  # what the data was given as; every later command reads it
    if check is not None:
        record["held_out"] = f"{check.where} (accuracy before and after healing only)"
    with process_group_from_env(device) as rank, folder:
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())  # this rank's GPU under torchrun
        path, subsets = compress_checkpoint(src, out, keep, batches, mode=mode, progress=rank == 0, meta=record,
                                            rule=rule, heal=heal, check=check, device=device, dtype=dtype,
                                            budget=budget, quantize=quantize, search=search)
    report_skipped(batches.examples)
    if rank != 0:
        return None
    healed = native_info(path)[1].get("heal")
    return {"path": path, "subsets": subsets, "before": summary(src), "after": summary(path), "heal": healed}


def _held_out(calib, model, options=None):
    """The held-out split of a calibration source, as labelled datasets.Examples checked against the model: a
    data set's test split, an image folder's val/ (or test/) beside its train/; else None."""
    from ..data.inputs import check_examples
    from ..data.examples import DataOptions
    from ..data.sources import open_data, split_folder
    from ..core.preprocess import for_model

    options = options or DataOptions()
    text = str(calib)
    path = Path(text)
    if text.endswith((".npy", ".npz", ".txt")):
        return None
    if path.is_dir() and not any(path.glob("*-idx3-ubyte*")) and split_folder(path, "train") == path:
        return None  # one folder of images: nothing held out
    examples = open_data(calib, "test", for_model(model, **options.preprocess_overrides()), options, labelled=True)
    check_examples(model, examples, f"{calib} (held-out split)")
    return examples


@contextlib.contextmanager
def process_group_from_env(device=None):
    """Join the torch.distributed group torchrun describes (WORLD_SIZE > 1 in the environment): NCCL with each
    rank on its own GPU (cuda:LOCAL_RANK, made the current device) when `device` is a GPU, else gloo on the CPU.
    Yields the rank (0 when not distributed).

    Example (two processes on one machine):
        torchrun --standalone --nproc-per-node 2 --no-python moe-prune compress m.safetensors --calib DATA --out o
    """
    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        yield dist.get_rank() if dist.is_initialized() else 0
        return
    gpu = device is not None and torch.device(device).type == "cuda"
    if gpu:  # NCCL refuses two ranks on one GPU: each takes its own before the group forms
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if gpu else "gloo")
    try:
        yield dist.get_rank()
        # Every rank waits until all are done (rank 0 writes the output) before the group is torn down: a rank
        # that tore down early was once aborted by gloo ("terminate called without an active exception").
        dist.barrier()
    finally:
        dist.destroy_process_group()
