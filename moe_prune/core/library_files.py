"""The soft-moe and soft-moe-pytorch libraries' checkpoints as native models: `from_bwconrad`, `from_lucidrains`
(a state dict or any file `load` reads), and `convert_file`, which writes one as a native checkpoint (`moe-prune
convert`).
"""

from __future__ import annotations

import os

import torch
from torch import nn

from ..errors import CheckpointError
from .checkpoint import CheckpointFile, check_layout, load, open_checkpoint, save
from .layers import SoftMoE
from .models import SoftMoEViT, build
from .weights import assign_weights


def _library_state(src, what: str, kind: str, kwargs: dict):
    """(converted, where) for from_bwconrad / from_lucidrains: a state dict in memory or any checkpoint file."""
    from .formats import read_state_file
    from .libraries import bwconrad_vit, find_layout, lucidrains_layer, strip

    if isinstance(src, dict):
        bad = [k for k, v in src.items() if not isinstance(v, torch.Tensor)]
        if bad:
            raise CheckpointError(f"{what}: state dict entries {bad[:3]} are not tensors")
        state, where, hparams = dict(src), what, None
    else:
        sf = read_state_file(src)
        state, where, hparams = sf.tensors, str(src), sf.hyper_parameters
    found = find_layout(state, where=where)
    if found is not None and found[0] == kind:
        state, _ = strip(state, found[1])
    if kind == "vit":
        if "patch_embed.proj.weight" not in state:
            raise CheckpointError(f"{where}: no patch_embed.proj.weight: not a soft-moe SoftMoEVisionTransformer")
        return bwconrad_vit(state, kwargs, hparams, where), where
    return lucidrains_layer(state, kwargs, where), where


def _from_library(src, kind: str, kwargs: dict, what: str) -> nn.Module:
    converted, where = _library_state(src, what, kind, kwargs)
    with torch.device("meta"):
        model = build(converted.spec)
    check_layout(model, {k: ("", list(v.shape)) for k, v in converted.state.items()}, where)
    assign_weights(model, converted.state, where, "cpu")
    model.checkpoint_meta = {"converted_from": f"{converted.library} {converted.model}", "source_kwargs": converted.kwargs}
    return model.eval()


def from_bwconrad(path_or_state_dict, **kwargs) -> SoftMoEViT:
    """Load a `soft_moe.SoftMoEVisionTransformer` checkpoint (PyPI soft-moe 0.0.1, bwconrad) as a native model.

    Args:
        path_or_state_dict: its state_dict(), or a checkpoint file of it (any format `load` reads).
        **kwargs: constructor arguments the tensor shapes cannot tell (num_heads, global_pool); any other given
            is checked against the tensors. The callables (embed_layer, norm_layer, act_layer, block_fn,
            mlp_layer) can only be their defaults.

    Returns:
        SoftMoEViT in eval mode; its outputs equal the source model's.

    Raises:
        ConfigError: unknown or unsupported keyword arguments.
        CheckpointError: unreadable file, or tensors that do not fit the arguments.

    Example:
        >>> model = moe_prune.from_bwconrad("vit.safetensors", num_heads=4)
    """
    return _from_library(path_or_state_dict, "vit", kwargs, "from_bwconrad")


def from_lucidrains(path_or_state_dict, **kwargs) -> SoftMoE:
    """Load a `soft_moe_pytorch.SoftMoE` layer (PyPI soft-moe-pytorch 0.1.9, lucidrains) as a native layer.

    The library's RMSNorm (l2-normalize, times sqrt(D) and a gain) becomes `token_norm="l2"` with the gain
    folded into `norm_weight`; its normalized slot embeddings become a fixed Phi with no column normalization.
    Difference: padded tokens (mask False) get output 0 here; the library gives them a uniform mix of all slots.

    Args:
        path_or_state_dict: the layer's state_dict(), or a checkpoint file of it.
        **kwargs: optional, checked against the tensors: dim, seq_len or num_slots, num_experts, expert_mult,
            geglu, use_layernorm; dropout, is_distributed and offload_unused_experts_to_cpu are accepted and do
            not affect inference. Every one of them follows from the tensors.

    Returns:
        SoftMoE in eval mode; for an input x [B, N, D] its output equals the library's.

    Raises:
        ConfigError: unknown or inconsistent keyword arguments. CheckpointError: unreadable or misfit tensors.

    Example:
        >>> layer = moe_prune.from_lucidrains("layer.safetensors")
        >>> y = layer(torch.randn(3, 64, 64))
    """
    return _from_library(path_or_state_dict, "lucidrains", kwargs, "from_lucidrains")


def convert_file(source, out: str | os.PathLike, fmt: str = "auto", kwargs: dict | None = None,
                 ema: bool = False, preprocess: dict | None = None, dtype=None) -> tuple[nn.Module, dict]:
    """Convert a soft-moe or soft-moe-pytorch checkpoint (any format) to a native checkpoint, keeping its dtype.

    Args:
        source: the library's checkpoint (.safetensors, sharded, .pt/.pth/.bin, Lightning .ckpt).
        out: the native checkpoint to write (atomically; never the source).
        fmt: "bwconrad", "lucidrains" or "auto" (detected from tensor names).
        kwargs: constructor arguments the shapes cannot tell (see `libraries`); optional.
        ema: take the EMA weights.
        preprocess: overrides of the model's input preprocessing (interpolation, crop_pct, mean, std; see
            moe_prune.preprocess), recorded with the defaults in the output's metadata.
        dtype: the output's float dtype ("fp16", "bf16", "fp32"; None: the source's).

    Returns:
        (model, found: what was read and inferred, see `summary`).

    Raises:
        CheckpointError: unreadable source or unknown layout. ConfigError: bad kwargs. OutputError: bad output.

    Example:
        >>> model, found = convert_file("last.ckpt", "native.safetensors", kwargs={"num_heads": 6})
    """
    src = CheckpointFile(os.fspath(source), kwargs=kwargs or None, ema=ema, library=fmt)
    opened = open_checkpoint(src)
    if opened.native:
        raise CheckpointError(f"{source}: is already a moe-prune checkpoint; nothing to convert")
    from .preprocess import for_model

    model = load(src)
    pre = for_model(model, **(preprocess or {}))
    if pre is not None:  # recorded, so that every later command (and `info`) sees it
        model.checkpoint_meta = {**model.checkpoint_meta, "preprocess": pre.to_dict()}
    save(model, out, inputs=(opened.path,), dtype=dtype)
    return model, opened.found
