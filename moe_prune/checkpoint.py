"""Checkpoints: the native format, and loaders for the two public PyTorch Soft MoE libraries.

Native format: ONE safetensors file. Its header metadata holds, under the key "moe_prune", a JSON object
{"format_version": 1, "spec": <model spec, see moe_prune.models>, "meta": {...}} (meta: free-form facts such as
the test accuracy, the training command, the original expert ids of a compressed model). One file means a
checkpoint cannot be separated from its architecture, and one atomic rename publishes both.

Nothing is ever unpickled: a pickle or torch.save file is refused with a message saying how to convert it.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from .errors import CheckpointError, ConfigError
from .files import atomic_output
from .layers import SoftMoE, SoftMoEConfig
from .models import SoftMoEViT, ViTConfig, build, model_spec

NATIVE_KEY = "moe_prune"
FORMAT_VERSION = 1
_PICKLE_HINT = (
    "moe-prune never unpickles files (unpickling runs code). Convert it yourself where you trust it: "
    "`safetensors.torch.save_file(torch.load(PATH, weights_only=True), 'model.safetensors')`, "
    "then `moe-prune convert`"
)

# -- reading -------------------------------------------------------------------------------------------------


def check_readable(path: str | os.PathLike) -> Path:
    """Refuse at once what cannot be a safetensors checkpoint: missing, a folder, empty, pickle or zip."""
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"{p}: no such file")
    if p.is_dir():
        raise CheckpointError(f"{p}: is a folder; give the .safetensors file inside it")
    with open(p, "rb") as f:
        head = f.read(9)
    if not head:
        raise CheckpointError(f"{p}: the file is empty")
    if head[8:9] != b"{":  # safetensors: an 8-byte little-endian header length, then the JSON header
        if head[:1] == b"\x80" and len(head) > 1 and 2 <= head[1] <= 5:
            raise CheckpointError(f"{p}: this is a pickle file, not safetensors. {_PICKLE_HINT}")
        if head[:4] == b"PK\x03\x04":
            raise CheckpointError(f"{p}: this is a zip archive (a torch.save file?), not safetensors. {_PICKLE_HINT}")
        if len(head) < 9:
            raise CheckpointError(f"{p}: truncated: {len(head)} bytes, too short for a safetensors header")
        raise CheckpointError(f"{p}: not a safetensors file (it does not start with a safetensors header)")
    return p


def read_header(path: str | os.PathLike) -> tuple[dict[str, str], dict[str, tuple[str, list[int]]]]:
    """Read a safetensors header without loading any tensor.

    Returns:
        (metadata, {tensor name: (dtype, shape)}).

    Raises:
        CheckpointError: missing, pickled, truncated or corrupted file.

    Example:
        >>> meta, tensors = read_header("model.safetensors")
        >>> tensors["head.weight"]
        ('F32', [10, 784])
    """
    p = check_readable(path)
    try:
        with safe_open(str(p), framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {}
            for name in f.keys():
                sl = f.get_slice(name)
                tensors[name] = (sl.get_dtype(), list(sl.get_shape()))
    except CheckpointError:
        raise
    except Exception as e:  # safetensors raises its own error types (and OSError) for every malformed file
        raise CheckpointError(f"{p}: not a valid safetensors file ({_short(e)}); is it truncated or corrupted?") from None
    return metadata, tensors


def _short(e: Exception) -> str:
    return str(e).splitlines()[0][:200] if str(e) else type(e).__name__


def load_tensors(path: str | os.PathLike, names: list[str] | None = None) -> dict[str, torch.Tensor]:
    """Load some or all tensors of a safetensors file (validated like `read_header`)."""
    p = check_readable(path)
    try:
        with safe_open(str(p), framework="pt") as f:
            return {name: f.get_tensor(name) for name in (names if names is not None else f.keys())}
    except Exception as e:
        raise CheckpointError(f"{p}: could not read tensors ({_short(e)}); is the file truncated or corrupted?") from None


def native_info(path: str | os.PathLike) -> tuple[dict, dict, dict[str, tuple[str, list[int]]]]:
    """(spec, meta, tensor header) of a native checkpoint, loading no tensor.

    Raises:
        CheckpointError: not a native checkpoint (the message says which converter fits, if one does).
    """
    metadata, tensors = read_header(path)
    if NATIVE_KEY not in metadata:
        source = detect_source(tensors)
        hint = {
            "bwconrad": f"it looks like a soft-moe (bwconrad) checkpoint: `moe-prune convert {path} --from bwconrad "
            "--kwargs '{...the SoftMoEVisionTransformer arguments...}' --out model.safetensors`",
            "lucidrains": f"it looks like a soft-moe-pytorch (lucidrains) checkpoint: `moe-prune convert {path} "
            "--from lucidrains --kwargs '{\"dim\": ..., \"num_experts\": ...}' --out model.safetensors`",
        }.get(source, "it has no moe-prune architecture metadata and no known layout")
        raise CheckpointError(f"{path}: not a moe-prune checkpoint; {hint}")
    try:
        record = json.loads(metadata[NATIVE_KEY])
        spec, meta = record["spec"], record.get("meta", {})
        version = record.get("format_version")
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{path}: the moe-prune metadata is not valid JSON with a 'spec' ({_short(e)})") from None
    if type(version) is not int or version != FORMAT_VERSION:
        raise CheckpointError(f"{path}: format version {version!r}; this moe-prune reads version {FORMAT_VERSION}")
    if not isinstance(meta, dict):
        raise CheckpointError(f"{path}: the moe-prune metadata's 'meta' is not a JSON object; the file is damaged")
    config = spec.get("config") if isinstance(spec, dict) else None
    depth = config.get("depth") if isinstance(config, dict) else None
    if isinstance(depth, int) and depth > len(tensors):  # every block holds tensors; building 10**9 of them would hang
        raise CheckpointError(f"{path}: its architecture config is invalid: depth {depth}, but the file holds {len(tensors)} tensors")
    try:  # a damaged spec fails in many ways (wrong types, huge sizes); building it on the meta device checks all
        with torch.device("meta"):
            skeleton = build(spec)
            spec = model_spec(skeleton)
    except Exception as e:
        raise CheckpointError(f"{path}: its architecture config is invalid: {e if isinstance(e, ConfigError) else _short(e)}") from None
    # The header against the spec, as `load` checks it: `info` and `compress` never describe a file `load` refuses.
    _check_layout(skeleton, tensors, path)
    return spec, meta, tensors


def skeleton(path: str | os.PathLike) -> nn.Module:
    """The model a native checkpoint describes, on the meta device (no tensor read), with its `checkpoint_meta`:
    enough to know what input it takes before minutes of work (see data.check_inputs).

    Example:
        >>> data.check_inputs(skeleton("model.safetensors"), images, "calib.npy")
    """
    spec, meta, _ = native_info(path)
    with torch.device("meta"):
        model = build(spec)
    model.checkpoint_meta = meta
    return model


def load(path: str | os.PathLike, *, device: str | torch.device = "cpu") -> nn.Module:
    """Load a native checkpoint as a model in eval mode.

    Args:
        path: a native .safetensors checkpoint (see `save`).
        device: where the weights go.

    Returns:
        The model (MnistSoftMoE, SoftMoEViT or SoftMoE), with `model.checkpoint_meta` set to the file's meta.

    Raises:
        CheckpointError: missing, pickled, corrupted, not native, tensors that do not fit the config,
            or non-finite weights.

    Example:
        >>> model = moe_prune.load("model.safetensors")
        >>> logits = model(images)  # images [B, 1, 28, 28] in [0, 1]
    """
    spec, meta, header = native_info(path)
    try:
        with torch.device("meta"):
            model = build(spec)
    except ConfigError as e:
        raise CheckpointError(f"{path}: its architecture config is invalid: {e}") from None
    _check_layout(model, header, path)
    assign_weights(model, load_tensors(path), path, device)
    model.checkpoint_meta = meta
    return model.eval()


def _check_layout(model: nn.Module, header: dict[str, tuple[str, list[int]]], where) -> None:
    """Missing, unexpected and misshapen tensors against the model the config describes, in one message."""
    expected = {k: list(v.shape) for k, v in model.state_dict().items()}
    missing = sorted(set(expected) - set(header))
    extra = sorted(set(header) - set(expected))
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


def assign_weights(model: nn.Module, state: dict[str, torch.Tensor], where, device) -> None:
    """Put checked tensors into `model` (every name, strictly), as float32 on `device`.

    Raises:
        CheckpointError: non-float weights or NaN/Inf values, naming `where` (the file or the model).
    """
    expected = model.state_dict()
    for name, t in state.items():
        if name in expected and expected[name].is_floating_point() and not t.is_floating_point():
            raise CheckpointError(f"{where}: tensor {name} is {t.dtype}; the model needs floating-point weights")
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise CheckpointError(f"{where}: tensor {name} holds NaN or Inf values; the checkpoint is damaged")
    # One float dtype for the whole model: half-precision or mixed checkpoints load as float32 (inputs are float32).
    state = {k: v.to(device, torch.float32) if v.is_floating_point() else v.to(device) for k, v in state.items()}
    model.load_state_dict(state, strict=True, assign=True)


# -- writing -------------------------------------------------------------------------------------------------


def save(model: nn.Module, path: str | os.PathLike, meta: dict[str, Any] | None = None, inputs: tuple = ()) -> Path:
    """Write a model as a native checkpoint, atomically (a temporary file, then a rename).

    Args:
        model: a moe-prune model (MnistSoftMoE, SoftMoEViT or SoftMoE).
        path: the output .safetensors file.
        meta: JSON-able facts stored with it (accuracy, command, ...); defaults to `model.checkpoint_meta`.
        inputs: paths the output must not overwrite (e.g. the checkpoint the model came from).

    Returns:
        The output path.

    Raises:
        ConfigError: not a moe-prune model. OutputError: the path cannot be written safely.

    Example:
        >>> moe_prune.save(model, "model.safetensors", meta={"test_accuracy": 0.91})
    """
    spec = model_spec(model)
    if meta is None:
        meta = getattr(model, "checkpoint_meta", {})
    record = {"format_version": FORMAT_VERSION, "spec": spec, "meta": meta}
    metadata = {"format": "pt", NATIVE_KEY: json.dumps(record, sort_keys=True)}
    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    with atomic_output(path, inputs=inputs, suffix=".safetensors") as tmp:
        save_file(state, str(tmp), metadata=metadata)
        _sort_metadata(tmp)
    return Path(path)


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


# -- the public libraries ------------------------------------------------------------------------------------


def detect_source(names) -> str | None:
    """'bwconrad', 'lucidrains' or None, from tensor names alone."""
    names = list(names)
    if any(".mlp.experts.0.fc1.weight" in n for n in names) and "patch_embed.proj.weight" in names:
        return "bwconrad"
    if any(n.endswith("experts.experts.0.0.weight") for n in names) and any(n.endswith("slot_embeds") for n in names):
        return "lucidrains"
    return None


def _state_dict(src, what: str) -> tuple[dict[str, torch.Tensor], str]:
    if isinstance(src, dict):
        bad = [k for k, v in src.items() if not isinstance(v, torch.Tensor)]
        if bad:
            raise CheckpointError(f"{what}: state dict entries {bad[:3]} are not tensors")
        return dict(src), what
    return load_tensors(src), str(src)


_BWCONRAD_CALLABLES = ("embed_layer", "norm_layer", "act_layer", "block_fn", "mlp_layer")


def from_bwconrad(path_or_state_dict, **kwargs) -> SoftMoEViT:
    """Load a `soft_moe.SoftMoEVisionTransformer` checkpoint (PyPI soft-moe 0.0.1, bwconrad) as a native model.

    Args:
        path_or_state_dict: its state_dict(), or a safetensors file of it.
        **kwargs: exactly the keyword arguments the model was built with (num_experts, slots_per_expert,
            moe_layer_index, img_size, patch_size, in_chans, num_classes, global_pool, embed_dim, depth,
            num_heads, mlp_ratio, qkv_bias, qk_norm, init_values, class_token, no_embed_class, pre_norm,
            fc_norm, the dropout rates, weight_init). The callables (embed_layer, norm_layer, act_layer,
            block_fn, mlp_layer) can only be their defaults.

    Returns:
        SoftMoEViT in eval mode; its outputs equal the source model's.

    Raises:
        ConfigError: unknown or unsupported keyword arguments.
        CheckpointError: unreadable file, or tensors that do not fit the arguments.

    Example:
        >>> model = moe_prune.from_bwconrad("vit.safetensors", num_experts=16, moe_layer_index=2, img_size=28,
        ...                                 patch_size=4, in_chans=1, num_classes=10, embed_dim=64, depth=4, num_heads=4)
    """
    custom = [k for k in _BWCONRAD_CALLABLES if kwargs.get(k) is not None]
    if custom:
        raise ConfigError(f"from_bwconrad: custom {custom} are not supported; only soft-moe's default layers convert")
    for k in _BWCONRAD_CALLABLES:
        kwargs.pop(k, None)
    known = set(ViTConfig.__dataclass_fields__) - {"moe_mlp_ratio", "moe_dispatch_input"}
    unknown = sorted(set(kwargs) - known)
    if unknown:
        raise ConfigError(f"from_bwconrad: unknown keyword arguments {unknown}; SoftMoEVisionTransformer takes {sorted(known)}")
    state, where = _state_dict(path_or_state_dict, "from_bwconrad")
    config = ViTConfig(**kwargs)
    with torch.device("meta"):
        model = SoftMoEViT(config)
    native = {}
    experts: dict[tuple[str, str], dict[int, torch.Tensor]] = {}
    for name, t in state.items():
        parts = name.split(".")
        # blocks.{i}.mlp.experts.{e}.{fc1|fc2}.{weight|bias} -> blocks.{i}.mlp.experts.{w1|b1|w2|b2}[e]
        if len(parts) == 7 and parts[0] == "blocks" and parts[2:4] == ["mlp", "experts"] and parts[4].isdigit():
            key = {("fc1", "weight"): "w1", ("fc1", "bias"): "b1", ("fc2", "weight"): "w2", ("fc2", "bias"): "b2"}.get(
                (parts[5], parts[6])
            )
            if key is None:
                raise CheckpointError(f"{where}: unexpected expert tensor {name}")
            experts.setdefault((".".join(parts[:4]), key), {})[int(parts[4])] = t.t() if key[0] == "w" else t
        else:
            native[name] = t
    for (prefix, key), per_expert in experts.items():
        if sorted(per_expert) != list(range(len(per_expert))):
            raise CheckpointError(f"{where}: {prefix} has experts {sorted(per_expert)}; expected 0..{len(per_expert) - 1}")
        shapes = {tuple(v.shape) for v in per_expert.values()}
        if len(shapes) != 1:
            raise CheckpointError(f"{where}: the experts of {prefix} have different {key} shapes {sorted(shapes)}")
        native[f"{prefix}.{key}"] = torch.stack([per_expert[e] for e in range(len(per_expert))])
    _check_layout(model, {k: ("", list(v.shape)) for k, v in native.items()}, where)
    assign_weights(model, native, where, "cpu")
    model.checkpoint_meta = {"converted_from": "soft-moe (bwconrad) SoftMoEVisionTransformer", "source_kwargs": kwargs}
    return model.eval()


_LUCIDRAINS_KWARGS = (
    "dim", "seq_len", "num_experts", "num_slots", "expert_mult", "dropout", "geglu", "is_distributed",
    "offload_unused_experts_to_cpu", "use_layernorm",
)


def from_lucidrains(path_or_state_dict, **kwargs) -> SoftMoE:
    """Load a `soft_moe_pytorch.SoftMoE` layer (PyPI soft-moe-pytorch 0.1.9, lucidrains) as a native layer.

    The library's RMSNorm (l2-normalize, times sqrt(D) and a gain) becomes `token_norm="l2"` with the gain
    folded into `norm_weight`; its normalized slot embeddings become a fixed Phi with no column normalization.
    Difference: padded tokens (mask False) get output 0 here; the library gives them a uniform mix of all slots.

    Args:
        path_or_state_dict: the layer's state_dict(), or a safetensors file of it.
        **kwargs: the layer's keyword arguments: dim (required), seq_len or num_slots (exactly one),
            num_experts=4, expert_mult=4, geglu=False, use_layernorm=False; dropout, is_distributed and
            offload_unused_experts_to_cpu are accepted and do not affect inference.

    Returns:
        SoftMoE in eval mode; for an input x [B, N, D] its output equals the library's.

    Raises:
        ConfigError: unknown or inconsistent keyword arguments. CheckpointError: unreadable or misfit tensors.

    Example:
        >>> layer = moe_prune.from_lucidrains("layer.safetensors", dim=64, seq_len=64, num_experts=8)
        >>> y = layer(torch.randn(3, 64, 64))
    """
    unknown = sorted(set(kwargs) - set(_LUCIDRAINS_KWARGS))
    if unknown:
        raise ConfigError(f"from_lucidrains: unknown keyword arguments {unknown}; SoftMoE takes {list(_LUCIDRAINS_KWARGS)}")
    if "dim" not in kwargs:
        raise ConfigError("from_lucidrains: `dim` is required")
    dim, E = kwargs["dim"], kwargs.get("num_experts", 4)
    seq_len, num_slots = kwargs.get("seq_len"), kwargs.get("num_slots")
    if (seq_len is None) == (num_slots is None):
        raise ConfigError("from_lucidrains: pass exactly one of seq_len and num_slots, as soft_moe_pytorch.SoftMoE requires")
    S = num_slots if num_slots is not None else seq_len // E
    if S < 1:
        raise ConfigError(f"from_lucidrains: seq_len {seq_len} // num_experts {E} gives no slots")
    mult, geglu, layernorm = kwargs.get("expert_mult", 4), kwargs.get("geglu", False), kwargs.get("use_layernorm", False)
    hidden = int(dim * mult * 2 / 3) if geglu else int(dim * mult)
    config = SoftMoEConfig(
        dim=dim, num_experts=E, slots_per_expert=S, hidden=hidden, expert="geglu" if geglu else "gelu_mlp",
        token_norm="layer" if layernorm else "l2", token_gain=True, phi_norm=False,
        # the library's F.normalize floor (1e-12) or F.layer_norm's default epsilon (1e-5)
        eps=1e-5 if layernorm else 1e-12,
    )
    state, where = _state_dict(path_or_state_dict, "from_lucidrains")
    expected_src = {"norm.gamma", "slot_norm.gamma", "slot_embeds"} | {
        f"experts.experts.{e}.{i}.{w}" for e in range(E) for i in (0, 3) for w in ("weight", "bias")
    }
    if layernorm:
        expected_src |= {"norm.beta", "slot_norm.beta"}
    missing, extra = sorted(expected_src - set(state)), sorted(set(state) - expected_src - {"norm.beta", "slot_norm.beta"})
    if missing or extra:
        raise CheckpointError(
            f"{where}: does not fit soft_moe_pytorch.SoftMoE({', '.join(f'{k}={v}' for k, v in kwargs.items())}): "
            f"missing {missing[:4]}{' ...' if len(missing) > 4 else ''}, unexpected {extra[:4]}{' ...' if len(extra) > 4 else ''}"
        )
    if list(state["slot_embeds"].shape) != [E, S, dim]:
        raise CheckpointError(f"{where}: slot_embeds is {list(state['slot_embeds'].shape)}, the arguments imply {[E, S, dim]}")
    gamma, slot_gamma, slots = state["norm.gamma"], state["slot_norm.gamma"], state["slot_embeds"]
    if layernorm:
        if any(bool(state[k].any()) for k in ("norm.beta", "slot_norm.beta") if k in state):
            raise CheckpointError(f"{where}: nonzero LayerNorm beta; soft-moe-pytorch keeps it at zero, so the file is not from it")
        gain = gamma
        phi = torch.nn.functional.layer_norm(slots, (dim,), eps=1e-5) * slot_gamma  # [E, S, D]
    else:
        gain = gamma * math.sqrt(dim)
        phi = torch.nn.functional.normalize(slots, dim=-1) * math.sqrt(dim) * slot_gamma  # [E, S, D]
    native = {"phi": phi.permute(2, 0, 1).contiguous(), "norm_weight": gain}
    for key, (idx, w) in {"w1": (0, "weight"), "b1": (0, "bias"), "w2": (3, "weight"), "b2": (3, "bias")}.items():
        ts = [state[f"experts.experts.{e}.{idx}.{w}"] for e in range(E)]
        native[f"experts.{key}"] = torch.stack([t.t() if w == "weight" else t for t in ts])
    with torch.device("meta"):
        layer = SoftMoE(config)
    _check_layout(layer, {k: ("", list(v.shape)) for k, v in native.items()}, where)
    assign_weights(layer, native, where, "cpu")
    layer.checkpoint_meta = {"converted_from": "soft-moe-pytorch (lucidrains) SoftMoE", "source_kwargs": kwargs}
    return layer.eval()


def summary(path: str | os.PathLike) -> dict:
    """Architecture, Soft MoE layers and parameter counts of a native checkpoint, loading no tensor.

    Returns:
        A JSON-able dict: path, bytes, family, config, parameters, expert_parameters, moe_layers (per layer:
        name, experts in the router, experts held, slots, hidden, kind, original ids of the held experts,
        parameters) and meta.

    Example:
        >>> s = summary("model.safetensors")
        >>> s["moe_layers"][0]["experts_held"]
        16
    """
    spec, meta, header = native_info(path)
    count = {name: math.prod(shape) for name, (_, shape) in header.items()}
    layers = []
    for name, cfg in (spec.get("moe") or {"": spec["config"]}).items():
        prefix = f"{name}." if name else ""
        held = len(cfg["present"]) if cfg.get("present") else cfg["num_experts"]
        origin = cfg.get("origin") or cfg.get("present")
        layers.append({
            "name": name or "(layer)", "router_experts": cfg["num_experts"], "experts_held": held,
            "slots_per_expert": cfg["slots_per_expert"], "hidden": cfg["hidden"], "expert": cfg["expert"],
            "kept_original_ids": origin,
            "parameters": sum(n for k, n in count.items() if k.startswith(prefix)),
            "expert_parameters": sum(n for k, n in count.items() if k.startswith(prefix + "experts.")),
        })
    return {
        "path": str(path), "bytes": os.path.getsize(path), "family": spec["family"], "config": spec["config"],
        "parameters": sum(count.values()), "expert_parameters": sum(layer["expert_parameters"] for layer in layers),
        "moe_layers": layers, "meta": meta,
    }


def convert(source: str | os.PathLike, out: str | os.PathLike, fmt: str = "auto", kwargs: dict | None = None):
    """Convert a soft-moe or soft-moe-pytorch safetensors state dict to a native checkpoint.

    Args:
        source: the library's state dict as .safetensors.
        out: the native checkpoint to write (atomically; never the source).
        fmt: "bwconrad", "lucidrains" or "auto" (detected from tensor names).
        kwargs: the library model's constructor keyword arguments.

    Returns:
        (model, detected format).

    Raises:
        CheckpointError: unreadable source or unknown layout. ConfigError: bad kwargs. OutputError: bad output.

    Example:
        >>> convert("vit.safetensors", "native.safetensors", "bwconrad", {"num_experts": 16, ...})
    """
    _, header = read_header(source)
    if fmt == "auto":
        fmt = detect_source(header)
        if fmt is None:
            raise CheckpointError(f"{source}: the tensor names match neither soft-moe (bwconrad) nor soft-moe-pytorch "
                                  "(lucidrains); pass --from if you know which it is")
    loader = {"bwconrad": from_bwconrad, "lucidrains": from_lucidrains}.get(fmt)
    if loader is None:
        raise ConfigError(f"unknown source format {fmt!r}: choose bwconrad or lucidrains")
    model = loader(source, **(kwargs or {}))
    save(model, out, inputs=(source,))
    return model, fmt
