"""One verb per stage: `compress(model, calib, CompressConfig)` and `export(model, path, ExportConfig)` give exactly
what the steps they stand for give (the same subsets, weights, outputs and records), and refuse what those refuse."""

import pytest
import torch

import moe_prune as mp
from moe_prune.compression.compress import compress_and_heal, compress_model, kept_record
from moe_prune.compression.quantize import quantize_
from moe_prune.core.models import MnistConfig, MnistSoftMoE
from moe_prune.errors import SelectionError
from moe_prune.selection.calibration import choose_subsets

E = 8


def mnist(seed=0):
    torch.manual_seed(seed)
    m = MnistSoftMoE(MnistConfig(num_experts=E)).eval()
    with torch.no_grad():
        m.moe.scale.fill_(4.0)
        m.head.weight.normal_(0, 1.0)
    return m


def batches(seed=0, sizes=(24, 16)):
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(n, 1, 28, 28, generator=g) for n in sizes]


def same_model(a, b, x):
    with torch.no_grad():
        assert torch.equal(a(x), b(x))
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("rule", ["mass", "output", "loss"])
def test_compress_is_choose_subsets_then_compress_model(rule):
    model, calib, x = mnist(), batches(), batches(1)[0]
    small, record = mp.compress(model, calib, mp.CompressConfig(keep="1/4", rule=rule))
    subsets, chosen = choose_subsets(model, calib, "1/4", rule=rule)
    same_model(small, compress_model(model, subsets), x)
    assert record == {"keep": "1/4", **chosen, "mode": "drop", "kept_experts": kept_record(small)}
    assert record["kept_experts"]["moe"] == subsets["moe"].tolist()


def test_compress_heals_as_compress_and_heal_does():
    model, calib, x = mnist(), batches(), batches(1)[0]
    heal = mp.HealConfig(steps=6, batch_size=16, lr=1e-3, parts="experts+router")
    small, record = mp.compress(model, calib, mp.CompressConfig(keep=2, rule="mass", mode="renorm", heal=heal))
    subsets, _ = choose_subsets(model, calib, 2, rule="mass")
    ref, healed = compress_and_heal(model, subsets, calib, mode="renorm", config=heal, progress=False)
    same_model(small, ref, x)
    timed = ("seconds",)  # wall-clock time differs run to run; every other fact of the heal must match
    assert {k: v for k, v in record["heal"].items() if k not in timed} == {k: v for k, v in healed.items() if k not in timed}
    assert record["mode"] == "renorm"


def test_compress_quantizes_last():
    model, calib, x = mnist(), batches(), batches(1)[0]
    small, record = mp.compress(model, calib, mp.CompressConfig(keep=2, rule="mass", quantize="int8"))
    subsets, _ = choose_subsets(model, calib, 2, rule="mass")
    same_model(small, quantize_(compress_model(model, subsets), mp.QuantConfig()), x)
    assert record["quantize"] == mp.QuantConfig().record()
    assert small.moe.experts.w1.dtype == torch.int8


def test_compress_refuses_what_its_steps_refuse():
    model, calib = mnist(), batches()
    with pytest.raises(SelectionError, match="keep"):
        mp.compress(model, calib, mp.CompressConfig(keep=E + 1))
    with pytest.raises(SelectionError, match="rule"):
        mp.compress(model, calib, mp.CompressConfig(rule="largest"))
    int8 = quantize_(compress_model(model, {"moe": torch.arange(4)}), mp.QuantConfig())
    with pytest.raises(SelectionError, match="int8"):
        mp.compress(int8, calib, mp.CompressConfig(keep=2, rule="mass"))


def test_export_writes_and_validates(tmp_path):
    model = mp.with_selection(mnist(), "1/4", per="batch")
    path, report = mp.export(model, tmp_path / "m.onnx")
    assert path == tmp_path / "m.onnx" and path.is_file()
    assert report.passed and "PASSED" in report.format()
    again, none = mp.export(model, tmp_path / "n.onnx", mp.ExportConfig(validate=False, dynamic_batch=False))
    assert none is None and again.is_file()
