"""The Soft MoE layer's math: softmax axes, dispatch modes, expert kinds, masks, subsets."""

import math

import pytest
import torch
import torch.nn.functional as F

from moe_prune.errors import ConfigError
from moe_prune.experts import CPU_POLICY, set_policy
from moe_prune.layers import SoftMoE, SoftMoEConfig, routing_ref


def weights(layer, x, mask=None):
    """The full dispatch and combine weights [B, M, E*S] of one routed call."""
    r = layer.route(x, mask)
    return r.dispatch_weights, r.combine_weights

KINDS = ["gelu_mlp", "relu_mlp", "geglu"]


def make(E=6, S=2, D=12, H=10, **kw):
    layer = SoftMoE(SoftMoEConfig(dim=D, num_experts=E, slots_per_expert=S, hidden=H, **kw)).eval()
    with torch.no_grad():  # non-trivial parameters everywhere (biases start at zero)
        for p in layer.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return layer


def loop_reference(layer: SoftMoE, x: torch.Tensor) -> torch.Tensor:
    """An independent, slow formulation: per input, per expert, in float64, with F.linear like the libraries."""
    c = layer.config
    x = x.double()
    out = []
    for b in range(x.shape[0]):
        xb = x[b]  # [M, D]
        if c.token_norm == "l2":
            xn = xb / xb.norm(dim=-1, keepdim=True).clamp_min(c.eps)
        elif c.token_norm == "layer":
            xn = (xb - xb.mean(-1, keepdim=True)) / torch.sqrt(xb.var(-1, unbiased=False, keepdim=True) + c.eps)
        else:
            xn = xb
        if layer.norm_weight is not None:
            xn = xn * layer.norm_weight.double()
        phi = layer.phi.double().reshape(c.dim, -1)  # [D, E*S]
        if layer.scale is not None:
            phi = layer.scale.double() * phi / phi.norm(dim=0, keepdim=True).clamp_min(c.eps)
        logits = xn @ phi  # [M, E*S]
        dispatch = torch.exp(logits - logits.max(0).values) / torch.exp(logits - logits.max(0).values).sum(0)
        combine = torch.exp(logits - logits.max(1, keepdim=True).values)
        combine = combine / combine.sum(1, keepdim=True)
        xd = xn if c.dispatch_input == "normalized" else xb
        slots = dispatch.T @ xd  # [E*S, D]
        ys = []
        for e in range(c.num_experts):
            s = slots[e * c.slots_per_expert:(e + 1) * c.slots_per_expert]
            w1, w2 = layer.experts.w1[e].double(), layer.experts.w2[e].double()
            b1 = layer.experts.b1[e].double() if layer.experts.b1 is not None else None
            b2 = layer.experts.b2[e].double() if layer.experts.b2 is not None else None
            h = F.linear(s, w1.T, b1)
            if c.expert == "gelu_mlp":
                h = F.gelu(h)
            elif c.expert == "relu_mlp":
                h = F.relu(h)
            else:
                h = h[:, : c.hidden] * F.gelu(h[:, c.hidden:])
            ys.append(F.linear(h, w2.T, b2))
        out.append(combine @ torch.cat(ys))
    return torch.stack(out).float()


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dispatch_input", ["normalized", "raw"])
def test_layer_matches_loop_reference(kind, dispatch_input):
    layer = make(expert=kind, dispatch_input=dispatch_input)
    x = torch.randn(3, 9, 12)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), loop_reference(layer, x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("token_norm,gain,phi_norm", [("l2", True, False), ("layer", True, False), ("none", False, False)])
def test_other_router_normalizations_match_loop_reference(token_norm, gain, phi_norm):
    layer = make(token_norm=token_norm, token_gain=gain, phi_norm=phi_norm, expert="geglu")
    x = torch.randn(2, 5, 12)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), loop_reference(layer, x), atol=1e-5, rtol=1e-5)


def test_dispatch_modes_differ():
    """Raw and normalized dispatch give different outputs (so the flag is not silently ignored)."""
    torch.manual_seed(1)
    a = make(dispatch_input="normalized")
    b = make(dispatch_input="raw")
    b.load_state_dict(a.state_dict())
    x = 3 * torch.randn(2, 5, 12)
    with torch.no_grad():
        assert (a(x) - b(x)).abs().max() > 1e-3


@pytest.mark.parametrize("M", [1, 7, 33])
def test_softmax_axes(M):
    x = torch.randn(4, M, 12)
    layer = make()
    dispatch, combine = weights(layer, x)
    assert dispatch.shape == combine.shape == (4, M, 12)
    # each dispatch column (a slot) sums to 1 over tokens; each combine row (a token) sums to 1 over slots
    torch.testing.assert_close(dispatch.sum(dim=1), torch.ones(4, 12))
    torch.testing.assert_close(combine.sum(dim=2), torch.ones(4, M))


def test_normalization_is_scale_invariant_and_uses_eps():
    """l2-normalized routing: scaling a token changes nothing in its routing; a zero token stays finite."""
    layer = make()
    x = torch.randn(1, 4, 12)
    d1, c1 = weights(layer, x)
    d2, c2 = weights(layer, x * torch.tensor([1.0, 5.0, 0.2, 30.0]).view(1, 4, 1))
    torch.testing.assert_close(c1, c2)
    torch.testing.assert_close(d1, d2)
    x[0, 0] = 0
    d, c = weights(layer, x)
    assert torch.isfinite(d).all() and torch.isfinite(c).all()


def test_scale_sharpens_routing():
    layer = make()
    x = torch.randn(1, 6, 12)
    _, c1 = weights(layer, x)
    with torch.no_grad():
        layer.scale.fill_(20.0)
    _, c2 = weights(layer, x)
    entropy = lambda c: -(c * c.clamp_min(1e-30).log()).sum(-1).mean()  # noqa: E731
    assert entropy(c2) < entropy(c1)


def test_mask_excludes_padded_tokens():
    layer = make()
    x = torch.randn(2, 6, 12)
    mask = torch.tensor([[True] * 6, [True] * 4 + [False] * 2])
    with torch.no_grad():
        y = layer(x, mask=mask)
        dispatch, combine = weights(layer, x, mask)
        # padded tokens get no dispatch weight and a zero output; real tokens equal running on the unpadded input
        assert dispatch[1, 4:].abs().max() == 0
        torch.testing.assert_close(dispatch[1, :4].sum(0), torch.ones(12))
        assert y[1, 4:].abs().max() == 0
        torch.testing.assert_close(y[1, :4], layer(x[1:, :4])[0], atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(y[0], layer(x[:1])[0])
        # the garbage in padded positions does not matter
        x2 = x.clone()
        x2[1, 4:] = 1e3 * torch.randn(2, 12)
        torch.testing.assert_close(layer(x2, mask=mask)[1, :4], y[1, :4])


def test_routing_ref_matches_layer_routing():
    layer = make(token_gain=True)
    x = torch.randn(2, 5, 12)
    d, c = routing_ref(x, layer.phi, layer.scale, layer.norm_weight, eps=layer.config.eps)
    d2, c2 = weights(layer, x)
    torch.testing.assert_close(d, d2)
    torch.testing.assert_close(c, c2)


@pytest.mark.parametrize("kind", KINDS)
def test_experts_are_stacked_not_looped(kind):
    layer = make(expert=kind)
    h1 = 2 * 10 if kind == "geglu" else 10
    assert layer.experts.w1.shape == (6, 12, h1)
    assert layer.experts.w2.shape == (6, 10, 12)
    assert (layer.experts.b1 is None) == (kind == "relu_mlp")


@pytest.mark.parametrize(
    "bad",
    [dict(dim=0), dict(num_experts=-1), dict(expert="swiglu"), dict(token_norm="rms"), dict(dispatch_input="x"),
     dict(present=(3, 1)), dict(present=(0, 9)), dict(present=()), dict(origin=(1, 2, 3))],
)
def test_config_errors(bad):
    base = dict(dim=8, num_experts=4, slots_per_expert=1, hidden=8)
    with pytest.raises(ConfigError):
        SoftMoEConfig(**{**base, **bad})


def test_config_round_trip():
    cfg = SoftMoEConfig(dim=8, num_experts=4, slots_per_expert=2, hidden=8, present=(0, 3), origin=(5, 9))
    assert SoftMoEConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ConfigError, match="unknown keys"):
        SoftMoEConfig.from_dict({**cfg.to_dict(), "typo": 1})


def test_wrong_input_shape_is_a_clear_error():
    with pytest.raises(ValueError, match=r"tokens \[B, M, 12\]"):
        make()(torch.randn(2, 5, 11))


def test_phi_init_scale():
    layer = SoftMoE(SoftMoEConfig(dim=256, num_experts=64, slots_per_expert=1, hidden=8))
    assert math.isclose(layer.phi.std().item(), 1 / 16, rel_tol=0.1)  # LeCun normal, as soft-moe and vmoe


@pytest.mark.parametrize("kind", KINDS)
def test_expert_subset_eager_views_equal_the_gathered_graph_path(kind, monkeypatch):
    """Eager runs kept experts on weight views; traced graphs gather them: both compute the same."""
    layer = set_policy(make(expert=kind), CPU_POLICY, gather_limit=0)  # the tiny test experts would be gathered
    slots = torch.randn(3, 5, 12)
    idx = torch.tensor([4, 0, 2])
    with torch.no_grad():
        eager = layer.experts(slots, idx)
        monkeypatch.setattr(torch.compiler, "is_exporting", lambda: True)
        graph = layer.experts(slots, idx)
    torch.testing.assert_close(eager, graph)
    assert layer.experts(slots[:0], idx[:0]).shape == (0, 5, 12)


@pytest.mark.parametrize("kind", KINDS)
def test_full_layer_expert_loop_equals_batched_matmul(kind, monkeypatch):
    """Many rows per expert run as one addmm pair per expert (eager); few as one batched matmul: the same layer."""
    layer = make(expert=kind)
    x = torch.randn(3, 7, 12)
    with torch.no_grad():
        batched = set_policy(layer, CPU_POLICY, loop_rows=None)(x)
        looped = set_policy(layer, CPU_POLICY, loop_rows=1)(x)
    torch.testing.assert_close(looped, batched, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(looped, loop_reference(layer, x), atol=1e-5, rtol=1e-4)


def test_full_layer_with_many_rows_trains(monkeypatch):
    """The per-expert loop (many rows, inference) writes into a preallocated output, which autograd cannot
    follow: with gradients on, the layer runs the batched matmul and backpropagates."""
    layer = set_policy(make().train(), CPU_POLICY, loop_rows=1)
    x = torch.randn(3, 7, 12, requires_grad=True)
    layer(x).square().sum().backward()
    assert x.grad is not None and layer.experts.w1.grad.abs().sum() > 0
