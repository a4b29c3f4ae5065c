"""Algorithm 1 run sparsely: each input's kept experts computed on its kept slots only, grouped by expert.

Oracles: the dense per-input formulation (every expert on every slot, the others' slots then discarded, as the
layer computed before the sparse path), and a float64 loop over inputs and kept experts written from the paper's
equations. Every execution regime of `StackedExperts.grouped` (weights gathered per row, a padded batched matmul
over the stack, a loop over the used experts) is forced in turn.
"""

import pytest
import torch
import torch.nn.functional as F

from moe_prune.core.experts import CPU_POLICY, set_policy
from moe_prune.core.layers import SoftMoE, SoftMoEConfig
from moe_prune.selection.scores import select_experts, with_selection

KINDS = ["gelu_mlp", "relu_mlp", "geglu"]
REGIMES = {  # execution policies that force each path of StackedExperts.grouped
    "gather": dict(row_gather_limit=1 << 40, loop_overhead=0),
    "padded": dict(row_gather_limit=0, loop_overhead=None),
    "padded to the batch (no host sync)": dict(row_gather_limit=0, loop_overhead=None, padded_capacity="batch"),
    "loop": dict(row_gather_limit=0, loop_overhead=0),
}


def make(E=9, S=2, D=12, H=10, held=None, **kw):
    layer = SoftMoE(SoftMoEConfig(dim=D, num_experts=E, slots_per_expert=S, hidden=H, held=held, **kw)).eval()
    with torch.no_grad():  # non-trivial parameters everywhere (biases start at zero)
        for p in layer.parameters():
            p.add_(0.1 * torch.randn_like(p))
        if layer.scale is not None:
            layer.scale.fill_(4.0)  # peaked softmaxes, so that dropping experts changes the output a lot
    return layer


def random_subsets(B, held, K, generator=None):
    """[B, K] distinct experts per input from the list `held`, ascending."""
    rows = [sorted(torch.tensor(held)[torch.randperm(len(held), generator=generator)[:K]].tolist()) for _ in range(B)]
    return torch.tensor(rows, dtype=torch.long).reshape(B, K)


def dense_per_input(layer, x, mask, experts, mode):
    """Every held expert on every slot; the slots of experts an input did not keep are then discarded."""
    c = layer.config
    S = c.slots_per_expert
    held = list(c.held) if c.held is not None else list(range(c.num_experts))
    r = layer.route(x, mask)
    cols = torch.tensor([e * S + s for e in held for s in range(S)])
    logits = r.logits.index_select(2, cols)
    dispatch = r.dispatch_weights.index_select(2, cols)
    combine = r.combine_weights.index_select(2, cols)  # full denominators
    kept = torch.zeros(x.shape[0], len(held), dtype=torch.bool)
    for b, row in enumerate(experts.tolist()):
        for e in row:
            kept[b, held.index(e)] = True
    kept = kept.repeat_interleave(S, dim=1).unsqueeze(1)  # [B, 1, H*S]
    if mode == "drop":
        combine = combine * kept
    else:
        combine = logits.masked_fill(~kept, float("-inf")).softmax(dim=-1).nan_to_num(0.0)
        if mask is not None:
            combine = combine * mask.unsqueeze(-1)
    xd = x if c.dispatch_input == "raw" else r.tokens
    slots = dispatch.transpose(1, 2) @ xd  # [B, H*S, D]
    B, HS, D = slots.shape
    y = layer.experts(slots.reshape(B, len(held), S, D).transpose(0, 1).reshape(len(held), B * S, D))
    y = y.reshape(len(held), B, S, -1).transpose(0, 1).reshape(B, HS, -1)
    return combine @ y


def float64_reference(layer, x, mask, experts, mode):
    """Per input, per kept expert, in float64, from the equations (l2 token norm, normalized Phi)."""
    c = layer.config
    S = c.slots_per_expert
    held = list(c.held) if c.held is not None else list(range(c.num_experts))
    x = x.double()
    phi = layer.phi.double().reshape(c.dim, -1)
    phi = layer.scale.double() * phi / phi.norm(dim=0, keepdim=True).clamp_min(c.eps)
    out = torch.zeros(x.shape[0], x.shape[1], c.out_features, dtype=torch.float64)
    for b in range(x.shape[0]):
        real = torch.ones(x.shape[1], dtype=torch.bool) if mask is None else mask[b]
        xn = x[b] / x[b].norm(dim=-1, keepdim=True).clamp_min(c.eps)
        logits = xn @ phi  # [M, E*S]
        cols = [e * S + s for e in experts[b].tolist() for s in range(S)]
        if mode == "drop":
            combine = logits.softmax(dim=-1)[:, cols]  # every slot in the denominator
            dispatch = logits.masked_fill(~real[:, None], -1e300).softmax(dim=0)[:, cols]
        else:
            combine = logits[:, cols].softmax(dim=-1) if cols else logits[:, :0]
            dispatch = logits[:, cols].masked_fill(~real[:, None], -1e300).softmax(dim=0)
        combine = combine * real[:, None]
        xd = xn if c.dispatch_input == "normalized" else x[b]
        for j, e in enumerate(experts[b].tolist()):
            i = held.index(e)
            s = dispatch[:, j * S:(j + 1) * S].T @ xd  # [S, D]
            w1, w2 = layer.experts.w1[i].double(), layer.experts.w2[i].double()
            b1 = layer.experts.b1[i].double() if layer.experts.b1 is not None else None
            b2 = layer.experts.b2[i].double() if layer.experts.b2 is not None else None
            h = F.linear(s, w1.T, b1)
            h = {"gelu_mlp": F.gelu, "relu_mlp": F.relu}.get(c.expert, lambda t: t[:, :c.hidden] * F.gelu(t[:, c.hidden:]))(h)
            out[b] += combine[:, j * S:(j + 1) * S] @ F.linear(h, w2.T, b2)
    return out


def rel_error(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


@pytest.mark.parametrize("regime", sorted(REGIMES))
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("mode", ["drop", "renorm"])
def test_sparse_per_input_equals_dense_and_float64(regime, kind, mode):
    layer = set_policy(make(expert=kind), CPU_POLICY, **REGIMES[regime])
    B, M = 5, 11
    x = torch.randn(B, M, 12)
    mask = torch.rand(B, M) > 0.25
    mask[:, 0] = True
    mask[3] = False  # a fully padded input: zero output
    experts = random_subsets(B, list(range(9)), 3)
    experts[1] = experts[0]  # two inputs on the same experts: groups of more than one row
    with torch.no_grad():
        out = layer(x, mask, experts=experts, mode=mode)
        dense = dense_per_input(layer, x, mask, experts, mode)
        ref = float64_reference(layer, x, mask, experts, mode)
    assert rel_error(out, dense) <= 1e-6
    torch.testing.assert_close(out.double(), ref, atol=1e-6 * ref.abs().max().item(), rtol=1e-5)
    assert out[3].abs().max() == 0
    # the dropped experts matter: the oracle is far from the full layer, so it is not passed by accident
    assert rel_error(layer(x, mask), ref.float()) > 1e-2


@pytest.mark.parametrize("regime", sorted(REGIMES))
@pytest.mark.parametrize("mode", ["drop", "renorm"])
def test_compressed_layer_per_input(regime, mode):
    """A compressed drop-mode layer holds experts 1, 4, 5, 7 of 9: inputs choose among those, by router id."""
    layer = set_policy(make(held=(1, 4, 5, 7), dispatch_input="raw"), CPU_POLICY, **REGIMES[regime])
    x = torch.randn(4, 6, 12)
    experts = random_subsets(4, [1, 4, 5, 7], 2)
    with torch.no_grad():
        out = layer(x, experts=experts, mode=mode)
        ref = float64_reference(layer, x, None, experts, mode)
    assert rel_error(out, dense_per_input(layer, x, None, experts, mode)) <= 1e-6
    torch.testing.assert_close(out.double(), ref, atol=1e-6 * ref.abs().max().item(), rtol=1e-5)


@pytest.mark.parametrize("mode", ["drop", "renorm"])
def test_one_input_alone_or_in_any_batch(mode):
    """Algorithm 1's answer for an input does not depend on the other inputs of its batch."""
    layer = make(E=16, S=1)
    alg1 = with_selection(layer, "1/8", per="input", mode=mode)
    x = torch.randn(7, 10, 12)
    with torch.no_grad():
        alone = torch.cat([alg1(x[i:i + 1]) for i in range(7)])
        together = alg1(x)
        shuffled = alg1(x[torch.tensor([6, 2, 0, 5, 1, 4, 3])])
    torch.testing.assert_close(together, alone, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(shuffled, alone[torch.tensor([6, 2, 0, 5, 1, 4, 3])], atol=1e-6, rtol=1e-5)


def test_batch_of_one_takes_the_shared_path_with_the_same_result():
    layer = make()
    x = torch.randn(1, 8, 12)
    with torch.no_grad():
        scores = layer.route(x).scores
        per_input = select_experts(scores, 3, per="input")  # [1, 3]
        shared = select_experts(scores, 3, per="batch")  # [3]
        assert torch.equal(per_input[0], shared)
        torch.testing.assert_close(layer(x, experts=per_input), layer(x, experts=shared), atol=0, rtol=0)
        torch.testing.assert_close(layer(x, experts=per_input), dense_per_input(layer, x, None, per_input, "drop"))


@pytest.mark.parametrize("mode", ["drop", "renorm"])
def test_no_experts_per_input_gives_zeros_like_a_shared_empty_subset(mode):
    layer = make()
    x = torch.randn(3, 5, 12)
    with torch.no_grad():
        per_input = layer(x, experts=torch.zeros(3, 0, dtype=torch.long), mode=mode)
        shared = layer(x, experts=torch.zeros(0, dtype=torch.long), mode=mode)
    assert torch.isfinite(per_input).all()
    assert torch.equal(per_input, torch.zeros(3, 5, 12))
    assert torch.equal(shared, torch.zeros(3, 5, 12))


def test_all_rows_on_one_expert_and_unused_experts():
    """Every input keeps the same single expert: one group holds every row, the other experts have none."""
    layer = make()
    x = torch.randn(6, 5, 12)
    experts = torch.full((6, 1), 4)
    for regime, changes in REGIMES.items():
        set_policy(layer, CPU_POLICY, **changes)
        with torch.no_grad():
            out = layer(x, experts=experts)
            assert rel_error(out, layer(x, experts=torch.tensor([4]))) <= 1e-6, regime


@pytest.mark.parametrize("kind", KINDS)
def test_layer_through_the_grouped_kernel_equals_torch(kind):
    """use_triton=True sends the grouped rows through the Triton kernel (its interpreter here; on CUDA it is the
    default): the layer's per-input output equals the torch path's."""
    pytest.importorskip("triton")
    layer = make(E=6, S=2, D=20, H=12, expert=kind)
    x = torch.randn(3, 7, 20)
    experts = random_subsets(3, list(range(6)), 2)
    with torch.no_grad():
        ref = layer(x, experts=experts, mode="drop")
        layer.experts.use_triton = True
        out = layer(x, experts=experts, mode="drop")
    assert rel_error(out, ref) <= 1e-5
