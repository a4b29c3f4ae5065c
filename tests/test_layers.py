"""The Soft MoE layer's math: softmax axes, dispatch modes, expert kinds, masks, subsets."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from moe_prune.errors import ConfigError
from moe_prune.core.experts import CPU_POLICY, set_policy
from moe_prune.core.layers import SoftMoE, SoftMoEConfig
from moe_prune.core.routing import routing_ref

from routing_oracle import routing_float64


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


ROUTERS = [  # every router option of SoftMoEConfig: token_norm, token_gain, phi_norm (scale), slots per expert
    dict(token_norm="l2", token_gain=False, phi_norm=True, S=2),
    dict(token_norm="l2", token_gain=True, phi_norm=True, S=1),
    dict(token_norm="l2", token_gain=True, phi_norm=False, S=3),
    dict(token_norm="layer", token_gain=True, phi_norm=True, S=2),
    dict(token_norm="layer", token_gain=False, phi_norm=False, S=1),
    dict(token_norm="none", token_gain=False, phi_norm=True, S=2),
    dict(token_norm="none", token_gain=True, phi_norm=False, S=1),
]


def router_layer(opts, eps=1e-6):
    o = dict(opts)
    layer = make(E=5, S=o.pop("S"), D=12, eps=eps, **o)
    with torch.no_grad():
        if layer.scale is not None:
            layer.scale.fill_(3.0)  # routing far from uniform, so a wrong axis or norm shows
    return layer


@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("M", [1, 33])
@pytest.mark.parametrize("opts", ROUTERS, ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()))
def test_routing_matches_the_independent_oracle(opts, M, masked):
    """routing_ref and the layer's own routing both equal the float64 oracle written out in routing_oracle.py."""
    layer = router_layer(opts)
    x = 2 * torch.randn(3, M, 12) + 0.5  # a non-zero mean: LayerNorm's centring matters
    mask = None
    if masked:
        mask = torch.rand(3, M) > 0.3
        mask[0, 0] = True
        mask[1] = False  # an input with every token padded: uniform dispatch, zero combine
    want_d, want_c = routing_float64(x, layer.phi, layer.scale, layer.norm_weight,
                                     token_norm=opts["token_norm"], eps=layer.config.eps, mask=mask)
    d, c = routing_ref(x, layer.phi, layer.scale, layer.norm_weight, token_norm=opts["token_norm"],
                       eps=layer.config.eps, mask=mask)
    torch.testing.assert_close(d.double(), want_d, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(c.double(), want_c, atol=1e-6, rtol=1e-5)
    with torch.no_grad():
        d, c = weights(layer, x, mask)
    torch.testing.assert_close(d.double(), want_d, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(c.double(), want_c, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("token_norm", ["l2", "layer"])
def test_routing_eps_is_the_layers_own(token_norm):
    """A large eps changes the routing of small tokens: the oracle, given the layer's eps, still agrees."""
    layer = router_layer(dict(token_norm=token_norm, token_gain=True, phi_norm=True, S=2), eps=0.5)
    x = 0.05 * torch.randn(2, 9, 12)  # norms and variances below eps
    want_d, want_c = routing_float64(x, layer.phi, layer.scale, layer.norm_weight, token_norm=token_norm, eps=0.5)
    with torch.no_grad():
        d, c = weights(layer, x)
    torch.testing.assert_close(d.double(), want_d, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(c.double(), want_c, atol=1e-6, rtol=1e-5)
    other_d, _ = routing_float64(x, layer.phi, layer.scale, layer.norm_weight, token_norm=token_norm, eps=1e-6)
    assert (other_d - want_d).abs().max() > 1e-3  # eps is not a no-op here: the check above could fail


@pytest.mark.parametrize("mode", ["drop", "renorm"])
def test_kept_weights_match_the_oracle(mode):
    """drop: the full routing's kept columns; renorm: the routing of a router holding only the kept experts."""
    layer = router_layer(dict(token_norm="l2", token_gain=True, phi_norm=True, S=2))
    x = torch.randn(2, 8, 12)
    kept = torch.tensor([0, 3, 4])
    cols = (kept.unsqueeze(-1) * 2 + torch.arange(2)).flatten()  # [K*S]
    args = (layer.scale, layer.norm_weight)
    if mode == "drop":
        want_d, want_c = (w[..., cols] for w in routing_float64(x, layer.phi, *args))
    else:
        want_d, want_c = routing_float64(x, layer.phi[:, kept], *args)
    with torch.no_grad():
        d, c = layer.route(x).kept_weights(cols, mode)
    torch.testing.assert_close(d.double(), want_d, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(c.double(), want_c, atol=1e-6, rtol=1e-5)


class _Ops(TorchDispatchMode):
    """Records every aten op a call dispatches: a Python loop over experts shows up as ops repeated per expert."""

    def __init__(self):
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


def dispatched_ops(layer, x, **kw) -> list[str]:
    with torch.no_grad(), _Ops() as ops:
        layer(x, **kw)
    return ops.ops


# The regimes that run the experts stacked (no Python loop over experts): (policy changes, forward keywords for a
# layer of E experts). Full layer: rows per expert (B*S = 4) below CPU_POLICY.loop_rows, or loop_rows=None at any
# row count (CUDA_POLICY); a shared subset of small experts (gathered); per-input subsets of small experts
# (gathered per row) or of experts padded over the stack (loop_overhead=None, as on CUDA).
def _shared(E):
    return dict(experts=torch.arange(0, E, 2))  # [K]: K = 2 of 3 experts, 5 of 9


def _per_input(E):
    K = (E + 1) // 2
    return dict(experts=torch.stack([torch.arange(K), torch.arange(E - K, E)]))  # [B=2, K]


STACKED = {
    "full, few rows": (dict(), lambda E: {}),
    "full, never loop": (dict(loop_rows=None), lambda E: dict(rows=70)),  # 70*S = 140 rows per expert
    "shared subset": (dict(), _shared),
    "per input, gathered": (dict(), _per_input),
    "per input, padded": (dict(row_gather_limit=0, loop_overhead=None), _per_input),
}


@pytest.mark.parametrize("regime", STACKED)
@pytest.mark.parametrize("kind", KINDS)
def test_experts_are_stacked_not_looped(kind, regime):
    """Where the policy says batched, the ops a call dispatches are the same for 3 and for 9 experts (kept experts
    growing with them): a Python loop over experts would dispatch its matmuls once per expert."""
    changes, call = STACKED[regime]
    runs = {}
    for E in (3, 9):
        layer = set_policy(make(E=E, expert=kind), CPU_POLICY, **changes)
        h1 = 2 * 10 if kind == "geglu" else 10
        assert layer.experts.w1.shape == (E, 12, h1) and layer.experts.w2.shape == (E, 10, 12)
        assert (layer.experts.b1 is None) == (kind == "relu_mlp")
        kw = call(E)
        x = torch.randn(kw.pop("rows", 2), 7, 12)  # B=2 by default: 2*S = 4 rows per expert, below loop_rows
        runs[E] = dispatched_ops(layer, x, **kw)
    assert runs[3] == runs[9], f"{regime}: {len(runs[3])} ops for 3 experts, {len(runs[9])} for 9"
    # The probe sees a loop where there is one: the policy's many-rows regime runs one matmul pair per expert.
    x = torch.randn(2, 7, 12)
    looped = {E: dispatched_ops(set_policy(make(E=E, expert=kind), CPU_POLICY, loop_rows=1), x) for E in (3, 9)}
    assert len(looped[9]) > len(looped[3])


@pytest.mark.parametrize(
    "bad",
    [dict(dim=0), dict(num_experts=-1), dict(expert="swiglu"), dict(token_norm="rms"), dict(dispatch_input="x"),
     dict(held=(3, 1)), dict(held=(0, 9)), dict(held=()), dict(origin=(1, 2, 3))],
)
def test_config_errors(bad):
    base = dict(dim=8, num_experts=4, slots_per_expert=1, hidden=8)
    with pytest.raises(ConfigError):
        SoftMoEConfig(**{**base, **bad})


def test_config_round_trip():
    cfg = SoftMoEConfig(dim=8, num_experts=4, slots_per_expert=2, hidden=8, held=(0, 3), origin=(5, 9))
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


def _independent_router(layer):
    """scale * phi / |phi| over D in float64, written out (shares nothing with router_weight)."""
    phi = layer.phi.detach().double().reshape(layer.config.dim, -1)
    return (layer.scale.detach().double() * phi / phi.pow(2).sum(0, keepdim=True).sqrt()).float()


def test_router_is_reused_without_gradients_and_follows_every_change():
    layer = make().requires_grad_(False)  # frozen, as for serving or evaluation
    with torch.no_grad():
        first = layer.router()
        assert layer.router() is first  # computed once
        torch.testing.assert_close(first, _independent_router(layer), rtol=1e-6, atol=1e-7)
        layer.phi.mul_(-2.0)  # in place
        torch.testing.assert_close(layer.router(), _independent_router(layer), rtol=1e-6, atol=1e-7)
        layer.scale.fill_(3.0)
        torch.testing.assert_close(layer.router(), _independent_router(layer), rtol=1e-6, atol=1e-7)
        layer.phi.data = layer.phi.data.transpose(0, 1).contiguous().transpose(0, 1)  # same values, new layout
        torch.testing.assert_close(layer.router(), _independent_router(layer), rtol=1e-6, atol=1e-7)
        layer.phi.data.mul_(0.5)  # bypasses versions: documented, cleared by hand
        layer.clear_router_cache()
        torch.testing.assert_close(layer.router(), _independent_router(layer), rtol=1e-6, atol=1e-7)
    other = make()
    layer.load_state_dict(other.state_dict())  # what loading a checkpoint does
    with torch.no_grad():
        torch.testing.assert_close(layer.router(), _independent_router(other), rtol=1e-6, atol=1e-7)
    layer.phi = torch.nn.Parameter(torch.randn_like(layer.phi), requires_grad=False)  # replaced
    with torch.no_grad():
        torch.testing.assert_close(layer.router(), _independent_router(layer), rtol=1e-6, atol=1e-7)
    with torch.inference_mode():
        x = torch.randn(2, 5, 12)
        torch.testing.assert_close(layer(x), loop_reference(layer, x), rtol=1e-4, atol=1e-5)
    import copy
    import pickle

    assert copy.deepcopy(layer)._router_cache is None and pickle.loads(pickle.dumps(layer))._router_cache is None
    layer.double()  # moved: the cache is dropped with the old storage
    with torch.no_grad():
        assert layer._router_cache is None and layer.router().dtype == torch.float64


def test_a_trainable_layer_recomputes_its_router():
    """Optimizers (fused ones) write parameters without bumping their version: a layer whose router trains never
    reuses it, even between training steps under no_grad."""
    layer = make()
    opt = torch.optim.SGD(layer.parameters(), lr=1.0)
    with torch.no_grad():
        before = layer.router()
        assert layer.router() is not before
    layer(torch.randn(2, 5, 12)).square().sum().backward()
    opt.step()
    with torch.no_grad():
        torch.testing.assert_close(layer.router(), _independent_router(layer), rtol=1e-6, atol=1e-7)


def test_router_is_recomputed_where_gradients_flow():
    layer = make()
    with torch.no_grad():
        layer.router()
    r = layer.router()  # gradients enabled: a fresh tensor in the autograd graph
    assert r.requires_grad and r.grad_fn is not None
    r.sum().backward()
    assert layer.phi.grad is not None and layer.phi.grad.abs().sum() > 0


def test_a_config_pickled_before_the_rename_unpickles_present_as_held():
    cfg = SoftMoEConfig(dim=8, num_experts=4, slots_per_expert=2, hidden=8, held=(0, 3), origin=(5, 9))
    state = dict(cfg.__dict__)
    state["present"] = state.pop("held")  # what an object pickled by the previous version holds
    old = SoftMoEConfig.__new__(SoftMoEConfig)
    old.__setstate__(state)
    assert old.held == (0, 3) and old == cfg and not hasattr(old, "present")
