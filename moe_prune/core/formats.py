"""Checkpoint files as Soft MoE users have them, read into one flat state dict without running any code.

    model.safetensors                      -> safetensors (its header checked before any tensor is read)
    model.safetensors.index.json, or a folder holding one index -> every shard its weight_map names
    model.pt / .pth / .bin, last.ckpt      -> torch.load(weights_only=True): PyTorch's restricted unpickler, which
                                              builds tensors and plain containers only and never calls user code
    containers                             -> the state dict inside: Lightning's {"state_dict", "hyper_parameters",
                                              "optimizer_states", ...}, {"model": ...}, {"state_dict_ema": ...}

What is not weights (optimizer states, schedulers, loops, callbacks) is never used and is listed in `notes`.
A file that needs full unpickling (a pickled nn.Module, a class in the hyper-parameters) is refused in one line.
Which tensors inside the state dict form the model (prefixes such as `model.`) is the layouts' business
(`moe_prune.libraries`).
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import CheckpointError

# Entries of a checkpoint dict that may hold the state dict, most specific first. Lightning and most training
# loops write "state_dict"; others "model", "model_state_dict", "module" (DDP wrappers), "net".
_MODEL_ENTRIES = ("state_dict", "model_state_dict", "model", "module", "net", "network", "weights", "params")
# Exponential-moving-average copies (timm's train.py writes "state_dict_ema"; others "model_ema", "ema", ...).
EMA_ENTRIES = ("state_dict_ema", "model_ema", "ema_state_dict", "ema", "ema_model", "model_ema_state_dict")
_HPARAM_ENTRIES = ("hyper_parameters", "hparams", "config", "args")
_INDEX_SUFFIX = ".index.json"


@dataclass
class StateFile:
    """What a checkpoint file holds, read without running code.

    Attributes:
        path: the file (for a sharded checkpoint, its index).
        format: in words: "safetensors", "safetensors, 3 shards", "torch.save", "Lightning checkpoint".
        tensors: the state dict (names as the file has them, prefixes included).
        metadata: the safetensors header metadata ({} for other formats).
        hyper_parameters: a Lightning checkpoint's `hyper_parameters` (or a dict's `hparams`/`config`), else None.
        entry: which entry of a container dict the state dict came from ("state_dict", "state_dict_ema", ...).
        notes: what was found and not used, in words (for `moe-prune info`).
        ema_entries: EMA entries the file has besides the one used. ema: the state dict is an EMA entry.
    """

    path: Path
    format: str
    tensors: dict[str, torch.Tensor]
    metadata: dict[str, str] = field(default_factory=dict)
    hyper_parameters: dict | None = None
    entry: str | None = None
    notes: list[str] = field(default_factory=list)
    ema_entries: list[str] = field(default_factory=list)
    ema: bool = False


def _short(e: BaseException) -> str:
    return str(e).splitlines()[0][:200] if str(e) else type(e).__name__


def sniff(path: Path) -> str:
    """"safetensors", "zip" (torch.save since 1.6, Lightning), "pickle" (legacy torch.save), "index" or "unknown"."""
    if path.name.endswith(_INDEX_SUFFIX):
        return "index"
    with open(path, "rb") as f:
        head = f.read(9)
    if len(head) == 9 and head[8:9] == b"{":  # an 8-byte little-endian header length, then the JSON header
        return "safetensors"
    if head[:4] == b"PK\x03\x04":
        return "zip"
    if head[:1] == b"\x80" and len(head) > 1 and 2 <= head[1] <= 5:
        return "pickle"
    return "unknown"


def resolve(path: str | os.PathLike) -> Path:
    """The file to read: `path`, or the one sharded index inside a folder.

    Raises:
        CheckpointError: missing, empty, or a folder without exactly one `*.index.json`.
    """
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"{p}: no such file")
    if p.is_dir():
        indexes = sorted(p.glob(f"*{_INDEX_SUFFIX}"))
        if len(indexes) == 1:
            return indexes[0]
        found = ", ".join(q.name for q in indexes) if indexes else "no *.index.json"
        raise CheckpointError(f"{p}: is a folder ({found}); give the checkpoint file inside it")
    if p.stat().st_size == 0:
        raise CheckpointError(f"{p}: the file is empty")
    return p


def read_state_file(path: str | os.PathLike, ema: bool = False) -> StateFile:
    """Read any checkpoint file into a flat state dict (see the module docstring).

    Args:
        path: a .safetensors file, a sharded index (or its folder), a torch.save file or a Lightning .ckpt.
        ema: take the exponential-moving-average weights where the file keeps them as their own entry
            (EMA copies inside one state dict, under a prefix such as `model_ema.`, are chosen by the layouts).

    Returns:
        A StateFile.

    Raises:
        CheckpointError: unreadable, truncated, corrupted, needs full unpickling, or holds no state dict.

    Example:
        >>> sf = read_state_file("last.ckpt")
        >>> sf.format, sf.entry, sorted(sf.hyper_parameters)[:2]
        ('Lightning checkpoint', 'state_dict', ['embed_dim', 'lr'])
    """
    p = resolve(path)
    kind = sniff(p)
    if kind == "safetensors":
        tensors, metadata = _read_safetensors(p)
        return StateFile(p, "safetensors", tensors, metadata)
    if kind == "index":
        return _read_index(p, ema)
    if kind in ("zip", "pickle"):
        return _unwrap(p, torch_load(p), ema)
    raise CheckpointError(f"{p}: not a checkpoint moe-prune can read (neither safetensors nor a torch.save or "
                          "Lightning file); is it truncated or corrupted?")


def _read_safetensors(p: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors import safe_open

    try:
        with safe_open(str(p), framework="pt") as f:
            return {name: f.get_tensor(name) for name in f.keys()}, dict(f.metadata() or {})
    except Exception as e:  # safetensors raises its own error types (and OSError) for every malformed file
        raise CheckpointError(f"{p}: not a valid safetensors file ({_short(e)}); is it truncated or corrupted?") from None


# torch.load(weights_only=True) before 2.6 could be made to run code (CVE-2025-32434); 2.6 fixed it.
_SAFE_TORCH = (2, 6)


def torch_load(p: Path):
    """torch.load with PyTorch's weights-only unpickler, memory-mapped where the format allows.

    Raises:
        CheckpointError: the file needs full unpickling (the message names the Python object it holds), is
            damaged, or this torch's weights-only loader is not safe.
    """
    import pickle

    version = tuple(int(v) for v in re.findall(r"\d+", torch.__version__)[:2])
    if version < _SAFE_TORCH:
        raise CheckpointError(
            f"{p}: torch {torch.__version__} cannot read torch.save files safely (its weights_only loader can run "
            "code, CVE-2025-32434); upgrade to torch 2.6 or newer, or convert the file to safetensors where you trust it"
        )
    zipped = sniff(p) == "zip"
    try:
        return torch.load(p, map_location="cpu", weights_only=True, mmap=zipped)
    except pickle.UnpicklingError as e:
        what = re.search(r"GLOBAL ([\w.]+)", str(e))
        obj = f" ({what.group(1)})" if what else ""
        raise CheckpointError(
            f"{p}: needs full unpickling: it stores a Python object{obj}, not only tensors, and unpickling it could "
            "run any code; moe-prune reads torch.save files only with torch.load(weights_only=True). Where you trust "
            "the file, load it yourself and save the model's state_dict() (torch.save or safetensors)"
        ) from None
    except Exception as e:
        raise CheckpointError(f"{p}: not a readable torch.save file ({_short(e)}); is it truncated or corrupted?") from None


def _is_state_dict(obj) -> bool:
    return isinstance(obj, dict) and bool(obj) and all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                                       for k, v in obj.items())


def _nested_state(obj):
    """obj itself if it is a state dict, or the state dict one level inside it ({"module": {...}}), else None."""
    if _is_state_dict(obj):
        return obj, None
    if isinstance(obj, dict):
        for key in (*_MODEL_ENTRIES, *EMA_ENTRIES):
            if _is_state_dict(obj.get(key)):
                return obj[key], key
    return None, None


def _describe(value) -> str:
    if isinstance(value, dict):
        return f"{len(value)} entr{'y' if len(value) == 1 else 'ies'}"
    if isinstance(value, (list, tuple)):
        return f"{len(value)} item{'' if len(value) == 1 else 's'}"
    return type(value).__name__


def _unwrap(p: Path, obj, ema: bool) -> StateFile:
    """The state dict inside what torch.load returned."""
    lightning = isinstance(obj, dict) and any(k.startswith("pytorch-lightning_version") or k == "lightning_version"
                                              for k in obj) or (isinstance(obj, dict) and "optimizer_states" in obj)
    fmt = "Lightning checkpoint" if lightning else "torch.save"
    if _is_state_dict(obj):
        return StateFile(p, fmt, dict(obj))
    if not isinstance(obj, dict):
        raise CheckpointError(f"{p}: holds a {type(obj).__name__}, not a state dict (a dict of tensors)")
    ema_found = [k for k in EMA_ENTRIES if _nested_state(obj.get(k))[0] is not None]
    # With --ema an EMA entry wins; without one, EMA copies inside the state dict (prefixed names) are chosen later.
    entries = [*EMA_ENTRIES, *_MODEL_ENTRIES] if ema else list(_MODEL_ENTRIES)
    state, entry = None, None
    for key in entries:
        inner, sub = _nested_state(obj.get(key))
        if inner is not None:
            state, entry = inner, key if sub is None else f"{key}.{sub}"
            break
    if state is None:
        if any(isinstance(v, torch.Tensor) for v in obj.values()):
            bad = [k for k, v in obj.items() if not isinstance(v, torch.Tensor)]
            raise CheckpointError(f"{p}: state dict entries {bad[:3]} are not tensors")
        raise CheckpointError(f"{p}: no state dict inside (looked for entries {', '.join(_MODEL_ENTRIES)}); the file "
                              f"has {', '.join(map(str, list(obj)[:8]))}")
    hparams = next((obj[k] for k in _HPARAM_ENTRIES if isinstance(obj.get(k), dict)), None)
    top = entry.split(".")[0]
    notes = [f"{k} ({_describe(v)})" for k, v in obj.items()
             if k != top and k not in _HPARAM_ENTRIES and isinstance(v, (dict, list, tuple)) and v]
    return StateFile(p, fmt, dict(state), hyper_parameters=hparams, entry=entry, notes=notes,
                     ema_entries=[k for k in ema_found if k != top], ema=top in EMA_ENTRIES)


def _read_index(p: Path, ema: bool) -> StateFile:
    """A sharded checkpoint: its index's weight_map names each tensor's shard (Hugging Face's layout)."""
    try:
        index = json.loads(p.read_text())
        weight_map = index["weight_map"]
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise TypeError("weight_map is not an object of file names")
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{p}: not a sharded-checkpoint index (JSON with a 'weight_map'): {_short(e)}") from None
    tensors: dict[str, torch.Tensor] = {}
    shards = sorted(set(weight_map.values()))
    for name in shards:
        shard = (p.parent / name).resolve()
        if p.parent.resolve() not in shard.parents:
            raise CheckpointError(f"{p}: shard {name!r} is outside the index's folder; refused")
        part = read_state_file(shard, ema=ema)
        want = {k for k, v in weight_map.items() if v == name}
        missing = sorted(want - set(part.tensors))
        if missing:
            raise CheckpointError(f"{p}: shard {name} lacks {len(missing)} tensor(s) its index names, e.g. {missing[0]}")
        tensors.update({k: part.tensors[k] for k in want})
    metadata = index.get("metadata") if isinstance(index.get("metadata"), dict) else {}
    return StateFile(p, f"sharded, {len(shards)} shard(s)", tensors, {k: str(v) for k, v in metadata.items()})
