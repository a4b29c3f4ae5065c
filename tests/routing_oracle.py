"""Soft MoE routing written out once more, in float64, from the paper and the layer's parameters alone.

The oracle for `moe_prune.core.routing.routing_ref`, the layer's `Routing` and the fused kernel's reference: it shares
none of their helpers (`normalize_tokens`, `router_weight`, the softmaxes), and spells out every step (norms as
square roots of sums of squares, softmaxes as exponentials over their sums) so a wrong axis, a missing eps or a
gain applied in the wrong place in moe_prune cannot be reproduced here by sharing the code.

    tokens   = norm(x) * gain              # [B, M, D]; norm: l2 over D, LayerNorm without affine, or none
    router   = scale * phi / |phi|         # [D, E*S]; columns over D, column e*S + s is expert e's slot s
    logits   = tokens @ router             # [B, M, E*S]
    dispatch = softmax over the M tokens   # per slot; padded tokens get 0 (all padded: uniform 1/M)
    combine  = softmax over the E*S slots  # per token; padded tokens' rows are 0
"""

from __future__ import annotations

import torch


def routing_float64(x, phi, scale=None, gain=None, *, token_norm="l2", eps=1e-6, mask=None):
    """(dispatch_weights, combine_weights) [B, M, E*S] in float64.

    Args: x [B, M, D]; phi [D, E, S] or [D, N], raw; scale: the learned scalar (None: phi used as it is);
    gain [D] after the token norm, or None; token_norm "l2", "layer" or "none"; mask [B, M], True = real token.
    """
    x = x.detach().double()
    B, M, D = x.shape
    if token_norm == "l2":
        tokens = x / torch.sqrt((x * x).sum(-1, keepdim=True)).clamp_min(eps)
    elif token_norm == "layer":
        centred = x - x.sum(-1, keepdim=True) / D
        tokens = centred / torch.sqrt((centred * centred).sum(-1, keepdim=True) / D + eps)
    elif token_norm == "none":
        tokens = x
    else:
        raise ValueError(token_norm)
    if gain is not None:
        tokens = tokens * gain.detach().double()
    router = phi.detach().double().reshape(D, -1)  # [D, N]
    if scale is not None:
        router = scale.detach().double() * router / torch.sqrt((router * router).sum(0, keepdim=True)).clamp_min(eps)
    logits = torch.einsum("bmd,dn->bmn", tokens, router)  # [B, M, N]
    real = torch.ones(B, M, 1, dtype=torch.bool) if mask is None else mask.detach().cpu().bool().unsqueeze(-1)
    real = real.to(logits.device)

    # dispatch: each slot's weights over its input's real tokens
    top = logits.masked_fill(~real, -torch.inf).amax(1, keepdim=True)  # [B, 1, N]
    e = torch.where(real, torch.exp(logits - torch.where(torch.isfinite(top), top, 0)), 0.0)
    total = e.sum(1, keepdim=True)  # [B, 1, N]
    dispatch = torch.where(total > 0, e / torch.where(total > 0, total, 1), 1.0 / M)
    # combine: each token's weights over all slots
    e = torch.exp(logits - logits.amax(-1, keepdim=True))
    combine = torch.where(real, e / e.sum(-1, keepdim=True), 0.0)
    return dispatch, combine
