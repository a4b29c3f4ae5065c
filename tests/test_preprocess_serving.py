"""Preprocessing in the served model (`export --preprocess`), its record in every ONNX file, its validation, and the
predictor that feeds images of any size through it.

The oracles do not come from the code under test: the normalization is computed here with plain numpy,
(pixels / 255 - mean) / std, and the predictor's answers are compared with ONNX Runtime on the float graph fed
images that went through `Preprocess.image` one by one.
"""

import json
import subprocess
import sys
import textwrap
from dataclasses import replace

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from PIL import Image

import moe_prune
from moe_prune.cli import build_parser, main
from moe_prune.onnx.export import export_onnx
from moe_prune.core.layers import SoftMoE, SoftMoEConfig
from moe_prune.core.models import MnistConfig, MnistSoftMoE, SoftMoEViT, ViTConfig
from moe_prune.onnx.files import PREPROCESS_KEY, read_preprocess, set_preprocess
from moe_prune.core.preprocess import INTERPOLATIONS, Preprocess
from moe_prune.serving.predictor import Predictor
from moe_prune.serving.repository import model_config, parse_model_config
from moe_prune.onnx.validate import validate_onnx

pytestmark = pytest.mark.usefixtures("one_thread")

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
PRE = Preprocess(size=16, channels=3, mean=MEAN, std=STD, crop_pct=0.875)


def tiny_vit() -> SoftMoEViT:
    torch.manual_seed(0)
    model = SoftMoEViT(ViTConfig(num_experts=4, moe_layer_index=1, img_size=16, patch_size=4, in_chans=3,
                                 num_classes=5, embed_dim=32, depth=2, num_heads=2)).eval()
    model.checkpoint_meta = {"preprocess": PRE.to_dict()}
    return model


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A tiny RGB ViT with ImageNet normalization, saved, and exported by the CLI with and without --preprocess."""
    tmp = tmp_path_factory.mktemp("pre")
    model = tiny_vit()
    ckpt = moe_prune.save(model, tmp / "vit.safetensors")
    assert main(["export", str(ckpt), "--out", str(tmp / "pixels.onnx"), "--preprocess"]) == 0
    assert main(["export", str(ckpt), "--out", str(tmp / "float.onnx")]) == 0
    return {"model": model, "ckpt": ckpt, "pixels": tmp / "pixels.onnx", "float": tmp / "float.onnx", "tmp": tmp}


def normalized(pixels: np.ndarray, mean=MEAN, std=STD) -> np.ndarray:
    """The oracle: uint8 [N, H, W, C] -> float32 [N, C, H, W], (x / 255 - mean) / std, written out here."""
    x = pixels.astype(np.float64) / 255.0
    x = (x - np.array(mean)) / np.array(std)
    return x.transpose(0, 3, 1, 2).astype(np.float32)


def run(path, x: np.ndarray) -> np.ndarray:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(["output"], {"input": x})[0]


def torch_logits(model, x: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.from_numpy(x)).numpy()


def metadata(path) -> dict:
    return {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}


# -- export --preprocess ----------------------------------------------------------------------------------------


def test_preprocess_export_takes_uint8_nhwc_at_the_input_size(files):
    inp = ort.InferenceSession(str(files["pixels"]), providers=["CPUExecutionProvider"]).get_inputs()[0]
    assert inp.type == "tensor(uint8)" and inp.shape == ["batch", 16, 16, 3]
    record = json.loads(metadata(files["pixels"])[PREPROCESS_KEY])
    assert record["in_graph"] is True and record["mean"] == list(MEAN) and record["std"] == list(STD)
    assert record["size"] == [16, 16] and record["channels"] == 3 and record["crop_pct"] == 0.875


def test_every_export_records_its_preprocessing(files, tmp_path):
    """Without --preprocess the graph takes float NCHW and the file says what normalization the caller owes it."""
    inp = ort.InferenceSession(str(files["float"]), providers=["CPUExecutionProvider"]).get_inputs()[0]
    assert inp.type == "tensor(float)" and inp.shape == ["batch", 3, 16, 16]
    pre, in_graph = read_preprocess(metadata(files["float"]))
    assert in_graph is False and (pre.mean, pre.std, pre.size, pre.crop_pct) == (MEAN, STD, (16, 16), 0.875)
    # a model trained here (no record in its checkpoint): pixels / 255, also written down
    mnist = export_onnx(MnistSoftMoE(MnistConfig(num_experts=4)).eval(), tmp_path / "mnist.onnx")
    pre, in_graph = read_preprocess(metadata(mnist))
    assert not in_graph and (pre.channels, pre.size, pre.mean, pre.std) == (1, (28, 28), (0.0,), (1.0,))


@pytest.mark.parametrize("batch", [1, 3])
def test_onnx_runtime_on_pixels_equals_torch_on_numpy_normalized_floats(files, batch):
    pixels = np.random.default_rng(batch).integers(0, 256, (batch, 16, 16, 3), dtype=np.uint8)
    got = run(files["pixels"], pixels)
    want = torch_logits(files["model"], normalized(pixels))
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-4)
    # and the float graph fed the same normalization agrees: the two files are one model
    np.testing.assert_allclose(run(files["float"], normalized(pixels)), want, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("per", ["batch", "input"])
def test_preprocess_with_algorithms_in_the_graph(files, tmp_path, capsys, per):
    """Pixels in, Algorithm 2 or 1 inside: the outputs and the expert choice are validated against PyTorch."""
    out = tmp_path / f"alg-{per}.onnx"
    assert main(["export", str(files["ckpt"]), "--out", str(out), "--preprocess", "--keep", "2", "--dynamic",
                 "--per", per]) == 0
    text = capsys.readouterr().out
    assert "inside the graph" in text and "expert choice" in text and "PASSED" in text
    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    assert sess.get_inputs()[0].type == "tensor(uint8)"
    assert [o.name for o in sess.get_outputs()] == ["output", "experts.blocks.1.mlp"]


def test_mean_and_std_options_override_the_checkpoint(files, tmp_path):
    out = tmp_path / "half.onnx"
    assert main(["export", str(files["ckpt"]), "--out", str(out), "--preprocess", "--mean", "0.5", "--std",
                 "0.25,0.5,0.125", "--interpolation", "bilinear", "--crop-pct", "1"]) == 0
    pre, in_graph = read_preprocess(metadata(out))
    assert in_graph and pre.mean == (0.5, 0.5, 0.5) and pre.std == (0.25, 0.5, 0.125)
    assert pre.interpolation == "bilinear" and pre.crop_pct == 1.0
    pixels = np.random.default_rng(5).integers(0, 256, (2, 16, 16, 3), dtype=np.uint8)
    want = torch_logits(files["model"], normalized(pixels, (0.5,) * 3, (0.25, 0.5, 0.125)))
    np.testing.assert_allclose(run(out, pixels), want, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("args, words", [
    (["--mean", "0.1,0.2"], "1 value"),
    (["--std", "0,1,1"], "positive"),
    (["--crop-pct", "1.5"], "crop-pct"),
    (["--mean", "0.5,0.5,0.5", "--std", "0.5"], None),  # fine for the RGB model; refused for a gray one below
])
def test_bad_preprocessing_options_are_one_line_exit_2(files, tmp_path, capsys, args, words):
    out = tmp_path / "bad.onnx"
    if words is None:  # three means for a one-channel model: known only once the checkpoint is loaded
        gray = moe_prune.save(MnistSoftMoE(MnistConfig(num_experts=4)).eval(), tmp_path / "gray.safetensors")
        assert main(["export", str(gray), "--out", str(out), "--preprocess", *args]) == 2
        words = "1 finite value"
    else:
        assert main(["export", str(files["ckpt"]), "--out", str(out), "--preprocess", *args]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("moe-prune: error: ") and words in err, err
    assert not out.exists()


def test_a_mean_that_is_not_numbers_is_a_usage_error(files, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:  # argparse's usage error: one line, exit status 2
        main(["export", str(files["ckpt"]), "--out", str(tmp_path / "m.onnx"), "--mean", "a,b,c"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and "comma-separated list of numbers" in err


def test_preprocessing_of_a_token_model_is_refused(tmp_path, capsys):
    layer = SoftMoE(SoftMoEConfig(dim=8, num_experts=4, slots_per_expert=1, hidden=8)).eval()
    with pytest.raises(moe_prune.ExportError, match="tokens"):
        export_onnx(layer, tmp_path / "layer.onnx", preprocess=Preprocess(size=4, channels=1))
    ckpt = moe_prune.save(layer, tmp_path / "layer.safetensors")
    assert main(["export", str(ckpt), "--out", str(tmp_path / "l.onnx"), "--preprocess"]) == 2
    assert "--preprocess apply to image models" in capsys.readouterr().err
    # without it a token model exports as before, with no record
    assert main(["export", str(ckpt), "--out", str(tmp_path / "l.onnx")]) == 0
    assert PREPROCESS_KEY not in metadata(tmp_path / "l.onnx")


def test_preprocess_for_another_input_size_is_refused(tmp_path):
    with pytest.raises(moe_prune.ExportError, match=r"\[3, 32, 32\] inputs, the model takes \[3, 16, 16\]"):
        export_onnx(tiny_vit(), tmp_path / "m.onnx", preprocess=Preprocess(size=32, channels=3))


def test_cli_interpolations_are_the_preprocess_ones():
    export = build_parser()._subparsers._group_actions[0].choices["export"]
    action = next(a for a in export._actions if a.dest == "interpolation")
    assert tuple(action.choices) == INTERPOLATIONS


# -- validation ---------------------------------------------------------------------------------------------------


def test_validation_of_a_pixel_graph_passes_and_says_so(files):
    report = validate_onnx(files["pixels"], files["model"])
    assert report.passed and report.pixels and len(report.checks) == 2
    assert "inside the graph" in report.format() and "PASSED" in report.format()


def test_a_wrong_mean_inside_the_graph_fails_validation(files, tmp_path, monkeypatch):
    """The graph normalizes with a wrong mean while the file records the right one: the numbers must catch it."""
    import moe_prune.onnx.export as export

    real = export.with_preprocess
    wrong = Preprocess(size=16, channels=3, mean=(0.406, 0.456, 0.485), std=STD)  # channels swapped (BGR)
    monkeypatch.setattr(export, "with_preprocess", lambda model, pre: real(model, wrong))
    path = export_onnx(files["model"], tmp_path / "wrong.onnx", preprocess=PRE)
    monkeypatch.undo()
    assert read_preprocess(metadata(path))[0].mean == MEAN  # the record is right; only the graph is wrong
    report = validate_onnx(path, files["model"], check=False)
    assert not report.passed and not report.record_problem
    assert all(not c.passed for c in report.checks)
    with pytest.raises(moe_prune.ExportError, match="differs from PyTorch"):
        report.raise_for_failure()


def test_a_record_other_than_the_expected_preprocessing_fails_validation(files, tmp_path):
    wrong = Preprocess(size=16, channels=3, mean=0.5, std=0.5)
    path = export_onnx(files["model"], tmp_path / "other.onnx", preprocess=wrong)
    assert validate_onnx(path, files["model"], preprocess=wrong).passed  # consistent with itself
    report = validate_onnx(path, files["model"], preprocess=PRE, check=False)
    assert not report.passed and "expected" in report.record_problem
    assert all(not c.passed for c in report.checks)  # and the numbers differ too: PyTorch got PRE's normalization
    with pytest.raises(moe_prune.ExportError, match="preprocessing record"):
        report.raise_for_failure()


def test_a_record_that_misplaces_the_preprocessing_fails_validation(files, tmp_path):
    proto = onnx.load(str(files["float"]))
    set_preprocess(proto, PRE, in_graph=True)  # a float graph claiming to normalize itself
    onnx.save(proto, tmp_path / "liar.onnx")
    report = validate_onnx(tmp_path / "liar.onnx", files["model"], check=False)
    assert not report.passed and "in the graph" in report.record_problem
    assert all(c.passed for c in report.checks)  # the numbers are right; only the record lies


# -- the predictor ------------------------------------------------------------------------------------------------


def odd_images(tmp_path):
    """Images of sizes other than the model's: RGB 40x30 (PIL), gray 20x20 (array), RGBA 9x50 (array), a PNG file."""
    rng = np.random.default_rng(0)
    rgb = Image.fromarray(rng.integers(0, 256, (30, 40, 3), dtype=np.uint8))
    gray = rng.integers(0, 256, (20, 20), dtype=np.uint8)
    rgba = rng.integers(0, 256, (9, 50, 4), dtype=np.uint8)
    path = tmp_path / "photo.png"
    Image.fromarray(rng.integers(0, 256, (70, 33, 3), dtype=np.uint8)).save(path)
    return [rgb, gray, rgba, path]


def reference(files, images) -> np.ndarray:
    """ONNX Runtime on the float graph, fed each image through Preprocess.image (Pillow resize + crop)."""
    def pil(im):
        if isinstance(im, np.ndarray):
            return Image.fromarray(im)
        return Image.open(im) if not isinstance(im, Image.Image) else im
    return run(files["float"], np.stack([PRE.image(pil(im)) for im in images]))


@pytest.mark.parametrize("graph", ["pixels", "float"])
def test_predictor_on_images_of_any_size_equals_the_float_graph_on_preprocessed_images(files, tmp_path, graph):
    images = odd_images(tmp_path)
    p = Predictor(files[graph])
    assert p.preprocessing == replace(PRE, source="checkpoint")
    np.testing.assert_allclose(p.logits(images), reference(files, images), atol=1e-5, rtol=1e-4)
    # one image alone, in each form
    for im in images:
        np.testing.assert_allclose(p.logits(im), reference(files, [im]), atol=1e-5, rtol=1e-4)
    # a batch array [N, H, W, C] of another size
    batch = np.random.default_rng(1).integers(0, 256, (3, 24, 20, 3), dtype=np.uint8)
    np.testing.assert_allclose(p.logits(batch), reference(files, list(batch)), atol=1e-5, rtol=1e-4)
    assert p.predict(images).shape == (4,) and np.allclose(p.predict_proba(images).sum(-1), 1, rtol=1e-5)


def test_predictor_feeds_a_pixel_graph_pixels_and_a_float_graph_normalized_floats(files):
    """At the input size (crop_pct 1 leaves them unchanged) both agree with the numpy oracle."""
    pixels = np.random.default_rng(2).integers(0, 256, (4, 16, 16, 3), dtype=np.uint8)
    want = torch_logits(files["model"], normalized(pixels))
    pre = replace(PRE, crop_pct=1.0)
    a, b = Predictor(files["pixels"], preprocess=pre), Predictor(files["float"], preprocess=pre)
    assert a.preprocess(pixels).dtype == np.uint8 and np.array_equal(a.preprocess(pixels), pixels)
    np.testing.assert_allclose(b.preprocess(pixels), normalized(pixels), atol=1e-6)
    np.testing.assert_allclose(a.logits(pixels), want, atol=1e-5, rtol=1e-4)
    np.testing.assert_allclose(b.logits(pixels), want, atol=1e-5, rtol=1e-4)


def test_float_input_at_the_model_shape_passes_unchanged(files):
    x = normalized(np.random.default_rng(3).integers(0, 256, (2, 16, 16, 3), dtype=np.uint8))
    p = Predictor(files["float"])
    assert np.array_equal(p.preprocess(x), x)
    np.testing.assert_allclose(p.logits(x[0]), run(files["float"], x[:1]), atol=1e-6)
    with pytest.raises(moe_prune.DataError, match="already preprocessed"):
        p.preprocess(np.zeros((2, 3, 20, 20), np.float32))
    with pytest.raises(moe_prune.DataError, match="takes uint8 pixels"):
        Predictor(files["pixels"]).preprocess(x)


def test_a_file_without_a_record_refuses_pixels_instead_of_guessing(files, tmp_path):
    """The old predictor divided by 255 and ignored mean/std: wrong inputs for this model, without a word."""
    proto = onnx.load(str(files["float"]))
    del proto.metadata_props[:]
    onnx.save(proto, tmp_path / "old.onnx")
    p = Predictor(tmp_path / "old.onnx")
    pixels = np.random.default_rng(4).integers(0, 256, (2, 16, 16, 3), dtype=np.uint8)
    with pytest.raises(moe_prune.DataError, match="records no preprocessing"):
        p.logits(pixels)
    with pytest.raises(moe_prune.DataError, match="records no preprocessing"):
        p.logits(Image.fromarray(pixels[0]))
    x = normalized(pixels)
    np.testing.assert_allclose(p.logits(x), run(files["float"], x), atol=1e-6)  # float input still works
    given = Predictor(tmp_path / "old.onnx", preprocess=replace(PRE, crop_pct=1.0))  # 16x16 stays as it is
    np.testing.assert_allclose(given.logits(pixels), run(files["float"], x), atol=1e-5, rtol=1e-4)


def test_predictor_refuses_a_preprocess_that_contradicts_the_graph(files):
    with pytest.raises(moe_prune.ServeError, match="normalizes inside its graph"):
        Predictor(files["pixels"], preprocess=Preprocess(size=16, channels=3, mean=0.5, std=0.5))
    with pytest.raises(moe_prune.ServeError, match="takes"):
        Predictor(files["float"], preprocess=Preprocess(size=20, channels=3))
    # resize and crop happen outside the graph: those may differ
    p = Predictor(files["pixels"], preprocess=Preprocess(size=16, channels=3, mean=MEAN, std=STD,
                                                         interpolation="nearest"))
    assert p.preprocessing.interpolation == "nearest"


@pytest.mark.parametrize("bad, words", [
    (np.zeros((2, 5, 16, 16, 3), np.uint8), "uint8 images must be"),
    (np.zeros((16, 16, 3), np.int64), "must be uint8"),
    ([np.zeros((2, 16, 16, 3), np.uint8)], "a list holds single images"),
    ([], "no images"),
])
def test_predictor_input_errors(files, bad, words):
    with pytest.raises(moe_prune.DataError, match=words):
        Predictor(files["pixels"]).preprocess(bad)


def test_predictor_unreadable_file(files, tmp_path):
    (tmp_path / "x.png").write_text("not a png")
    with pytest.raises(moe_prune.DataError, match="not an image file"):
        Predictor(files["pixels"]).predict(tmp_path / "x.png")


def test_predictor_needs_no_torch(files, tmp_path):
    """The serving environment has no torch: the predictor, on a pixel graph and on a float one."""
    code = textwrap.dedent(f"""
        import sys
        for name in ("torch", "triton", "onnx"):
            sys.modules[name] = None  # any import of them now raises ImportError
        import numpy as np
        from PIL import Image
        from moe_prune.serving.predictor import Predictor
        im = Image.fromarray(np.arange(40 * 30 * 3, dtype=np.uint8).reshape(30, 40, 3))
        a, b = Predictor({str(files["pixels"])!r}), Predictor({str(files["float"])!r})
        assert np.abs(a.logits([im]) - b.logits([im])).max() < 1e-5
        loaded = sorted(k for k in sys.modules if k.split(".")[0] in ("torch", "triton") and sys.modules[k] is not None)
        assert not loaded, loaded
        print("ok")
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-2000:]


# -- Triton repository ----------------------------------------------------------------------------------------------


def test_triton_repo_with_preprocess_takes_uint8_hwc(files, tmp_path):
    repo = tmp_path / "repo"
    assert main(["export", str(files["ckpt"]), "--out", str(repo), "--format", "triton-repo", "--name", "vit_pixels",
                 "--preprocess"]) == 0
    cfg = parse_model_config((repo / "vit_pixels" / "config.pbtxt").read_text())
    assert [(i.name, list(i.dims)) for i in cfg.input] == [("input", [16, 16, 3])]
    assert cfg.input[0].data_type == 2  # TYPE_UINT8 in Triton's DataType enum
    assert cfg.output[0].data_type == 11 and list(cfg.output[0].dims) == [5]  # TYPE_FP32
    served = repo / "vit_pixels" / "1" / "model.onnx"
    assert read_preprocess(metadata(served)) == read_preprocess(metadata(files["pixels"]))
    pixels = np.random.default_rng(6).integers(0, 256, (2, 16, 16, 3), dtype=np.uint8)
    np.testing.assert_allclose(run(served, pixels), torch_logits(files["model"], normalized(pixels)),
                               atol=1e-5, rtol=1e-4)
    assert "TYPE_UINT8" in model_config("m", files["pixels"])
