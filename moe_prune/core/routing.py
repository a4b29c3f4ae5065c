"""Soft MoE routing math, once: tokens normalized, the router's logits, dispatch and combine weights, and the
`Routing` object a layer call computes once and hands on (scoring, selection and mixing read it).

    logits   = norm(X) @ Phi_n          # [B, M, N]; N = E*S slots, Phi_n = scale * Phi / |Phi| (columns over D)
    dispatch = softmax(logits, over M)  # each slot's column sums to 1 over the tokens
    combine  = softmax(logits, over N)  # each token's row sums to 1 over the slots

`routing_ref` is the plain-torch reference of the fused Triton kernel (moe_prune.kernels.routing), which imports it
from here; this module imports no kernel.
Axes: B batch, M tokens, D model dim, E experts, S slots per expert, N = E*S slots.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


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
    return softmaxes(logits, mask)


def softmaxes(logits: torch.Tensor, mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [B, M, N] -> dispatch (softmax over M) and combine (softmax over N), padded tokens excluded."""
    return dispatch_softmax(logits, mask), combine_softmax(logits, mask)


def dispatch_softmax(logits: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Softmax over tokens; a slot's column depends on its own logits only, so columns can be computed apart."""
    if mask is None:
        return logits.softmax(dim=1)
    # A finite floor, not -inf: a slot whose every token is padded gets uniform weights instead of NaN.
    return logits.masked_fill(~mask.unsqueeze(-1), torch.finfo(logits.dtype).min).softmax(dim=1)


def combine_softmax(logits: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Softmax over all slots (padded tokens' rows are 0)."""
    combine = logits.softmax(dim=-1)
    return combine if mask is None else combine * mask.unsqueeze(-1)


class Routing:
    """One Soft MoE layer call's routing, computed once and handed on: scoring, selection and mixing read it.

    Holds the layer input `x` [B, M, D], its `mask` [B, M] or None and the normalized `tokens` [B, M, D];
    the router `logits` [B, M, E*S], the full `dispatch_weights` and `combine_weights` [B, M, E*S] and the
    expert `scores` [B, E] are computed when first asked for. On CUDA the fused Triton kernel fills dispatch,
    combine and scores in one launch, and the logits are then computed only if a caller needs them (renorm).

    Example:
        >>> r = layer.route(x)            # nothing but the tokens' normalization has run yet (torch path)
        >>> keep = select_experts(r.scores, "1/8", per="input")   # [B, K]
        >>> y = layer.mix(r, keep)        # reuses r's logits and combine weights
    """

    def __init__(self, layer: nn.Module, x: torch.Tensor, mask: torch.Tensor | None, tokens: torch.Tensor, *,
                 dispatch: torch.Tensor | None = None, combine: torch.Tensor | None = None,
                 scores: torch.Tensor | None = None):
        self.layer, self.x, self.mask, self.tokens = layer, x, mask, tokens
        self._logits, self._dispatch, self._combine, self._scores = None, dispatch, combine, scores

    @property
    def logits(self) -> torch.Tensor:
        """Router logits [B, M, E*S]."""
        if self._logits is None:
            self._logits = self.tokens @ self.layer.router()
        return self._logits

    def slots(self, dispatch: torch.Tensor) -> torch.Tensor:
        """slots = dispatch^T x_d: dispatch [B, M, C] -> [B, C, D] (x_d: the raw or the normalized tokens)."""
        xd = self.x if self.layer.config.dispatch_input == "raw" else self.tokens
        return dispatch.transpose(1, 2) @ xd

    @property
    def dispatch_weights(self) -> torch.Tensor:
        """Softmax over tokens [B, M, E*S]: every slot's column sums to 1 (padded tokens get none)."""
        if self._dispatch is None:
            self._dispatch = dispatch_softmax(self.logits, self.mask)
        return self._dispatch

    @property
    def combine_weights(self) -> torch.Tensor:
        """Softmax over all E*S slots [B, M, E*S]: every real token's row sums to 1 (padded rows are 0)."""
        if self._combine is None:
            self._combine = combine_softmax(self.logits, self.mask)
        return self._combine

    @property
    def scores(self) -> torch.Tensor:
        """Combine-weight mass per router expert [B, E], float32: an input's scores sum to its token count."""
        if self._scores is None:
            c = self.layer.config
            B = self.x.shape[0]
            self._scores = self.combine_weights.float().sum(dim=1).reshape(B, c.num_experts, c.slots_per_expert).sum(-1)
        return self._scores

    def columns(self, t: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
        """t [B, M, E*S] at slot columns cols [C] (shared) or [B, C] (per input) -> [B, M, C]."""
        if cols.dim() == 1:
            return t.index_select(2, cols)
        return t.gather(2, cols.unsqueeze(1).expand(-1, t.shape[1], -1))

    def kept_weights(self, cols: torch.Tensor, mode: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Dispatch and combine weights of the kept slot columns cols [C] or [B, C], each [B, M, C].

        drop: the full model's weights at those columns (a slot's dispatch column depends on its own logits only;
        combine keeps every slot in its denominator). renorm: both softmaxes over the kept columns alone.
        """
        if mode == "renorm":
            return softmaxes(self.columns(self.logits, cols), self.mask)
        dispatch = (self.columns(self._dispatch, cols) if self._dispatch is not None
                    else dispatch_softmax(self.columns(self.logits, cols), self.mask))  # only the kept columns' softmax
        return dispatch, self.columns(self.combine_weights, cols)
