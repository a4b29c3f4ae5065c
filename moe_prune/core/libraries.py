"""The public Soft MoE libraries' state dicts: found inside whatever a user saved, their architecture read off the
tensor shapes, their tensors converted to moe-prune's (experts stacked).

    soft-moe (bwconrad, PyPI 0.0.1)          SoftMoEVisionTransformer -> family "vit"   (what Chung et al. used)
                                             SoftMoELayerWrapper      -> family "layer"
    soft-moe-pytorch (lucidrains, PyPI 0.1.9) SoftMoE                 -> family "layer"

A state dict is searched for one of these layouts under any leading prefix (`model.` of a LightningModule,
`module.` of DDP, `_orig_mod.` of torch.compile, `model_ema.module.` of an EMA copy), and everything the shapes
determine is read from them. What they cannot tell (a ViT's `num_heads` and `global_pool`) comes from, in order:
the caller's keyword arguments, the checkpoint's hyper-parameters, the library's default for that width; each
value's source is recorded, so `moe-prune info` can say which were guessed.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field, fields

import torch

from ..errors import CheckpointError, ConfigError
from .layers import SoftMoEConfig
from .models import SoftMoEViT, ViTConfig, model_spec

SOFT_MOE = "soft-moe (bwconrad)"
SOFT_MOE_PYTORCH = "soft-moe-pytorch (lucidrains)"

# soft-moe's ViT presets (soft_moe_vit_tiny ... huge): the library's num_heads for each width. Other widths: timm's
# convention of 64-wide heads.
_HEADS_BY_WIDTH = {192: 3, 384: 6, 768: 12, 1024: 16, 1280: 16}
# Constructor arguments that only matter for training (dropout, init): never worth a warning when defaulted.
_TRAINING_ONLY = {"drop_rate", "pos_drop_rate", "patch_drop_rate", "proj_drop_rate", "attn_drop_rate",
                  "drop_path_rate", "weight_init"}
# What a wrong guess silently changes: the outputs (not a shape, so no check can catch it).
OUTPUT_AFFECTING_DEFAULTS = ("num_heads", "global_pool")
# Read off the shapes by assuming a square grid of patches: where the hyper-parameters say otherwise, they win.
_GUESSED = ("img_size", "no_embed_class")
_BWCONRAD_CALLABLES = ("embed_layer", "norm_layer", "act_layer", "block_fn", "mlp_layer")
_VIT_KWARGS = tuple(f.name for f in fields(ViTConfig) if f.name not in ("moe_mlp_ratio", "moe_dispatch_input"))
_LUCIDRAINS_KWARGS = (
    "dim", "seq_len", "num_experts", "num_slots", "expert_mult", "dropout", "geglu", "is_distributed",
    "offload_unused_experts_to_cpu", "use_layernorm",
)


@dataclass
class Converted:
    """A library state dict as a native model's parts.

    Attributes:
        spec: the native model spec (see moe_prune.core.models). state: native tensor names -> tensors.
        library, model: e.g. "soft-moe (bwconrad)", "SoftMoEVisionTransformer".
        kwargs: the library constructor's keyword arguments this corresponds to.
        sources: {argument: "tensors" | "hyper_parameters" | "given" | "default"}.
        notes: anything worth saying (hyper-parameters the tensors overrule, ...).
    """

    spec: dict
    state: dict[str, torch.Tensor]
    library: str
    model: str
    kwargs: dict
    sources: dict[str, str]
    prefix: str = ""
    ignored: int = 0
    notes: list[str] = field(default_factory=list)

    def defaulted(self) -> list[str]:
        """The arguments that affect the outputs and were not found anywhere (the library's default was used)."""
        return [k for k in OUTPUT_AFFECTING_DEFAULTS if self.sources.get(k) == "default"]


# -- finding a layout ----------------------------------------------------------------------------------------

_SIGNATURES = (  # (what, suffix of a tensor that only this layout has, a sibling it must also have)
    ("vit", "patch_embed.proj.weight", None),
    ("lucidrains", "slot_embeds", "experts.experts.0.0.weight"),
    ("bwconrad_layer", "phi", "experts.0."),
)


def _is_ema(prefix: str) -> bool:
    return any("ema" in part.lower() for part in prefix.split(".") if part)


def find_layout(names, ema: bool = False, where: str = "the state dict") -> tuple[str, str] | None:
    """The library layout in a state dict and the prefix its names carry: ("vit" | "lucidrains" |
    "bwconrad_layer", prefix), or None when no Soft MoE layer of either library is in it.

    Raises:
        CheckpointError: several models or layers under different prefixes (a model of the user's own holding
            library layers; two ViTs), or --ema asked and no EMA copy found.
    """
    names = list(names)
    for kind, signature, sibling in _SIGNATURES:
        prefixes = sorted({n[: -len(signature)] for n in names
                           if n == signature or n.endswith("." + signature)})
        if sibling is not None:
            prefixes = [p for p in prefixes if any(n.startswith(p + sibling) for n in names)]
        if kind == "vit":  # a ViT counts only with a Soft MoE layer in its blocks
            prefixes = [p for p in prefixes if any(re.fullmatch(re.escape(p) + r"blocks\.\d+\.mlp\.phi", n) for n in names)]
        if not prefixes:
            continue
        chosen = [p for p in prefixes if _is_ema(p) == ema] or ([] if ema else prefixes)
        if ema and not chosen:
            raise CheckpointError(f"{where}: --ema: no EMA copy found (the model's names start with "
                                  f"{', '.join(repr(p) for p in prefixes)})")
        if len(chosen) == 1:
            return kind, chosen[0]
        shown = ", ".join(repr(p) for p in chosen[:4]) + (" ..." if len(chosen) > 4 else "")
        if kind == "vit":
            raise CheckpointError(f"{where}: holds {len(chosen)} Soft MoE ViTs (names starting {shown}); keep one "
                                  "model's tensors in the file")
        what = "soft-moe-pytorch SoftMoE" if kind == "lucidrains" else "soft-moe SoftMoELayerWrapper"
        raise CheckpointError(
            f"{where}: holds {len(chosen)} {what} layers ({shown}) inside a model moe-prune does not know; in Python, "
            "build your model, load these weights into it and call moe_prune.convert(model)"
        )
    return None


def strip(state: dict[str, torch.Tensor], prefix: str) -> tuple[dict[str, torch.Tensor], int]:
    """The tensors under `prefix`, without it, and how many tensors were outside it."""
    if not prefix:
        return dict(state), 0
    inner = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    return inner, len(state) - len(inner)


# -- hyper-parameters ----------------------------------------------------------------------------------------


def _hparam_kwargs(hparams: dict | None, known) -> dict:
    """Constructor arguments in a checkpoint's hyper-parameters: its own keys, or those of the nested dict (one
    level down, e.g. {"model_kwargs": {...}}) that names the most of them."""
    if not isinstance(hparams, dict):
        return {}
    candidates = [hparams] + [v for v in hparams.values() if isinstance(v, dict)]
    best = max(candidates, key=lambda d: len(set(d) & set(known)))
    return {k: v for k, v in best.items() if k in known}


# -- soft-moe's ViT ------------------------------------------------------------------------------------------


def _square(n: int) -> int | None:
    r = math.isqrt(n)
    return r if r * r == n else None


def _ratio(hidden: int, dim: int) -> float:
    """An mlp_ratio r with int(dim * r) == hidden, as the library computes the hidden width."""
    r = hidden / dim
    while int(dim * r) < hidden:
        r = math.nextafter(r, math.inf)
    return r


def infer_vit(state: dict[str, torch.Tensor], given: dict | None = None, hparams: dict | None = None,
              where: str = "the state dict") -> tuple[dict, dict, list[str]]:
    """SoftMoEVisionTransformer's keyword arguments for a state dict (prefix already stripped).

    Args:
        state: the library's state dict. given: arguments the caller knows (win over everything; contradictions
            with the tensors surface when the tensors are checked). hparams: the checkpoint's hyper-parameters.

    Returns:
        (kwargs, sources {argument: "given" | "tensors" | "hyper_parameters" | "default"}, notes).

    Raises:
        CheckpointError: tensors that contradict each other, or an image size the shapes cannot tell and no
            one gave.
    """
    given = dict(given or {})
    from_hp = _hparam_kwargs(hparams, _VIT_KWARGS)
    t: dict = {}
    w = state["patch_embed.proj.weight"]  # [D, C, ph, pw]
    if w.dim() != 4:
        raise CheckpointError(f"{where}: patch_embed.proj.weight is {list(w.shape)}; a ViT's is [D, C, ph, pw]")
    D, C, ph, pw = w.shape
    t["embed_dim"], t["in_chans"] = D, C
    t["patch_size"] = ph if ph == pw else [ph, pw]
    t["pre_norm"] = "norm_pre.weight" in state
    t["class_token"] = "cls_token" in state
    blocks = sorted({int(m.group(1)) for n in state if (m := re.match(r"blocks\.(\d+)\.", n))})
    if not blocks:
        raise CheckpointError(f"{where}: a soft-moe ViT without blocks")
    depth = blocks[-1] + 1
    t["depth"] = depth
    moe = [i for i in blocks if f"blocks.{i}.mlp.phi" in state]
    t["moe_layer_index"] = moe[0] if moe == list(range(moe[0], depth)) else moe
    shapes = {tuple(state[f"blocks.{i}.mlp.phi"].shape) for i in moe}
    if len(shapes) != 1:
        raise CheckpointError(f"{where}: the Soft MoE layers' phi differ in shape {sorted(shapes)}; soft-moe's ViT "
                              "gives every layer the same experts and slots")
    _, t["num_experts"], t["slots_per_expert"] = next(iter(shapes))
    dense = [i for i in blocks if f"blocks.{i}.mlp.fc1.weight" in state]
    hidden = (state[f"blocks.{dense[0]}.mlp.fc1.weight"].shape[0] if dense
              else state[f"blocks.{moe[0]}.mlp.experts.0.fc1.weight"].shape[0])
    t["mlp_ratio"] = _ratio(int(hidden), D)
    t["num_classes"] = int(state["head.weight"].shape[0]) if "head.weight" in state else 0
    t["qkv_bias"] = "blocks.0.attn.qkv.bias" in state
    t["qk_norm"] = "blocks.0.attn.q_norm.weight" in state
    t["fc_norm"] = "fc_norm.weight" in state
    # Layer scale on or off; its initial value does not matter here (the weights overwrite it).
    t["init_values"] = (from_hp.get("init_values") or 1e-5) if "blocks.0.ls1.gamma" in state else None
    pos = state.get("pos_embed")
    if pos is None or pos.dim() != 3:
        raise CheckpointError(f"{where}: a soft-moe ViT without a [1, L, D] pos_embed")
    L = int(pos.shape[1])
    prefix_tokens = 1 if t["class_token"] else 0
    no_embed_class = given.get("no_embed_class", from_hp.get("no_embed_class"))
    told = given.get("img_size", from_hp.get("img_size"))
    for nec in ([False, True] if no_embed_class is None else [bool(no_embed_class)]):
        side = _square(L - (0 if nec else prefix_tokens))
        if side:  # a square grid of patches (a non-square image's size must be told)
            t["img_size"] = side * ph if ph == pw else [side * ph, side * pw]
            if no_embed_class is None and prefix_tokens:
                t["no_embed_class"] = nec
            break
    else:
        if told is None:
            raise CheckpointError(
                f"{where}: the position embedding has {L} entries, not a square grid of patches; pass the image "
                "size, e.g. --kwargs '{\"img_size\": [H, W]}'"
            )
    sources, kwargs, notes = {}, {}, []
    defaults = {f.name: f.default for f in fields(ViTConfig)}
    for name in _VIT_KWARGS:
        if name in given:
            kwargs[name], sources[name] = given[name], "given"
        elif name in _GUESSED and name in from_hp and name in t and _differs(from_hp[name], t[name]):
            # the shapes only fit a square image; the hyper-parameters know the real one (checked by the shapes)
            kwargs[name], sources[name] = from_hp[name], "hyper_parameters"
        elif name in t:
            kwargs[name], sources[name] = t[name], "tensors"
            if name in from_hp and _differs(from_hp[name], t[name]):
                notes.append(f"hyper_parameters say {name}={from_hp[name]!r}, the tensors {t[name]!r}: the tensors win")
        elif name in from_hp:
            kwargs[name], sources[name] = from_hp[name], "hyper_parameters"
        elif name == "num_heads":
            kwargs[name], sources[name] = _HEADS_BY_WIDTH.get(D, max(1, D // 64)), "default"
        else:
            kwargs[name], sources[name] = defaults[name], "default" if name not in _TRAINING_ONLY else "default (training only)"
    return kwargs, sources, notes


def _differs(a, b) -> bool:
    if isinstance(a, (list, tuple)) or isinstance(b, (list, tuple)):
        return list(a) != list(b) if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)) else True
    if isinstance(a, float) or isinstance(b, float):
        return not math.isclose(float(a), float(b), rel_tol=1e-6)
    return a != b


def _expert_linears(state: dict[str, torch.Tensor], prefix: str, where: str) -> tuple[list[str], list[str | None]]:
    """The two Linear layers of a two-layer MLP expert under `prefix`: (weight names, bias names or None), in
    order (timm's fc1/fc2, or a Sequential's numbered children). Anything else under it is an error."""
    names = sorted((n for n in state if n.startswith(prefix)),
                   key=lambda n: [int(p) if p.isdigit() else p for p in n[len(prefix):].split(".")])
    weights = [n for n in names if n.endswith(".weight") and state[n].dim() == 2]
    others = [n for n in names if n not in weights and not (n.endswith(".bias") and n[:-5] + ".weight" in weights)]
    if len(weights) != 2 or others:
        raise CheckpointError(
            f"{where}: the expert at {prefix!r} is not a two-Linear MLP (found {', '.join(n[len(prefix):] for n in names)}); "
            "moe-prune converts experts of two Linear layers with GELU or ReLU between them"
        )
    return weights, [w[:-7] + ".bias" if w[:-7] + ".bias" in state else None for w in weights]


def stack_experts(state: dict[str, torch.Tensor], prefix: str, num_experts: int, where: str) -> dict[str, torch.Tensor]:
    """E two-Linear experts `{prefix}{e}.` -> moe-prune's stacked w1 [E, D, H], b1 [E, H], w2 [E, H, D_out], b2.

    Biases: all experts have them or none (b1/b2 absent); a layer with one bias and not the other is refused."""
    found = sorted({int(m.group(1)) for n in state if (m := re.match(re.escape(prefix) + r"(\d+)\.", n))})
    if found != list(range(num_experts)):
        raise CheckpointError(f"{where}: {prefix.rstrip('.')} has experts {found[:6]}{' ...' if len(found) > 6 else ''}; "
                              f"expected 0..{num_experts - 1}")
    per = [_expert_linears(state, f"{prefix}{e}.", where) for e in range(num_experts)]
    out = {}
    for key, j, transpose in (("w1", 0, True), ("w2", 1, True)):
        ts = [state[ws[j]] for ws, _ in per]
        if len({tuple(x.shape) for x in ts}) != 1:
            raise CheckpointError(f"{where}: the experts of {prefix.rstrip('.')} have different shapes")
        out[key] = torch.stack([x.t() for x in ts])
    for key, j in (("b1", 0), ("b2", 1)):
        names = [bs[j] for _, bs in per]
        if all(n is not None for n in names):
            out[key] = torch.stack([state[n] for n in names])
        elif any(n is not None for n in names):
            raise CheckpointError(f"{where}: some experts of {prefix.rstrip('.')} have biases and some do not")
    if ("b1" in out) != ("b2" in out):
        raise CheckpointError(f"{where}: the experts of {prefix.rstrip('.')} have a bias on one Linear and not the "
                              "other; moe-prune's experts have both or neither")
    return out


def expert_kind(activation: str, bias: bool) -> tuple[str, bool]:
    """moe-prune's (expert kind, bias) for a two-Linear MLP with this activation ("gelu" or "relu")."""
    return {"gelu": "gelu_mlp", "relu": "relu_mlp"}[activation], bias


def bwconrad_vit(state: dict[str, torch.Tensor], given: dict | None = None, hparams: dict | None = None,
                 where: str = "the state dict") -> Converted:
    """A soft-moe SoftMoEVisionTransformer state dict (no prefix) as a native SoftMoEViT's spec and tensors."""
    given = dict(given or {})
    custom = [k for k in _BWCONRAD_CALLABLES if given.get(k) is not None]
    if custom:
        raise ConfigError(f"soft-moe ViT: custom {custom} are not supported; only soft-moe's default layers convert")
    for k in _BWCONRAD_CALLABLES:
        given.pop(k, None)
    unknown = sorted(set(given) - set(_VIT_KWARGS))
    if unknown:
        raise ConfigError(f"soft-moe ViT: unknown keyword arguments {unknown}; SoftMoEVisionTransformer takes {sorted(_VIT_KWARGS)}")
    kwargs, sources, notes = infer_vit(state, given, hparams, where)
    try:
        config = ViTConfig(**kwargs)
    except (ConfigError, TypeError) as e:
        raise ConfigError(f"{where}: {e}") from None
    native = {}
    moe_prefixes = sorted({m.group(0) for n in state if (m := re.match(r"blocks\.\d+\.mlp\.", n))
                           and f"{m.group(0)}phi" in state})
    for name, t in state.items():
        if not any(name.startswith(p + "experts.") for p in moe_prefixes):
            native[name] = t
    for p in moe_prefixes:
        E = state[f"{p}phi"].shape[1]
        stacked = stack_experts(state, f"{p}experts.", E, where)
        if "b1" not in stacked:
            raise CheckpointError(f"{where}: the experts of {p}experts have no biases; soft-moe's timm Mlp has them")
        native.update({f"{p}experts.{k}": v for k, v in stacked.items()})
    with torch.device("meta"):
        spec = model_spec(SoftMoEViT(config))
    return Converted(spec, native, SOFT_MOE, "SoftMoEVisionTransformer", kwargs, sources, notes=notes)


def bwconrad_layer(state: dict[str, torch.Tensor], given: dict | None = None, where: str = "the state dict") -> Converted:
    """A soft-moe SoftMoELayerWrapper state dict alone (two-Linear experts, GELU assumed: timm's Mlp default)."""
    given = dict(given or {})
    known = ("dim", "num_experts", "slots_per_expert", "normalize", "activation")
    unknown = sorted(set(given) - set(known))
    if unknown:
        raise ConfigError(f"soft-moe layer: unknown keyword arguments {unknown}; give any of {list(known)}")
    D, E, S = state["phi"].shape
    stacked = stack_experts(state, "experts.", E, where)
    activation = given.get("activation", "gelu")
    if activation not in ("gelu", "relu"):
        raise ConfigError(f"soft-moe layer: activation {activation!r}: moe-prune converts 'gelu' and 'relu'")
    kind, bias = expert_kind(activation, "b1" in stacked)
    normalize = "scale" in state
    config = SoftMoEConfig(dim=int(D), num_experts=int(E), slots_per_expert=int(S), hidden=int(stacked["w1"].shape[2]),
                           expert=kind, expert_bias=bias, token_norm="l2" if normalize else "none",
                           phi_norm=normalize, out_dim=_out_dim(stacked, D), eps=1e-12)
    native = {"phi": state["phi"], **({"scale": state["scale"]} if normalize else {}),
              **{f"experts.{k}": v for k, v in stacked.items()}}
    kwargs = {"dim": int(D), "num_experts": int(E), "slots_per_expert": int(S), "normalize": normalize,
              "activation": activation}
    sources = {k: "tensors" for k in kwargs}
    sources["activation"] = "given" if "activation" in given else "default"
    _check_given(given, kwargs, where, "soft-moe SoftMoELayerWrapper")
    return Converted({"family": "layer", "config": config.to_dict()}, native, SOFT_MOE, "SoftMoELayerWrapper",
                     kwargs, sources)


def _out_dim(stacked, D) -> int | None:
    out = int(stacked["w2"].shape[2])
    return None if out == D else out


def _check_given(given: dict, inferred: dict, where: str, what: str) -> None:
    wrong = [f"{k}={given[k]!r} (the tensors say {inferred[k]!r})" for k in given
             if k in inferred and _differs(given[k], inferred[k])]
    if wrong:
        raise CheckpointError(f"{where}: the tensors do not match the {what} arguments: {'; '.join(wrong)}")


# -- soft-moe-pytorch's layer --------------------------------------------------------------------------------


def lucidrains_layer(state: dict[str, torch.Tensor], given: dict | None = None, where: str = "the state dict") -> Converted:
    """A soft-moe-pytorch SoftMoE state dict (no prefix) as a native layer.

    The library's RMSNorm (l2-normalize, times sqrt(D) and a gain) becomes token_norm="l2" with the gain folded
    into `norm_weight`; its normalized slot embeddings become a fixed Phi with no column normalization. Padded
    tokens (mask False) get output 0 here; the library gives them a uniform mix of all slots.
    """
    given = dict(given or {})
    unknown = sorted(set(given) - set(_LUCIDRAINS_KWARGS))
    if unknown:
        raise ConfigError(f"soft-moe-pytorch SoftMoE: unknown keyword arguments {unknown}; it takes {list(_LUCIDRAINS_KWARGS)}")
    if given.get("seq_len") is not None and given.get("num_slots") is not None:
        raise ConfigError("soft-moe-pytorch SoftMoE: pass at most one of seq_len and num_slots (the library takes exactly one)")
    if "slot_embeds" not in state or state["slot_embeds"].dim() != 3:
        raise CheckpointError(f"{where}: no [E, S, D] slot_embeds; not a soft-moe-pytorch SoftMoE")
    E, S, D = (int(v) for v in state["slot_embeds"].shape)
    layernorm = "norm.beta" in state
    expected = {"norm.gamma", "slot_norm.gamma", "slot_embeds"} | ({"norm.beta", "slot_norm.beta"} if layernorm else set())
    missing = sorted(expected - set(state))
    if missing:
        raise CheckpointError(f"{where}: does not fit soft_moe_pytorch.SoftMoE: missing {missing[:4]}")
    outside = sorted(n for n in state if n not in expected and not n.startswith("experts.experts."))
    if outside:
        raise CheckpointError(f"{where}: does not fit soft_moe_pytorch.SoftMoE: unexpected {outside[:4]}")
    stacked = stack_experts(state, "experts.experts.", E, where)
    if "b1" not in stacked:
        raise CheckpointError(f"{where}: the experts have no biases; soft-moe-pytorch's experts have them")
    h1, hidden = int(stacked["w1"].shape[2]), int(stacked["w2"].shape[1])
    geglu = h1 == 2 * hidden
    if not geglu and h1 != hidden:
        raise CheckpointError(f"{where}: expert widths {h1} -> {hidden} fit neither FeedForward nor GLUFeedForward")
    if geglu and stacked["w1"].shape[1] != D:
        raise CheckpointError(f"{where}: expert input width {stacked['w1'].shape[1]}, the slots' {D}")
    inferred = {"dim": D, "num_experts": E, "num_slots": S, "geglu": geglu, "use_layernorm": layernorm}
    check = {k: v for k, v in given.items() if k in inferred}
    if "seq_len" in given:
        check["num_slots"] = given["seq_len"] // given.get("num_experts", E) if given["seq_len"] else 0
    if "expert_mult" in given:
        mult = given["expert_mult"]
        want = int(D * mult * 2 / 3) if geglu else int(D * mult)
        if want != hidden:
            raise CheckpointError(f"{where}: the tensors do not match expert_mult={mult} (experts are {hidden} wide)")
    _check_given(check, inferred, where, "soft_moe_pytorch.SoftMoE")
    gamma, slot_gamma, slots = state["norm.gamma"], state["slot_norm.gamma"], state["slot_embeds"]
    if layernorm:
        if any(bool(state[k].any()) for k in ("norm.beta", "slot_norm.beta")):
            raise CheckpointError(f"{where}: nonzero LayerNorm beta; soft-moe-pytorch keeps it at zero, so the file is not from it")
        gain = gamma
        phi = torch.nn.functional.layer_norm(slots.float(), (D,), eps=1e-5).to(slots.dtype) * slot_gamma  # [E, S, D]
    else:
        gain = gamma * math.sqrt(D)
        phi = torch.nn.functional.normalize(slots.float(), dim=-1).to(slots.dtype) * math.sqrt(D) * slot_gamma
    config = SoftMoEConfig(
        dim=D, num_experts=E, slots_per_expert=S, hidden=hidden, expert="geglu" if geglu else "gelu_mlp",
        token_norm="layer" if layernorm else "l2", token_gain=True, phi_norm=False, out_dim=_out_dim(stacked, D),
        # the library's F.normalize floor (1e-12) or F.layer_norm's default epsilon (1e-5)
        eps=1e-5 if layernorm else 1e-12,
    )
    native = {"phi": phi.permute(2, 0, 1).contiguous(), "norm_weight": gain,
              **{f"experts.{k}": v for k, v in stacked.items()}}
    kwargs = {"dim": D, "num_experts": E, "num_slots": S, "geglu": geglu, "use_layernorm": layernorm,
              "expert_mult": hidden / D if not geglu else hidden * 3 / (2 * D)}
    sources = {k: "tensors" for k in kwargs}
    return Converted({"family": "layer", "config": config.to_dict()}, native, SOFT_MOE_PYTORCH, "SoftMoE", kwargs,
                     sources)


# -- the whole step ------------------------------------------------------------------------------------------


def convert_state(state: dict[str, torch.Tensor], *, given: dict | None = None, hparams: dict | None = None,
                  library: str = "auto", ema: bool = False, where: str = "the state dict") -> Converted:
    """Find a library layout in a state dict (under any prefix) and convert it.

    Args:
        state: tensor names -> tensors, as saved (prefixes and all).
        given: the library constructor's keyword arguments the caller knows (all optional).
        hparams: the checkpoint's hyper-parameters (Lightning's), consulted for what the shapes cannot tell.
        library: "auto", "bwconrad" (soft-moe) or "lucidrains" (soft-moe-pytorch).
        ema: take the EMA copy of the weights (a prefix naming "ema").
        where: the file, for messages.

    Returns:
        Converted.

    Raises:
        CheckpointError: no known layout, an ambiguous one, or tensors that do not fit.
        ConfigError: unknown or contradictory arguments.

    Example:
        >>> c = convert_state(torch.load("last.ckpt", weights_only=True)["state_dict"])
        >>> c.prefix, c.kwargs["num_experts"], c.sources["num_heads"]
        ('model.', 128, 'default')
    """
    if library not in ("auto", "bwconrad", "lucidrains"):
        raise ConfigError(f"unknown source library {library!r}: choose bwconrad (soft-moe) or lucidrains (soft-moe-pytorch)")
    found = find_layout(state, ema=ema, where=where)
    if found is None:
        has_moe = any(n.endswith((".phi", ".slot_embeds")) or n in ("phi", "slot_embeds") for n in state)
        hint = ("it holds Soft MoE router tensors in a layout moe-prune does not know" if has_moe else
                "no soft-moe or soft-moe-pytorch Soft MoE layer in it")
        raise CheckpointError(f"{where}: not a checkpoint moe-prune can convert: {hint} (e.g. {', '.join(list(state)[:3])})")
    kind, prefix = found
    if library == "lucidrains" and kind != "lucidrains" or library == "bwconrad" and kind == "lucidrains":
        raise CheckpointError(f"{where}: --from {library}, but the tensors are laid out as "
                              f"{SOFT_MOE_PYTORCH if kind == 'lucidrains' else SOFT_MOE}")
    inner, ignored = strip(state, prefix)
    if kind == "vit":
        out = bwconrad_vit(inner, given, hparams, where)
    elif kind == "lucidrains":
        out = lucidrains_layer(inner, given, where)
    else:
        out = bwconrad_layer(inner, given, where)
    out.prefix, out.ignored = prefix, ignored
    return out
