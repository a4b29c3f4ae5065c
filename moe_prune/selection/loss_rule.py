"""The `loss` rule (see calibration.py): each layer's subset built expert by expert to minimize the model's own
distillation loss KL(full || pruned) on calibration inputs, per layer or with one FLOP budget over all layers
(`global_loss_subsets`), kept only where it beats the combine-mass top k, layer by layer and for the whole model.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..core.devices import device_of
from ..core.layers import SoftMoE
from ..core.models import moe_layers
from ..data.examples import Batches, as_batches, spread
from ..data.shards import all_reduce, shard, sum_over_ranks
from ..errors import SelectionError
from .rules import reconstruct_subsets
from .scores import TappedLayer, calibrate, keep_per_layer, replace_layers, select_experts, static_from_sums


# The default search: 256 inputs, 2 candidates run per step, k experts chosen in 2 rounds. Chosen on the validation
# split (benchmarks/results/calibration_cost/): the cheapest search within 0.5 points of the best one's mean
# validation accuracy over the study's ViTs, 4.9x the mass rule's time where 2048 inputs x 8, expert by expert
# (the previous default), took 98x (re-measured with the search on spread inputs: the same choice).
DEFAULT_SEARCH = {"limit": 256, "candidates": 2, "rounds": 2}


def _search_inputs(batches, limit: int, chunk: int, dev) -> Batches:
    """The inputs the search runs on: `limit` of the calibration inputs spread evenly over them (a folder read
    class by class gives every class), in chunks, decoded once if they fit the data's cache budget."""
    data = as_batches(batches, device=dev)
    return data.subset(spread(data.num_inputs, limit), chunk).cached()


def _kl(log_p_student: torch.Tensor, log_p_teacher: torch.Tensor) -> torch.Tensor:
    return F.kl_div(log_p_student, log_p_teacher, log_target=True, reduction="sum")


def _subsets_kl(subsets: dict, runs: dict, pruned, chunks, teacher, own) -> float:
    """The mean distillation KL(full || pruned) over the calibration chunks with `subsets` set on the tapped layers:
    this rank's chunks `own`, summed over the ranks."""
    for n, ids in subsets.items():
        runs[n].experts = ids
    with torch.no_grad():
        total = sum(float(_kl(pruned(chunks[i]).float().log_softmax(-1), teacher[i])) for i in own)
    return sum_over_ranks(total)[0] / chunks.num_inputs


def loss_subsets(model: nn.Module, batches: Sequence, keep, *, mode: str = "drop",
                 candidates: int = DEFAULT_SEARCH["candidates"], limit: int = DEFAULT_SEARCH["limit"], chunk: int = 512,
                 progress: bool = False, budget: str = "per-layer",
                 rounds: int | None = DEFAULT_SEARCH["rounds"]) -> tuple[dict, dict]:
    """The `loss` rule: each layer's subset built expert by expert to minimize the model's distillation loss.

    Layers in order (earlier ones pruned to their subsets, later ones full). At each step the loss's gradient at
    the layer's output, dotted with every unchosen expert's output share Z_e, predicts the change from adding it
    (one backward pass ranks all experts); the `candidates` best by that prediction are then run for real and
    the one giving the lowest KL(full model || pruned model) over `limit` calibration inputs (spread evenly over them) is added.
    The candidates run in `mode` (the compressed checkpoint's); the prediction uses drop-mode shares. A bare
    layer's output is the model's output, so there the rule is `reconstruct`. With `rounds` R below a layer's k,
    the layer takes R predictions instead of k: each round adds the best candidate run and then the next best
    predicted experts, so that k are chosen in R rounds (a cost of R * (3 + candidates) passes over `limit`
    inputs per layer, whatever k).

    Two guards against greedy misses. Per layer, the greedy subset is compared with the layer's combine-mass top k
    on the search inputs (earlier layers pruned, later ones full) and the lower loss kept. Then the whole model:
    every layer with its chosen subset against the all-mass model (each layer's combine-mass top k over all the
    calibration data, exactly what `--rule mass` writes), on up to `limit` calibration inputs the search did not
    run on (spread evenly; the search inputs when there are no others), and the all-mass subsets are returned if they
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
    # `limit` inputs spread over the data, decoded once and kept if they fit the data's cache budget, else read again per pass.
    dev = device_of(model)
    chunks = _search_inputs(batches, limit, chunk, dev)
    rank, world = shard()
    own = list(range(rank, len(chunks), world))  # under torchrun each rank its chunks; every sum is all-reduced
    with torch.no_grad():
        teacher = {i: model(chunks[i]).float().log_softmax(-1) for i in own}
    runs: dict[str, TappedLayer] = {}
    pruned = replace_layers(model, lambda n, layer: runs.setdefault(n, TappedLayer(layer, mode=mode)))
    # parameters stay untouched: gradients are taken with autograd.grad at a detached copy of the layer output
    total = sum(ks.values())
    bar = None
    if progress:
        from ..core.progress import progress as progress_bar

        bar = progress_bar(total=total, desc="calibrating (loss)", unit="expert")

    def kl_of(subset_of_layer: dict) -> float:
        return _subsets_kl(subset_of_layer, runs, pruned, chunks, teacher, own)

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
            predicted = all_reduce({"p": predicted})["p"].to(dev)
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
    fit the budget are run for real and the one giving the lowest KL(full || pruned) on `limit`
    calibration inputs is added. The cost is that of the per-layer rule. The whole-model guard of `loss_subsets`
    follows (against the all-mass model with a uniform `keep`, at the same expert FLOPs).

    Returns:
        (subsets, record {"budget": "global", "kept": {layer: k}, "expert_flops": (spent, budget), "kl",
        "whole_model": see `loss_subsets`}).
    """
    from ..core.flops import expert_flops_per_slot

    layers = moe_layers(model)
    ks = keep_per_layer(model, keep)
    dev = device_of(model)
    chunks = _search_inputs(batches, limit, chunk, dev)
    rank, world = shard()
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
        return _subsets_kl(subsets, runs, pruned, chunks, teacher, own)

    bar = None
    if progress:
        from ..core.progress import progress as progress_bar

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
        predicted = {n: all_reduce({"p": p})["p"].to(dev) for n, p in predicted.items()}
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
    writes), on calibration inputs the search did not see (up to `limit` of the others, spread evenly; the search's
    own when there are none): the record, and which to keep ("loss" unless mass is strictly better there)."""
    data = as_batches(batches, device=dev)
    n_all = data.num_inputs
    searched = spread(n_all, limit)
    held_out = n_all > len(searched)
    idx = spread(n_all, limit, exclude=searched) if held_out else searched
    check = data.subset(idx, chunk).cached()
    mass = static_from_sums(model, calibrate(model, batches), keep)
    rank, world = shard()
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
    mass = all_reduce({"m": mass})["m"].to(mass.device)
    held = layer.held_experts(mass.device)
    return held[select_experts(mass[held], k, per="batch")]
