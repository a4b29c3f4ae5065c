"""Checkpoints: the native format, and every file a Soft MoE user has, opened the same way.

Native format: ONE safetensors file. Its header metadata holds, under the key "moe_prune", a JSON object
{"format_version": 2, "spec": <model spec, see moe_prune.models>, "meta": {...}} (meta: free-form facts such as
the test accuracy, the training command, the original expert ids of a compressed model). One file means a
checkpoint cannot be separated from its architecture, and one atomic rename publishes both.

Any other checkpoint (a soft-moe or soft-moe-pytorch state dict as .safetensors, sharded, .pt/.pth/.bin or a
Lightning .ckpt; see `formats` and `libraries`) opens as if it were native: its architecture is inferred from
the tensor shapes and its tensors converted in memory. Nothing is unpickled beyond what
torch.load(weights_only=True) allows (tensors and plain containers; it never calls user code).

    open_checkpoint(file) -> Opened(spec, meta, header, found)  -> load / skeleton / summary
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from ..errors import CheckpointError, ConfigError, DefaultedWarning
from .files import atomic_output
from .layers import SoftMoE
from .models import build, model_spec, moe_layers
from .weights import assign_weights, float_dtype

NATIVE_KEY = "moe_prune"
FORMAT_VERSION = 2
# Versions this moe-prune reads: 1 named a layer's held experts `present` (SoftMoEConfig.from_dict reads it as `held`).
READ_VERSIONS = (1, 2)


@dataclass(frozen=True)
class CheckpointFile(os.PathLike):
    """A checkpoint path and how to read it, usable wherever a path is (`Path(f)`, `open(f)` see the path).

    Args:
        path: the file (native or any format `formats.read_state_file` reads).
        kwargs: the source library's constructor arguments the shapes cannot tell (a ViT's num_heads,
            global_pool); everything else is inferred.
        ema: take the EMA copy of the weights (a separate entry, or a prefix naming "ema").
        library: "auto", "bwconrad" (soft-moe) or "lucidrains" (soft-moe-pytorch).

    Example:
        >>> model = moe_prune.load(CheckpointFile("last.ckpt", kwargs={"num_heads": 6}, ema=True))
    """

    path: str | os.PathLike
    kwargs: dict | None = None
    ema: bool = False
    library: str = "auto"

    def __fspath__(self) -> str:
        return os.fspath(self.path)

    def __str__(self) -> str:
        return os.fspath(self.path)


def as_file(src) -> CheckpointFile:
    """`src` (a path or a CheckpointFile) as a CheckpointFile."""
    return src if isinstance(src, CheckpointFile) else CheckpointFile(src)


# -- reading -------------------------------------------------------------------------------------------------


def read_header(path: str | os.PathLike) -> tuple[dict[str, str], dict[str, tuple[str, list[int]]]]:
    """Read a safetensors header without loading any tensor.

    Returns:
        (metadata, {tensor name: (dtype, shape)}).

    Raises:
        CheckpointError: missing, not safetensors, truncated or corrupted file.

    Example:
        >>> meta, tensors = read_header("model.safetensors")
        >>> tensors["head.weight"]
        ('F32', [10, 784])
    """
    from .formats import resolve, sniff

    p = resolve(path)
    if sniff(p) != "safetensors":
        with open(p, "rb") as f:
            short = len(f.read(9)) < 9
        why = "truncated: too short for a safetensors header" if short else "it does not start with a safetensors header"
        raise CheckpointError(f"{p}: not a safetensors file ({why})")
    try:
        with safe_open(str(p), framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {}
            for name in f.keys():
                sl = f.get_slice(name)
                tensors[name] = (sl.get_dtype(), list(sl.get_shape()))
    except Exception as e:  # safetensors raises its own error types (and OSError) for every malformed file
        raise CheckpointError(f"{p}: not a valid safetensors file ({_short(e)}); is it truncated or corrupted?") from None
    return metadata, tensors


def _short(e: Exception) -> str:
    return str(e).splitlines()[0][:200] if str(e) else type(e).__name__


def load_tensors(path: str | os.PathLike, names: list[str] | None = None) -> dict[str, torch.Tensor]:
    """Load some or all tensors of a safetensors file (validated like `read_header`)."""
    p = Path(path)
    try:
        with safe_open(str(p), framework="pt") as f:
            return {name: f.get_tensor(name) for name in (names if names is not None else f.keys())}
    except Exception as e:
        raise CheckpointError(f"{p}: could not read tensors ({_short(e)}); is the file truncated or corrupted?") from None


@dataclass
class Opened:
    """A checkpoint, opened: what `load`, `skeleton` and `summary` need, whatever the file's format.

    Attributes:
        path: the file read. spec, meta: the native spec and meta. header: native tensor name -> (dtype, shape).
        native: a native file (its tensors are read from it lazily); else `state` holds the converted tensors.
        found: for a converted file, what was found and inferred (format, library, prefix, each argument's
            source), for `moe-prune info`.
    """

    path: Path
    spec: dict
    meta: dict
    header: dict[str, tuple[str, list[int]]]
    native: bool
    state: dict[str, torch.Tensor] | None = None
    found: dict = field(default_factory=dict)

    def tensors(self) -> dict[str, torch.Tensor]:
        return load_tensors(self.path) if self.native else dict(self.state)


def open_checkpoint(src) -> Opened:
    """Open any checkpoint: a native file (header only), or a library's state dict in any format, converted.

    Raises:
        CheckpointError: unreadable, damaged, unknown layout, or tensors that do not fit their config.
        ConfigError: bad keyword arguments.

    Example:
        >>> opened = open_checkpoint(CheckpointFile("last.ckpt"))
        >>> opened.found["library"], opened.spec["family"]
        ('soft-moe (bwconrad)', 'vit')
    """
    from .formats import resolve, sniff

    f = as_file(src)
    p = resolve(f)
    if sniff(p) == "safetensors":
        metadata, header = read_header(p)
        if NATIVE_KEY in metadata:
            if f.kwargs or f.ema or f.library != "auto":
                raise ConfigError(f"{p}: a moe-prune checkpoint carries its architecture; --kwargs, --ema and --from "
                                  "apply to other libraries' files only")
            spec, meta = _native_record(p, metadata, header)
            return Opened(p, spec, meta, header, True)
    return _open_foreign(f, p)


def _native_record(p: Path, metadata: dict, header: dict) -> tuple[dict, dict]:
    try:
        record = json.loads(metadata[NATIVE_KEY])
        spec, meta = record["spec"], record.get("meta", {})
        version = record.get("format_version")
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{p}: the moe-prune metadata is not valid JSON with a 'spec' ({_short(e)})") from None
    if type(version) is not int or version not in READ_VERSIONS:
        raise CheckpointError(f"{p}: format version {version!r}; this moe-prune reads versions "
                              f"{', '.join(map(str, READ_VERSIONS))}")
    if not isinstance(meta, dict):
        raise CheckpointError(f"{p}: the moe-prune metadata's 'meta' is not a JSON object; the file is damaged")
    if isinstance(spec, dict) and spec.get("family") == "module":
        return _module_spec(p, spec, header), meta
    config = spec.get("config") if isinstance(spec, dict) else None
    depth = config.get("depth") if isinstance(config, dict) else None
    if isinstance(depth, int) and depth > len(header):  # every block holds tensors; building 10**9 of them would hang
        raise CheckpointError(f"{p}: its architecture config is invalid: depth {depth}, but the file holds {len(header)} tensors")
    try:  # a damaged spec fails in many ways (wrong types, huge sizes); building it on the meta device checks all
        with torch.device("meta"):
            skeleton = build(spec)
            spec = model_spec(skeleton)
    except Exception as e:
        raise CheckpointError(f"{p}: its architecture config is invalid: {e if isinstance(e, ConfigError) else _short(e)}") from None
    # The header against the spec, as `load` checks it: `info` and `compress` never describe a file `load` refuses.
    check_layout(skeleton, header, p)
    return spec, meta


def _module_spec(p: Path, spec: dict, header: dict) -> dict:
    """A checkpoint of a user's own model class: its Soft MoE layers' configs are checked, the rest is theirs."""
    from .layers import SoftMoEConfig

    moe = spec.get("moe")
    if not isinstance(moe, dict) or not moe:
        raise CheckpointError(f"{p}: its architecture config is invalid: a model of your own class lists no Soft MoE layers")
    try:
        for name, cfg in moe.items():
            with torch.device("meta"):
                layer = SoftMoE(SoftMoEConfig.from_dict(cfg))
            prefix = f"{name}." if name else ""
            check_layout(layer, {k[len(prefix):]: v for k, v in header.items() if k.startswith(prefix)}, p,
                          allow_extra=False)
    except ConfigError as e:
        raise CheckpointError(f"{p}: its architecture config is invalid: {e}") from None
    return spec


def _open_foreign(f: CheckpointFile, p: Path) -> Opened:
    from .formats import read_state_file
    from .libraries import convert_state

    sf = read_state_file(p, ema=f.ema)
    converted = convert_state(sf.tensors, given=f.kwargs, hparams=sf.hyper_parameters, library=f.library,
                              ema=f.ema and not sf.ema, where=str(p))
    state = converted.state
    try:
        with torch.device("meta"):
            skeleton = build(converted.spec)
    except ConfigError as e:
        raise CheckpointError(f"{p}: {e}") from None
    header = {k: (str(v.dtype).replace("torch.", ""), list(v.shape)) for k, v in state.items()}
    check_layout(skeleton, header, p)
    found = {
        "file_format": sf.format, "entry": sf.entry, "library": converted.library, "model": converted.model,
        "prefix": converted.prefix, "ignored_tensors": converted.ignored, "ema": sf.ema or _is_ema_prefix(converted.prefix),
        "other_ema_entries": sf.ema_entries, "not_used": sf.notes, "kwargs": converted.kwargs,
        "sources": converted.sources, "defaulted": converted.defaulted(), "notes": converted.notes,
    }
    if converted.defaulted():
        import warnings

        shown = ", ".join(f"{k}={converted.kwargs[k]!r}" for k in converted.defaulted())
        warnings.warn(f"{p}: {shown}: not in the file, the library's default for this model; if it was trained with "
                      f"other values, pass them (--kwargs '{{\"{converted.defaulted()[0]}\": ...}}')",
                      DefaultedWarning, stacklevel=3)
    meta = {"converted_from": f"{converted.library} {converted.model}", "source_kwargs": converted.kwargs,
            "source": {"file": p.name, "format": sf.format, "prefix": converted.prefix, "sources": converted.sources}}
    return Opened(p, converted.spec, meta, header, False, state, found)


def _is_ema_prefix(prefix: str) -> bool:
    return any("ema" in part.lower() for part in prefix.split(".") if part)


def native_info(path) -> tuple[dict, dict, dict[str, tuple[str, list[int]]]]:
    """(spec, meta, tensor header) of a checkpoint (a native one reads no tensor).

    Raises:
        CheckpointError: unreadable, damaged, or not convertible.
    """
    opened = open_checkpoint(path)
    return opened.spec, opened.meta, opened.header


def skeleton(path) -> nn.Module:
    """The model a checkpoint describes, on the meta device (no tensor read for a native file), with its
    `checkpoint_meta`: enough to know what input it takes before minutes of work (see data.check_inputs).

    Raises:
        CheckpointError: see `open_checkpoint`; or a model of the user's own class (only they can build it).

    Example:
        >>> data.check_inputs(skeleton("model.safetensors"), images, "calib.npy")
    """
    opened = open_checkpoint(path)
    _refuse_module(opened)
    with torch.device("meta"):
        model = build(opened.spec)
    model.checkpoint_meta = opened.meta
    return model


def _refuse_module(opened: Opened) -> None:
    if opened.spec.get("family") == "module":
        raise CheckpointError(
            f"{opened.path}: holds a model of your own class {opened.spec.get('class', '?')}; build it in Python and "
            "load the file into it: moe_prune.load(path, model=YourModel(...))"
        )


def file_dtype(opened: Opened) -> torch.dtype:
    """`checkpoint_dtype` of an opened checkpoint, from its header (no tensor read)."""
    names = {dtype_name(dt) for dt, _ in opened.header.values()}
    floats = {getattr(torch, n) for n in names if isinstance(getattr(torch, n, None), torch.dtype)
              and getattr(torch, n).is_floating_point}
    return floats.pop() if len(floats) == 1 else torch.float32


def load(path, *, device: str | torch.device = "cpu", dtype=None, model: nn.Module | None = None) -> nn.Module:
    """Load a checkpoint (native, or a soft-moe / soft-moe-pytorch file of any format) as a model in eval mode.

    Args:
        path: a file path or a CheckpointFile (to pass the source library's kwargs, --ema, the library).
        device: where the weights go.
        dtype: the model's dtype; None keeps the checkpoint's (float32 when it mixes dtypes).
        model: for a checkpoint of a model of your own class (saved by `save` after `moe_prune.convert`): a fresh
            instance of that class; its Soft MoE layers are converted to the file's (compressed) ones and the
            file's weights loaded into it, in place.

    Returns:
        The model (MnistSoftMoE, SoftMoEViT, SoftMoE, or `model`), with `model.checkpoint_meta` set.

    Raises:
        CheckpointError: missing, needs full unpickling, corrupted, unknown layout, tensors that do not fit the
            config, or non-finite weights.

    Example:
        >>> model = moe_prune.load("last.ckpt")          # a soft-moe ViT, architecture from its shapes
        >>> logits = model(images)
    """
    opened = open_checkpoint(path)
    dtype = float_dtype(dtype)
    if model is not None:
        return _load_into(opened, model, device, dtype)
    _refuse_module(opened)
    try:
        with torch.device("meta"):
            built = build(opened.spec)
    except ConfigError as e:
        raise CheckpointError(f"{opened.path}: its architecture config is invalid: {e}") from None
    check_layout(built, opened.header, opened.path)
    assign_weights(built, opened.tensors(), opened.path, device, dtype)
    built.checkpoint_meta = opened.meta
    return _inference_only(built).eval()


def _inference_only(model: nn.Module) -> nn.Module:
    """A model with int8 experts (moe_prune.compression.quantize) is inference-only: its parameters are frozen, so that only a
    call that means to train asks for gradients through the experts (and is refused there)."""
    from .models import quantized_layers

    return model.requires_grad_(False) if quantized_layers(model) else model


def _load_into(opened: Opened, model: nn.Module, device, dtype) -> nn.Module:
    from .convert import convert
    from .layers import SoftMoEConfig

    spec = opened.spec
    if spec.get("family") != "module":
        raise CheckpointError(f"{opened.path}: holds a moe-prune {spec.get('family')} model; load it without model=")
    configs = {name: SoftMoEConfig.from_dict(cfg) for name, cfg in spec["moe"].items()}
    convert(model, configs=configs)
    state = opened.tensors()
    check_layout(model, {k: ("", list(v.shape)) for k, v in state.items()}, opened.path)
    assign_weights(model, state, opened.path, device, dtype)
    model.checkpoint_meta = opened.meta
    return _inference_only(model).eval()


def check_layout(model: nn.Module, header: dict[str, tuple[str, list[int]]], where, allow_extra: bool = False) -> None:
    """Missing, unexpected and misshapen tensors against the model the config describes, in one message."""
    expected = {k: list(v.shape) for k, v in model.state_dict().items()}
    missing = sorted(set(expected) - set(header))
    extra = [] if allow_extra else sorted(set(header) - set(expected))
    wrong = [f"{k} is {header[k][1]}, the config implies {expected[k]}" for k in expected if k in header and header[k][1] != expected[k]]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing tensor(s): {', '.join(missing[:4])}{' ...' if len(missing) > 4 else ''}")
    if extra:
        problems.append(f"{len(extra)} unexpected tensor(s): {', '.join(extra[:4])}{' ...' if len(extra) > 4 else ''}")
    if wrong:
        problems.append(f"{len(wrong)} shape mismatch(es): {'; '.join(wrong[:3])}{' ...' if len(wrong) > 3 else ''}")
    if problems:
        raise CheckpointError(f"{where}: the tensors do not match the architecture config: {' | '.join(problems)}")


# -- writing -------------------------------------------------------------------------------------------------


def save(model: nn.Module, path: str | os.PathLike, meta: dict[str, Any] | None = None, inputs: tuple = (),
         dtype=None) -> Path:
    """Write a model as a native checkpoint, atomically (a temporary file, then a rename).

    A model of your own class with moe-prune Soft MoE layers in it (after `moe_prune.convert`) is written too:
    its layers' configs go into the metadata, and `load(path, model=YourModel(...))` reads it back.

    Args:
        model: a moe-prune model (MnistSoftMoE, SoftMoEViT or SoftMoE), or any model holding moe-prune layers.
        path: the output .safetensors file.
        meta: JSON-able facts stored with it (accuracy, command, ...); defaults to `model.checkpoint_meta`.
        inputs: paths the output must not overwrite (e.g. the checkpoint the model came from).
        dtype: write floating weights in this dtype (None: as the model holds them).

    Returns:
        The output path.

    Raises:
        ConfigError: no Soft MoE layer in the model. OutputError: the path cannot be written safely.

    Example:
        >>> moe_prune.save(model, "model.safetensors", meta={"test_accuracy": 0.91})
    """
    spec = any_spec(model)
    if meta is None:
        meta = getattr(model, "checkpoint_meta", {})
    dtype = float_dtype(dtype)
    record = {"format_version": FORMAT_VERSION, "spec": spec, "meta": meta}
    metadata = {"format": "pt", NATIVE_KEY: json.dumps(record, sort_keys=True)}
    state = {k: v.detach().to("cpu", dtype if dtype is not None and v.is_floating_point() else v.dtype).contiguous()
             for k, v in model.state_dict().items()}
    _untie(state)
    with atomic_output(path, inputs=inputs, suffix=".safetensors") as tmp:
        save_file(state, str(tmp), metadata=metadata)
        _sort_metadata(tmp)
    return Path(path)


def _untie(state: dict[str, torch.Tensor]) -> None:
    """safetensors refuses tensors that share memory (tied weights of a user's model): give each its own copy."""
    seen = set()
    for k, v in state.items():
        key = (v.untyped_storage().data_ptr(), v.storage_offset()) if v.numel() else None
        if key is not None and key in seen:
            state[k] = v.clone()
        seen.add(key)


def any_spec(model: nn.Module) -> dict:
    """`model_spec` for moe-prune's families; for a model of the user's own class holding moe-prune Soft MoE
    layers, {"family": "module", "class": its import path, "moe": {layer name: config}}.

    Raises:
        ConfigError: a model with no moe-prune Soft MoE layer in it.
    """
    try:
        return model_spec(model)
    except ConfigError:
        layers = moe_layers(model)
        if not layers:
            raise ConfigError(f"{type(model).__name__} holds no moe-prune Soft MoE layer; convert it first "
                              "(moe_prune.convert(model))") from None
        cls = type(model)
        return {"family": "module", "class": f"{cls.__module__}.{cls.__qualname__}",
                "moe": {name: layer.config.to_dict() for name, layer in layers.items()}}


def _sort_metadata(path: Path) -> None:
    """Rewrite a safetensors header in place with its metadata keys sorted, so that equal inputs give equal bytes.

    safetensors writes the metadata from a Rust HashMap, whose order changes from one call to the next.
    """
    with open(path, "r+b") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
        header["__metadata__"] = dict(sorted(header.get("__metadata__", {}).items()))
        text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
        if len(text) <= n:  # the same JSON reordered has the same length; the rest is the usual space padding
            f.seek(8)
            f.write(text + b" " * (n - len(text)))


def dtype_name(dt: str) -> str:
    """A safetensors header dtype ("F32", "BF16", ...) as torch names it ("float32", "bfloat16", ...)."""
    return {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "F64": "float64", "I64": "int64", "I32": "int32",
            "I16": "int16", "I8": "int8", "U8": "uint8"}.get(dt, dt.lower())
