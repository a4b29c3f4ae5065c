"""Soft MoE layers inside a user's own model (the real soft-moe and soft-moe-pytorch layers): `moe_prune.convert`
reproduces the model, then every step works on it (scores, Algorithms 1 and 2, each calibration rule, healing,
compression, ONNX export and validation, bench's torch rows), and the compressed weights go back into the
user's own class with the README's recipe.

Oracles are the libraries' own layers: a converted layer against the original; a pruned layer against the
original library layer with the dropped experts' outputs replaced by zeros (done inside the library's module)."""

import pytest
import torch
from torch import nn

import moe_prune
from moe_prune.selection.calibration import RULES, choose_subsets
from moe_prune.errors import ConfigError
from moe_prune.core.layers import SoftMoE
from moe_prune.compression.compress import compress_and_heal
from moe_prune.onnx.export import export_onnx
from moe_prune.core.models import moe_layers

from library_models import Mlp, UserNet, soft_moe_layer_module, soft_moe_pytorch

pytestmark = pytest.mark.usefixtures("one_thread")

VARIANTS = {
    "timm Mlp + RMSNorm SoftMoE": dict(expert="timm"),
    "ReLU Sequential + LayerNorm GEGLU SoftMoE": dict(expert="relu", lucidrains={"num_slots": 2, "geglu": True,
                                                                                 "use_layernorm": True}),
    "timm Mlp + SoftMoE by seq_len": dict(expert="timm", lucidrains={"seq_len": 32}),
}


def images(n, seed=0):
    return torch.randn(n, 1, 16, 16, generator=torch.Generator().manual_seed(seed))


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_convert_reproduces_the_users_model(variant):
    torch.manual_seed(1)
    net = UserNet(**VARIANTS[variant]).eval()
    x = images(6)
    with torch.no_grad():
        want = net(x)
    libraries = [type(m).__module__ for m in (net.blocks[0]["moe"], net.blocks[1]["moe"])]
    report = moe_prune.convert(net)
    assert [r["name"] for r in report] == ["blocks.0.moe", "blocks.1.moe"]
    assert all(isinstance(net.blocks[i]["moe"], SoftMoE) for i in (0, 1))
    assert libraries[1].startswith("soft_moe_pytorch") and report[1]["library"].startswith("soft-moe-pytorch")
    with torch.no_grad():
        got = net(x)
    assert rel(got, want) <= 1e-5


def _zeroed_library_output(layer, x, kept):
    """The library layer's own output with every expert outside `kept` returning zeros (drop mode's meaning)."""
    if hasattr(layer, "slot_embeds"):  # soft-moe-pytorch: experts(slots [b, e, s, d]) -> [b, e, s, d]
        def hook(module, args, out):
            mask = torch.zeros(out.shape[1], dtype=torch.bool)
            mask[kept] = True
            return out * mask[None, :, None, None]
        handle = layer.experts.register_forward_hook(hook)
    else:  # soft-moe: a list of expert modules; the dropped ones answer zeros
        originals = list(layer.experts)
        for e, expert in enumerate(originals):
            if e not in kept:
                expert.register_forward_hook(lambda m, a, out: torch.zeros_like(out))
        handle = None
    try:
        with torch.no_grad():
            return layer(x)
    finally:
        if handle is not None:
            handle.remove()


@pytest.mark.parametrize("which", [0, 1])
def test_a_pruned_converted_layer_is_the_library_layer_with_dropped_experts_zeroed(which):
    import copy

    torch.manual_seed(2)
    net = UserNet(**VARIANTS["ReLU Sequential + LayerNorm GEGLU SoftMoE"]).eval()
    library_layer = copy.deepcopy(net.blocks[which]["moe"])
    moe_prune.convert(net)
    layer = net.blocks[which]["moe"]
    x = torch.randn(3, 17, 32)
    kept = [1, 4, 9]
    with torch.no_grad():
        got = moe_prune.with_experts(layer, torch.tensor(kept))(x)
    assert rel(got, _zeroed_library_output(library_layer, x, kept)) <= 1e-5


def test_every_step_works_on_a_converted_user_model(tmp_path):
    from moe_prune.compression.healing import HealConfig
    from moe_prune.measurement.timing import BenchConfig, bench_models

    torch.manual_seed(3)
    net = UserNet().eval()
    moe_prune.convert(net)
    x = images(4, seed=9)
    batches = [images(64, seed=s) for s in range(3)]
    # scores and Algorithms 1 and 2
    routing = net.blocks[0]["moe"].route(torch.randn(2, 16, 32))
    assert torch.allclose(routing.scores.sum(-1), torch.full((2,), 16.0))
    alg1 = moe_prune.with_selection(net, "1/8", per="input")
    alg2 = moe_prune.with_selection(net, "1/8", per="batch")
    with torch.no_grad():
        assert alg1(x).shape == alg2(x).shape == (4, 10)
    # every calibration rule, then the default (loss) subsets, compressed and healed
    for rule in RULES:
        subsets, _ = choose_subsets(net, batches, "1/8", rule=rule)
        assert {name: len(s) for name, s in subsets.items()} == {"blocks.0.moe": 2, "blocks.1.moe": 2}
    subsets, _ = choose_subsets(net, batches, "1/8", rule="loss")
    small, record = compress_and_heal(net, subsets, batches, config=HealConfig(steps=30, held_out=0.0, max_epochs=0))  # few inputs: no guard, no cap
    assert record["loss_after"] < record["loss_before"]
    assert sum(p.numel() for p in small.parameters()) < 0.3 * sum(p.numel() for p in net.parameters())
    assert type(small) is UserNet
    # ONNX export and validation of the compressed model and of Algorithm 1 on the full one
    onnx_small = export_onnx(small, tmp_path / "small.onnx", example=x)
    assert moe_prune.validate_onnx(onnx_small, small).passed
    onnx_alg1 = export_onnx(alg1, tmp_path / "alg1.onnx", example=x, with_choice=True)
    assert moe_prune.validate_onnx(onnx_alg1, alg1).passed
    # bench's torch rows: the models side by side
    timed = bench_models({}, {"full": net, "compressed": small, "alg1": alg1}, lambda b: images(b),
                         BenchConfig(batch_sizes=(2,), warmup=1, rounds=1, iters_per_round=2, min_seconds=0),
                         progress=False)
    assert set(timed["torch"][2]) == {"full", "compressed", "alg1"}
    # the README's recipe: save, then load into a freshly built model of the user's own class
    path = moe_prune.save(small, tmp_path / "small.safetensors")
    fresh = moe_prune.load(path, model=UserNet())
    with torch.no_grad():
        assert torch.equal(fresh(x), small(x))
    # or: convert with the kept experts, then the user's own load_state_dict
    from safetensors.torch import load_file

    kept = {name: layer.config.origin for name, layer in moe_layers(small).items()}
    own = UserNet()
    moe_prune.convert(own, experts=kept)
    own.load_state_dict(load_file(path))
    with torch.no_grad():
        assert torch.equal(own.eval()(x), small(x))
    assert moe_prune.summary(path)["family"] == "module"
    with pytest.raises(moe_prune.CheckpointError, match="your own class"):
        moe_prune.load(path)


def test_convert_keeps_dtype_and_refuses_what_it_cannot_reproduce():
    torch.manual_seed(4)
    net = UserNet().to(torch.bfloat16).eval()
    moe_prune.convert(net)
    assert {p.dtype for p in net.parameters()} == {torch.bfloat16}
    with torch.no_grad():
        assert net(images(2).bfloat16()).dtype == torch.bfloat16

    sm = soft_moe_layer_module()

    class Residual(Mlp):  # two Linear layers and a GELU, but not a plain MLP
        def forward(self, x):
            return super().forward(x) + x

    class Swish(nn.Module):
        def __init__(self, width):
            super().__init__()
            self.fc1, self.act, self.fc2 = nn.Linear(width, 8), nn.SiLU(), nn.Linear(8, width)

    holder = nn.Module()
    holder.moe = sm.SoftMoELayerWrapper(dim=16, num_experts=4, slots_per_expert=1, layer=Residual, in_features=16,
                                        hidden_features=8)
    with pytest.raises(ConfigError, match="does not reproduce"):
        moe_prune.convert(holder)
    holder.moe = sm.SoftMoELayerWrapper(dim=16, num_experts=4, slots_per_expert=1, layer=Swish, width=16)
    with pytest.raises(ConfigError, match="SiLU"):
        moe_prune.convert(holder)
    with pytest.raises(ConfigError, match="no Soft MoE layer"):
        moe_prune.convert(nn.Sequential(nn.Linear(3, 3)))
    with pytest.raises(ConfigError, match="itself a library"):
        moe_prune.convert(soft_moe_pytorch().SoftMoE(dim=16, num_slots=1, num_experts=4))
