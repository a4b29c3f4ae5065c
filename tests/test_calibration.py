"""Static-subset calibration rules (mass, output, reconstruct, loss) against oracles written here.

Oracles never call the code under test: float64 loops over tokens, slots and experts written in this file; brute
force over every subset; the layer (or model) itself run with `with_experts` in float64. Models are tiny (6
experts, so every subset can be tried) and routing is sharpened (router scale 4) so that subsets differ.

Known limitation found here (marked xfail, strict, so that a fix shows up as XPASS):
- `loss` builds its subset greedily, expert by expert: with k = 2 it misses the brute-force optimum on one seed
  of 12. (On another, its greedy subset was worse than the combine-mass top k; the rule now keeps the better of
  the two, and that seed finds the optimum.)
"""

from __future__ import annotations

import copy
import itertools

import pytest
import torch
import torch.nn.functional as F

from moe_prune import with_experts
from moe_prune.selection.calibration import DEFAULT_RULE, RULES, choose_subsets
from moe_prune.selection.rules import _gram, greedy_subset, reconstruct_subsets, subset_error
from moe_prune.selection.loss_rule import loss_subsets
from moe_prune.compression.compress import compress_model
from moe_prune.errors import SelectionError
from moe_prune.core.layers import SoftMoE, SoftMoEConfig
from moe_prune.core.models import MnistConfig, MnistSoftMoE, SoftMoEViT, ViTConfig, moe_layers

from conftest import perturbed_layer

E = 6  # experts in every model here: C(6, 2) = 15 subsets, brute force is cheap


pytestmark = pytest.mark.usefixtures("one_thread")


# -- models and inputs ---------------------------------------------------------------------------------------


def bare(S=1, kind="gelu_mlp", seed=0, D=8, H=6):
    torch.manual_seed(seed)
    return perturbed_layer(E, S, D, H, kind)


def tokens(seed, D=8, M=7):
    g = torch.Generator().manual_seed(100 + seed)
    return [torch.randn(5, M, D, generator=g), torch.randn(3, M, D, generator=g)]  # two batches of unequal size


def mnist(seed):
    torch.manual_seed(seed)
    m = MnistSoftMoE(MnistConfig(num_experts=E)).eval()
    with torch.no_grad():
        m.moe.scale.fill_(4.0)
        m.head.weight.normal_(0, 1.0)  # logits of order 1: KLs well above float32 noise
    return m


def images(seed, sizes=(24, 16)):
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(n, 1, 28, 28, generator=g) for n in sizes]


def vit(seed):
    """Two Soft MoE layers (blocks 2 and 3); larger expert outputs, so that pruning block 2 moves block 3's input."""
    torch.manual_seed(seed)
    m = SoftMoEViT(ViTConfig(num_experts=E, moe_layer_index=2, depth=4, img_size=8, patch_size=4, in_chans=1,
                             num_classes=3, embed_dim=16, num_heads=2)).eval()
    with torch.no_grad():
        for layer in moe_layers(m).values():
            layer.scale.fill_(4.0)
            layer.experts.w2.mul_(3.0)
        m.head.weight.mul_(10.0)
    return m


def small_images(seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(8, 1, 8, 8, generator=g), torch.rand(5, 1, 8, 8, generator=g)]


def subsets_of(k):
    return list(itertools.combinations(range(E), k))


def ids(subsets: dict, name: str) -> tuple:
    return tuple(subsets[name].tolist())


# -- oracles -------------------------------------------------------------------------------------------------


def double(model):
    return copy.deepcopy(model).double()


@torch.no_grad()
def layer_error64(m64: SoftMoE, subset, batches) -> float:
    """|Y_full - Y_subset|^2 summed over all calibration tokens, the layer itself run in float64."""
    pruned = with_experts(m64, torch.tensor(subset))
    return sum(float((m64(x.double()) - pruned(x.double())).pow(2).sum()) for x in batches)


@torch.no_grad()
def by_hand(layer: SoftMoE, batches):
    """(combine mass [E], sum of C * |slot output| [E]) in float64, one input, expert and slot at a time.

    Routing of the Soft MoE paper (l2-normalized tokens, router columns l2-normalized times scale), slots averaged
    from the normalized tokens, each expert run from layer.experts.w1/b1/w2/b2.
    """
    c = layer.config
    assert c.token_norm == "l2" and c.phi_norm and not c.token_gain and c.dispatch_input == "normalized"
    S = c.slots_per_expert
    phi = layer.phi.detach().double().reshape(c.dim, E * S)
    router = layer.scale.detach().double() * phi / phi.norm(dim=0, keepdim=True)  # [D, E*S]
    ex = layer.experts
    w1, w2 = ex.w1.detach().double(), ex.w2.detach().double()
    b1 = torch.zeros(E, w1.shape[-1], dtype=torch.float64) if ex.b1 is None else ex.b1.detach().double()
    b2 = torch.zeros(E, w2.shape[-1], dtype=torch.float64) if ex.b2 is None else ex.b2.detach().double()
    act = {"relu_mlp": F.relu, "gelu_mlp": F.gelu}[c.expert]
    mass = torch.zeros(E, dtype=torch.float64)
    output = torch.zeros(E, dtype=torch.float64)
    for batch in batches:
        for x in batch.double():  # [M, D]
            t = x / x.norm(dim=-1, keepdim=True)
            logits = t @ router  # [M, E*S]
            combine = logits.softmax(dim=1)  # over slots
            dispatch = logits.softmax(dim=0)  # over tokens
            for e in range(E):
                for s in range(S):
                    j = e * S + s
                    slot = dispatch[:, j] @ t  # [D]
                    y = act(slot @ w1[e] + b1[e]) @ w2[e] + b2[e]  # [D_out]
                    mass[e] += combine[:, j].sum()
                    output[e] += combine[:, j].sum() * y.norm()
    return mass, output


@torch.no_grad()
def kl64(m64, experts: dict, batches) -> float:
    """Mean over inputs of KL(full || pruned) of the class distributions, float64."""
    pruned = with_experts(m64, experts)
    total, n = 0.0, 0
    for x in batches:
        log_p, log_q = m64(x.double()).log_softmax(-1), pruned(x.double()).log_softmax(-1)
        total += float((log_p.exp() * (log_p - log_q)).sum())
        n += len(x)
    return total / n


@torch.no_grad()
def layer_outputs(model, experts, name, batches) -> list[torch.Tensor]:
    """The output of Soft MoE layer `name` on every batch, the model run with `experts` (None: full)."""
    run = model if experts is None else with_experts(model, experts)
    got = []
    hook = run.get_submodule(name).register_forward_hook(lambda mod, args, out: got.append(out))
    try:
        for x in batches:
            run(x.double())
    finally:
        hook.remove()
    return got


# -- 1. reconstruct: the Gram error is the layer's error, and the chosen subset is the brute-force argmin ----


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("k", [2, 3])
@pytest.mark.parametrize("S", [1, 2])
@pytest.mark.parametrize("kind", ["relu_mlp", "gelu_mlp"])
def test_reconstruct_error_and_argmin_by_brute_force(kind, S, k, seed):
    m = bare(S, kind, seed)
    batches = tokens(seed)
    m64 = double(m)
    brute = {s: layer_error64(m64, s, batches) for s in subsets_of(k)}  # float64, the layer itself
    with torch.no_grad():
        t2 = sum(float(m64(x.double()).pow(2).sum()) for x in batches)
    tol = 1e-5 * t2  # the Gram sums are accumulated from float32 slot outputs

    # the Gram sums as reconstruct_subsets accumulates them (for a bare layer the target is its own output)
    G = torch.zeros(E, E, dtype=torch.float64)
    b = torch.zeros(E, dtype=torch.float64)
    t2_gram = 0.0
    with torch.no_grad():
        for x in batches:
            r = m.route(x)
            combine, y = m.slot_outputs(r)
            g_, b_, t_ = _gram(combine, y, S, m.mix(r))
            G, b, t2_gram = G + g_, b + b_, t2_gram + t_
    assert t2_gram == pytest.approx(t2, rel=1e-5)
    for s, err in brute.items():  # every subset
        assert subset_error(G, b, t2_gram, s) == pytest.approx(err, abs=tol), s

    subsets, record = reconstruct_subsets(m, batches, k)
    chosen = ids(subsets, "")
    ranked = sorted(brute, key=brute.get)
    assert brute[ranked[1]] - brute[ranked[0]] > 10 * tol, "near tie: this seed cannot tell subsets apart"
    assert chosen == ranked[0], (chosen, brute[chosen], ranked[0], brute[ranked[0]])
    assert record[""]["error"] == pytest.approx(brute[chosen] / t2, abs=1e-5)
    # the test can fail: the worst subset's error is far from the chosen one's, and so is the record's
    assert abs(brute[ranked[-1]] - brute[chosen]) > 100 * tol
    assert record[""]["error"] != pytest.approx(brute[ranked[1]] / t2, abs=1e-5)


def test_greedy_subset_is_a_local_optimum_of_single_swaps():
    """On random Gram problems greedy + swaps reaches a subset no single swap improves (not always the global
    optimum: brute force beats it on 12 of 2000 random 8-choose-3 problems, e.g. seed 58)."""
    for seed in range(50):
        g = torch.Generator().manual_seed(seed)
        n, k = 8, 3
        Z = torch.randn(n, 20, generator=g, dtype=torch.float64)  # Z_e flattened
        T = Z[torch.randperm(n, generator=g)[:4]].sum(0) + 0.5 * torch.randn(20, generator=g, dtype=torch.float64)
        G, b, t2 = Z @ Z.T, Z @ T, float(T @ T)
        chosen = greedy_subset(G, b, k)
        assert chosen == sorted(set(chosen)) and len(chosen) == k
        err = float((T - Z[chosen].sum(0)).pow(2).sum())  # directly, not from the Gram sums
        for o in chosen:
            for i in set(range(n)) - set(chosen):
                swapped = [e for e in chosen if e != o] + [i]
                assert float((T - Z[swapped].sum(0)).pow(2).sum()) >= err - 1e-9, (seed, chosen, o, i)
    with pytest.raises(SelectionError):
        greedy_subset(G, b, 0)
    with pytest.raises(SelectionError):
        greedy_subset(G, b, n + 1)


# -- 2. mass and output: argmax of their score sums, brute force over subsets -----------------------------------


def _argmax_subset(scores: torch.Tensor, k: int):
    totals = {s: float(scores[list(s)].sum()) for s in subsets_of(k)}
    ranked = sorted(totals, key=totals.get, reverse=True)
    return ranked, totals


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("S", [1, 2])
@pytest.mark.parametrize("kind", ["relu_mlp", "gelu_mlp"])
def test_mass_and_output_rules_by_hand(kind, S, seed):
    m = bare(S, kind, seed)
    batches = tokens(seed)
    mass, output = by_hand(m, batches)
    for rule, scores in (("mass", mass), ("output", output)):
        subsets, record = choose_subsets(m, batches, 2, rule=rule)
        ranked, totals = _argmax_subset(scores, 2)
        assert totals[ranked[0]] - totals[ranked[1]] > 1e-4, "near tie"
        assert ids(subsets, "") == ranked[0], (rule, ids(subsets, ""), ranked[0])
        torch.testing.assert_close(torch.tensor(record["calibration_scores"][""], dtype=torch.float64), scores,
                                   atol=1e-5, rtol=1e-5)
        assert record["rule"] == rule
    # mass ignores what the experts return; output does not (the two scores are not proportional)
    assert not torch.allclose(output / output.sum(), mass / mass.sum(), rtol=1e-3)


def test_output_rule_differs_from_mass_on_some_layers():
    """The two rules are not the same rule under another name: on these seeds they pick different subsets."""
    differ = 0
    for seed in range(3):
        m = bare(1, "relu_mlp", seed)
        a, _ = choose_subsets(m, tokens(seed), 2, rule="mass")
        b, _ = choose_subsets(m, tokens(seed), 2, rule="output")
        differ += ids(a, "") != ids(b, "")
    assert differ >= 2


@pytest.mark.parametrize("rule", ["mass", "output"])
def test_mass_and_output_rules_on_a_model(rule):
    """The same oracle on the MNIST model's layer, fed the tokens the model makes of its images."""
    m = mnist(0)
    batches = images(0)
    mass, output = by_hand(m.moe, [m.tokens(x) for x in batches])
    scores = mass if rule == "mass" else output
    subsets, record = choose_subsets(m, batches, 2, rule=rule)
    ranked, _ = _argmax_subset(scores, 2)
    assert ids(subsets, "moe") == ranked[0]
    torch.testing.assert_close(torch.tensor(record["calibration_scores"]["moe"], dtype=torch.float64), scores,
                               atol=1e-5, rtol=1e-5)


# -- 3. loss: KL(full || pruned) by brute force on a tiny MNIST model -----------------------------------------


def _loss_case(seed, k):
    m = mnist(seed)
    batches = images(seed)
    m64 = double(m)
    kls = {s: kl64(m64, {"moe": torch.tensor(s)}, batches) for s in subsets_of(k)}
    subsets, record = choose_subsets(m, batches, k, rule="loss")
    mass, _ = choose_subsets(m, batches, k, rule="mass")
    return kls, ids(subsets, "moe"), ids(mass, "moe"), record


@pytest.mark.parametrize("seed", range(6))
def test_loss_k1_is_the_exact_argmin(seed):
    kls, chosen, mass, record = _loss_case(seed, 1)
    ranked = sorted(kls, key=kls.get)
    assert kls[ranked[1]] - kls[ranked[0]] > 1e-5, "near tie"
    assert chosen == ranked[0], (chosen, kls)
    assert record["rule"] == "loss"
    rec = record["distillation_kl"]["moe"]
    assert rec["kl"] == pytest.approx(kls[chosen], rel=1e-3)
    assert rec["kl_mass"] == pytest.approx(kls[mass], rel=1e-3)


_GREEDY_MISSES = pytest.mark.xfail(
    strict=True, raises=AssertionError,
    reason="LIMITATION: the loss rule is greedy (expert by expert) and misses the k=2 optimum here")
K2_SEEDS = range(12)


@pytest.mark.parametrize("seed", [pytest.param(s, marks=_GREEDY_MISSES) if s == 10 else s for s in K2_SEEDS])
def test_loss_k2_is_the_brute_force_argmin(seed):
    kls, chosen, _, record = _loss_case(seed, 2)
    best = min(kls, key=kls.get)
    assert record["distillation_kl"]["moe"]["kl"] == pytest.approx(kls[chosen], rel=1e-3)
    assert chosen == best, (chosen, kls[chosen], best, kls[best])


@pytest.mark.parametrize("seed", K2_SEEDS)
def test_loss_k2_is_never_worse_than_the_mass_rule(seed):
    kls, chosen, mass, record = _loss_case(seed, 2)
    assert kls[chosen] <= kls[mass] + 1e-7, (chosen, kls[chosen], mass, kls[mass])
    assert record["distillation_kl"]["moe"]["kl"] <= record["distillation_kl"]["moe"]["kl_mass"] + 1e-7


def test_loss_on_a_bare_layer_is_reconstruct():
    m = bare(2, "gelu_mlp", 0)
    a, record = choose_subsets(m, tokens(0), 2, rule="loss")
    b, _ = choose_subsets(m, tokens(0), 2, rule="reconstruct")
    assert torch.equal(a[""], b[""]) and "relative_output_error" in record


# -- 4. layers in order: a later layer sees the earlier ones pruned, and targets the full model ----------------


def test_reconstruct_calibrates_the_second_layer_on_inputs_with_the_first_pruned():
    naive_differs = 0
    for seed in (0, 4, 10):
        m = vit(seed)
        first, second = moe_layers(m)
        batches = small_images(seed)
        m64 = double(m)
        subsets, record = choose_subsets(m, batches, 2, rule="reconstruct")
        full = {n: torch.arange(E) for n in (first, second)}
        T1 = layer_outputs(m64, None, first, batches)  # the full model's outputs: the targets
        T2 = layer_outputs(m64, None, second, batches)

        def error(targets, experts, name):
            got = layer_outputs(m64, experts, name, batches)
            return sum(float((t - y).pow(2).sum()) for t, y in zip(targets, got))

        e1 = {s: error(T1, {**full, first: torch.tensor(s)}, first) for s in subsets_of(2)}
        c1 = ids(subsets, first)
        assert c1 == min(e1, key=e1.get)
        # the second layer: the first fixed at its chosen subset, the target from the full model
        e2 = {s: error(T2, {first: torch.tensor(c1), second: torch.tensor(s)}, second) for s in subsets_of(2)}
        c2 = ids(subsets, second)
        assert c2 == min(e2, key=e2.get), (seed, c2, e2)
        t2 = sum(float(t.pow(2).sum()) for t in T2)
        assert record["relative_output_error"][second]["error"] == pytest.approx(e2[c2] / t2, abs=1e-5)
        # what it would be had the second layer been calibrated on the full model's inputs
        naive = {s: error(T2, {**full, second: torch.tensor(s)}, second) for s in subsets_of(2)}
        assert record["relative_output_error"][second]["error"] != pytest.approx(naive[c2] / t2, abs=1e-5)
        naive_differs += min(naive, key=naive.get) != c2
    assert naive_differs >= 1  # on seed 10 the naive calibration would keep other experts


def test_loss_calibrates_layers_in_order():
    """k = 1 (every candidate is run for real, so each step is exact): the first layer's expert minimizes the KL
    with the second full; the second's minimizes it with the first pruned to its choice."""
    naive_differs = 0
    for seed in (10, 11):
        m = vit(seed)
        first, second = moe_layers(m)
        batches = small_images(seed)
        m64 = double(m)
        subsets, record = choose_subsets(m, batches, 1, rule="loss")
        k1 = {e: kl64(m64, {first: torch.tensor([e]), second: torch.arange(E)}, batches) for e in range(E)}
        c1 = int(subsets[first])
        assert c1 == min(k1, key=k1.get)
        k2 = {e: kl64(m64, {first: torch.tensor([c1]), second: torch.tensor([e])}, batches) for e in range(E)}
        c2 = int(subsets[second])
        assert c2 == min(k2, key=k2.get), (seed, c2, k2)
        assert record["distillation_kl"][second]["kl"] == pytest.approx(k2[c2], rel=1e-3)
        naive = {e: kl64(m64, {first: torch.arange(E), second: torch.tensor([e])}, batches) for e in range(E)}
        naive_differs += min(naive, key=naive.get) != c2
    assert naive_differs >= 1


# -- 5. compressed inputs, bad rules, bad keeps -------------------------------------------------------------


class Untouchable:
    """Calibration batches that fail the test if anything looks at them."""

    def __iter__(self):
        raise AssertionError("the calibration data was read before keep was checked")

    def __len__(self):
        raise AssertionError("the calibration data was read before keep was checked")

    def __getitem__(self, i):
        raise AssertionError("the calibration data was read before keep was checked")


@pytest.mark.parametrize("rule", RULES)
def test_compressed_model_chooses_among_its_experts(rule):
    held = [0, 2, 3, 5]
    small = compress_model(mnist(0), {"moe": torch.tensor(held)})  # drop mode: router ids kept
    batches = images(0)
    subsets, _ = choose_subsets(small, batches, 2, rule=rule)
    chosen = ids(subsets, "moe")
    assert len(chosen) == 2 and set(chosen) <= set(held), chosen
    with torch.no_grad():
        assert torch.isfinite(with_experts(small, subsets)(batches[0])).all()
    # all it holds: the whole held set
    subsets, _ = choose_subsets(small, batches, 4, rule=rule)
    assert ids(subsets, "moe") == tuple(held)
    with pytest.raises(SelectionError):
        choose_subsets(small, Untouchable(), 5, rule=rule)  # 5 > the 4 it holds


@pytest.mark.parametrize("rule", RULES)
def test_compressed_renorm_model_chooses_among_its_experts(rule):
    small = compress_model(mnist(0), {"moe": torch.tensor([0, 2, 3, 5])}, mode="renorm")  # re-indexed 0..3
    subsets, _ = choose_subsets(small, images(0), 2, rule=rule, mode="renorm")
    assert set(ids(subsets, "moe")) <= {0, 1, 2, 3}


def test_compressed_reconstruct_subset_is_the_argmin_among_held():
    held = [0, 2, 3, 5]
    m = bare(1, "gelu_mlp", 1)
    small = compress_model(m, {"": torch.tensor(held)})
    batches = tokens(1)
    s64 = double(small)
    # the compressed layer's own output is the target; brute force over pairs of the held experts
    brute = {s: layer_error64(s64, s, batches) for s in itertools.combinations(held, 2)}
    subsets, _ = choose_subsets(small, batches, 2, rule="reconstruct")
    assert ids(subsets, "") == min(brute, key=brute.get)


@pytest.mark.parametrize("rule", ["greedy", "", "Mass", None])
def test_bad_rule_is_a_selection_error(rule):
    with pytest.raises(SelectionError, match="rule"):
        choose_subsets(mnist(0), Untouchable(), 2, rule=rule)


@pytest.mark.parametrize("keep", [0, 7, "0", "abc", "3/2", -1, float("nan")])
@pytest.mark.parametrize("rule", RULES)
def test_bad_keep_fails_before_any_pass_over_the_data(rule, keep):
    for model in (mnist(0), bare()):
        with pytest.raises(SelectionError, match="keep"):
            choose_subsets(model, Untouchable(), keep, rule=rule)


def test_default_rule_is_one_of_the_rules():
    assert DEFAULT_RULE in RULES and set(RULES) == {"mass", "output", "reconstruct", "loss"}


def test_no_soft_moe_layer_is_a_selection_error():
    with pytest.raises(SelectionError, match="no Soft MoE layer"):
        choose_subsets(torch.nn.Linear(3, 3), Untouchable(), 1, rule="mass")


# -- 6. determinism ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("rule", RULES)
def test_same_inputs_same_subsets(rule):
    m = mnist(3)
    a, ra = choose_subsets(m, images(3), 2, rule=rule)
    b, rb = choose_subsets(m, images(3), 2, rule=rule)
    assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)
    assert ra == rb


@pytest.mark.parametrize("rule", ["mass", "output", "reconstruct"])
@pytest.mark.parametrize("family", ["mnist", "layer"])
def test_batch_order_does_not_change_the_subsets(rule, family):
    if family == "mnist":
        m, batches = mnist(1), images(1, sizes=(10, 7, 13))
    else:
        m, batches = bare(2, "relu_mlp", 1), tokens(1) + tokens(2)
    rebatched = list(torch.cat(batches[::-1]).split(4))  # reversed, and cut into other batches
    a, ra = choose_subsets(m, batches, 2, rule=rule)
    b, rb = choose_subsets(m, rebatched, 2, rule=rule)
    assert all(torch.equal(a[n], b[n]) for n in a), (a, b)
    if rule == "mass":  # fixed-point integer sums: bit for bit whatever the order
        assert ra["calibration_scores"] == rb["calibration_scores"]
    elif rule == "output":
        for n in a:
            torch.testing.assert_close(torch.tensor(ra["calibration_scores"][n]),
                                       torch.tensor(rb["calibration_scores"][n]), atol=1e-6, rtol=1e-6)
    else:
        for n in a:
            assert ra["relative_output_error"][n]["error"] == pytest.approx(rb["relative_output_error"][n]["error"],
                                                                          abs=1e-6)
    # the oracle can fail: other calibration data changes the scores
    _, rc = choose_subsets(m, batches[:1], 2, rule=rule)
    assert rc != ra


def _two_moe_layers(seed: int, experts: int):
    """A 3-block ViT on 8x8 images whose blocks 1 and 2 are Soft MoE layers, routing sharpened (scale 5)."""
    from moe_prune.core.models import SoftMoEViT, ViTConfig

    torch.manual_seed(seed)
    model = SoftMoEViT(ViTConfig(num_experts=experts, moe_layer_index=1, img_size=8, patch_size=4, in_chans=1,
                                 num_classes=5, embed_dim=16, depth=3, num_heads=2)).eval()
    with torch.no_grad():
        for layer in moe_layers(model).values():
            layer.scale.fill_(5.0)
    return model


def test_the_whole_model_guard_catches_what_the_per_layer_check_misses():
    """Two Soft MoE layers, search inputs and held-out calibration inputs from different ranges: each layer's
    greedy subset beats that layer's combine-mass top k on the search inputs, yet the whole greedy model is worse
    than the all-mass model (what --rule mass writes) on the held-out inputs. The rule returns the all-mass
    subsets; the KLs are recomputed here from the models' outputs, independently of the rule's bookkeeping."""
    from moe_prune.selection.calibration import choose_subsets
    from moe_prune.selection.loss_rule import loss_subsets
    from moe_prune.selection.scores import with_experts

    model = _two_moe_layers(seed=12, experts=6)
    g = torch.Generator().manual_seed(12)
    search, held = torch.rand(32, 1, 8, 8, generator=g), torch.rand(32, 1, 8, 8, generator=g) * 3 - 1
    # the search runs on `limit` inputs spread evenly over the data (every other one here), the guard on the rest
    data = torch.stack([search, held], 1).reshape(64, 1, 8, 8)
    assert torch.equal(data[0::2], search) and torch.equal(data[1::2], held)
    subsets, record = loss_subsets(model, [data], 2, limit=32, chunk=32)
    names = list(moe_layers(model))
    assert [record[n]["chosen_by"] for n in names] == ["greedy", "greedy"]  # the per-layer check kept the greedy
    mass, _ = choose_subsets(model, [data], 2, rule="mass")
    assert {n: s.tolist() for n, s in subsets.items()} == {n: s.tolist() for n, s in mass.items()}
    assert record["whole_model"]["held_out"] and record["whole_model"]["chosen"] == "mass"

    def kl(chosen):
        with torch.no_grad():
            p = F.log_softmax(model(held).double(), -1)
            q = F.log_softmax(with_experts(model, chosen)(held).double(), -1)
        return float((p.exp() * (p - q)).sum() / len(held))

    greedy = {n: torch.tensor(ids) for n, ids in record["whole_model"]["rule_subsets"].items()}
    assert {n: s.tolist() for n, s in greedy.items()} != {n: s.tolist() for n, s in mass.items()}
    assert kl(greedy) > kl(mass)  # what the per-layer check alone would have written is worse there
    assert kl(greedy) == pytest.approx(record["whole_model"]["kl_rule"], rel=1e-3)  # the rule sums in fp32
    assert kl(mass) == pytest.approx(record["whole_model"]["kl_mass"], rel=1e-3)


def test_global_budget_spends_the_uniform_expert_flops_where_the_loss_drops_most():
    """--budget global on two Soft MoE layers of 4 experts, keep 2 each: 4 experts in all (equal sizes: equal
    FLOPs), split as the loss asks. Checked against brute force over every split and subset (68 models) and
    against the all-mass model, the KLs recomputed here in float64."""
    from moe_prune.selection.calibration import choose_subsets

    model = _two_moe_layers(seed=3, experts=4)
    x = torch.rand(48, 1, 8, 8, generator=torch.Generator().manual_seed(3))
    names = list(moe_layers(model))

    def kl(subsets):
        with torch.no_grad():
            p = F.log_softmax(model(x).double(), -1)
            q = F.log_softmax(with_experts(model, {n: torch.as_tensor(s) for n, s in subsets.items()})(x).double(), -1)
        return float((p.exp() * (p - q)).sum() / len(x))

    glob, record = choose_subsets(model, [x], 2, rule="loss", budget="global")
    mass, _ = choose_subsets(model, [x], 2, rule="mass")
    kept = record["distillation_kl"]["kept"]
    assert sum(kept.values()) == 4 and min(kept.values()) >= 1 and [len(glob[n]) for n in names] == [kept[n] for n in names]
    spent, total = record["distillation_kl"]["expert_flops"]
    assert spent == pytest.approx(total)
    splits = [(a, 4 - a) for a in (1, 2, 3)]
    best = min(kl({names[0]: list(s0), names[1]: list(s1)})
               for a, b in splits for s0 in itertools.combinations(range(4), a) for s1 in itertools.combinations(range(4), b))
    # the optimum bounds it below; the whole-model guard bounds it above by the all-mass model (no held-out
    # inputs here: the guard compares on the search inputs). Greedy, it is not always the optimum (the study
    # measures it against the per-layer budget).
    assert best - 1e-12 <= kl(glob) <= kl(mass) + 1e-9
    assert kl(glob) == pytest.approx(record["distillation_kl"]["whole_model"]["kl_rule"], rel=1e-2) or \
        record["distillation_kl"]["whole_model"]["chosen"] == "mass"
    with pytest.raises(SelectionError, match="global"):
        choose_subsets(model, [x], 2, rule="mass", budget="global")


def test_rounds_cut_the_loss_rules_passes():
    """`rounds` sets the prediction rounds per layer: k = 4 of 6 experts in 1 round costs one prediction and one
    round of candidate runs, against 4 of each expert by expert; rounds >= k is the expert-by-expert search."""
    import moe_prune.selection.loss_rule as calibration  # the loss rule's module, where _kl is looked up

    m, batches = mnist(3), images(3)
    calls = []
    real = calibration._kl

    def counting(*args):
        calls.append(1)
        return real(*args)

    def passes(**search):
        calls.clear()
        with pytest.MonkeyPatch.context() as mp_:
            mp_.setattr(calibration, "_kl", counting)
            subsets, record = loss_subsets(m, batches, 4, **search)
        return len(calls), subsets, record

    every, a, _ = passes(candidates=8, rounds=None)
    same, b, _ = passes(candidates=8, rounds=4)
    once, c, record = passes(candidates=8, rounds=1)
    assert every == same and all(torch.equal(a[n], b[n]) for n in a)
    # per chunk (one: 40 inputs): expert by expert 4 predictions + 6 + 5 + 4 + 3 candidate runs; one round 1 + 6
    assert every - once == (4 + 6 + 5 + 4 + 3) - (1 + 6)
    assert len(c["moe"]) == 4 and record["search"] == {"inputs": 40, "candidates": 8, "rounds": 1}


def test_the_search_and_its_guard_see_every_part_of_a_sorted_folder():
    """A folder is read class by class: the loss rule's `limit` search inputs and the guard's held-out ones are
    spread over all of it (every block of 100 inputs, 10 classes), disjoint, not the first ones."""
    import numpy as np

    from moe_prune.data.examples import spread

    search = spread(1000, 256)
    check = spread(1000, 256, exclude=search)
    assert len(search) == len(check) == 256 and not set(search) & set(check)
    for idx in (search, check):
        assert sorted(set(np.asarray(idx) // 100)) == list(range(10))
        assert (np.diff(idx) > 0).all()
    assert list(spread(5, 8)) == [0, 1, 2, 3, 4]  # fewer than asked: all of them
    assert list(spread(6, 4, exclude=np.array([0, 2, 4]))) == [1, 3, 5]
