"""The Soft MoE layer: the numerical ground truth every other path (Triton kernel, ONNX graph) is checked against.

Soft MoE (Puigcerver et al., "From Sparse to Soft Mixtures of Experts"), for one input X [M, D]:

    logits   = norm(X) @ Phi_n                # [M, E*S]; Phi_n = scale * Phi / |Phi| (columns over D)
    dispatch = softmax(logits, over tokens)   # each slot (column) sums to 1 over the M tokens
    combine  = softmax(logits, over slots)    # each token (row) sums to 1 over the E*S slots
    slots    = dispatch^T @ X_d               # [E*S, D]; X_d is norm(X) or the raw X (`dispatch_input`)
    Y        = expert_e(slots of e)           # expert e sees its S slots
    out      = combine @ Y                    # [M, D_out]

Running with a subset of experts (Chung et al., "Beyond Parameter Count"), two modes:
    drop:   dispatch and combine from the full logits; dropped experts are not run, their slot outputs are 0.
    renorm: dropped slots' logits are -inf before both softmaxes (the router needs only the kept columns).
Axes: B batch, M tokens, D model dim, E experts, S slots per expert, H expert hidden, K kept experts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Literal

import torch
from torch import nn

from ..errors import ConfigError
from .mlp import EXPERT_KINDS, ExpertKind, default_bias
from .experts import StackedExperts, triton_available
from .tracing import check_on_device, compiling, in_graph
from .routing import Routing, normalize_tokens, router_weight

__all__ = ["SoftMoEConfig", "SoftMoE", "StackedExperts", "EXPERT_KINDS", "MODES"]

TokenNorm = Literal["l2", "layer", "none"]
# How a layer's expert weights are stored: float (None) or int8 with per-output-channel scales.
EXPERT_QUANTS = (None, "int8")
Mode = Literal["drop", "renorm"]
MODES = ("drop", "renorm")


def _renamed(d: dict) -> dict:
    """A config dict with `present`, the name of `held` before checkpoint format version 2, read as `held`."""
    if "present" not in d:
        return d
    if "held" in d:
        raise ConfigError("Soft MoE config: both held and present (its old name) are given")
    return {("held" if k == "present" else k): v for k, v in d.items()}


@dataclass(frozen=True)
class SoftMoEConfig:
    """Architecture of one Soft MoE layer.

    Args:
        dim: D, the token width.
        num_experts: E, the router's expert count (columns of Phi are E*S).
        slots_per_expert: S.
        hidden: H, each expert's hidden width (for GEGLU, the width after gating).
        expert: "gelu_mlp" (timm Mlp: Linear+GELU+Linear, biases; soft-moe, soft-moe-pytorch),
            "relu_mlp" (Linear+ReLU+Linear, no biases; Chung et al.'s MNIST model), "geglu" (soft-moe-pytorch).
        expert_bias: whether the experts' Linear layers have biases; None: the kind's default (above).
        token_norm: how tokens are normalized for routing: "l2" over D (the Soft MoE paper), "layer"
            (LayerNorm without affine; soft-moe-pytorch's use_layernorm) or "none".
        token_gain: a learned per-channel gain after token_norm (soft-moe-pytorch's RMSNorm gamma times sqrt(D)).
        phi_norm: l2-normalize Phi's columns over D and multiply by a learned scalar `scale` (the paper).
        dispatch_input: what the slots average: "normalized" tokens (bwconrad/soft-moe, which Chung et al.
            used; soft-moe-pytorch) or the "raw" tokens (google-research/vmoe).
        eps: floor of the l2 norms (and LayerNorm's epsilon).
        out_dim: the experts' output width; None means D.
        held: the router experts whose weights this layer holds, ascending (a compressed `drop`-mode
            checkpoint keeps all of Phi but only these experts); None means all E (see `held_ids`). Read from
            `present`, its name before checkpoint format version 2.
        origin: the experts' ids in the model this layer was compressed from, for reports; None means own ids.
        quant: "int8": the experts' w1 and w2 are stored as int8 with one scale per output channel (tensors
            `experts.w1_scale` [E, H1], `experts.w2_scale` [E, D_out]; see moe_prune.compression.quantize); None: float
            weights. The router, norms and every other tensor keep their float dtype either way.

    Example:
        >>> cfg = SoftMoEConfig(dim=64, num_experts=8, slots_per_expert=1, hidden=128)
        >>> layer = SoftMoE(cfg)
        >>> layer(torch.randn(2, 10, 64)).shape
        torch.Size([2, 10, 64])
    """

    dim: int
    num_experts: int
    slots_per_expert: int
    hidden: int
    expert: ExpertKind = "gelu_mlp"
    expert_bias: bool | None = None
    token_norm: TokenNorm = "l2"
    token_gain: bool = False
    phi_norm: bool = True
    dispatch_input: Literal["normalized", "raw"] = "normalized"
    eps: float = 1e-6
    out_dim: int | None = None
    held: tuple[int, ...] | None = None
    origin: tuple[int, ...] | None = field(default=None, compare=False)
    quant: str | None = None

    def __post_init__(self):
        for name in ("dim", "num_experts", "slots_per_expert", "hidden"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"Soft MoE config: {name} must be a positive integer, got {value!r}")
        if self.expert not in EXPERT_KINDS:
            raise ConfigError(f"Soft MoE config: expert must be one of {EXPERT_KINDS}, got {self.expert!r}")
        if self.expert_bias is not None and not isinstance(self.expert_bias, bool):
            raise ConfigError(f"Soft MoE config: expert_bias must be true, false or null, got {self.expert_bias!r}")
        if self.token_norm not in ("l2", "layer", "none"):
            raise ConfigError(f"Soft MoE config: token_norm must be 'l2', 'layer' or 'none', got {self.token_norm!r}")
        if self.dispatch_input not in ("normalized", "raw"):
            raise ConfigError(
                f"Soft MoE config: dispatch_input must be 'normalized' or 'raw', got {self.dispatch_input!r}"
            )
        if not isinstance(self.eps, (int, float)) or isinstance(self.eps, bool) or not 0 < self.eps < math.inf:
            raise ConfigError(f"Soft MoE config: eps must be a positive finite number, got {self.eps!r}")
        if self.held is not None:
            object.__setattr__(self, "held", tuple(int(i) for i in self.held))
            p = self.held
            if not p or list(p) != sorted(set(p)) or p[0] < 0 or p[-1] >= self.num_experts:
                raise ConfigError(
                    f"Soft MoE config: held must be distinct ascending expert ids in [0, {self.num_experts}), "
                    f"got {list(p)}"
                )
        if self.quant not in EXPERT_QUANTS:
            raise ConfigError(f"Soft MoE config: quant must be null or one of {list(EXPERT_QUANTS[1:])}, got {self.quant!r}")
        if self.origin is not None:
            object.__setattr__(self, "origin", tuple(int(i) for i in self.origin))
            if len(self.origin) != self.num_held:
                raise ConfigError(
                    f"Soft MoE config: origin names {len(self.origin)} experts but the layer holds {self.num_held}"
                )

    def __setstate__(self, state: dict) -> None:
        """A config pickled before `present` was renamed `held` unpickles with it as `held`."""
        self.__dict__.update(_renamed(state))

    @property
    def held_ids(self) -> tuple[int, ...]:
        """The router ids of the experts whose weights the layer holds, in stack order: `held`, or all E."""
        return self.held if self.held is not None else tuple(range(self.num_experts))

    @property
    def num_held(self) -> int:
        """How many experts' weights the layer holds (K for a compressed drop-mode layer, else E)."""
        return self.num_experts if self.held is None else len(self.held)

    @property
    def has_bias(self) -> bool:
        """Whether the experts have biases (b1, b2)."""
        return default_bias(self.expert) if self.expert_bias is None else self.expert_bias

    @property
    def out_features(self) -> int:
        return self.dim if self.out_dim is None else self.out_dim

    def to_dict(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        for key in ("held", "origin"):
            if d[key] is not None:
                d[key] = list(d[key])
        for key in ("expert_bias", "quant"):  # unset: specs written before the field existed stay as they were
            if d[key] is None:
                del d[key]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "SoftMoEConfig":
        known = {f.name for f in fields(cls)}
        d = _renamed(d)
        unknown = set(d) - known
        if unknown:
            raise ConfigError(f"Soft MoE config: unknown keys {sorted(unknown)}; known keys are {sorted(known)}")
        try:
            return cls(**d)
        except TypeError as e:  # a missing required key
            raise ConfigError(f"Soft MoE config: {e}") from None


# The routing kernel's dtypes, and the most programs its grid's second axis (one per input) may have on CUDA.
_KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_MAX_GRID_Y = 65535


class SoftMoE(nn.Module):
    """A Soft MoE layer with stacked experts; runs all experts, a shared subset, or a per-input subset.

    Parameters: phi [D, E, S] (soft-moe's layout), scale [1] (if phi_norm), norm_weight [D] (if token_gain),
    experts.w1/b1/w2/b2 (see StackedExperts). A call is `mix(route(x, mask), experts, mode)`.

    Example:
        >>> layer = SoftMoE(SoftMoEConfig(dim=16, num_experts=8, slots_per_expert=1, hidden=32))
        >>> x = torch.randn(4, 10, 16)
        >>> y = layer(x, experts=torch.tensor([1, 5]))  # only experts 1 and 5 run; the others' outputs are 0
    """

    def __init__(self, config: SoftMoEConfig):
        super().__init__()
        self.config = config
        c = config
        self.phi = nn.Parameter(torch.randn(c.dim, c.num_experts, c.slots_per_expert) / math.sqrt(c.dim))
        self.scale = nn.Parameter(torch.ones(1)) if c.phi_norm else None
        self.norm_weight = nn.Parameter(torch.ones(c.dim)) if c.token_gain else None
        self.experts = StackedExperts(c.expert, c.num_held, c.dim, c.hidden, c.out_features, c.has_bias, quant=c.quant)
        # None: the Triton kernel for CUDA inference when triton is installed, else torch. True/False forces one.
        self.use_triton: bool | None = None
        self._router_cache: tuple | None = None  # (what it was computed from, router): see router()

    @property
    def num_experts(self) -> int:
        return self.config.num_experts

    def held_experts(self, device=None) -> torch.Tensor:
        """The router ids [E_held] of the experts this layer holds (config.held_ids) as an int64 tensor."""
        return torch.tensor(self.config.held_ids, dtype=torch.long, device=device)

    # -- routing -------------------------------------------------------------------------------------------
    def route_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, M, D] -> normalized tokens [B, M, D]."""
        return normalize_tokens(x, self.config.token_norm, self.norm_weight, self.config.eps)

    def router(self) -> torch.Tensor:
        """The effective router [D, E*S].

        For a frozen layer (phi and scale without requires_grad) called without gradients, outside graphs and
        compilation, it is computed once and reused until phi or scale change in place (load_state_dict, any op
        that bumps a tensor's version), are replaced, or the layer is moved (`.to`, `.half`): normalizing Phi on
        every call was up to a third of a small layer's time (benchmarks/results/router_levers.md). A trainable
        layer recomputes it on every call: optimizers (fused ones) and collectives write parameters without
        bumping their version. Writes through `.data` or numpy bypass versions too: call `clear_router_cache()`
        after one on a frozen layer."""
        phi, scale = self.phi, self.scale
        params = [p for p in (phi, scale) if p is not None]
        if (torch.is_grad_enabled() or in_graph() or compiling()
                or any(p.requires_grad or p.is_inference() or type(p) not in (nn.Parameter, torch.Tensor) for p in params)):
            return router_weight(phi, scale, self.config.eps)
        # Keyed on the tensors themselves (held: a replaced one is not freed and its address reused), their
        # versions and layout, and the eps the router is computed with.
        state = (self.config.eps,) + tuple(
            (p._version, p.data_ptr(), p.shape, p.stride(), p.storage_offset(), p.dtype, p.device) for p in params)
        hit = getattr(self, "_router_cache", None)  # None too for a layer pickled before the cache existed
        if hit is None or hit[0] is not phi or hit[1] is not scale or hit[2] != state:
            hit = self._router_cache = (phi, scale, state, router_weight(phi, scale, self.config.eps))
        return hit[3]

    def clear_router_cache(self) -> None:
        """Forget the reused router (see `router`): after writing phi or scale in a way that bumps no version."""
        self._router_cache = None

    def _apply(self, fn, recurse=True):
        self._router_cache = None  # a move frees the old storage: its address may come back
        return super()._apply(fn, recurse)

    def __getstate__(self):
        return {**super().__getstate__(), "_router_cache": None}  # pickles and copies carry no cached router

    def route(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> Routing:
        """Route tokens x [B, M, D] (mask [B, M], True = real token): the Routing every later step reads.

        On CUDA (and `use_triton` not False) the fused kernel computes dispatch, combine and scores in one launch;
        otherwise torch computes what is asked for, each once.

        Raises:
            ValueError: x is not [B, M, D] with this layer's D.
        """
        if x.dim() != 3 or x.shape[-1] != self.config.dim:
            raise ValueError(f"SoftMoE expects tokens [B, M, {self.config.dim}], got {list(x.shape)}")
        tokens = self.route_tokens(x)
        if self.triton_for(x):
            from ..kernels.routing import soft_moe_routing

            dispatch, combine, scores = soft_moe_routing(
                x, self.phi, self.scale, self.norm_weight, token_norm=self.config.token_norm, eps=self.config.eps,
                mask=mask, slots_per_expert=self.config.slots_per_expert,
            )
            return Routing(self, x, mask, tokens, dispatch=dispatch, combine=combine, scores=scores)
        return Routing(self, x, mask, tokens)

    def triton_for(self, x: torch.Tensor) -> bool:
        """Whether `route` uses the fused Triton kernel for x: CUDA inference, a dtype and grid it takes."""
        if in_graph():
            return False  # an exported graph is plain ONNX operators
        # What the kernel cannot take goes to torch even with use_triton=True, instead of failing in its launcher:
        # fp32/fp16/bf16 only (no float64 tl.dot), and at most _MAX_GRID_Y inputs (the batch is grid axis 1).
        if x.dtype not in _KERNEL_DTYPES or x.dim() != 3 or x.shape[0] > _MAX_GRID_Y:
            return False
        if self.use_triton is not None:
            return self.use_triton
        if torch.is_grad_enabled() and (x.requires_grad or self.phi.requires_grad):
            return False  # the kernel has no backward: training routes through torch
        return (x.is_cuda and self.config.token_norm != "layer" and x.dtype in _KERNEL_DTYPES
                and x.shape[0] <= _MAX_GRID_Y and triton_available())

    # -- forward -------------------------------------------------------------------------------------------
    def forward(
        self,
        x: torch.Tensor,
        mask: torch.Tensor | None = None,
        experts: torch.Tensor | None = None,
        mode: Mode = "drop",
    ) -> torch.Tensor:
        """Run the layer: `mix(route(x, mask), experts, mode)`.

        Args:
            x: tokens [B, M, D].
            mask: optional key-padding mask [B, M], True for real tokens (padded tokens' outputs are 0).
            experts: None (all experts the layer holds), router expert ids [K] shared by the batch, or [B, K]
                per input; only the kept experts are computed, on the kept slots only.
            mode: "drop" or "renorm" (see the module docstring); ignored when experts is None.

        Returns:
            [B, M, D_out].
        """
        return self.mix(self.route(x, mask), experts, mode)

    def mix(self, routing: Routing, experts: torch.Tensor | None = None, mode: Mode = "drop") -> torch.Tensor:
        """Slots from the dispatch weights, the kept experts on them, outputs mixed by the combine weights.

        Args:
            routing: this call's `route(x, mask)`.
            experts: None, router ids [K] (a shared subset), or [B, K] (each input its own; Algorithm 1).
            mode: "drop" or "renorm".

        Returns:
            [B, M, D_out].
        """
        if mode not in MODES:
            raise ValueError(f"mode must be 'drop' or 'renorm', got {mode!r}")
        if experts is not None and experts.device != routing.x.device:
            experts = experts.to(routing.x.device)  # ids chosen on the host (calibration) index device tensors
        compressed = self.config.held is not None
        if experts is None and not compressed:
            return self._mix(routing, routing.dispatch_weights, routing.combine_weights, None)
        if experts is None:  # a compressed drop-mode layer: its held experts are the subset, its stack in order
            held = self.held_experts(routing.x.device)
            return self._mix(routing, *routing.kept_weights(self._columns(held), "drop"), None)
        if experts.dim() == 2 and not in_graph():
            if experts.shape[0] == 1:  # one input: its subset is a shared one, the cheapest path
                experts = experts[0]
            elif experts.shape[1] == self.config.num_held and not compressed:  # every input keeps every expert
                return self._mix(routing, routing.dispatch_weights, routing.combine_weights, None)
        cols = self._columns(experts)  # [K*S] or [B, K*S]
        dispatch, combine = routing.kept_weights(cols, mode)  # [B, M, K*S]
        if experts.dim() == 1:
            return self._mix(routing, dispatch, combine, self._stack_index(experts))
        return self._mix_per_input(routing, dispatch, combine, self._stack_index(experts))

    def slot_outputs(self, routing: Routing) -> tuple[torch.Tensor, torch.Tensor]:
        """What every held expert returns and where it goes, for calibration rules that look at expert outputs.

        Returns:
            (combine [B, M, Kh*S], y [B, Kh*S, D_out]): the combine weights at the held experts' slot columns
            and those slots' expert outputs, held experts in stack order; the layer's output (all held experts,
            drop mode) is `combine @ y`, and expert j's share of it is combine[..., j*S:(j+1)*S] @ y[:, j*S:(j+1)*S].
        """
        held = self.held_experts(routing.x.device)
        S, D_out = self.config.slots_per_expert, self.config.out_features
        dispatch, combine = routing.kept_weights(self._columns(held), "drop")
        slots = routing.slots(dispatch)  # [B, Kh*S, D]
        B, KS, D = slots.shape
        K = KS // S
        y = self.experts(slots.reshape(B, K, S, D).transpose(0, 1).reshape(K, B * S, D), None)  # [Kh, B*S, D_out]
        return combine, y.reshape(K, B, S, D_out).transpose(0, 1).reshape(B, KS, D_out)

    def _columns(self, experts: torch.Tensor) -> torch.Tensor:
        """Router expert ids [..., K] -> their slot columns [..., K*S]."""
        S = self.config.slots_per_expert
        cols = experts.unsqueeze(-1) * S + torch.arange(S, device=experts.device)  # [..., K, S]
        return cols.flatten(-2)

    def _mix(self, routing, dispatch, combine, idx):
        """All held experts (idx None) or a shared subset (stack positions idx [K]). dispatch/combine [B, M, K*S]."""
        S, D, D_out = self.config.slots_per_expert, self.config.dim, self.config.out_features
        slots = routing.slots(dispatch)  # [B, K*S, D]
        K = self.config.num_held if idx is None else idx.shape[0]
        if K == 0:
            return combine.new_zeros(*combine.shape[:2], D_out)
        # Sizes from the config and one -1 per reshape: an exported graph gets constant shapes instead of a
        # Shape-Gather-Unsqueeze-Concat chain per reshape (benchmarks/results/bench_vit2-e128-s10_renorm).
        slots = slots.reshape(-1, K, S, D).transpose(0, 1).reshape(K, -1, D)  # [K, B*S, D]
        y = self.experts(slots, idx)  # [K, B*S, D_out]
        y = y.reshape(K, -1, S, D_out).transpose(0, 1).reshape(-1, K * S, D_out)  # [B, K*S, D_out]
        return combine @ y  # [B, M, D_out]

    def _mix_per_input(self, routing, dispatch, combine, idx):
        """Algorithm 1, sparse: each input's K experts (stack positions idx [B, K]) on its own kept slots only.

        The B*K (input, expert) slot groups are grouped by expert and each used expert runs once on its rows
        (StackedExperts.grouped), so the experts cost B*K evaluations, as a shared subset of K costs B*K."""
        S, D_out = self.config.slots_per_expert, self.config.out_features
        slots = routing.slots(dispatch)  # [B, K*S, D]
        B, KS, D = slots.shape
        y = self.experts.grouped(slots.reshape(-1, S, D), idx.reshape(-1), capacity=B)  # [B*K, S, D_out]
        return combine @ y.reshape(B, KS, D_out)  # [B, M, D_out]

    def _stack_index(self, experts: torch.Tensor) -> torch.Tensor:
        """Router ids [...] -> positions in this layer's expert stack (a lookup table for a compressed layer)."""
        held = self.config.held
        if held is None:
            return experts
        table = torch.full((self.config.num_experts,), -1, dtype=torch.long, device=experts.device)
        table[list(held)] = torch.arange(len(held), device=experts.device)
        pos = table[experts]
        check_on_device((pos >= 0).all(), ValueError(f"experts not all held by this compressed layer (it holds {list(held)})"))
        return pos
