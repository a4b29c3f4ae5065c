"""Which experts to run: combine-mass scores, Chung et al.'s Algorithms 1 and 2, static calibration.

    score[b, e] = sum over tokens m and slots s of expert e of combine_weights[b, m, e*S + s]   # [B, E]

One input's scores sum to its token count. Algorithm 1 keeps each input's top k; Algorithm 2 keeps the top k
of the scores summed over the batch (one subset, so the other experts are never computed); the static subset
is the same sum over a calibration set. Ties go to the lower expert index. `keep` is a count (int, "4") or a
fraction of the experts (float, "1/8", "0.125"): k = max(1, ceil(E * fraction)).
"""

from __future__ import annotations

import contextlib
import copy
import math
from fractions import Fraction
from typing import Iterable, Literal

import torch
from torch import nn

from ..errors import SelectionError
from ..core.tracing import check_on_device, in_graph
from ..core.layers import MODES, SoftMoE
from ..core.models import moe_layers

Per = Literal["input", "batch"]


def parse_keep(keep: int | float | str, num_experts: int) -> int:
    """The number of experts to keep, k, out of `num_experts`.

    Args:
        keep: a count (int or an integer string such as "4") or a fraction of the experts (float or a string
            such as "1/8" or "0.125"); k = max(1, ceil(num_experts * fraction)).
        num_experts: n.

    Returns:
        k in [1, n].

    Raises:
        SelectionError: zero, negative, a fraction above 1, a count above n, or unparsable.

    Example:
        >>> parse_keep("1/8", 128), parse_keep(0.125, 12), parse_keep(4, 16)
        (16, 2, 4)
    """
    if isinstance(keep, bool) or not isinstance(keep, (int, float, str, Fraction)):
        raise SelectionError(f"keep={keep!r}: give a count (4) or a fraction ('1/8', 0.125)")
    count = None
    frac = None
    if isinstance(keep, int):
        count = keep
    elif isinstance(keep, str):
        text = keep.strip()
        try:
            if text.lstrip("+-").isdigit():
                count = int(text)
            else:
                frac = Fraction(text)
        except (ValueError, ZeroDivisionError):
            raise SelectionError(f"keep={keep!r} is not a count (4) or a fraction ('1/8', 0.125)") from None
    else:
        if not math.isfinite(float(keep)):
            raise SelectionError(f"keep={keep!r} is not a finite number")
        frac = Fraction(keep).limit_denominator(10**6)
    if count is not None:
        if not 1 <= count <= num_experts:
            raise SelectionError(f"keep={keep!r}: a count must be in 1..{num_experts} (the layer has {num_experts} experts)")
        return count
    if not 0 < frac <= 1:
        raise SelectionError(f"keep={keep!r}: a fraction must be in (0, 1]")
    return max(1, math.ceil(num_experts * frac))


def keep_per_layer(model: nn.Module, keep: int | float | str) -> dict[str, int]:
    """k of every Soft MoE layer of `model`, out of the experts it holds: a bad `keep` fails here, before any work.

    Args:
        model: a native model or layer (full or compressed; a skeleton will do).
        keep: see `parse_keep`.

    Returns:
        {layer name: k}.

    Raises:
        SelectionError: see `parse_keep`.

    Example:
        >>> keep_per_layer(model, "1/8")
        {'moe': 16}
    """
    return {name: parse_keep(keep, layer.config.num_held) for name, layer in moe_layers(model).items()}


@torch.no_grad()
def expert_scores(layer: SoftMoE, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Combine-weight mass of every expert of a Soft MoE layer for each input.

    Args:
        layer: a SoftMoE layer.
        x: its input tokens [B, M, D].
        mask: optional key-padding mask [B, M] (True = real token); padded tokens add nothing.

    Returns:
        float32 scores [B, E] over the router's E experts; each row sums to the input's (unmasked) token count.
        Computed by the fused Triton kernel on CUDA (see `SoftMoE.use_triton`), else in torch.

    Example:
        >>> scores = expert_scores(model.moe, model.tokens(images))  # [B, E]
        >>> select_experts(scores, "1/8", per="batch")
    """
    return layer.route(x, mask).scores


def top_k(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k largest along the last axis, ascending; ties go to the lower index."""
    if in_graph():
        top = torch.topk(scores, k, dim=-1, sorted=True).indices  # ONNX TopK puts the lower index first on ties
    else:
        top = torch.sort(scores, dim=-1, descending=True, stable=True).indices[..., :k]
    return torch.sort(top, dim=-1).values


def select_experts(scores: torch.Tensor, keep: int | float | str, per: Per = "input") -> torch.Tensor:
    """Algorithm 1 (per input) or Algorithm 2 (per batch): the experts to keep, sorted ascending.

    Args:
        scores: [B, E] from `expert_scores` (or [E] already aggregated).
        keep: count or fraction (see `parse_keep`).
        per: "input" -> [B, k], each input's top k; "batch" -> [k], the top k of the scores summed over B.

    Returns:
        int64 expert ids, sorted ascending within each row.

    Raises:
        SelectionError: bad `keep` or `per`, or NaN/Inf scores (a selection never silently comes from NaN).

    Example:
        >>> select_experts(torch.tensor([[0.1, 3.0, 0.9]]), 2)
        tensor([[1, 2]])
    """
    if per not in ("input", "batch"):
        raise SelectionError(f"per={per!r}: choose 'input' (Algorithm 1) or 'batch' (Algorithm 2)")
    if scores.dim() not in (1, 2):
        raise SelectionError(f"scores must be [B, E] or [E], got shape {list(scores.shape)}")
    check_on_device(torch.isfinite(scores).all(),
                    SelectionError("the expert scores contain NaN or Inf (non-finite inputs or weights?); no selection made"))
    k = parse_keep(keep, scores.shape[-1])
    if per == "batch" and scores.dim() == 2:
        scores = scores.sum(dim=0)
    return top_k(scores, k)


class PrunedSoftMoE(nn.Module):
    """A Soft MoE layer run with a subset of its experts: fixed (`experts`), or chosen per call (`keep`, `per`).

    The wrapped layer is shared, not copied. With a fixed empty subset every expert output is zero (the k = 0
    baseline).
    """

    def __init__(self, layer: SoftMoE, experts: torch.Tensor | None = None, keep=None, per: Per = "batch",
                 mode: str = "drop"):
        super().__init__()
        if mode not in MODES:
            raise SelectionError(f"mode={mode!r}: choose 'drop' (the paper) or 'renorm'")
        if (experts is None) == (keep is None):
            raise SelectionError("give either a fixed expert subset or `keep` for a per-call selection")
        self.layer, self.mode, self.per = layer, mode, per
        self.k = None if keep is None else parse_keep(keep, layer.config.num_held)
        if experts is not None:
            experts = torch.as_tensor(experts, dtype=torch.long)
            _check_ids(experts, layer)
        self.register_buffer("experts", experts, persistent=False)
        self.choice = nn.Identity()  # passes the experts each call runs: a forward hook on it observes the choice

    @property
    def config(self):
        return self.layer.config

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        layer = self.layer
        routing = layer.route(x, mask)
        if self.experts is not None:
            return layer.mix(routing, self.choice(self.experts), self.mode)
        # Algorithm 1 or 2 on this call's input, scored from the routing the layer then mixes with.
        scores = routing.scores  # [B, E]
        if layer.config.held is not None:  # a compressed layer can only choose among the experts it holds
            held = layer.held_experts(x.device)
            experts = held[select_experts(scores.index_select(1, held), self.k, self.per)]
        else:
            experts = select_experts(scores, self.k, self.per)
        return layer.mix(routing, self.choice(experts), self.mode)


def pruned_layers(model: nn.Module) -> dict[str, PrunedSoftMoE]:
    """The layers of `model` wrapped by with_experts / with_selection, by module name ("" for the model itself).

    Example:
        >>> list(pruned_layers(with_selection(model, "1/8")))
        ['moe']
    """
    return {name: m for name, m in model.named_modules() if isinstance(m, PrunedSoftMoE)}


@contextlib.contextmanager
def recorded_choices(layers: dict[str, PrunedSoftMoE]):
    """Record the experts each pruned layer runs while the block runs: {layer name: ids of its last call}.

    The ids are what the layer's `choice` identity passed ([k] for a shared subset, [B, k] per input); the
    hooks are removed when the block ends, so nothing is ever stored on a module.

    Example:
        >>> with recorded_choices(pruned_layers(fast)) as seen:
        ...     fast(x)
        >>> seen["moe"]  # tensor([3, 17, ...])
    """
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


def random_subsets(model: nn.Module, k_of, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """A random subset of each layer's held experts, as router ids (what with_experts and compress take).

    Args:
        model: a native model or layer (full or compressed).
        k_of: {layer name: k}, or one k for every layer.
        generator: draws the subsets, layer after layer in moe_layers order.

    Returns:
        {layer name: sorted router ids [k]}.

    Example:
        >>> random_subsets(model, 16, torch.Generator().manual_seed(0))["moe"].shape
        torch.Size([16])
    """
    out = {}
    for name, layer in moe_layers(model).items():
        k = k_of[name] if isinstance(k_of, dict) else k_of
        out[name] = layer.held_experts()[torch.randperm(layer.config.num_held, generator=generator)[:k]].sort().values
    return out


def _check_ids(experts: torch.Tensor, layer: SoftMoE) -> None:
    if experts.dim() not in (1, 2):
        raise SelectionError(f"experts must be [K] or [B, K], got shape {list(experts.shape)}")
    held = set(layer.config.held_ids)
    bad = sorted(set(experts.flatten().tolist()) - held)
    if bad:
        raise SelectionError(f"expert ids {bad[:8]} are not experts of this layer (it has {sorted(held)[:4]}...)")
    rows = experts.reshape(-1, experts.shape[-1]) if experts.numel() else experts.reshape(1, 0)
    if any(len(set(r.tolist())) != len(r) for r in rows):
        raise SelectionError("an expert subset names the same expert twice")


def replace_layers(model: nn.Module, make) -> nn.Module:
    """A copy of `model` sharing its weights, with each Soft MoE layer `name` replaced by make(name, layer).

    A bare layer is replaced itself (make("", layer)); the original model is unchanged.

    Example:
        >>> wrapped = replace_layers(model, lambda name, layer: PrunedSoftMoE(layer, experts=torch.tensor([0, 3])))
    """
    layers = moe_layers(model)
    if not layers:
        raise SelectionError(f"{type(model).__name__} has no Soft MoE layer")
    if isinstance(model, SoftMoE):
        return make("", model)
    memo = {id(t): t for t in list(model.parameters()) + list(model.buffers())}
    out = copy.deepcopy(model, memo)
    for name in layers:
        parent_name, _, child = name.rpartition(".")
        parent = out.get_submodule(parent_name)
        setattr(parent, child, make(name, getattr(parent, child)))
    return out


def with_experts(module: nn.Module, experts, mode: str = "drop") -> nn.Module:
    """Run a layer or a whole model with fixed expert subsets.

    Args:
        module: a SoftMoE layer, or a model containing Soft MoE layers.
        experts: for a layer, expert ids [K] (shared: only those K are computed) or [B, K] (per input);
            for a model, a dict from layer name (see `moe_layers`) to such ids; every layer must be named.
        mode: "drop" (the paper: dropped combine mass is lost) or "renorm" (combine renormalized over kept slots).

    Returns:
        A module sharing the original weights (the original is unchanged).

    Raises:
        SelectionError: unknown layer names, missing layers, ids out of range or repeated, bad mode.

    Example:
        >>> small = with_experts(model, {"moe": torch.tensor([3, 7])})
        >>> logits = small(images)
    """
    if isinstance(module, SoftMoE):
        return PrunedSoftMoE(module, experts=experts, mode=mode)
    if not isinstance(experts, dict):
        raise SelectionError("for a model, give experts as a dict {layer name: ids}")
    names = set(moe_layers(module))
    if set(experts) != names:
        raise SelectionError(f"experts name layers {sorted(experts)}; the model's Soft MoE layers are {sorted(names)}")
    return replace_layers(module, lambda name, layer: PrunedSoftMoE(layer, experts=experts[name], mode=mode))


def with_selection(module: nn.Module, keep, per: Per = "batch", mode: str = "drop") -> nn.Module:
    """Run a layer or model choosing experts per call: Algorithm 1 (per="input") or 2 (per="batch").

    Each Soft MoE layer scores its own input (after the earlier layers ran pruned) and keeps its top k.

    Example:
        >>> fast = with_selection(model, "1/8", per="batch")
        >>> logits = fast(images)
    """
    return replace_layers(module, lambda name, layer: PrunedSoftMoE(layer, keep=keep, per=per, mode=mode))


class TappedLayer(nn.Module):
    """A Soft MoE layer run with a fixed subset (`experts`, router ids; None: all it holds, in `mode`) that hands
    each call's routing and output to `record(layer, routing, out)`; what `record` returns, if not None, replaces
    the output. Calibration reads routings through it: one routing per call.

    Example:
        >>> seen = []
        >>> tap = lambda layer, routing, out: seen.append(routing.scores)
        >>> tapped = replace_layers(model, lambda name, layer: TappedLayer(layer, record=tap))
    """

    def __init__(self, layer: SoftMoE, experts: torch.Tensor | None = None, record=None, mode: str = "drop"):
        super().__init__()
        self.layer, self.experts, self.record, self.mode = layer, experts, record, mode

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        routing = self.layer.route(x, mask)
        out = self.layer.mix(routing, self.experts, self.mode if self.experts is not None else "drop")
        if self.record is not None:
            replaced = self.record(self.layer, routing, out)
            if replaced is not None:
                return replaced
        return out


# Calibration sums scores as integers in units of 2**-24: integer addition is exact and order-free, so a data set
# sharded over processes (each rank takes every world-th batch) gives bit for bit the sums of one process.
_FIXED_POINT = 2.0**24


@torch.no_grad()
def calibrate(model: nn.Module, batches: Iterable[torch.Tensor], progress: bool = False) -> dict[str, torch.Tensor]:
    """Sum each Soft MoE layer's expert scores over a calibration data set, streamed batch by batch.

    Under torch.distributed (launched by torchrun), each rank scores every world-th batch and the sums are
    all-reduced: one all-reduce of E integers per layer, and the result equals one process's exactly.

    Args:
        model: the full model.
        batches: an iterable of model inputs (the same sequence on every rank).
        progress: show a progress bar.

    Returns:
        {layer name: float64 score sums [E]}; the static subset is `select_experts(sums, keep, per="batch")`.

    Raises:
        SelectionError: no Soft MoE layer, or non-finite scores.

    Example:
        >>> sums = calibrate(model, (x for x, _ in loader))
        >>> subset = {name: select_experts(s, "1/8", per="batch") for name, s in sums.items()}
    """
    from ..core.devices import device_of
    from ..data.shards import all_reduce, own_batches

    layers = moe_layers(model)
    if not layers:
        raise SelectionError(f"{type(model).__name__} has no Soft MoE layer to calibrate")
    dev = device_of(model)
    sums = {name: torch.zeros(layer.config.num_experts, dtype=torch.int64, device=dev) for name, layer in layers.items()}
    finite = {name: torch.ones((), dtype=torch.bool, device=dev) for name in layers}

    def record(name, scores):  # scores [B, E], from the routing the layer then mixes with; no host sync per batch
        finite[name] &= torch.isfinite(scores).all()
        sums[name] += torch.round(scores.double().nan_to_num() * _FIXED_POINT).long().sum(dim=0)

    scoring = replace_layers(model, lambda name, layer: TappedLayer(
        layer, record=lambda lay, routing, out, name=name: record(name, routing.scores)))
    for x in own_batches(batches, model, "calibrating", progress):
        scoring(x)
    bad = [name for name, ok in finite.items() if not bool(ok)]
    if bad:
        raise SelectionError(f"calibration scores of {bad[0]!r} are NaN or Inf (non-finite inputs or weights?)")
    sums = all_reduce({name: s.cpu() for name, s in sums.items()})
    return {name: s.double() / _FIXED_POINT for name, s in sums.items()}


def static_from_sums(model: nn.Module, sums: dict[str, torch.Tensor], keep) -> dict[str, torch.Tensor]:
    """The static subsets: each layer's top k of its calibration score sums, among the experts it holds.

    Args:
        model: the calibrated model (full or compressed).
        sums: {layer name: score sums [E]} from `calibrate`.
        keep: see `parse_keep` (k out of the experts a layer holds).

    Returns:
        {layer name: router ids [k]}.

    Example:
        >>> static_from_sums(model, calibrate(model, batches), "1/8")["moe"].shape
        torch.Size([16])
    """
    subsets = {}
    for name, layer in moe_layers(model).items():
        held = layer.held_experts()  # a compressed layer chooses among the experts it holds
        subsets[name] = held[select_experts(sums[name][held], keep, per="batch")]
    return subsets
