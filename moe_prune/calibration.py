"""Static subsets from calibration data: which experts one compressed checkpoint keeps, by one of four rules.

For a calibration input, Soft MoE layer output Y = sum over held experts e of Z_e, with Z_e [M, D] expert e's
share: its slots' outputs y_e [S, D] mixed in by their combine weights C[:, e] [M, S] (drop mode).

    mass:    score_e = sum of C[:, e]                  (Chung et al.: the combine-weight mass; `calibrate`)
    output:  score_e = sum of C[:, e, s] * |y_e,s|      (combine weight times the size of what the slot returns)
    reconstruct: the subset S minimizing the output error |T - sum_{e in S} Z_e|^2 over the calibration tokens,
             T the full model's output of that layer. Built by greedy addition, then improved by single swaps
             until none helps. Everything comes from G[e, f] = sum <Z_e, Z_f> and b[e] = sum <T, Z_e>,
             accumulated once over the data (E x E numbers per layer). Layers are calibrated in order, each on
             the inputs it sees after the earlier layers were pruned to their chosen subsets; T stays the full
             model's output, so a later layer also corrects what the earlier pruning changed.

    loss:    the subset built expert by expert to minimize the model's own distillation loss KL(full || pruned)
             on the calibration inputs (see `loss_subsets`); layers in order, as `reconstruct`. Each layer's
             subset is kept only if it beats that layer's combine-mass top k there (earlier layers pruned, later
             full), and the whole model's subsets only if they beat the all-mass model (what `mass` writes) on
             calibration inputs the search did not see. The default: it measured best without healing (README).

`mass` and `output` rank experts (top k of a sum, one pass); `reconstruct` needs one pass per Soft MoE layer over
the calibration data, each running the full model and the pruned one; `loss` (default search, DEFAULT_SEARCH) runs
the model about 3 + 2 times per round, 2 rounds per layer, on its first 256 calibration inputs, whatever k: about
5x the `mass` rule's time on the study's ViTs (20x with every expert searched on 512 inputs). All sums are float64.

Reconstruction in a layer's output space did not track accuracy on the MNIST family (e.g. n = 32, keep 1/8: lower
output error than combine mass, lower accuracy): every direction of the error counts alike there, whatever the
head makes of it. The `loss` rule measures what the model's output loses instead.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .errors import SelectionError
from .layers import SoftMoE
from .models import moe_layers
from .datasets import Batches, as_batches
from .selection import TappedLayer, calibrate, keep_per_layer, replace_layers, select_experts, static_from_sums

RULES = ("mass", "output", "reconstruct", "loss")
DEFAULT_RULE = "loss"
# The loss rule's default search: 256 inputs, 2 candidates run per step, k experts chosen in 2 rounds. Chosen on
# the validation split (benchmarks/results/calibration_cost/): the cheapest search within 0.5 points of the best
# one's mean validation accuracy over the study's ViTs, 4.9x the mass rule's time where 2048 inputs x 8 every
# expert (the previous default) took 97x.
DEFAULT_SEARCH = {"limit": 256, "candidates": 2, "rounds": 2}


def _bar(batches, desc, progress):
    if not progress:
        return batches
    from .reports import progress as progress_bar

    return progress_bar(batches, desc=desc, unit="batch")


def device_of(model: nn.Module) -> torch.device:
    """Where a model's weights are (the CPU for a model without any)."""
    return next((p.device for p in model.parameters()), torch.device("cpu"))


def _own(batches, model: nn.Module, desc: str, progress: bool):
    """This process's calibration batches, on the model's device: all of them, or under torchrun every
    world-th (only those are read)."""
    data = as_batches(batches, device=device_of(model))
    rank, world = _shard()
    mine = data if world == 1 else (data[i] for i in range(rank, len(data), world))
    return _bar(mine, desc, progress)


def _all_reduce(tensors: dict) -> dict:
    """Sum float64 tensors over torch.distributed ranks (each rank saw every world-th batch)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return tensors
    device = collective_device()
    out = {}
    for name, t in tensors.items():
        t = t.to(device)
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        out[name] = t.cpu()
    return out


def sum_over_ranks(*values: float) -> tuple[float, ...]:
    """Python numbers summed over torch.distributed ranks (as they are in one process)."""
    if _shard()[1] == 1:
        return values
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64, device=collective_device())
    dist.all_reduce(t)
    return tuple(t.tolist())


def collective_device() -> torch.device:
    """The device torch.distributed's collectives take: this rank's GPU under NCCL (torchrun set it), else the CPU."""
    import torch.distributed as dist

    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _shard():
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


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
    for x in _own(batches, model, "calibrating (output)", progress):
        tapped(x)
    sums = {name: s.cpu() for name, s in _all_reduce(sums).items()}
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
        for x in _own(batches, model, desc, progress):
            if li > 0:
                full(x)
            tapped(x)
        acc = {k: v.cpu() for k, v in _all_reduce(acc).items()}  # the search runs on the host: E x E is small
        G, b, t2 = acc["G"], acc["b"], float(acc["t2"])
        if not (torch.isfinite(G).all() and torch.isfinite(b).all()):
            raise SelectionError(f"calibration of {name!r} gave NaN or Inf (non-finite inputs or weights?)")
        pos = greedy_subset(G, b, ks[name])
        by_mass = sorted(torch.sort(acc["mass"], descending=True, stable=True).indices[:ks[name]].tolist())
        held = target_layer.held_experts()
        subsets[name] = held[torch.tensor(pos, dtype=torch.long)]
        record[name] = {"error": subset_error(G, b, t2, pos) / max(t2, 1e-30),
                        "error_mass": subset_error(G, b, t2, by_mass) / max(t2, 1e-30)}
    return subsets, record


def _kl(log_p_student: torch.Tensor, log_p_teacher: torch.Tensor) -> torch.Tensor:
    return F.kl_div(log_p_student, log_p_teacher, log_target=True, reduction="sum")


def loss_subsets(model: nn.Module, batches: Sequence, keep, *, mode: str = "drop",
                 candidates: int = DEFAULT_SEARCH["candidates"], limit: int = DEFAULT_SEARCH["limit"], chunk: int = 512,
                 progress: bool = False, budget: str = "per-layer",
                 rounds: int | None = DEFAULT_SEARCH["rounds"]) -> tuple[dict, dict]:
    """The `loss` rule: each layer's subset built expert by expert to minimize the model's distillation loss.

    Layers in order (earlier ones pruned to their subsets, later ones full). At each step the loss's gradient at
    the layer's output, dotted with every unchosen expert's output share Z_e, predicts the change from adding it
    (one backward pass ranks all experts); the `candidates` best by that prediction are then run for real and
    the one giving the lowest KL(full model || pruned model) over the first `limit` calibration inputs is added.
    The candidates run in `mode` (the compressed checkpoint's); the prediction uses drop-mode shares. A bare
    layer's output is the model's output, so there the rule is `reconstruct`. With `rounds` R below a layer's k,
    the layer takes R predictions instead of k: each round adds the best candidate run and then the next best
    predicted experts, so that k are chosen in R rounds (a cost of R * (3 + candidates) passes over `limit`
    inputs per layer, whatever k).

    Two guards against greedy misses. Per layer, the greedy subset is compared with the layer's combine-mass top k
    on the search inputs (earlier layers pruned, later ones full) and the lower loss kept. Then the whole model:
    every layer with its chosen subset against the all-mass model (each layer's combine-mass top k over all the
    calibration data, exactly what `--rule mass` writes), on the calibration inputs after the first `limit` (up to
    `limit` of them; the search inputs when there are no others), and the all-mass subsets are returned if they
    are strictly better there. So the model `loss` writes is never worse than the one `mass` writes on held-out
    calibration inputs, when there are any.

    Returns:
        (subsets, record {layer name: {"kl": mean KL with the layer's final subset (later layers full),
        "kl_greedy", "kl_mass": the greedy subset's and the combine-mass top k's, "chosen_by"}, "whole_model":
        {"inputs", "held_out" (whether they were outside the search), "kl_rule", "kl_mass", "chosen",
        "rule_subsets", "mass_subsets"}}).
    """
    if isinstance(model, SoftMoE):
        return reconstruct_subsets(model, batches, keep, progress=progress)
    if budget not in BUDGETS:
        raise SelectionError(f"budget={budget!r}: choose one of {', '.join(BUDGETS)}")
    if budget == "global":
        return global_loss_subsets(model, batches, keep, mode=mode, candidates=candidates, limit=limit,
                                   chunk=chunk, progress=progress)
    layers = moe_layers(model)
    ks = keep_per_layer(model, keep)
    # The first `limit` inputs, decoded once and kept if they fit the data's cache budget, else read again per pass.
    dev = device_of(model)
    chunks = as_batches(batches, device=dev).head(limit, chunk).cached()
    rank, world = _shard()
    own = list(range(rank, len(chunks), world))  # under torchrun each rank its chunks; every sum is all-reduced
    with torch.no_grad():
        teacher = {i: model(chunks[i]).float().log_softmax(-1) for i in own}
    runs: dict[str, TappedLayer] = {}
    pruned = replace_layers(model, lambda n, layer: runs.setdefault(n, TappedLayer(layer, mode=mode)))
    # parameters stay untouched: gradients are taken with autograd.grad at a detached copy of the layer output
    total = sum(ks.values())
    bar = None
    if progress:
        from .reports import progress as progress_bar

        bar = progress_bar(total=total, desc="calibrating (loss)", unit="expert")

    def kl_of(subset_of_layer: dict) -> float:
        for n, ids in subset_of_layer.items():
            runs[n].experts = ids
        with torch.no_grad():
            total = sum(float(_kl(pruned(chunks[i]).float().log_softmax(-1), teacher[i])) for i in own)
        return sum_over_ranks(total)[0] / chunks.num_inputs

    subsets: dict[str, torch.Tensor] = {}
    record = {}
    for name, layer in layers.items():
        held = layer.held_experts(dev)
        K, S = len(held), layer.config.slots_per_expert
        chosen: list[int] = []  # stack positions
        n_rounds = min(ks[name], rounds or ks[name])
        for r in range(n_rounds):
            adds = -(-(ks[name] - len(chosen)) // (n_rounds - r))  # this round's share of what is left
            # 1. rank every unchosen expert by the first-order change of the loss from adding it
            predicted = torch.zeros(K, dtype=torch.float64, device=dev)
            current = held[torch.tensor(sorted(chosen), dtype=torch.long)]
            for n in layers:
                runs[n].experts = subsets.get(n, current if n == name else None)
            for i in own:
                c, t = chunks[i], teacher[i]
                seen = {}

                def tap(lay, routing, out, seen=seen):
                    leaf = out.detach().requires_grad_(True)
                    seen["out"], seen["routing"] = leaf, routing
                    return leaf

                runs[name].record = tap
                with torch.enable_grad():
                    loss = _kl(pruned(c).float().log_softmax(-1), t)
                    (g,) = torch.autograd.grad(loss, [seen["out"]])
                with torch.no_grad():
                    combine, y = layer.slot_outputs(seen["routing"])  # [B, M, K*S], [B, K*S, D]
                    share = (combine.float() * (g.float() @ y.float().transpose(1, 2))).sum(dim=(0, 1))  # [K*S]
                    predicted += share.double().reshape(K, S).sum(-1)
            runs[name].record = None
            predicted = _all_reduce({"p": predicted})["p"].to(dev)
            predicted[chosen] = float("inf")
            order = torch.sort(predicted, stable=True).indices[: min(candidates, K - len(chosen))]
            # 2. run the best predicted candidates, keep the one with the lowest loss
            trials = [(kl_of({name: held[torch.tensor(sorted(chosen + [int(e)]), dtype=torch.long)]}), int(e))
                      for e in order]
            chosen.append(min(trials)[1])
            predicted[chosen[-1]] = float("inf")
            chosen += torch.sort(predicted, stable=True).indices[: adds - 1].tolist()  # then by prediction
            if bar is not None:
                bar.update(adds)
                bar.set_postfix(layer=name or "(layer)", chosen=f"{len(chosen)}/{ks[name]}")
        greedy = held[torch.tensor(sorted(chosen), dtype=torch.long)]
        by_mass = _mass_top(pruned, runs, name, layer, [chunks[i] for i in own], ks[name], subsets)
        others = {n: subsets.get(n) for n in layers if n != name}
        kl_greedy, kl_mass = kl_of({**others, name: greedy}), kl_of({**others, name: by_mass})
        # Greedy addition can miss (brute force on 6 experts, k = 2: 2 seeds of 12); the combine-mass top k is
        # already at hand, so the rule never returns a subset worse than it on the calibration inputs.
        subsets[name] = (by_mass if kl_mass < kl_greedy else greedy).cpu()  # ids on the host, as every rule gives them
        record[name] = {"kl": min(kl_greedy, kl_mass), "kl_mass": kl_mass, "kl_greedy": kl_greedy,
                        "chosen_by": "mass" if kl_mass < kl_greedy else "greedy"}
        runs[name].experts = subsets[name]
    if bar is not None:
        bar.close()
    record["whole_model"] = _whole_model_guard(model, batches, keep, subsets, runs, pruned, limit, chunk, dev)
    if record["whole_model"]["chosen"] == "mass":
        subsets = {n: torch.as_tensor(ids) for n, ids in record["whole_model"]["mass_subsets"].items()}
    record["search"] = {"inputs": chunks.num_inputs, "candidates": candidates, "rounds": rounds}
    return subsets, record


BUDGETS = ("per-layer", "global")


def global_loss_subsets(model: nn.Module, batches: Sequence, keep, *, mode: str = "drop",
                        candidates: int = DEFAULT_SEARCH["candidates"], limit: int = DEFAULT_SEARCH["limit"],
                        chunk: int = 512, progress: bool = False) -> tuple[dict, dict]:
    """The `loss` rule with one budget for the whole model: the same expert FLOPs as `keep` of every layer, spent
    where the distillation loss drops most, so layers may keep different numbers of experts.

    Every layer starts from its combine-mass top 1. Then, while the budget lasts: one backward pass gives the
    loss's gradient at every Soft MoE layer's output, which dotted with each unchosen expert's output share
    predicts the change from adding it (every (layer, expert) pair at once); the `candidates` best pairs that
    fit the budget are run for real and the one giving the lowest KL(full || pruned) on the first `limit`
    calibration inputs is added. The cost is that of the per-layer rule. The whole-model guard of `loss_subsets`
    follows (against the all-mass model with a uniform `keep`, at the same expert FLOPs).

    Returns:
        (subsets, record {"budget": "global", "kept": {layer: k}, "expert_flops": (spent, budget), "kl",
        "whole_model": see `loss_subsets`}).
    """
    from .flops import expert_flops_per_slot

    layers = moe_layers(model)
    ks = keep_per_layer(model, keep)
    dev = device_of(model)
    chunks = as_batches(batches, device=dev).head(limit, chunk).cached()
    rank, world = _shard()
    own = list(range(rank, len(chunks), world))
    with torch.no_grad():
        teacher = {i: model(chunks[i]).float().log_softmax(-1) for i in own}
    runs: dict[str, TappedLayer] = {}
    pruned = replace_layers(model, lambda n, layer: runs.setdefault(n, TappedLayer(layer, mode=mode)))
    # An expert's cost: its FLOPs on its slots (equal-size layers make this a count of experts).
    cost = {n: expert_flops_per_slot(layer) * layer.config.slots_per_expert for n, layer in layers.items()}
    total = sum(ks[n] * cost[n] for n in layers)
    held = {n: layer.held_experts(dev) for n, layer in layers.items()}
    chosen: dict[str, list[int]] = {}  # stack positions per layer
    for n, layer in layers.items():  # the mass top 1 of each layer, on the inputs it sees with the earlier ones pruned
        top = _mass_top(pruned, runs, n, layer, [chunks[i] for i in own], 1,
                        {m: held[m][torch.tensor(chosen[m])] for m in chosen})
        chosen[n] = [int((held[n] == top[0]).nonzero()[0, 0])]
    spent = sum(cost[n] for n in layers)

    def current() -> dict:
        return {n: held[n][torch.tensor(sorted(chosen[n]), dtype=torch.long)] for n in layers}

    def kl_of(subsets: dict) -> float:
        for n, ids in subsets.items():
            runs[n].experts = ids
        with torch.no_grad():
            s = sum(float(_kl(pruned(chunks[i]).float().log_softmax(-1), teacher[i])) for i in own)
        return sum_over_ranks(s)[0] / chunks.num_inputs

    bar = None
    if progress:
        from .reports import progress as progress_bar

        bar = progress_bar(total=int(round((total - spent) / min(cost.values()))), desc="calibrating (loss, global)",
                           unit="expert")
    names = list(layers)
    while True:
        fits = [n for n in names if spent + cost[n] <= total * (1 + 1e-9) and len(chosen[n]) < len(held[n])]
        if not fits:
            break
        subsets = current()
        for n in names:
            runs[n].experts = subsets[n]
        predicted = {n: torch.zeros(len(held[n]), dtype=torch.float64, device=dev) for n in names}
        for i in own:
            seen: dict = {}

            def tap(name):
                def fn(lay, routing, out):
                    # the first layer's output becomes the leaf; later outputs stay in the graph (their
                    # gradients then include every later layer's Jacobian) and keep their .grad
                    leaf = out.detach().requires_grad_(True) if not seen else out
                    if seen:
                        leaf.retain_grad()
                    seen[name] = (leaf, routing)
                    return leaf
                return fn

            for n in names:
                runs[n].record = tap(n)
            with torch.enable_grad():
                _kl(pruned(chunks[i]).float().log_softmax(-1), teacher[i]).backward()
            with torch.no_grad():
                for n, (leaf, routing) in seen.items():
                    layer, S = layers[n], layers[n].config.slots_per_expert
                    combine, y = layer.slot_outputs(routing)
                    share = (combine.float() * (leaf.grad.float() @ y.float().transpose(1, 2))).sum(dim=(0, 1))
                    predicted[n] += share.double().reshape(-1, S).sum(-1)
        for n in names:
            runs[n].record = None
        predicted = {n: _all_reduce({"p": p})["p"].to(dev) for n, p in predicted.items()}
        pairs = []
        for n in fits:
            p = predicted[n].clone()
            p[chosen[n]] = float("inf")
            for e in torch.sort(p, stable=True).indices[: min(candidates, len(held[n]) - len(chosen[n]))].tolist():
                pairs.append((float(p[e]) / cost[n], n, e))  # the predicted drop per FLOP
        pairs = sorted(pairs)[:candidates]
        trials = []
        for _, n, e in pairs:
            trial = {**current(), n: held[n][torch.tensor(sorted(chosen[n] + [e]), dtype=torch.long)]}
            trials.append((kl_of(trial), names.index(n), e, n))
        best = min(trials)
        chosen[best[3]].append(best[2])
        spent += cost[best[3]]
        if bar is not None:
            bar.update()
    if bar is not None:
        bar.close()
    subsets = {n: ids.cpu() for n, ids in current().items()}
    record = {"budget": "global", "kept": {n: len(c) for n, c in chosen.items()},
              "uniform": dict(ks), "expert_flops": (spent, total), "kl": kl_of(current())}
    record["whole_model"] = _whole_model_guard(model, batches, keep, subsets, runs, pruned, limit, chunk, dev)
    if record["whole_model"]["chosen"] == "mass":
        subsets = {n: torch.as_tensor(ids) for n, ids in record["whole_model"]["mass_subsets"].items()}
    return subsets, record


@torch.no_grad()
def _whole_model_guard(model, batches, keep, subsets, runs, pruned, limit: int, chunk: int, dev) -> dict:
    """The whole pruned model (every layer with the rule's subset) against the all-mass model (what `--rule mass`
    writes), on calibration inputs the search did not see (those after the first `limit`; the search's own when
    there are none): the record, and which to keep ("loss" unless mass is strictly better there)."""
    data = as_batches(batches, device=dev)
    n_all = data.num_inputs
    held_out = n_all > limit
    idx = np.arange(limit, min(n_all, 2 * limit)) if held_out else np.arange(min(n_all, limit))
    check = Batches(data.examples.subset(idx), chunk, device=dev, cache_mb=data.cache_mb).cached()
    mass = static_from_sums(model, calibrate(model, batches), keep)
    rank, world = _shard()
    own = list(range(rank, len(check), world))
    teacher = {i: model(check[i]).float().log_softmax(-1) for i in own}

    def kl(chosen: dict) -> float:
        for n, ids in chosen.items():
            runs[n].experts = ids
        total = sum(float(_kl(pruned(check[i]).float().log_softmax(-1), teacher[i])) for i in own)
        return sum_over_ranks(total)[0] / check.num_inputs

    kl_rule, kl_mass = kl(subsets), kl(mass)
    return {"inputs": int(len(idx)), "held_out": held_out, "kl_rule": kl_rule, "kl_mass": kl_mass,
            "chosen": "mass" if kl_mass < kl_rule else "loss",
            "rule_subsets": {n: torch.as_tensor(ids).tolist() for n, ids in subsets.items()},
            "mass_subsets": {n: ids.tolist() for n, ids in mass.items()}}


@torch.no_grad()
def _mass_top(pruned, runs, name, layer, chunks, k, subsets) -> torch.Tensor:
    """The combine-mass top k of `name` on the inputs it sees with the earlier layers pruned (for the record)."""
    mass = torch.zeros(layer.config.num_experts, dtype=torch.float64, device=device_of(layer))

    def tap(lay, routing, out):
        mass.add_(routing.scores.double().sum(0))

    for n in runs:
        runs[n].experts = subsets.get(n) if n != name else None
    runs[name].record = tap
    for c in chunks:  # this rank's chunks; the masses are summed over the ranks
        pruned(c)
    runs[name].record = None
    mass = _all_reduce({"m": mass})["m"].to(mass.device)
    held = layer.held_experts(mass.device)
    return held[select_experts(mass[held], k, per="batch")]


def choose_subsets(model: nn.Module, batches: Sequence, keep, rule: str = DEFAULT_RULE, mode: str = "drop",
                   progress: bool = False, budget: str = "per-layer", search: dict | None = None) -> tuple[dict, dict]:
    """The static subset of every Soft MoE layer from calibration inputs, by `rule` (see the module docstring).

    Args:
        model: a native model or bare layer (full or compressed: a compressed layer chooses among its experts).
        batches: calibration inputs, a sequence of model inputs (iterated once per layer by `reconstruct`).
        keep: see `parse_keep`. rule: "mass", "output", "reconstruct" or "loss" (the default; measured best,
            see the README). mode: the mode the subsets will run in ("loss" chooses for it; the others ignore it).
        progress: show progress bars.
        budget: "per-layer" (every layer keeps `keep` of its experts) or "global" (the `loss` rule spends the same
            expert FLOPs where they lower the loss most: layers may keep different numbers; see global_loss_subsets).
        search: the `loss` rule's search settings (`limit`, `candidates`, `rounds`: see loss_subsets); missing
            keys take DEFAULT_SEARCH's.

    Returns:
        (subsets {layer name: router ids [k]}, record for the checkpoint's metadata: the rule and, per layer,
        the scores ("mass", "output"), the relative output errors ("reconstruct") or the distillation KL of
        the subsets and of the combine-mass top k in their place ("loss")).

    Raises:
        SelectionError: an unknown rule, a bad keep, no Soft MoE layer, non-finite calibration values.

    Example:
        >>> subsets, record = choose_subsets(model, batches, "1/8", rule="loss")
        >>> small = compress_model(model, subsets)
    """
    if rule not in RULES:
        raise SelectionError(f"rule={rule!r}: choose one of {', '.join(RULES)}")
    if not moe_layers(model):
        raise SelectionError(f"{type(model).__name__} has no Soft MoE layer to calibrate")
    keep_per_layer(model, keep)  # a bad keep fails before any pass over the data
    if budget not in BUDGETS:
        raise SelectionError(f"budget={budget!r}: choose one of {', '.join(BUDGETS)}")
    if budget == "global" and (rule != "loss" or isinstance(model, SoftMoE)):
        raise SelectionError("--budget global spends one budget across Soft MoE layers by the loss rule: use it with "
                             "--rule loss on a model with Soft MoE layers inside")
    if rule == "reconstruct":
        subsets, errors = reconstruct_subsets(model, batches, keep, progress=progress)
        return subsets, {"rule": rule, "relative_output_error": errors}
    if rule == "loss":
        subsets, losses = loss_subsets(model, batches, keep, mode=mode, progress=progress, budget=budget,
                                       **(search or {}))
        key = "relative_output_error" if isinstance(model, SoftMoE) else "distillation_kl"
        return subsets, {"rule": rule, key: losses}
    sums = calibrate(model, batches, progress=progress) if rule == "mass" else output_sums(model, batches, progress)
    return static_from_sums(model, sums, keep), {"rule": rule, "calibration_scores": {n: s.tolist() for n, s in sums.items()}}


__all__ = ["BUDGETS", "RULES", "DEFAULT_RULE", "DEFAULT_SEARCH", "choose_subsets", "global_loss_subsets", "greedy_subset",
           "loss_subsets", "output_sums", "reconstruct_subsets", "subset_error"]
