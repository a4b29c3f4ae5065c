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
the model about 3 + 2 times per round, 2 rounds per layer, on 256 calibration inputs spread over the data, whatever k: about
5x the `mass` rule's time on the study's ViTs (20x with every expert searched on 512 inputs). All sums are float64.

Reconstruction in a layer's output space did not track accuracy on the MNIST family (e.g. n = 32, keep 1/8: lower
output error than combine mass, lower accuracy): every direction of the error counts alike there, whatever the
head makes of it. The `loss` rule measures what the model's output loses instead.
"""

from __future__ import annotations

from typing import Sequence

from torch import nn

from ..core.layers import SoftMoE
from ..core.models import moe_layers
from ..errors import SelectionError
from .loss_rule import BUDGETS, DEFAULT_SEARCH, loss_subsets
from .rules import output_sums, reconstruct_subsets
from .scores import calibrate, keep_per_layer, static_from_sums

RULES = ("mass", "output", "reconstruct", "loss")
DEFAULT_RULE = "loss"


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


__all__ = ["BUDGETS", "RULES", "DEFAULT_RULE", "DEFAULT_SEARCH", "choose_subsets"]
