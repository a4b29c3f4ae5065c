"""The `output` and `reconstruct` rules (see calibration.py): experts ranked by what their slots return, and the
subset that best reconstructs each layer's full output, from E x E sums accumulated once over the data.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from ..core.devices import device_of
from ..core.models import moe_layers
from ..data.shards import all_reduce, own_batches
from ..errors import SelectionError
from .scores import TappedLayer, keep_per_layer, replace_layers, top_k


def _shares_norm(combine: torch.Tensor, y: torch.Tensor, S: int) -> torch.Tensor:
    """sum over tokens and slots of C[b, m, e, s] * |y[b, e, s]| -> [E_held] (float64)."""
    KS = combine.shape[-1]
    mass = combine.float().sum(dim=1)  # [B, K*S]
    size = y.float().norm(dim=-1)  # [B, K*S]
    return (mass * size).double().sum(dim=0).reshape(KS // S, S).sum(-1)


def _gram(combine: torch.Tensor, y: torch.Tensor, S: int, target: torch.Tensor, chunk: int = 32):
    """G [K, K] = sum <Z_e, Z_f>, b [K] = sum <T, Z_e>, t2 = |T|^2 for one batch (float64).

    Z_e = C[:, :, e-slots] @ y[:, e-slots]; <Z_(e,s), Z_(f,s')> over tokens and D is (C^T C) * (y y^T)
    elementwise, computed on chunks of the batch so memory stays at chunk x (K*S)^2.
    """
    B, M, KS = combine.shape
    K = KS // S
    G = torch.zeros(K, K, dtype=torch.float64, device=combine.device)
    b = torch.zeros(K, dtype=torch.float64, device=combine.device)
    for i in range(0, B, chunk):
        c, v, t = combine[i:i + chunk].float(), y[i:i + chunk].float(), target[i:i + chunk].float()
        g = ((c.transpose(1, 2) @ c) * (v @ v.transpose(1, 2))).sum(0)  # [KS, KS]
        G += g.double().reshape(K, S, K, S).sum(dim=(1, 3))
        # <T, Z_(e,s)> = sum_m C[m, (e,s)] <T_m, y_(e,s)>
        tb = (c * (t @ v.transpose(1, 2))).sum(dim=(0, 1))  # [KS]
        b += tb.double().reshape(K, S).sum(-1)
    return G, b, target.double().pow(2).sum()


def subset_error(G: torch.Tensor, b: torch.Tensor, t2: float, subset: Sequence[int]) -> float:
    """|T - sum_{e in subset} Z_e|^2 from the Gram sums (subset: stack positions)."""
    idx = torch.as_tensor(list(subset), dtype=torch.long)
    return float(t2 - 2 * b[idx].sum() + G[idx][:, idx].sum())


def greedy_subset(G: torch.Tensor, b: torch.Tensor, k: int, max_swaps: int = 10000) -> list[int]:
    """The k stack positions minimizing |T - sum Z_e|^2: greedy addition, then best single swaps to a local optimum.

    err(S) = t2 - 2 sum_S b + sum_{S x S} G. Adding e to S changes it by G_ee - 2 b_e + 2 sum_{f in S} G_ef;
    a swap (out o, in i) by the exact difference of the two subsets' errors. Ties go to the lower position.
    """
    n = G.shape[0]
    if not 1 <= k <= n:
        raise SelectionError(f"k={k} must be in 1..{n}")
    chosen: list[int] = []
    cross = torch.zeros(n, dtype=torch.float64)  # sum_{f in S} G[e, f]
    free = torch.ones(n, dtype=torch.bool)
    diag = G.diagonal()
    for _ in range(k):
        gain = diag - 2 * b + 2 * cross
        gain[~free] = float("inf")
        e = int(torch.argmin(gain))
        chosen.append(e)
        free[e] = False
        cross += G[:, e]
    # Single swaps: delta(o -> i) = [G_ii - 2 b_i + 2 (cross_i - G_io)] - [G_oo - 2 b_o + 2 (cross_o - G_oo)]
    for _ in range(max_swaps):
        inside = torch.tensor(chosen, dtype=torch.long)
        outside = free.nonzero().flatten()
        if len(outside) == 0:
            break
        add = diag[outside] - 2 * b[outside] + 2 * cross[outside]  # [n_out], before removing o
        add = add[None, :] - 2 * G[inside][:, outside]  # [k, n_out]: cross_i - G_io
        remove = diag[inside] - 2 * b[inside] + 2 * (cross[inside] - diag[inside])  # [k]
        delta = add - remove[:, None]
        best = float(delta.min())
        if not best < -1e-12 * max(1.0, float(G.diagonal().sum())):
            break
        o, i = divmod(int(torch.argmin(delta)), len(outside))
        o_pos, i_pos = int(inside[o]), int(outside[i])
        chosen[o] = i_pos
        free[o_pos], free[i_pos] = True, False
        cross += G[:, i_pos] - G[:, o_pos]
    return sorted(chosen)


@torch.no_grad()
def output_sums(model: nn.Module, batches, progress: bool = False) -> dict[str, torch.Tensor]:
    """The `output` rule's scores: {layer name: [E] sums of C * |y|}, 0 for experts a layer does not hold."""
    layers = moe_layers(model)
    dev = device_of(model)
    sums = {name: torch.zeros(layer.config.num_experts, dtype=torch.float64, device=dev) for name, layer in layers.items()}

    def record(name):
        def fn(layer, routing, out):
            combine, y = layer.slot_outputs(routing)
            sums[name][layer.held_experts(dev)] += _shares_norm(combine, y, layer.config.slots_per_expert)
        return fn

    tapped = replace_layers(model, lambda name, layer: TappedLayer(layer, record=record(name)))
    for x in own_batches(batches, model, "calibrating (output)", progress):
        tapped(x)
    sums = {name: s.cpu() for name, s in all_reduce(sums).items()}
    bad = [name for name, s in sums.items() if not bool(torch.isfinite(s).all())]  # checked once, not per batch
    if bad:
        raise SelectionError(f"calibration scores of {bad[0]!r} are NaN or Inf (non-finite inputs or weights?)")
    return sums


@torch.no_grad()
def reconstruct_subsets(model: nn.Module, batches: Sequence, keep, progress: bool = False) -> tuple[dict, dict]:
    """The `reconstruct` rule: each layer's subset minimizing its output error, layers calibrated in order.

    Returns:
        (subsets {layer name: router ids [k]}, record {layer name: {"error": relative error of the subset,
        "error_mass": that of the combine-mass top k on the same inputs}}).
    """
    layers = moe_layers(model)
    ks = keep_per_layer(model, keep)
    names = list(layers)
    subsets: dict[str, torch.Tensor] = {}
    record = {}
    dev = device_of(model)
    for li, name in enumerate(names):
        target_layer = layers[name]
        full_out: list[torch.Tensor] = []

        def keep_target(layer, routing, out):
            full_out.append(out)

        def accumulate(layer, routing, out):
            combine, y = layer.slot_outputs(routing)
            target = full_out.pop(0) if full_out else out  # the first layer: its own full output
            G, b, t2 = _gram(combine, y, layer.config.slots_per_expert, target)
            acc["G"] += G
            acc["b"] += b
            acc["t2"] += t2
            acc["mass"] += routing.scores.double().sum(0)[layer.held_experts(dev)]

        K = target_layer.config.num_held
        acc = {"G": torch.zeros(K, K, dtype=torch.float64, device=dev), "b": torch.zeros(K, dtype=torch.float64, device=dev),
               "t2": torch.zeros((), dtype=torch.float64, device=dev), "mass": torch.zeros(K, dtype=torch.float64, device=dev)}
        # The full model gives the target; the model with the earlier layers pruned gives this layer's inputs
        # (for the first layer they are the same run).
        full = replace_layers(model, lambda n, layer: TappedLayer(layer, record=keep_target if n == name else None))
        tapped = replace_layers(model, lambda n, layer: TappedLayer(layer, subsets.get(n), accumulate if n == name else None))
        desc = f"calibrating (reconstruct, layer {li + 1}/{len(names)})"
        for x in own_batches(batches, model, desc, progress):
            if li > 0:
                full(x)
            tapped(x)
        acc = {k: v.cpu() for k, v in all_reduce(acc).items()}  # the search runs on the host: E x E is small
        G, b, t2 = acc["G"], acc["b"], float(acc["t2"])
        if not (torch.isfinite(G).all() and torch.isfinite(b).all()):
            raise SelectionError(f"calibration of {name!r} gave NaN or Inf (non-finite inputs or weights?)")
        pos = greedy_subset(G, b, ks[name])
        by_mass = top_k(acc["mass"], ks[name]).tolist()  # the combine-mass top k, for the record
        held = target_layer.held_experts()
        subsets[name] = held[torch.tensor(pos, dtype=torch.long)]
        record[name] = {"error": subset_error(G, b, t2, pos) / max(t2, 1e-30),
                        "error_mass": subset_error(G, b, t2, by_mass) / max(t2, 1e-30)}
    return subsets, record
