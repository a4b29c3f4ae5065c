"""ONNX export and validation: every model kind, full / static subset / Algorithm 2 in the graph, both modes.

The oracle is the PyTorch model itself, run on fresh random batches of two batch sizes that differ from the one
the graph was traced with; the expert choice of the Algorithm 2 graph is checked against select_experts applied
by hooks to each layer's real input. Models are tiny: the suite shares two CPU cores.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

import moe_prune

from moe_prune import (
    ExportError,
    MnistConfig,
    MnistSoftMoE,
    PrunedSoftMoE,
    SoftMoE,
    SoftMoEConfig,
    SoftMoEViT,
    ViTConfig,
    expert_scores,
    select_experts,
    with_experts,
    with_selection,
)
from moe_prune.cli import main
from moe_prune.onnx.export import example_input, export_onnx
from moe_prune.onnx.files import check_external_data, op_histogram
from moe_prune.onnx.validate import validate_onnx

# float32 graph against float32 torch; the errors seen are ~1e-9 (MNIST) to ~5e-7 (ViT).
ATOL, RTOL = 1e-5, 1e-4


pytestmark = pytest.mark.usefixtures("one_thread")


def _mnist():
    torch.manual_seed(1)
    return MnistSoftMoE(MnistConfig(num_experts=16)).eval()


def _vit():
    torch.manual_seed(2)
    return SoftMoEViT(ViTConfig(num_experts=8, moe_layer_index=1, img_size=28, patch_size=7, in_chans=1,
                                num_classes=10, embed_dim=32, depth=2, num_heads=2)).eval()


def _layer(held=None):
    torch.manual_seed(3)
    cfg = SoftMoEConfig(dim=16, num_experts=8, slots_per_expert=2, hidden=8, expert="geglu", held=held)
    return SoftMoE(cfg).eval()


BUILD = {"mnist": _mnist, "vit": _vit, "layer": _layer}
STATIC = {"mnist": {"moe": [1, 3, 5, 9]}, "vit": {"blocks.1.mlp": [0, 5]}, "layer": [2, 5]}


def _variant(family: str, variant: str, mode: str):
    model = BUILD[family]()
    if variant == "static":
        ids = STATIC[family]
        experts = {k: torch.tensor(v) for k, v in ids.items()} if isinstance(ids, dict) else torch.tensor(ids)
        return with_experts(model, experts, mode=mode)
    if variant == "dynamic":
        return with_selection(model, "1/4", per="batch", mode=mode)
    if variant == "per_input":
        return with_selection(model, "1/4", per="input", mode=mode)
    return model


def _run(path, x: torch.Tensor) -> dict[str, np.ndarray]:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(None, {"input": x.numpy()})))


def _files(folder: Path) -> list[str]:
    return sorted(os.listdir(folder))


CASES = [(f, "full", "drop") for f in BUILD] + [
    (f, v, m) for f in BUILD for v in ("static", "dynamic", "per_input") for m in ("drop", "renorm")
]


@pytest.mark.parametrize("family,variant,mode", CASES, ids=["-".join(c) for c in CASES])
def test_onnx_matches_torch(tmp_path, family, variant, mode):
    model = _variant(family, variant, mode)
    path = export_onnx(model, tmp_path / "model.onnx", with_choice=variant != "full")
    assert _files(tmp_path) == ["model.onnx"]  # self-contained, no temporary left behind
    graph = onnx.load(str(path))
    assert [i.name for i in graph.graph.input] == ["input"] and graph.graph.output[0].name == "output"
    assert graph.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    ops = op_histogram(path)
    assert "Einsum" not in ops and ops.get("MatMul", 0) >= 3
    assert ("TopK" in ops) == (variant in ("dynamic", "per_input"))

    gen = torch.Generator().manual_seed(4)
    for batch in (1, 3):  # neither is the traced batch size (2)
        x = example_input(model, batch, generator=gen)
        with torch.no_grad():
            ref = model(x)
        torch.testing.assert_close(torch.from_numpy(_run(path, x)["output"]), ref, atol=ATOL, rtol=RTOL)

    report = validate_onnx(path, model, atol=1e-4)
    assert report.passed and [c.batch_size for c in report.checks] == [1, 4]
    assert all(c.max_abs <= 1e-4 for c in report.checks)
    assert all(c.choice_match is (None if variant == "full" else True) for c in report.checks)
    assert "PASSED" in report.format()


def _torch_choices(model, keep, x) -> dict[str, torch.Tensor]:
    """Algorithm 2 computed in PyTorch from each pruned layer's actual input, by hooks."""
    chosen = {}

    def hook(name):
        def fn(pruned, args):
            chosen[name] = select_experts(expert_scores(pruned.layer, args[0]), keep, per="batch")
        return fn

    layers = {name: m for name, m in model.named_modules() if isinstance(m, PrunedSoftMoE)}
    handles = [m.register_forward_pre_hook(hook(name)) for name, m in layers.items()]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in handles:
            h.remove()
    return chosen


@pytest.mark.parametrize("family", ["mnist", "vit"])
def test_graph_choice_equals_torch_algorithm2(tmp_path, family):
    model = with_selection(BUILD[family](), "1/4", per="batch")
    path = export_onnx(model, tmp_path / "alg2.onnx", with_choice=True)
    gen = torch.Generator().manual_seed(5)
    seen = set()
    for batch in (1, 1, 5, 5):
        # Inputs that move an untrained model's routing: on uniform noise every batch picks the same experts.
        # MNIST: sparse strokes; the tiny ViT's tokens are dominated by its position embedding, so wide noise.
        x = example_input(model, batch, generator=gen)
        if family == "mnist":
            x = x * (torch.rand(x.shape, generator=gen) < 0.05)
        else:
            x = 3 * torch.randn(x.shape, generator=gen)
        got = _run(path, x)
        want = _torch_choices(model, "1/4", x)
        assert want and sorted(f"experts.{n}" for n in want) == sorted(k for k in got if k != "output")
        for name, ids in want.items():
            assert got[f"experts.{name}"].tolist() == ids.tolist()
            seen.add(tuple(ids.tolist()))
    assert len(seen) > 1  # the choice really depends on the batch


def test_static_subset_file_holds_only_kept_experts(tmp_path):
    model = _mnist()
    full = export_onnx(model, tmp_path / "full.onnx")
    small = export_onnx(with_experts(model, {"moe": torch.tensor([1, 3, 5, 9])}), tmp_path / "small.onnx")
    # The experts are ~98% of MNIST's weights; 4 of 16 kept (constant folding gathered them at export).
    assert small.stat().st_size < 0.4 * full.stat().st_size


def test_compressed_layer_exports(tmp_path):
    layer = _layer(held=(1, 4, 6))  # holds 3 of 8 router experts
    x = torch.randn(3, 16, 16)
    for name, model in [
        ("held", layer),  # experts=None: runs its held experts
        ("static", with_experts(layer, torch.tensor([4, 6]))),
        ("dynamic", with_selection(layer, 2, per="batch")),  # Algorithm 2 among the held experts
    ]:
        path = export_onnx(model, tmp_path / f"{name}.onnx")
        with torch.no_grad():
            ref = model(x)
        torch.testing.assert_close(torch.from_numpy(_run(path, x)["output"]), ref, atol=ATOL, rtol=RTOL)
        assert validate_onnx(path, model).passed


def test_dynamo_exporter_alg2_and_determinism(tmp_path):
    model = with_selection(_mnist(), "1/4", per="batch")
    a = export_onnx(model, tmp_path / "a.onnx", dynamo=True, with_choice=True)
    b = export_onnx(model, tmp_path / "b.onnx", dynamo=True, with_choice=True)
    assert a.read_bytes() == b.read_bytes()  # node stack traces (paths, FX counters) are stripped
    report = validate_onnx(a, model)
    assert report.passed and all(c.choice_match for c in report.checks)
    assert "Einsum" not in report.ops and "TopK" in report.ops
    assert onnx.load(str(a)).graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"


def test_dynamo_exports_a_subset_of_a_compressed_layer(tmp_path):
    model = with_experts(_layer(held=(1, 4, 6)), torch.tensor([4, 6]))
    path = export_onnx(model, tmp_path / "d.onnx", dynamo=True)
    assert validate_onnx(path, model).passed


def test_torchscript_export_is_deterministic(tmp_path):
    model = with_selection(_vit(), "1/4", per="batch")
    a = export_onnx(model, tmp_path / "a.onnx", with_choice=True)
    torch.manual_seed(123)  # the global RNG state must not leak into the file
    b = export_onnx(model, tmp_path / "b.onnx", with_choice=True)
    assert a.read_bytes() == b.read_bytes()


def test_external_data_beside_model(tmp_path):
    model = with_selection(_mnist(), "1/4")
    path = export_onnx(model, tmp_path / "big.onnx", embed_limit_bytes=0, with_choice=True)
    assert _files(tmp_path) == ["big.onnx", "big.onnx.data"]
    proto = onnx.load(str(path), load_external_data=False)
    locations = {e.value for t in proto.graph.initializer for e in t.external_data if e.key == "location"}
    assert locations == {"big.onnx.data"}  # the bare name: the pair can be moved together
    assert check_external_data(path) == ["big.onnx.data"]
    moved = tmp_path / "moved"
    moved.mkdir()
    for f in ("big.onnx", "big.onnx.data"):
        os.replace(tmp_path / f, moved / f)
    report = validate_onnx(moved / "big.onnx", model)
    assert report.passed and report.data_files == ["big.onnx.data"] and "big.onnx.data" in report.format()


def _point_data_at(path: Path, location: str) -> None:
    proto = onnx.load(str(path), load_external_data=False)
    for t in proto.graph.initializer:
        for e in t.external_data:
            if e.key == "location":
                e.value = location
    path.write_bytes(proto.SerializeToString())


@pytest.mark.parametrize("location", ["../outside.data", "/etc/passwd", "sub/../../outside.data", "link.data"])
def test_external_data_outside_folder_refused(tmp_path, location):
    model = _layer()
    folder = tmp_path / "m"
    folder.mkdir()
    path = export_onnx(model, folder / "m.onnx", embed_limit_bytes=0)
    (tmp_path / "outside.data").write_bytes((folder / "m.onnx.data").read_bytes())
    (folder / "link.data").symlink_to(tmp_path / "outside.data")  # a link out of the folder
    _point_data_at(path, location)
    with pytest.raises(ExportError, match="outside the model's folder"):
        check_external_data(path)
    with pytest.raises(ExportError, match="outside the model's folder"):
        validate_onnx(path, model)


def test_missing_external_data_named(tmp_path):
    path = export_onnx(_layer(), tmp_path / "m.onnx", embed_limit_bytes=0)
    (tmp_path / "m.onnx.data").unlink()
    with pytest.raises(ExportError, match="m.onnx.data.*missing"):
        check_external_data(path)


@pytest.mark.parametrize("content", [b"", b"this is not an ONNX model\n", b"\x80\x04\x95 pickle"])
def test_not_onnx_refused(tmp_path, content):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(content)
    with pytest.raises(ExportError, match="bad.onnx.*not an ONNX model"):
        check_external_data(bad)
    with pytest.raises(ExportError, match="bad.onnx"):
        validate_onnx(bad, _layer())
    with pytest.raises(ExportError, match="no such file"):
        check_external_data(tmp_path / "absent.onnx")


def test_failed_write_leaves_nothing_behind(tmp_path, monkeypatch):
    from moe_prune.onnx import files as onnx_files

    model = _mnist()
    old = tmp_path / "m.onnx"
    old.write_bytes(b"previous export")

    def broken(proto, data_path, location):  # fail halfway through the data file
        Path(data_path).write_bytes(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(onnx_files, "_externalize", broken)
    with pytest.raises(Exception, match="No space left"):
        export_onnx(model, old, embed_limit_bytes=0)
    assert _files(tmp_path) == ["m.onnx"] and old.read_bytes() == b"previous export"

    def exporter_crash(*args, **kwargs):  # the exporter dies after writing part of its file
        Path(args[2]).write_bytes(b"half a model")
        raise RuntimeError("exporter crashed")

    monkeypatch.setattr(torch.onnx, "export", exporter_crash)
    with pytest.raises(ExportError, match="exporter crashed"):
        export_onnx(model, old)
    assert _files(tmp_path) == ["m.onnx"] and old.read_bytes() == b"previous export"


def test_validation_catches_a_wrong_graph(tmp_path):
    model = _vit()
    path = export_onnx(model, tmp_path / "m.onnx")
    other = _vit()
    with torch.no_grad():
        other.head.bias.add_(0.01)  # every logit off by 0.01
    with pytest.raises(ExportError, match="differs from PyTorch.*--atol"):
        validate_onnx(path, other)
    report = validate_onnx(path, other, check=False)
    assert not report.passed and "FAIL" in report.format()
    assert validate_onnx(path, other, atol=1.0).passed  # loosened


def test_fixed_batch_and_bad_options(tmp_path):
    model = _layer()
    path = export_onnx(model, tmp_path / "fixed.onnx", dynamic_batch=False, example=torch.randn(3, 5, 16))
    report = validate_onnx(path, model)
    assert [c.batch_size for c in report.checks] == [3] and "fixed at 3" in report.format()
    with pytest.raises(ExportError, match="with_choice"):
        export_onnx(model, tmp_path / "x.onnx", with_choice=True)
    with pytest.raises(ExportError, match="2 GiB"):
        export_onnx(model, tmp_path / "x.onnx", embed_limit_bytes=3 << 30)
    with pytest.raises(ExportError, match="opset"):
        export_onnx(model, tmp_path / "x.onnx", opset=11)
    assert _files(tmp_path) == ["fixed.onnx"]


@pytest.mark.parametrize("graph_path", ["gathered per group", "padded over the stack"])
@pytest.mark.parametrize("family", ["mnist", "vit", "layer"])
def test_graph_algorithm1_equals_torch_choice_and_output(tmp_path, family, graph_path, monkeypatch):
    """Algorithm 1 in the graph: each input's own experts (a [B, k] choice output) and the output, both equal to
    PyTorch's at batch sizes other than the traced one; both graph formulations of the grouped experts."""
    from moe_prune.core.experts import CPU_POLICY, set_policy

    model = set_policy(BUILD[family](), CPU_POLICY, graph_few_rows=0.0,
                       row_gather_limit=0 if graph_path == "padded over the stack" else 1 << 40)
    model = with_selection(model, "1/4", per="input")
    path = export_onnx(model, tmp_path / "alg1.onnx", with_choice=True)
    ops = op_histogram(path)
    assert "If" in ops and "ScatterElements" in ops  # both formulations in the graph; the limit (here forced) picks
    gen = torch.Generator().manual_seed(6)
    for batch in (1, 5):
        x = example_input(model, batch, generator=gen)
        x = x * (torch.rand(x.shape, generator=gen) < 0.05) if family == "mnist" else 3 * torch.randn(x.shape, generator=gen)
        got = _run(path, x)
        choices = {}
        handles = [m.choice.register_forward_hook(lambda mod, a, out, n=n: choices.__setitem__(n, out))
                   for n, m in model.named_modules() if isinstance(m, PrunedSoftMoE)]
        with torch.no_grad():
            ref = model(x)
        for h in handles:
            h.remove()
        torch.testing.assert_close(torch.from_numpy(got["output"]), ref, atol=ATOL, rtol=RTOL)
        for name, ids in choices.items():
            assert ids.shape[0] == batch and got["experts" + (f".{name}" if name else "")].tolist() == ids.tolist()
        if batch == 5:
            assert len({tuple(r) for r in next(iter(choices.values())).tolist()}) > 1  # inputs differ in choice
    assert validate_onnx(path, model, atol=1e-4).passed


def test_cli_export(tmp_path, capsys):
    from moe_prune import save

    ckpt = tmp_path / "mnist.safetensors"
    save(_mnist(), ckpt)
    out = tmp_path / "alg2.onnx"
    assert main(["export", str(ckpt), "--out", str(out), "--keep", "1/4", "--dynamic", "--mode", "renorm"]) == 0
    text = capsys.readouterr().out
    assert "PASSED" in text and "experts.moe" in text and out.is_file()
    alg1 = tmp_path / "alg1.onnx"
    assert main(["export", str(ckpt), "--out", str(alg1), "--keep", "1/4", "--dynamic", "--per", "input"]) == 0
    assert "PASSED" in capsys.readouterr().out
    assert [d.dim_param for d in onnx.load(str(alg1)).graph.output[1].type.tensor_type.shape.dim][0] == "batch"

    compressed = MnistSoftMoE(MnistConfig(num_experts=8),
                              SoftMoEConfig(dim=196, num_experts=8, slots_per_expert=1, hidden=98,
                                            expert="relu_mlp", held=(1, 4, 6)))
    save(compressed, tmp_path / "small.safetensors")
    assert main(["export", str(tmp_path / "small.safetensors"), "--out", str(tmp_path / "s.onnx")]) == 0
    assert "PASSED" in capsys.readouterr().out

    assert main(["export", str(ckpt), "--out", str(tmp_path / "x.onnx"), "--keep", "1/4"]) == 2
    assert "--dynamic" in capsys.readouterr().err
    assert not (tmp_path / "x.onnx").exists()
    assert main(["export", str(ckpt), "--out", str(tmp_path / "x.onnx"), "--per", "input"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--per input applies with --keep and --dynamic" in err
    assert not (tmp_path / "x.onnx").exists()


@pytest.mark.parametrize("family", ["mnist", "vit"])
def test_fp16_export_validates_and_halves_the_file(tmp_path, family):
    """`export --dtype fp16`: an fp16 graph (weights and input), validated by ONNX Runtime's CPU provider against
    PyTorch in fp16 at batch sizes 1 and 5, half the fp32 file, and close to the fp32 model's answers."""
    from moe_prune.onnx.export_file import export_checkpoint

    model = BUILD[family]()
    ckpt = moe_prune.save(model, tmp_path / "m.safetensors")
    p32, _ = export_checkpoint(ckpt, tmp_path / "m32.onnx")
    p16, report = export_checkpoint(ckpt, tmp_path / "m16.onnx", dtype="fp16")
    assert report.passed and (report.atol, report.rtol) == (2e-2, 2e-2)
    proto = onnx.load(str(p16))
    assert proto.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT16
    big = [t for t in proto.graph.initializer if np.prod(t.dims) > 64]
    assert big and all(t.data_type == onnx.TensorProto.FLOAT16 for t in big)
    assert p16.stat().st_size < 0.6 * p32.stat().st_size
    again = validate_onnx(p16, model.to(torch.float16), batch_sizes=(1, 5), atol=2e-2, rtol=2e-2)
    assert again.passed
    x = example_input(model.float(), 5, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = model.float()(x).numpy()
    got = _run(p16, x.half())["output"].astype(np.float32)
    np.testing.assert_allclose(got, want, atol=5e-2, rtol=5e-2)  # fp16 against the fp32 model itself
    with pytest.raises(moe_prune.ExportError, match="--dtype"):
        export_checkpoint(ckpt, tmp_path / "x.onnx", dtype="bf16")
