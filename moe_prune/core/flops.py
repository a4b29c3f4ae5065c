"""Analytic cost of one forward pass per input: FLOPs (a multiply-add is 2) and weight bytes, by layer kind.

The speedup bounds of running k of n experts:
    FLOP ratio   = FLOPs(full) / FLOPs(reduced)              -- rules when compute-bound (large batches)
    bytes ratio  = weight bytes(full) / weight bytes(reduced) -- rules when every weight is read once per batch
                                                                and that dominates (batch 1, large models)
Soft MoE layer with M tokens, width D, E experts of S slots, K kept:
    router   2*M*D*(E*S)   (drop mode: all slots, the combine denominator needs them; renorm: K*S columns)
    dispatch 2*M*(K*S)*D,  combine 2*M*(K*S)*D_out,  experts (K*S) * expert FLOPs per slot
Elementwise work (norms, softmax, GELU) is left out: it is small beside the matmuls and the same in both models.

Weight bytes count every stored value at the model's float width (4 bytes), except int8 experts' weights
(moe_prune.compression.quantize): 1 byte each, plus their float scales, one per output channel of w1 and w2 (`Cost.int8`).

Per-input subsets (Algorithm 1) compute K experts per input, as a shared subset does, but a batch reads the weights
of every expert some input kept: U(B) of them (`union`; about E * (1 - (1 - K/E)^B) if choices were uniform, 126 of
128 at B = 32, K = 16), so their weight bytes grow with the batch while their FLOPs per input do not. Neither ratio
alone bounds them; the roofline does: a pass costs at least max(FLOPs / peak FLOP/s, weight bytes / bandwidth),
and `roofline_ratio` compares two models by that, with the machine's measured peak and bandwidth.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

from torch import nn

from .layers import SoftMoE
from .models import MnistSoftMoE, SoftMoEViT, moe_layers

KINDS = ("embed", "attention", "dense_mlp", "router", "dispatch", "combine", "experts", "head")


@dataclass
class Cost:
    """FLOPs and weight parameters per input, by layer kind; `int8`: how many of those parameters are stored as
    int8 (1 byte each), by kind."""

    flops: dict = field(default_factory=lambda: defaultdict(float))
    params: dict = field(default_factory=lambda: defaultdict(float))
    int8: dict = field(default_factory=lambda: defaultdict(float))

    @property
    def total_flops(self) -> float:
        return sum(self.flops.values())

    @property
    def total_params(self) -> float:
        return sum(self.params.values())

    def weight_bytes(self, bytes_per_param: int = 4) -> dict:
        """Bytes of the weights by kind: int8 parameters 1 byte, the others `bytes_per_param`."""
        return {k: v * bytes_per_param - self.int8.get(k, 0.0) * (bytes_per_param - 1) for k, v in self.params.items()}

    def total_weight_bytes(self, bytes_per_param: int = 4) -> float:
        return sum(self.weight_bytes(bytes_per_param).values())

    def as_dict(self, bytes_per_param: int = 4) -> dict:
        return {"flops": dict(self.flops), "weight_bytes": self.weight_bytes(bytes_per_param),
                "total_flops": self.total_flops, "total_weight_bytes": self.total_weight_bytes(bytes_per_param)}


def expert_flops_per_slot(layer: SoftMoE) -> float:
    c = layer.config
    h1 = 2 * c.hidden if c.expert == "geglu" else c.hidden
    return 2 * c.dim * h1 + 2 * c.hidden * c.out_features


def expert_params(layer: SoftMoE) -> float:
    """Stored values of one expert: its weights and biases, and for int8 experts their scales too."""
    c = layer.config
    h1 = 2 * c.hidden if c.expert == "geglu" else c.hidden
    bias = h1 + c.out_features if c.has_bias else 0
    scales = h1 + c.out_features if c.quant is not None else 0
    return c.dim * h1 + c.hidden * c.out_features + bias + scales


def expert_int8_params(layer: SoftMoE) -> float:
    """How many of one expert's values are int8 (its w1 and w2 when the layer is quantized; else 0)."""
    c = layer.config
    h1 = 2 * c.hidden if c.expert == "geglu" else c.hidden
    return c.dim * h1 + c.hidden * c.out_features if c.quant is not None else 0


def moe_cost(layer: SoftMoE, tokens: int, kept: int | None = None, mode: str = "drop", dynamic: bool = False,
             cost: Cost | None = None, union: int | None = None) -> Cost:
    """Add one Soft MoE layer's cost for `tokens` tokens with `kept` experts computed (None: all it holds).

    `dynamic`: the subset is chosen inside the model (Algorithm 1 or 2), which needs the full router logits
    and all of Phi for the scores even in renorm mode. `union`: per-input subsets whose batch kept `union`
    distinct experts: their weights are what the pass reads (the FLOPs stay those of `kept` per input).
    """
    c = layer.config
    cost = cost or Cost()
    E, S, D = c.num_experts, c.slots_per_expert, c.dim
    K = c.num_held if kept is None else kept
    full_router = mode == "drop" or dynamic or K == E
    router_cols = E * S if full_router else K * S
    cost.flops["router"] += 2 * tokens * D * router_cols + (2 * tokens * D * K * S if dynamic and mode == "renorm" else 0)
    cost.flops["dispatch"] += 2 * tokens * K * S * D
    cost.flops["combine"] += 2 * tokens * K * S * c.out_features
    cost.flops["experts"] += K * S * expert_flops_per_slot(layer)
    cost.params["router"] += D * router_cols + (1 if c.phi_norm else 0) + (D if c.token_gain else 0)
    cost.params["experts"] += (K if union is None else union) * expert_params(layer)
    cost.int8["experts"] += (K if union is None else union) * expert_int8_params(layer)
    return cost


def model_cost(model: nn.Module, kept: dict | int | None = None, mode: str = "drop", dynamic: bool = False,
               tokens: int | None = None, union: dict | int | None = None) -> Cost:
    """Cost per input of a model run with `kept` experts per Soft MoE layer.

    Args:
        model: MnistSoftMoE, SoftMoEViT or a bare SoftMoE (then `tokens` is required). A compressed model's
            layers count the experts they hold.
        kept: None (each layer's held experts), an int for every layer, or {layer name: k}.
        mode: "drop" or "renorm".
        dynamic: experts chosen per batch in the graph (Algorithm 2): full router logits for the scores.
        tokens: tokens per input for a bare layer.
        union: per-input subsets: the number of distinct experts the batch kept, an int or {layer name: count}.

    Example:
        >>> full, small = model_cost(vit), model_cost(vit, kept=16)
        >>> full.total_flops / small.total_flops  # the FLOP bound of the speedup
    """
    cost = Cost()
    layers = moe_layers(model)
    k_of = lambda name: kept.get(name) if isinstance(kept, dict) else kept  # noqa: E731
    u_of = lambda name: union.get(name) if isinstance(union, dict) else union  # noqa: E731
    if isinstance(model, SoftMoE):
        if tokens is None:
            raise ValueError("model_cost of a bare Soft MoE layer needs tokens=")
        return moe_cost(model, tokens, k_of(""), mode, dynamic, cost, u_of(""))
    if isinstance(model, MnistSoftMoE):
        c = model.config
        moe_cost(model.moe, c.tokens, k_of("moe"), mode, dynamic, cost, u_of("moe"))
        cost.flops["head"] += 2 * model.head.in_features * model.head.out_features
        cost.params["head"] += model.head.weight.numel()
        return cost
    if not isinstance(model, SoftMoEViT):
        raise TypeError(f"no cost model for {type(model).__name__}")
    c = model.config
    M, D = c.tokens, c.embed_dim
    pe = model.patch_embed.proj
    cost.flops["embed"] += 2 * c.num_patches * pe.weight[0].numel() * D
    cost.params["embed"] += sum(p.numel() for p in model.patch_embed.parameters()) + model.pos_embed.numel() + (
        model.cls_token.numel() if model.cls_token is not None else 0)
    for i, block in enumerate(model.blocks):
        cost.flops["attention"] += 2 * M * D * 3 * D + 2 * 2 * M * M * D + 2 * M * D * D
        cost.params["attention"] += sum(p.numel() for p in block.attn.parameters()) + sum(
            p.numel() for n, p in block.named_parameters() if n.startswith(("norm1", "norm2", "ls")))
        name = f"blocks.{i}.mlp"
        if name in layers:
            moe_cost(layers[name], M, k_of(name), mode, dynamic, cost, u_of(name))
        else:
            cost.flops["dense_mlp"] += 2 * 2 * M * D * block.mlp.fc1.out_features
            cost.params["dense_mlp"] += sum(p.numel() for p in block.mlp.parameters())
    if isinstance(model.head, nn.Linear):
        cost.flops["head"] += 2 * D * model.head.out_features
        cost.params["head"] += sum(p.numel() for p in model.head.parameters())
    cost.params["head"] += sum(p.numel() for p in model.norm.parameters()) + sum(p.numel() for p in model.fc_norm.parameters())
    return cost


def bounds(full: Cost, reduced: Cost) -> dict:
    """Speedup bounds of `reduced` over `full`, whole model and per layer kind (None where a kind is absent)."""
    ratio = lambda a, b: a / b if b else None  # noqa: E731
    kinds = sorted(set(full.flops) | set(full.params), key=lambda k: KINDS.index(k) if k in KINDS else 99)
    return {
        "flop_ratio": ratio(full.total_flops, reduced.total_flops),
        "bytes_ratio": ratio(full.total_weight_bytes(), reduced.total_weight_bytes()),
        "by_kind": {k: {"flops": (full.flops.get(k, 0.0), reduced.flops.get(k, 0.0)),
                        "weight_params": (full.params.get(k, 0.0), reduced.params.get(k, 0.0))} for k in kinds},
    }


def roofline_seconds(cost: Cost, batch: int, flops_per_s: float, bytes_per_s: float, bytes_per_param: int = 4) -> float:
    """The least time a pass over `batch` inputs can take: its FLOPs at peak, or its weights read once, whichever
    is longer (activations are left out, as everywhere here)."""
    return max(batch * cost.total_flops / flops_per_s, cost.total_weight_bytes(bytes_per_param) / bytes_per_s)


def roofline_ratio(full: Cost, reduced: Cost, batch: int, flops_per_s: float, bytes_per_s: float) -> float:
    """The speedup bound of `reduced` over `full` at `batch` on a machine of that peak and bandwidth.

    Example:
        >>> alg1 = model_cost(vit, kept=16, dynamic=True, union=126)   # the batch of 32 kept 126 experts
        >>> roofline_ratio(model_cost(vit), alg1, 32, 2e11, 1.4e10)
    """
    return roofline_seconds(full, batch, flops_per_s, bytes_per_s) / roofline_seconds(reduced, batch, flops_per_s, bytes_per_s)
