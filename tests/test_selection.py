"""Scores, Algorithms 1 and 2, keep parsing, drop/renorm oracles, static calibration and compression."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import moe_prune
from moe_prune import expert_scores, parse_keep, select_experts, with_experts, with_selection
from moe_prune.compression.compress import compress_file, compress_model, static_subsets
from moe_prune.errors import SelectionError
from moe_prune.core.layers import SoftMoE, SoftMoEConfig
from moe_prune.core.models import MnistConfig, MnistSoftMoE, SoftMoEViT, ViTConfig

from conftest import perturbed_layer



def weights(layer, x, mask=None):
    """The full dispatch and combine weights [B, M, E*S] of one routed call."""
    r = layer.route(x, mask)
    return r.dispatch_weights, r.combine_weights

def layer(E=8, S=2, D=12, H=10, kind="gelu_mlp"):
    return perturbed_layer(E, S, D, H, kind)


def tiny_vit():
    return SoftMoEViT(ViTConfig(num_experts=8, moe_layer_index=1, img_size=28, patch_size=7, in_chans=1,
                                num_classes=10, embed_dim=32, depth=3, num_heads=2)).eval()


# -- scores ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("M", [1, 5, 33])
def test_scores_sum_to_token_count(M):
    m = layer()
    s = expert_scores(m, torch.randn(3, M, 12))
    assert s.shape == (3, 8) and s.dtype == torch.float32
    torch.testing.assert_close(s.sum(-1), torch.full((3,), float(M)))
    mask = torch.ones(3, M, dtype=torch.bool)
    mask[1, : M // 2] = False
    s = expert_scores(m, torch.randn(3, M, 12), mask)
    torch.testing.assert_close(s.sum(-1), mask.sum(-1).float())


def test_scores_are_combine_mass():
    m = layer()
    x = torch.randn(2, 6, 12)
    _, combine = weights(m, x)  # [B, M, E*S]
    expected = combine.reshape(2, 6, 8, 2).sum(dim=(1, 3))
    torch.testing.assert_close(expert_scores(m, x), expected)


# -- selection ------------------------------------------------------------------------------------------------


def test_algorithm_1_and_2_on_hand_made_scores():
    scores = torch.tensor([[5.0, 1.0, 3.0, 0.0], [0.0, 2.0, 1.0, 4.0], [1.0, 1.0, 1.0, 1.0]])
    assert select_experts(scores, 2, per="input").tolist() == [[0, 2], [1, 3], [0, 1]]  # ties: lower index
    # batch sums: [6, 4, 5, 5] -> top 2 = {0, 2} (2 and 3 tie at 5: the lower index wins)
    assert select_experts(scores, 2, per="batch").tolist() == [0, 2]
    assert select_experts(scores, "1/2", per="batch").tolist() == [0, 2]
    assert select_experts(scores, 4, per="input").tolist() == [[0, 1, 2, 3]] * 3


@pytest.mark.parametrize("keep,n,k", [(4, 16, 4), ("4", 16, 4), ("1/8", 128, 16), (0.125, 128, 16), ("0.125", 12, 2),
                                      ("1/8", 4, 1), (1.0, 5, 5), ("1", 3, 1), ("1/3", 9, 3), (0.1, 10, 1)])
def test_parse_keep(keep, n, k):
    assert parse_keep(keep, n) == k


@pytest.mark.parametrize("keep", [0, -1, "0", "-2", 17, "17", 1.5, "3/2", "0/4", "abc", "1/0", "", None, True,
                                  float("nan"), float("inf"), "nan"])
def test_parse_keep_errors(keep):
    with pytest.raises(SelectionError):
        parse_keep(keep, 16)


def test_nan_scores_are_an_error():
    with pytest.raises(SelectionError, match="NaN"):
        select_experts(torch.tensor([[1.0, float("nan"), 0.0]]), 1)
    m = layer()
    x = torch.randn(1, 4, 12)
    x[0, 0, 0] = float("nan")
    with pytest.raises(SelectionError, match="NaN"):
        select_experts(expert_scores(m, x), 2)


@settings(max_examples=150, deadline=None)
@given(st.integers(1, 5), st.integers(1, 24), st.data())
def test_selection_properties(B, E, data):
    k = data.draw(st.integers(1, E))
    values = data.draw(st.lists(st.sampled_from([0.0, 0.5, 1.0, 2.0, 3.0]) | st.floats(-10, 10), min_size=B * E, max_size=B * E))
    scores = torch.tensor(values, dtype=torch.float32).reshape(B, E)
    per_input = select_experts(scores, k, per="input")
    assert per_input.shape == (B, k)
    for b in range(B):
        row = per_input[b].tolist()
        assert row == sorted(set(row))  # unique, ascending
        # every kept score >= every dropped score, and among equal scores the lower indices are kept
        kept_min = min(scores[b, row])
        dropped = [e for e in range(E) if e not in row]
        assert all(scores[b, e] <= kept_min for e in dropped)
        assert all(e > max(i for i in row if scores[b, i] == scores[b, e]) for e in dropped if scores[b, e] == kept_min)
    batch = select_experts(scores, k, per="batch")
    assert batch.tolist() == select_experts(scores.sum(0, keepdim=True), k, per="input")[0].tolist()
    assert torch.equal(select_experts(scores, k, per="input"), per_input)  # deterministic


# -- running with subsets: the oracles ------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["gelu_mlp", "relu_mlp", "geglu"])
def test_drop_equals_full_layer_with_dropped_slot_outputs_zeroed(kind):
    m = layer(kind=kind)
    x = torch.randn(3, 7, 12)
    kept = torch.tensor([1, 4, 6])
    with torch.no_grad():
        dispatch, combine = weights(m, x)
        slots = dispatch.transpose(1, 2) @ m.route_tokens(x)  # [B, E*S, D]
        y = m.experts(slots.reshape(3, 8, 2, 12).transpose(0, 1).reshape(8, 6, 12))  # [E, B*S, D]
        y = y.reshape(8, 3, 2, 12).transpose(0, 1)  # [B, E, S, D]
        zeroed = torch.zeros_like(y)
        zeroed[:, kept] = y[:, kept]
        expected = combine @ zeroed.reshape(3, 16, 12)
        torch.testing.assert_close(m(x, experts=kept, mode="drop"), expected, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(with_experts(m, kept)(x), expected, atol=1e-6, rtol=1e-5)


def test_renorm_equals_layer_with_dropped_logits_at_minus_inf():
    m = layer()
    x = torch.randn(3, 7, 12)
    kept = torch.tensor([0, 5])
    with torch.no_grad():
        logits = m.route_tokens(x) @ m.router()  # [B, M, 16]
        cols = torch.tensor([0, 1, 10, 11])
        masked = torch.full_like(logits, float("-inf"))
        masked[..., cols] = logits[..., cols]
        dispatch, combine = masked.softmax(1)[..., cols], masked.softmax(-1)[..., cols]
        slots = dispatch.transpose(1, 2) @ m.route_tokens(x)  # [B, 4, D]
        y = m.experts(slots.reshape(3, 2, 2, 12).transpose(0, 1).reshape(2, 6, 12), kept)
        expected = combine @ y.reshape(2, 3, 2, 12).transpose(0, 1).reshape(3, 4, 12)
        torch.testing.assert_close(m(x, experts=kept, mode="renorm"), expected, atol=1e-6, rtol=1e-5)
        # the renormalized combine weights of kept slots sum to 1 per token
        torch.testing.assert_close(combine.sum(-1), torch.ones(3, 7))


@pytest.mark.parametrize("mode", ["drop", "renorm"])
def test_keep_all_equals_full_model_exactly(mode):
    m = layer()
    x = torch.randn(4, 9, 12)
    with torch.no_grad():
        full = m(x)
        assert torch.equal(m(x, experts=torch.arange(8), mode=mode), full)
        assert torch.equal(m(x, experts=torch.arange(8).expand(4, 8), mode=mode), full)
        assert torch.equal(with_selection(m, 8, per="batch", mode=mode)(x), full)
        assert torch.equal(with_selection(m, 8, per="input", mode=mode)(x), full)


@pytest.mark.parametrize("mode", ["drop", "renorm"])
def test_shared_subset_equals_per_input_rows(mode):
    m = layer()
    x = torch.randn(4, 9, 12)
    kept = torch.tensor([2, 3, 7])
    with torch.no_grad():
        torch.testing.assert_close(m(x, experts=kept, mode=mode), m(x, experts=kept.expand(4, 3), mode=mode))


def test_per_input_selection_uses_each_inputs_own_top_k():
    m = layer()
    x = torch.randn(5, 6, 12)
    with torch.no_grad():
        out = with_selection(m, 2, per="input")(x)
        for b in range(5):
            mine = select_experts(expert_scores(m, x[b:b + 1]), 2, per="input")[0]
            torch.testing.assert_close(out[b:b + 1], m(x[b:b + 1], experts=mine), atol=1e-6, rtol=1e-5)


def test_k0_zeroes_expert_outputs():
    m = layer()
    x = torch.randn(2, 4, 12)
    with torch.no_grad():
        assert with_experts(m, torch.zeros(0, dtype=torch.long))(x).abs().max() == 0


def test_subset_errors():
    m = layer()
    with pytest.raises(SelectionError):
        with_experts(m, torch.tensor([0, 8]))
    with pytest.raises(SelectionError):
        with_experts(m, torch.tensor([1, 1]))
    with pytest.raises(SelectionError):
        with_experts(m, torch.tensor([1]), mode="half")
    vit = tiny_vit()
    with pytest.raises(SelectionError, match="layers"):
        with_experts(vit, {"blocks.1.mlp": torch.tensor([1])})  # blocks.2.mlp missing
    with pytest.raises(SelectionError, match="no Soft MoE"):
        with_selection(torch.nn.Linear(2, 2), 1)


def test_with_experts_shares_weights_and_leaves_model_unchanged():
    vit = tiny_vit()
    before = {k: v.clone() for k, v in vit.state_dict().items()}
    pruned = with_experts(vit, {"blocks.1.mlp": torch.tensor([0, 3]), "blocks.2.mlp": torch.tensor([5])})
    assert pruned.blocks[0].attn.qkv.weight is vit.blocks[0].attn.qkv.weight
    x = torch.rand(2, 1, 28, 28)
    with torch.no_grad():
        assert not torch.allclose(pruned(x), vit(x))
    assert all(torch.equal(v, before[k]) for k, v in vit.state_dict().items())
    assert type(vit.blocks[1].mlp) is SoftMoE


def test_multi_layer_dynamic_selection_scores_each_layers_pruned_input():
    vit = tiny_vit()
    x = torch.rand(3, 1, 28, 28)
    seen = {}
    pruned = with_selection(vit, 2, per="batch")
    for name in ("blocks.1.mlp", "blocks.2.mlp"):
        pruned.get_submodule(name).register_forward_pre_hook(
            lambda mod, args, name=name: seen.__setitem__(name, select_experts(expert_scores(mod.layer, args[0]), 2, "batch")))
    with torch.no_grad():
        out = pruned(x)
        static = with_experts(vit, seen)(x)
    torch.testing.assert_close(out, static)


# -- calibration and compression ------------------------------------------------------------------------------


def test_calibration_sums_scores_over_batches():
    model = MnistSoftMoE(MnistConfig(num_experts=16)).eval()
    data = torch.rand(10, 1, 28, 28)
    subsets, sums = static_subsets(model, [data[:4], data[4:]], "1/4")
    with torch.no_grad():
        total = expert_scores(model.moe, model.tokens(data)).sum(0).double()
    torch.testing.assert_close(sums["moe"], total, atol=1e-5, rtol=1e-6)
    assert subsets["moe"].tolist() == select_experts(total, 4, per="batch").tolist()
    assert sums["moe"].sum().item() == pytest.approx(10 * 4)


@pytest.mark.parametrize("mode", ["drop", "renorm"])
def test_compressed_checkpoint_equals_full_model_with_subset(tmp_path, mode):
    model = tiny_vit()
    src = moe_prune.save(model, tmp_path / "full.safetensors")
    src_bytes = src.read_bytes()
    subsets = {"blocks.1.mlp": torch.tensor([1, 6]), "blocks.2.mlp": torch.tensor([0, 2])}
    out = compress_file(src, subsets, tmp_path / "small.safetensors", mode=mode)
    small = moe_prune.load(out)
    x = torch.rand(3, 1, 28, 28)
    with torch.no_grad():
        expected = with_experts(model, subsets, mode=mode)(x)
        torch.testing.assert_close(small(x), expected, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(compress_model(model, subsets, mode)(x), expected, atol=1e-5, rtol=1e-5)
    assert src.read_bytes() == src_bytes  # the input is never modified
    info = moe_prune.summary(out)
    assert [layer["kept_original_ids"] for layer in info["moe_layers"]] == [[1, 6], [0, 2]]
    assert info["expert_parameters"] * 4 == moe_prune.summary(src)["expert_parameters"]
    # compressing a compressed checkpoint again keeps the original ids
    again = compress_file(out, {"blocks.1.mlp": torch.tensor([6] if mode == "drop" else [1]),
                                "blocks.2.mlp": torch.tensor([0])}, tmp_path / "smaller.safetensors", mode=mode)
    assert [layer["kept_original_ids"] for layer in moe_prune.summary(again)["moe_layers"]] == [[6], [0]]


def test_compress_reads_only_kept_experts(tmp_path, monkeypatch):
    """The dropped experts' rows are never read from the file."""
    from safetensors import safe_open

    model = MnistSoftMoE(MnistConfig(num_experts=16)).eval()
    src = moe_prune.save(model, tmp_path / "full.safetensors")
    reads = []
    real_open = safe_open

    class Spy:
        def __init__(self, *a, **k):
            self.f = real_open(*a, **k)

        def __enter__(self):
            self.f.__enter__()
            return self

        def __exit__(self, *a):
            return self.f.__exit__(*a)

        def __getattr__(self, name):
            return getattr(self.f, name)

        def get_tensor(self, name):
            reads.append((name, "all"))
            return self.f.get_tensor(name)

        def get_slice(self, name):
            sl = self.f.get_slice(name)

            class S:
                def __getitem__(_, idx):
                    reads.append((name, idx))
                    return sl[idx]
            return S()

    monkeypatch.setattr("moe_prune.compression.compress.safe_open", Spy)
    compress_file(src, {"moe": torch.tensor([2, 3, 9])}, tmp_path / "out.safetensors")
    expert_reads = [(n, i) for n, i in reads if ".experts." in n]
    assert expert_reads and all(i != "all" for _, i in expert_reads)
    rows = {n: sorted(r for _, i in expert_reads if _ == n for r in range(i.start, i.stop)) for n, _ in expert_reads}
    assert all(r == [2, 3, 9] for r in rows.values())


@pytest.mark.parametrize("mode", ["drop", "renorm"])
def test_per_input_selection_on_a_compressed_layer(tmp_path, mode):
    """Algorithm 1 on a compressed (drop) layer equals it on the full layer restricted to the held experts."""
    m = layer()
    x = torch.randn(4, 6, 12)
    held = torch.tensor([1, 2, 5, 6])
    small = compress_model(m, {"": held}, "drop")
    per_input = torch.tensor([[1, 5], [2, 6], [1, 2], [5, 6]])
    with torch.no_grad():
        torch.testing.assert_close(small(x, experts=per_input, mode=mode), m(x, experts=per_input, mode=mode),
                                   atol=1e-6, rtol=1e-5)
        chosen = with_selection(small, 2, per="input", mode=mode)(x)
        assert chosen.shape == (4, 6, 12) and torch.isfinite(chosen).all()
