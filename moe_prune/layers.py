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

import functools
import importlib.util
import math
from dataclasses import dataclass, field, fields
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from .errors import ConfigError

ExpertKind = Literal["gelu_mlp", "relu_mlp", "geglu"]
TokenNorm = Literal["l2", "layer", "none"]
Mode = Literal["drop", "renorm"]
EXPERT_KINDS = ("gelu_mlp", "relu_mlp", "geglu")
MODES = ("drop", "renorm")


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
        token_norm: how tokens are normalized for routing: "l2" over D (the Soft MoE paper), "layer"
            (LayerNorm without affine; soft-moe-pytorch's use_layernorm) or "none".
        token_gain: a learned per-channel gain after token_norm (soft-moe-pytorch's RMSNorm gamma times sqrt(D)).
        phi_norm: l2-normalize Phi's columns over D and multiply by a learned scalar `scale` (the paper).
        dispatch_input: what the slots average: "normalized" tokens (bwconrad/soft-moe, which Chung et al.
            used; soft-moe-pytorch) or the "raw" tokens (google-research/vmoe).
        eps: floor of the l2 norms (and LayerNorm's epsilon).
        out_dim: the experts' output width; None means D.
        present: the router experts whose weights this layer holds, ascending (a compressed `drop`-mode
            checkpoint keeps all of Phi but only these experts); None means all E.
        origin: the experts' ids in the model this layer was compressed from, for reports; None means own ids.

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
    token_norm: TokenNorm = "l2"
    token_gain: bool = False
    phi_norm: bool = True
    dispatch_input: Literal["normalized", "raw"] = "normalized"
    eps: float = 1e-6
    out_dim: int | None = None
    present: tuple[int, ...] | None = None
    origin: tuple[int, ...] | None = field(default=None, compare=False)

    def __post_init__(self):
        for name in ("dim", "num_experts", "slots_per_expert", "hidden"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"Soft MoE config: {name} must be a positive integer, got {value!r}")
        if self.expert not in EXPERT_KINDS:
            raise ConfigError(f"Soft MoE config: expert must be one of {EXPERT_KINDS}, got {self.expert!r}")
        if self.token_norm not in ("l2", "layer", "none"):
            raise ConfigError(f"Soft MoE config: token_norm must be 'l2', 'layer' or 'none', got {self.token_norm!r}")
        if self.dispatch_input not in ("normalized", "raw"):
            raise ConfigError(
                f"Soft MoE config: dispatch_input must be 'normalized' or 'raw', got {self.dispatch_input!r}"
            )
        if not isinstance(self.eps, (int, float)) or isinstance(self.eps, bool) or not 0 < self.eps < math.inf:
            raise ConfigError(f"Soft MoE config: eps must be a positive finite number, got {self.eps!r}")
        if self.present is not None:
            object.__setattr__(self, "present", tuple(int(i) for i in self.present))
            p = self.present
            if not p or list(p) != sorted(set(p)) or p[0] < 0 or p[-1] >= self.num_experts:
                raise ConfigError(
                    f"Soft MoE config: present must be distinct ascending expert ids in [0, {self.num_experts}), "
                    f"got {list(p)}"
                )
        if self.origin is not None:
            object.__setattr__(self, "origin", tuple(int(i) for i in self.origin))
            if len(self.origin) != self.num_held:
                raise ConfigError(
                    f"Soft MoE config: origin names {len(self.origin)} experts but the layer holds {self.num_held}"
                )

    @property
    def num_held(self) -> int:
        """How many experts' weights the layer holds (K for a compressed drop-mode layer, else E)."""
        return self.num_experts if self.present is None else len(self.present)

    @property
    def out_features(self) -> int:
        return self.dim if self.out_dim is None else self.out_dim

    def to_dict(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        for key in ("present", "origin"):
            if d[key] is not None:
                d[key] = list(d[key])
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "SoftMoEConfig":
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ConfigError(f"Soft MoE config: unknown keys {sorted(unknown)}; known keys are {sorted(known)}")
        try:
            return cls(**d)
        except TypeError as e:  # a missing required key
            raise ConfigError(f"Soft MoE config: {e}") from None


def expert_activation(kind: ExpertKind, h: torch.Tensor) -> torch.Tensor:
    """The nonlinearity between an expert's two matmuls: GELU, ReLU, or GEGLU (value * gelu(gate), halving H)."""
    if kind == "gelu_mlp":
        return F.gelu(h)
    if kind == "relu_mlp":
        return F.relu(h)
    value, gate = h.chunk(2, dim=-1)
    return value * F.gelu(gate)


# Below this many weights (1M floats, 4 MB) gathering the kept experts is cheaper than one Python-level matmul
# pair per expert: measured on a CPU, gathering 16 of Chung et al.'s MNIST experts (150 KB) beat the loop 2x,
# and the loop beat gathering 16 ViT-S experts (75 MB) 7x.
_GATHER_LIMIT = 1 << 20


class StackedExperts(nn.Module):
    """E experts of one kind with their weights stacked, computed with batched matmuls (no loop over experts).

    Weights: w1 [E, D, H] (GEGLU: [E, D, 2H], value half first, then gate), w2 [E, H, D_out]; biases b1, b2
    unless the kind is "relu_mlp".
    """

    def __init__(self, kind: ExpertKind, num: int, dim: int, hidden: int, out_dim: int):
        super().__init__()
        self.kind = kind
        h1 = 2 * hidden if kind == "geglu" else hidden
        self.w1 = nn.Parameter(torch.empty(num, dim, h1))
        self.w2 = nn.Parameter(torch.empty(num, hidden, out_dim))
        if kind != "relu_mlp":
            self.b1 = nn.Parameter(torch.zeros(num, h1))
            self.b2 = nn.Parameter(torch.zeros(num, out_dim))
        else:
            self.b1 = self.b2 = None
        # Kaiming-uniform like nn.Linear, per expert.
        nn.init.uniform_(self.w1, -1 / math.sqrt(dim), 1 / math.sqrt(dim))
        nn.init.uniform_(self.w2, -1 / math.sqrt(hidden), 1 / math.sqrt(hidden))

    def forward(self, slots: torch.Tensor, idx: torch.Tensor | None = None) -> torch.Tensor:
        """slots [K, N, D] -> [K, N, D_out]; expert k of the stack is idx[k] (all experts in order if None)."""
        if idx is None:
            return self._mlp(slots, self.w1, self.b1, self.w2, self.b2)
        in_graph = torch.jit.is_tracing() or torch.compiler.is_exporting()
        if in_graph or len(idx) * (self.w1[0].numel() + self.w2[0].numel()) < _GATHER_LIMIT:
            # Gather the kept experts' weights (an ONNX Gather in a graph), then the same batched matmuls.
            pick = lambda t: None if t is None else t.index_select(0, idx)  # noqa: E731
            return self._mlp(slots, pick(self.w1), pick(self.b1), pick(self.w2), pick(self.b2))
        # Large experts, eager: use each kept expert's weights in place (views), one matmul pair per expert;
        # copying them first measured several times slower on a CPU for ViT-sized experts.
        if len(idx) == 0:
            return slots.new_zeros(*slots.shape[:-1], self.w2.shape[-1])
        at = lambda t, i: None if t is None else t[i]  # noqa: E731
        return torch.stack([self._mlp(slots[k], self.w1[i], at(self.b1, i), self.w2[i], at(self.b2, i))
                            for k, i in enumerate(idx.tolist())])

    def _mlp(self, x, w1, b1, w2, b2):
        """x [..., N, D] through experts with weights w1 [..., D, H1], b1 [..., H1], w2 [..., H, D_out]."""
        h = torch.matmul(x, w1)  # [..., N, H or 2H]
        if b1 is not None:
            h = h + b1.unsqueeze(-2)
        h = expert_activation(self.kind, h)
        y = torch.matmul(h, w2)  # [..., N, D_out]
        if b2 is not None:
            y = y + b2.unsqueeze(-2)
        return y


def normalize_tokens(x: torch.Tensor, token_norm: str, gain: torch.Tensor | None, eps: float) -> torch.Tensor:
    """Route-side token normalization: x [B, M, D] -> [B, M, D]."""
    if token_norm == "l2":
        # F.normalize's math without its expand_as, which exports as an ONNX Expand that materializes the norms
        # at full [B, M, D] size (8% of a compressed ViT-B Soft MoE layer's time in ONNX Runtime).
        x = x / torch.linalg.vector_norm(x, dim=-1, keepdim=True).clamp_min(eps)
    elif token_norm == "layer":
        x = F.layer_norm(x, x.shape[-1:], eps=eps)
    if gain is not None:
        x = x * gain
    return x


def router_weight(phi: torch.Tensor, scale: torch.Tensor | None, eps: float) -> torch.Tensor:
    """Phi [D, E, S] -> the effective router [D, E*S]: l2-normalized columns times `scale`, or raw if no scale."""
    phi = phi.flatten(1)
    if scale is not None:
        phi = scale * F.normalize(phi, dim=0, eps=eps)
    return phi


def routing_ref(
    x: torch.Tensor,
    phi: torch.Tensor,
    scale: torch.Tensor | None = None,
    gain: torch.Tensor | None = None,
    *,
    token_norm: str = "l2",
    eps: float = 1e-6,
    mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dispatch and combine weights of a Soft MoE router, in plain torch (the fused kernel's reference).

    Args:
        x: tokens [B, M, D].
        phi: router parameters [D, N] or [D, E, S] (N = E*S slots), raw (normalized here when `scale` is given).
        scale: learned scalar; None means Phi is used as it is (no column normalization).
        gain: per-channel gain [D] applied after the token normalization, or None.
        token_norm: "l2", "layer" or "none".
        eps: norm floor.
        mask: optional key-padding mask [B, M], True for real tokens: padded tokens get no dispatch weight and a
            zero combine row.

    Returns:
        (dispatch_weights, combine_weights), both [B, M, N]: every dispatch column and every unmasked combine
        row sums to 1.

    Example:
        >>> d, c = routing_ref(torch.randn(2, 5, 8), torch.randn(8, 4), torch.ones(1))
        >>> c.sum(-1)  # each token's combine weights sum to 1
    """
    logits = normalize_tokens(x, token_norm, gain, eps) @ router_weight(phi, scale, eps)  # [B, M, N]
    return _softmaxes(logits, mask)


def _softmaxes(logits: torch.Tensor, mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [B, M, N] -> dispatch (softmax over M) and combine (softmax over N), padded tokens excluded."""
    return _dispatch(logits, mask), _combine(logits, mask)


def _dispatch(logits: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Softmax over tokens; a slot's column depends on its own logits only, so columns can be computed apart."""
    if mask is None:
        return logits.softmax(dim=1)
    # A finite floor, not -inf: a slot whose every token is padded gets uniform weights instead of NaN.
    return logits.masked_fill(~mask.unsqueeze(-1), torch.finfo(logits.dtype).min).softmax(dim=1)


def _combine(logits: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Softmax over all slots (padded tokens' rows are 0)."""
    combine = logits.softmax(dim=-1)
    return combine if mask is None else combine * mask.unsqueeze(-1)


@functools.cache
def _triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


class SoftMoE(nn.Module):
    """A Soft MoE layer with stacked experts; runs all experts, a shared subset, or a per-input subset.

    Parameters: phi [D, E, S] (soft-moe's layout), scale [1] (if phi_norm), norm_weight [D] (if token_gain),
    experts.w1/b1/w2/b2 (see StackedExperts).

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
        self.experts = StackedExperts(c.expert, c.num_held, c.dim, c.hidden, c.out_features)
        # None: the Triton kernel for CUDA inference when triton is installed, else torch. True/False forces one.
        self.use_triton: bool | None = None

    @property
    def num_experts(self) -> int:
        return self.config.num_experts

    # -- routing -------------------------------------------------------------------------------------------
    def route_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, M, D] -> normalized tokens [B, M, D]."""
        return normalize_tokens(x, self.config.token_norm, self.norm_weight, self.config.eps)

    def router(self) -> torch.Tensor:
        """The effective router [D, E*S]."""
        return router_weight(self.phi, self.scale, self.config.eps)

    def logits(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(normalized tokens [B, M, D], router logits [B, M, E*S]), each computed once per call."""
        xn = self.route_tokens(x)
        return xn, xn @ self.router()

    def routing(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Full dispatch and combine weights, each [B, M, E*S] (the Triton kernel on CUDA, else torch)."""
        if self._triton_for(x):
            dispatch, combine, _ = self._kernel(x, mask)
            return dispatch, combine
        return _softmaxes(self.logits(x)[1], mask)

    def scores(self, logits: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Combine-weight mass per expert [B, E] (float32) from router logits [B, M, E*S]."""
        combine = logits.float().softmax(dim=-1)
        if mask is not None:
            combine = combine * mask.unsqueeze(-1)
        B, E, S = logits.shape[0], self.config.num_experts, self.config.slots_per_expert
        return combine.sum(dim=1).reshape(B, E, S).sum(dim=-1)

    def _kernel(self, x, mask):
        from .kernels.routing import soft_moe_routing

        return soft_moe_routing(
            x, self.phi, self.scale, self.norm_weight, token_norm=self.config.token_norm, eps=self.config.eps,
            mask=mask, slots_per_expert=self.config.slots_per_expert,
        )

    def _triton_for(self, x: torch.Tensor) -> bool:
        if torch.jit.is_tracing() or torch.compiler.is_exporting():
            return False  # an exported graph is plain ONNX operators
        if self.use_triton is not None:
            return self.use_triton
        if torch.is_grad_enabled() and (x.requires_grad or self.phi.requires_grad):
            return False  # the kernel has no backward: training routes through torch
        return x.is_cuda and self.config.token_norm != "layer" and _triton_available()

    # -- forward -------------------------------------------------------------------------------------------
    def forward(
        self,
        x: torch.Tensor,
        mask: torch.Tensor | None = None,
        experts: torch.Tensor | None = None,
        mode: Mode = "drop",
    ) -> torch.Tensor:
        """Run the layer.

        Args:
            x: tokens [B, M, D].
            mask: optional key-padding mask [B, M], True for real tokens (padded tokens' outputs are 0).
            experts: None (all experts the layer holds), router expert ids [K] shared by the batch (only
                those K experts are computed), or [B, K] per input (every expert runs, the others' slots are
                then discarded: this path is for accuracy, not speed).
            mode: "drop" or "renorm" (see the module docstring); ignored when experts is None.

        Returns:
            [B, M, D_out].
        """
        if x.dim() != 3 or x.shape[-1] != self.config.dim:
            raise ValueError(f"SoftMoE expects tokens [B, M, {self.config.dim}], got {list(x.shape)}")
        if mode not in MODES:
            raise ValueError(f"mode must be 'drop' or 'renorm', got {mode!r}")
        if experts is None and self.config.present is None:
            if self._triton_for(x):
                dispatch, combine, _ = self._kernel(x, mask)
                return self._mix(x, self.route_tokens(x), dispatch, combine, None)
            xn, logits = self.logits(x)
            return self._mix(x, xn, *_softmaxes(logits, mask), None)
        if experts is None:  # a compressed drop-mode layer: its held experts are the subset, its stack in order
            return self.run_subset(x, mask, torch.tensor(self.config.present, device=x.device), "drop", whole_stack=True)
        if experts.dim() == 1:
            return self.run_subset(x, mask, experts, mode)
        return self._per_input(x, mask, experts, mode)

    def _mix(self, x, xn, dispatch, combine, idx):
        """slots = dispatch^T x; expert outputs; out = combine @ outputs. dispatch/combine [B, M, K*S]."""
        B, M, D = x.shape
        S, D_out = self.config.slots_per_expert, self.config.out_features
        xd = x if self.config.dispatch_input == "raw" else xn
        slots = dispatch.transpose(1, 2) @ xd  # [B, K*S, D]
        K = slots.shape[1] // S
        slots = slots.reshape(B, K, S, D).transpose(0, 1).reshape(K, B * S, D)  # [K, B*S, D]
        y = self.experts(slots, idx)  # [K, B*S, D_out]
        y = y.reshape(K, B, S, D_out).transpose(0, 1).reshape(B, K * S, D_out)  # [B, K*S, D_out]
        return combine @ y  # [B, M, D_out]

    def _stack_index(self, experts: torch.Tensor) -> torch.Tensor:
        """Router ids [K] -> positions in this layer's expert stack (a lookup table for a compressed layer)."""
        present = self.config.present
        if present is None:
            return experts
        table = torch.full((self.config.num_experts,), -1, dtype=torch.long, device=experts.device)
        table[list(present)] = torch.arange(len(present), device=experts.device)
        pos = table[experts]
        if not (torch.jit.is_tracing() or torch.compiler.is_exporting()) and bool((pos < 0).any()):
            raise ValueError(f"experts {experts.tolist()} are not all held by this compressed layer (it holds {list(present)})")
        return pos

    def run_subset(self, x, mask, experts, mode, xn=None, logits=None, whole_stack=False):
        """Only the K experts in `experts` [K] (router ids) are computed; their slots' dispatch and combine weights
        come from the full logits (drop) or from the kept columns alone (renorm). `xn` and full `logits` may be
        passed in when the caller already computed them (Algorithm 2 scores the batch from the same logits).
        `whole_stack`: `experts` are exactly the experts this layer holds, in order (no gather of weights)."""
        S = self.config.slots_per_expert
        cols = (experts.unsqueeze(1) * S + torch.arange(S, device=experts.device)).reshape(-1)  # [K*S]
        if xn is None:
            xn = self.route_tokens(x)
        if mode == "drop":
            if logits is None:
                logits = xn @ self.router()  # [B, M, E*S]: the combine denominator needs every slot
            # Dispatch only for the kept slots; combine needs every slot for its denominator.
            dispatch = _dispatch(logits.index_select(2, cols), mask)
            combine = _combine(logits, mask).index_select(2, cols)
        else:
            kept_logits = logits.index_select(2, cols) if logits is not None else xn @ self.router().index_select(1, cols)
            dispatch, combine = _softmaxes(kept_logits, mask)  # [B, M, K*S]
        return self._mix(x, xn, dispatch, combine, None if whole_stack else self._stack_index(experts))

    def _per_input(self, x, mask, experts, mode, xn=None, logits=None):
        """Algorithm 1: each input keeps its own experts [B, K] (router ids); every expert the layer holds runs,
        the other experts' slots are discarded (their combine weight is 0, or -inf logits in renorm mode)."""
        B = x.shape[0]
        S = self.config.slots_per_expert
        if logits is None:
            xn, logits = self.logits(x)  # [B, M, E*S]
        dispatch, combine = _softmaxes(logits, mask)  # a slot's dispatch column does not depend on other slots
        present = self.config.present
        if present is not None:  # a compressed layer: only its held experts' columns (full denominators kept)
            cols = (torch.tensor(present, device=x.device).unsqueeze(1) * S + torch.arange(S, device=x.device)).reshape(-1)
            logits, dispatch, combine = (t.index_select(2, cols) for t in (logits, dispatch, combine))
        kept = torch.zeros(B, self.config.num_held, dtype=torch.bool, device=x.device)
        kept[torch.arange(B, device=x.device).unsqueeze(1), self._stack_index(experts)] = True
        kept = kept.repeat_interleave(S, dim=1).unsqueeze(1)  # [B, 1, K_held*S]
        if mode == "drop":
            combine = combine * kept
        else:
            combine = logits.masked_fill(~kept, float("-inf")).softmax(dim=-1)
            if mask is not None:
                combine = combine * mask.unsqueeze(-1)
        return self._mix(x, xn, dispatch, combine, None)
