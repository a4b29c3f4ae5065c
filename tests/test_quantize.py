"""8-bit experts: int8 weights with per-output-channel scales, run by torch and exported to ONNX.

Oracles:
- the weights: |w - q * scale| <= scale / 2 for every element, q in [-127, 127] (checked in float64, not by
  calling the quantizer again);
- the int8 experts (float activations, every execution path forced by its policy): an MLP written here in float64
  from the int8 tensors and scales, dequantized by hand (within float32 rounding);
- with int8 activations (the exported graph's numerics): the float64 weight-only MLP, within the bound that
  rounding each activation to half an int8 step of its row allows; and the ONNX graph against them (validate_onnx);
- the integer matmul: int64 products;
- checkpoints: a save/load round trip gives the same int8 tensors and outputs; damaged files are refused in one
  line; `compress --quantize int8` stores the kept experts in about a quarter of the fp32 compressed file's
  expert bytes (exactly: one byte per weight plus four per scale).
"""

import copy
import json
import math
import struct

import numpy as np
import pytest
import torch

import moe_prune
from moe_prune.cli import main
from moe_prune.compression.compress import compress_model
from moe_prune.errors import CheckpointError, ConfigError, ExportError, SelectionError
from moe_prune.core.experts import CPU_POLICY, StackedExperts, set_policy
from moe_prune.core.mlp import int8_matmul, w8a8_linear
from moe_prune.onnx.export import export_onnx
from moe_prune.core.flops import model_cost
from moe_prune.compression.healing import HealConfig, heal
from moe_prune.core.layers import SoftMoE, SoftMoEConfig
from moe_prune.core.models import MnistConfig, MnistSoftMoE, SoftMoEViT, ViTConfig
from moe_prune.compression.quantize import QuantConfig, graph_numerics, quantize_, quantize_file, quantize_weights
from moe_prune.selection.scores import with_experts, with_selection
from moe_prune.onnx.validate import validate_onnx

pytestmark = pytest.mark.usefixtures("one_thread")

KINDS = ["gelu_mlp", "relu_mlp", "geglu"]
# Execution policies that force each path of int8 StackedExperts with float activations.
FULL_PATHS = {"batched": dict(dequant_limit=1 << 40), "tile by tile": dict(dequant_limit=0)}
SHARED_PATHS = {"gathered": dict(dequant_limit=1 << 40), "loop over kept": dict(dequant_limit=0, shared_loop=True),
                "gathered (no loop policy)": dict(dequant_limit=0, shared_loop=False)}
ROW_PATHS = {"gathered per row": dict(row_gather_limit=1 << 40),
             "padded": dict(row_gather_limit=0, loop_overhead=None),
             "padded to the batch": dict(row_gather_limit=0, loop_overhead=None, padded_capacity="batch"),
             "loop over used": dict(row_gather_limit=0, loop_overhead=0)}


def int8_experts(kind: str, bias: bool, E=7, D=20, H=13, D_out=11) -> StackedExperts:
    """A quantized stack from random float weights with non-trivial biases (a zero output channel included)."""
    layer = SoftMoE(SoftMoEConfig(dim=D, num_experts=E, slots_per_expert=1, hidden=H, expert=kind,
                                  expert_bias=bias, out_dim=D_out)).eval()
    with torch.no_grad():
        for p in layer.experts.parameters():
            p.add_(0.3 * torch.randn_like(p))
        layer.experts.w2[2, :, 3] = 0  # an all-zero channel: scale 0, q 0
    return quantize_(layer).experts


def gelu64(h):
    return 0.5 * h * (1 + torch.erf(h / math.sqrt(2)))


def mlp64(experts: StackedExperts, x: torch.Tensor, ids) -> torch.Tensor:
    """Rows x [R, N, D] through experts ids [R] in float64, dequantized by hand: act(x @ q1 s1 + b1) @ q2 s2 + b2."""
    out = []
    for r, e in enumerate(ids):
        w1 = experts.w1[e].double() * experts.w1_scale[e].double()  # [D, H1]
        w2 = experts.w2[e].double() * experts.w2_scale[e].double()  # [H, D_out]
        h = x[r].double() @ w1
        if experts.b1 is not None:
            h = h + experts.b1[e].double()
        if experts.kind == "gelu_mlp":
            h = gelu64(h)
        elif experts.kind == "relu_mlp":
            h = h.clamp_min(0)
        else:
            half = h.shape[-1] // 2
            h = h[:, :half] * gelu64(h[:, half:])
        y = h @ w2
        if experts.b2 is not None:
            y = y + experts.b2[e].double()
        out.append(y)
    return torch.stack(out)


def close64(out: torch.Tensor, ref: torch.Tensor) -> None:
    """Within float32 rounding of a two-matmul MLP (relative to the output's size)."""
    torch.testing.assert_close(out.double(), ref, atol=2e-6 * ref.abs().max().item(), rtol=1e-5)


# -- the weights -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_quantization_error_is_at_most_half_a_step(dtype):
    w = (torch.randn(5, 33, 17) * torch.logspace(-3, 1, 17)).to(dtype)  # channels of very different sizes
    w[1, :, 4] = 0
    q, s = quantize_weights(w)
    assert q.dtype == torch.int8 and s.dtype == dtype and s.shape == (5, 17)
    assert int(q.min()) >= -127 and int(q.max()) <= 127
    err = (w.double() - q.double() * s.double().unsqueeze(1)).abs()
    assert bool((err <= s.double().unsqueeze(1) / 2).all())
    assert bool((s[1, 4] == 0) & (q[1, :, 4] == 0).all())
    nonzero = w.double().abs().amax(1) > 0
    assert bool((q.abs().amax(1)[nonzero] >= 126).all())  # the largest weight of a channel uses the whole range


def test_int8_matmul_is_exact():
    for a_shape, w_shape in [((1, 49), (49, 196)), ((5, 1100), (1100, 3)), ((4, 3, 17), (4, 17, 6))]:
        a = torch.randint(-127, 128, a_shape, dtype=torch.int8)
        w = torch.randint(-127, 128, w_shape, dtype=torch.int8)
        want = (a.long() @ w.long())
        got = int8_matmul(a, w)
        assert got.dtype == torch.int32 and torch.equal(got.long(), want)
        # the float path (other devices) is exact too, by the bound on the sums
        dtype = torch.float32 if a_shape[-1] * 127 * 127 < 2**24 else torch.float64
        assert torch.equal(torch.matmul(a.to(dtype), w.to(dtype)).to(torch.int32).long(), want)


# -- the experts, every execution path ---------------------------------------------------------------------------


@pytest.mark.parametrize("path", sorted(FULL_PATHS))
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("kind", KINDS)
def test_all_experts_equal_float64_dequantized(kind, bias, path):
    experts = set_policy(int8_experts(kind, bias), CPU_POLICY, **FULL_PATHS[path])
    x = torch.randn(7, 5, 20)
    with torch.no_grad():
        out = experts(x)
    close64(out, mlp64(experts, x, range(7)))


@pytest.mark.parametrize("path", sorted(SHARED_PATHS))
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("kind", KINDS)
def test_shared_subset_equals_float64_dequantized(kind, bias, path):
    experts = set_policy(int8_experts(kind, bias), CPU_POLICY, **SHARED_PATHS[path])
    idx = torch.tensor([5, 0, 2])
    x = torch.randn(3, 4, 20)
    with torch.no_grad():
        out = experts(x, idx)
        empty = experts(x[:0], idx[:0])
    close64(out, mlp64(experts, x, idx.tolist()))
    assert empty.shape == (0, 4, 11)


@pytest.mark.parametrize("path", sorted(ROW_PATHS))
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("kind", KINDS)
def test_per_input_rows_equal_float64_dequantized(kind, bias, path):
    experts = set_policy(int8_experts(kind, bias), CPU_POLICY, **ROW_PATHS[path])
    idx = torch.tensor([3, 1, 3, 6, 0, 1, 3])  # experts used by several rows
    x = torch.randn(7, 2, 20)
    with torch.no_grad():
        out = experts.grouped(x, idx, capacity=3)
    close64(out, mlp64(experts, x, idx.tolist()))


def test_compressed_layer_equals_its_float64_dequantized_twin():
    """The whole Soft MoE layer (routing, drop mode, a compressed layer's held experts, per-input subsets): the
    int8 layer equals a float64 float layer holding the dequantized weights."""
    layer = SoftMoE(SoftMoEConfig(dim=16, num_experts=9, slots_per_expert=2, hidden=24, held=(1, 4, 5, 7))).eval()
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(0.2 * torch.randn_like(p))
    q = quantize_(copy.deepcopy(layer))
    twin = copy.deepcopy(layer).double()
    with torch.no_grad():
        twin.experts.w1.copy_(q.experts.w1.double() * q.experts.w1_scale.double().unsqueeze(1))
        twin.experts.w2.copy_(q.experts.w2.double() * q.experts.w2_scale.double().unsqueeze(1))
        x = torch.randn(3, 10, 16)
        for experts in (None, torch.tensor([4, 7]), torch.tensor([[1, 4], [5, 7], [1, 7]])):
            close64(q(x, experts=experts), twin(x.double(), experts=experts))


# -- int8 activations (the exported graph's numerics) -------------------------------------------------------------


@pytest.mark.parametrize("bias", [True, False])
def test_int8_activations_stay_within_half_a_step_of_each_row(bias):
    """One linear with activations rounded per row: |y - y64| <= (scale_row / 2) * sum_i |w_ij| (+ rounding)."""
    experts = int8_experts("relu_mlp", bias)
    x = torch.randn(7, 5, 20) * torch.logspace(-2, 1, 5).view(1, 5, 1)  # rows of very different sizes
    x[0, 1] = 0  # an all-zero row
    b1 = experts.b1
    y = w8a8_linear(x, experts.w1, experts.w1_scale, b1)
    w = experts.w1.double() * experts.w1_scale.double().unsqueeze(1)  # [E, D, H]
    ref = x.double() @ w + (0 if b1 is None else b1.double().unsqueeze(1))
    half_step = x.double().abs().amax(-1, keepdim=True) / 127 / 2  # [E, N, 1]
    bound = half_step * w.abs().sum(1, keepdim=True) + 1e-5 * ref.abs() + 1e-6  # [E, N, H]
    assert bool(((y.double() - ref).abs() <= bound).all())
    assert bool((y[0, 1] == (0 if b1 is None else b1[0])).all())


def test_graph_numerics_follow_the_graph_and_switch_back():
    """Experts of at least graph_int8_min weights get int8 activations in a graph (and under graph_numerics);
    smaller ones keep float activations there, as in eager torch."""
    layer = SoftMoE(SoftMoEConfig(dim=8, num_experts=4, slots_per_expert=1, hidden=6)).eval()
    quantize_(layer)
    x = torch.randn(2, 5, 8)
    with torch.no_grad():
        plain = layer(x)
        with graph_numerics(layer):
            small = layer(x)
        set_policy(layer, CPU_POLICY, graph_int8_min=layer.experts.weights_per_expert)
        with graph_numerics(layer):
            large = layer(x)
        again = layer(x)
    assert torch.equal(plain, small) and torch.equal(plain, again) and not torch.equal(plain, large)
    assert layer.experts.int8_activations is None


# -- checkpoints ---------------------------------------------------------------------------------------------------


def tiny_vit(**moe) -> SoftMoEViT:
    return SoftMoEViT(ViTConfig(img_size=16, patch_size=4, in_chans=1, num_classes=5, embed_dim=32, depth=2,
                                num_heads=2, mlp_ratio=2.0, moe_layer_index=1, num_experts=6))


def test_save_load_round_trip(tmp_path):
    model = tiny_vit().eval()
    small = quantize_(compress_model(model, {"blocks.1.mlp": torch.tensor([0, 2, 5])}))
    path = moe_prune.save(small, tmp_path / "small.int8.safetensors")
    back = moe_prune.load(path)
    for (name, a), (name_b, b) in zip(small.state_dict().items(), back.state_dict().items()):
        assert name == name_b and a.dtype == b.dtype and torch.equal(a, b), name
    assert back.blocks[1].mlp.experts.w1.dtype == torch.int8
    assert back.blocks[1].mlp.config.quant == "int8"
    assert not any(p.requires_grad for p in back.parameters())  # inference-only
    x = torch.rand(3, 1, 16, 16)
    with torch.no_grad():
        assert torch.equal(small(x), back(x))
    spec = moe_prune.summary(path)
    assert spec["moe_layers"][0]["quant"] == "int8"
    assert "quant" not in moe_prune.summary(moe_prune.save(model, tmp_path / "f.safetensors"))["config"]


def _rewrite(path, change_header=None, change_record=None, patch=None):
    """A copy of a safetensors file with its header or metadata record changed, or bytes of a tensor patched."""
    data = bytearray(path.read_bytes())
    n = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8:8 + n])
    body = data[8 + n:]
    if change_record:
        record = json.loads(header["__metadata__"]["moe_prune"])
        change_record(record)
        header["__metadata__"]["moe_prune"] = json.dumps(record)
    if change_header:
        change_header(header)
    if patch:
        name, value = patch
        begin = header[name]["data_offsets"][0]
        body[begin:begin + len(value)] = value
    text = json.dumps(header).encode()
    out = path.with_name("bad-" + path.name)
    out.write_bytes(struct.pack("<Q", len(text)) + text + bytes(body))
    return out


@pytest.mark.parametrize("case", ["float file says int8", "int8 file says float", "weights not int8", "minus 128",
                                  "negative scale"])
def test_inconsistent_files_are_refused_in_one_line(tmp_path, case):
    model = MnistSoftMoE(MnistConfig(num_experts=4)).eval()
    plain = moe_prune.save(model, tmp_path / "f.safetensors")
    q = moe_prune.save(quantize_(copy.deepcopy(model)), tmp_path / "q.safetensors")
    set_quant = lambda value: lambda r: r["spec"]["moe"]["moe"].update(quant=value)  # noqa: E731
    bad = {
        "float file says int8": lambda: _rewrite(plain, change_record=set_quant("int8")),
        "int8 file says float": lambda: _rewrite(q, change_record=lambda r: r["spec"]["moe"]["moe"].pop("quant")),
        # same bytes per element, another kind of number: U8 for I8
        "weights not int8": lambda: _rewrite(q, change_header=lambda h: h["moe.experts.w1"].update(dtype="U8")),
        "minus 128": lambda: _rewrite(q, patch=("moe.experts.w2", b"\x80")),
        "negative scale": lambda: _rewrite(q, patch=("moe.experts.w1_scale", struct.pack("<f", -1.0))),
    }[case]()
    with pytest.raises(CheckpointError) as e:
        moe_prune.load(bad)
    assert str(bad) in str(e.value) and "\n" not in str(e.value)
    for value in ("int4", 8, ["int8"]):
        with pytest.raises(CheckpointError, match="quant"):
            moe_prune.load(_rewrite(plain, change_record=set_quant(value)))


# -- the commands ------------------------------------------------------------------------------------------------


@pytest.fixture()
def workspace(tmp_path):
    model = MnistSoftMoE(MnistConfig(num_experts=16)).eval()
    moe_prune.save(model, tmp_path / "tiny.safetensors")
    np.save(tmp_path / "calib.npy", (np.random.default_rng(0).random((48, 28, 28)) * 255).astype(np.uint8))
    return tmp_path


def test_cli_compress_quantize_stores_a_quarter_of_the_expert_bytes(workspace, capsys):
    ws = workspace
    common = ["compress", str(ws / "tiny.safetensors"), "--keep", "1/4", "--calib", str(ws / "calib.npy"),
              "--rule", "mass"]
    assert main(common + ["--out", str(ws / "f.safetensors")]) == 0
    assert main(common + ["--quantize", "int8", "--out", str(ws / "q.safetensors")]) == 0
    assert "int8 with per-channel scales" in capsys.readouterr().out
    f, q = moe_prune.summary(ws / "f.safetensors"), moe_prune.summary(ws / "q.safetensors")
    assert f["meta"]["kept_experts"] == q["meta"]["kept_experts"]  # the same calibration chose the same experts
    weights = 4 * (196 * 49 + 49 * 196)  # 4 kept experts, no biases
    scales = 4 * (49 + 196)
    assert f["expert_bytes"] == 4 * weights
    assert q["expert_bytes"] == weights + 4 * scales  # a quarter, plus one float per output channel
    assert 0.25 < q["expert_bytes"] / f["expert_bytes"] < 0.27
    assert q["meta"]["quantize"]["kind"] == "int8"
    # the same from the fp32 compressed checkpoint, quantized as it is: the same file contents
    assert main(["compress", str(ws / "f.safetensors"), "--quantize", "int8", "--out", str(ws / "q2.safetensors")]) == 0
    a, b = moe_prune.load(ws / "q.safetensors"), moe_prune.load(ws / "q2.safetensors")
    for (k, ta), tb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(ta, tb), k
    # and it exports, validated against torch with the graph's numerics, with the int8 weights in the file
    assert main(["export", str(ws / "q.safetensors"), "--out", str(ws / "q.onnx")]) == 0
    assert "PASSED" in capsys.readouterr().out
    import onnx

    graph = onnx.load(str(ws / "q.onnx")).graph
    int8 = sum(math.prod(t.dims) for t in graph.initializer if t.data_type == onnx.TensorProto.INT8)
    floats = sum(math.prod(t.dims) for t in graph.initializer if t.data_type == onnx.TensorProto.FLOAT)
    assert int8 == weights and floats < weights  # experts of 19K weights: float activations, int8 weights cast
    assert (ws / "q.onnx").stat().st_size < 0.4 * (ws / "f.onnx").stat().st_size if (ws / "f.onnx").exists() else True


def test_cli_heal_in_float_then_quantize(workspace, capsys):
    """--heal --quantize int8: healed in float (its record is there), the healed experts quantized last."""
    ws = workspace
    assert main(["compress", str(ws / "tiny.safetensors"), "--keep", "1/4", "--calib", str(ws / "calib.npy"), "--rule",
                 "mass", "--heal", "--heal-steps", "3", "--quantize", "int8", "--out", str(ws / "h.safetensors")]) == 0
    meta = moe_prune.summary(ws / "h.safetensors")["meta"]
    assert meta["heal"]["config"]["steps"] == 3 and meta["quantize"]["kind"] == "int8"
    assert moe_prune.load(ws / "h.safetensors").moe.experts.w1.dtype == torch.int8


@pytest.mark.parametrize("args,match", [
    (["compress", "q.safetensors", "--quantize", "int8", "--out", "again.safetensors"], "already int8"),
    (["compress", "q.safetensors", "--calib", "calib.npy", "--out", "again.safetensors"], "float model"),
    (["compress", "q.safetensors", "--calib", "calib.npy", "--heal", "--out", "again.safetensors"], "float model"),
    (["compress", "tiny.safetensors", "--out", "again.safetensors"], "--calib is required"),
    (["compress", "tiny.safetensors", "--quantize", "int8", "--keep", "2", "--out", "again.safetensors"], "--keep"),
    (["export", "q.safetensors", "--dtype", "fp16", "--out", "q16.onnx"], "fp32"),
    (["export", "q.safetensors", "--exporter", "dynamo", "--out", "qd.onnx"], "TorchScript"),
])
def test_cli_refusals_are_one_line(workspace, monkeypatch, capsys, args, match):
    monkeypatch.chdir(workspace)
    assert main(["compress", "tiny.safetensors", "--quantize", "int8", "--out", "q.safetensors"]) == 0
    capsys.readouterr()
    before = sorted(p.name for p in workspace.iterdir())
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("moe-prune: error:") and match in err[0], err
    assert sorted(p.name for p in workspace.iterdir()) == before


def test_quantizing_twice_compressing_and_healing_are_refused(tmp_path):
    teacher = MnistSoftMoE(MnistConfig(num_experts=8)).eval()
    small = quantize_(compress_model(teacher, {"moe": torch.tensor([1, 2, 6])}))
    with pytest.raises(ConfigError, match="already int8"):
        quantize_(small)
    with pytest.raises(ConfigError, match="already int8"):
        quantize_file(moe_prune.save(small, tmp_path / "q.safetensors"), tmp_path / "qq.safetensors")
    with pytest.raises(SelectionError, match="float model"):
        compress_model(small, {"moe": torch.tensor([1, 2])})
    with pytest.raises(ConfigError, match="inference-only"):
        heal(small, teacher, torch.rand(32, 1, 28, 28), HealConfig(steps=2, batch_size=8, held_out=0.0),
             progress=False)
    with pytest.raises(ConfigError, match="int4"):
        quantize_(copy.deepcopy(teacher), QuantConfig("int4"))


# -- ONNX --------------------------------------------------------------------------------------------------------


GRAPH_FORMS = {"int8 activations": 0, "float activations": 1 << 40}  # ExecutionPolicy.graph_int8_min


@pytest.mark.parametrize("form", sorted(GRAPH_FORMS))
@pytest.mark.parametrize("variant", ["full", "static", "alg2", "alg1"])
def test_onnx_export_validates(tmp_path, variant, form):
    """Full, static subset, Algorithm 2 and Algorithm 1 graphs of an int8 ViT, in both graph forms (integer
    matmuls on int8 activation rows; float activations with the weights cast): ONNX Runtime against torch with the
    graph's numerics, at the fp32 tolerance. The file holds the experts as int8 only."""
    model = tiny_vit().eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    set_policy(quantize_(model), CPU_POLICY, graph_int8_min=GRAPH_FORMS[form])
    wrapped = {"full": model, "static": with_experts(model, {"blocks.1.mlp": torch.tensor([1, 4])}),
               "alg2": with_selection(model, 2), "alg1": with_selection(model, 2, per="input")}[variant]
    path = export_onnx(wrapped, tmp_path / "m.onnx", with_choice=variant in ("alg1", "alg2"))
    report = validate_onnx(path, wrapped, atol=1e-4, rtol=1e-3)
    assert report.passed and all(c.choice_match is not False for c in report.checks)
    assert (report.ops.get("MatMulInteger", 0) >= 2) == (form == "int8 activations")
    import onnx

    graph = onnx.load(str(path)).graph
    int8 = sum(math.prod(t.dims) for t in graph.initializer if t.data_type == onnx.TensorProto.INT8)
    floats = sum(math.prod(t.dims) for t in graph.initializer if t.data_type == onnx.TensorProto.FLOAT)
    expert_weights = model.blocks[1].mlp.experts.w1.numel() + model.blocks[1].mlp.experts.w2.numel()
    assert int8 >= (2 if variant == "static" else 6) * expert_weights // 6  # every expert of the stack, or the kept 2
    float_state = sum(t.numel() for t in model.state_dict().values() if t.is_floating_point())
    assert floats < float_state + expert_weights // 2  # no float copy of the experts
    assert not any(o.domain == "moe_prune" for o in onnx.load(str(path)).opset_import)


def test_int8_bytes_in_the_cost_model():
    model = MnistSoftMoE(MnistConfig(num_experts=8)).eval()
    full = model_cost(model)
    q = model_cost(quantize_(copy.deepcopy(model)))
    weights = 8 * 2 * 196 * 98
    scales = 8 * (98 + 196)
    assert q.total_params == full.total_params + scales
    assert q.total_weight_bytes() == full.total_weight_bytes() - 4 * weights + weights + 4 * scales
    assert q.total_flops == full.total_flops


def test_bench_takes_an_int8_checkpoint_of_its_own_source_only(tmp_path):
    """`bench FULL --compressed SMALL.int8`: the int8 experts are the full model's kept rows, quantized."""
    from moe_prune.measurement.bench import check_compressed_from

    torch.manual_seed(0)
    full_path = moe_prune.save(MnistSoftMoE(MnistConfig(num_experts=8)), tmp_path / "m.safetensors")
    full = moe_prune.load(full_path)
    small_path = moe_prune.save(compress_model(full, {"moe": torch.tensor([1, 5])}), tmp_path / "s.safetensors")
    int8_path = tmp_path / "s.int8.safetensors"
    quantize_file(small_path, int8_path, "int8")
    check_compressed_from(full, moe_prune.load(int8_path), full_path, int8_path)  # accepted
    other = moe_prune.load(full_path)
    with torch.no_grad():
        other.moe.experts.w1[5, 0, 0] += 1.0  # one weight of a kept expert
    with pytest.raises(CheckpointError, match="weights differ"):
        check_compressed_from(other, moe_prune.load(int8_path), full_path, int8_path)
