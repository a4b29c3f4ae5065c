"""The user's own data: RGB image folders (PNG, JPEG, WebP, BMP, GIF, mixed sizes, class folders with train/ and
val/) through the model's own preprocessing, for a soft-moe ViT checkpoint with ImageNet mean and std.

Oracles: `image_data.reference_preprocess`, an independent numpy+Pillow implementation of timm's evaluation
transform, and an evaluation loop written here (file by file, the model in torch)."""

import json

import numpy as np
import pytest
import torch

import moe_prune
from moe_prune import CheckpointFile
from moe_prune.cli import main
from moe_prune.data.examples import DataOptions, FileExamples, TensorExamples
from moe_prune.data.sources import open_data
from moe_prune.errors import DataError
from moe_prune.core.models import SoftMoEViT, ViTConfig
from moe_prune.core.preprocess import Preprocess

from image_data import CLASS_NAMES, make_bad_files, make_image_folder, reference_preprocess
from library_models import soft_moe_vit_state

pytestmark = pytest.mark.usefixtures("one_thread")

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
NORM = ["--mean", ",".join(map(str, MEAN)), "--std", ",".join(map(str, STD))]
KWARGS = ["--kwargs", json.dumps({"num_heads": 2})]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp("photos"), n_train=120, n_val=60, seed=0)


@pytest.fixture(scope="module")
def vit_pt(tmp_path_factory):
    """A soft-moe ViT for 32x32 RGB images, 10 classes, saved as soft-moe's own state dict (.pt)."""
    torch.manual_seed(0)
    model = SoftMoEViT(ViTConfig(num_experts=8, moe_layer_index=1, img_size=32, patch_size=8, in_chans=3,
                                 num_classes=10, embed_dim=32, depth=2, num_heads=2, mlp_ratio=2.0)).eval()
    path = tmp_path_factory.mktemp("ckpt") / "vit.pt"
    torch.save(soft_moe_vit_state(model), path)
    return path


def _by_hand(model, root, files, pre):
    """Top-1 accuracy file by file: the independent transform, then the model."""
    right = 0
    with torch.no_grad():
        for rel, _, cls in files:
            x = reference_preprocess(root / rel, pre["size"], 3, pre["interpolation"], pre["crop_pct"], pre["mean"],
                                     pre["std"])
            pred = int(model(torch.from_numpy(x)[None]).argmax())
            right += pred == sorted(CLASS_NAMES).index(cls)  # torchvision's ImageFolder: classes sorted by name
    return right / len(files)


def test_eval_on_an_image_folder_equals_an_independent_evaluation(folder, vit_pt, tmp_path):
    out = tmp_path / "ev"
    assert main(["eval", str(vit_pt), *KWARGS, *NORM, "--data", str(folder["root"]), "--keep", "1/8", "--modes",
                 "drop", "--batch-sizes", "16", "--random-seeds", "1", "--out-dir", str(out)]) == 0
    report = json.loads((out / "eval.json").read_text())["reports"][0]
    pre = report["preprocess"]
    assert pre["mean"] == list(MEAN) and pre["std"] == list(STD) and pre["crop_pct"] == 0.9 and pre["size"] == [32, 32]
    assert report["test_set"].endswith("val") and report["classes"] == sorted(CLASS_NAMES)
    model = moe_prune.load(CheckpointFile(vit_pt, kwargs={"num_heads": 2}))
    assert report["full"] == pytest.approx(_by_hand(model, folder["root"], folder["val"], pre), abs=1e-12)
    assert 0 < report["full_top5"] and report["full"] <= report["full_top5"] <= 1
    assert len(report["per_class"]) == 10
    counts = np.bincount([sorted(CLASS_NAMES).index(c) for _, _, c in folder["val"]], minlength=10)
    assert sum(a * n for a, n in zip(report["per_class"], counts)) / counts.sum() == pytest.approx(report["full"])
    assert {row["method"] for row in report["rows"]} == {"alg1", "alg2", "static", "random"}
    assert all(row["top5"] is not None for row in report["rows"])


def test_every_file_goes_through_the_same_transform(folder):
    pre = Preprocess(size=32, channels=3, interpolation="bicubic", crop_pct=0.9, mean=MEAN, std=STD)
    examples = open_data(folder["root"], "test", pre, labelled=True)
    assert isinstance(examples, FileExamples) and len(examples) == len(folder["val"])
    x, y = examples.batch(np.arange(len(examples)))
    want = np.stack([reference_preprocess(folder["root"] / rel, 32, 3, "bicubic", 0.9, MEAN, STD)
                     for rel, _, _ in sorted(folder["val"], key=lambda f: (f[2], f[0]))])
    assert torch.equal(x, torch.from_numpy(want))
    assert y.tolist() == [sorted(CLASS_NAMES).index(c) for _, _, c in sorted(folder["val"], key=lambda f: (f[2], f[0]))]


def test_compress_and_heal_on_an_image_folder(folder, vit_pt, tmp_path, capsys):
    out = tmp_path / "small.safetensors"
    assert main(["compress", str(vit_pt), *KWARGS, *NORM, "--calib", str(folder["root"]), "--rule", "mass",
                 "--heal", "--heal-steps", "20", "--batch-size", "32", "--workers", "2", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "held-out accuracy" in printed
    meta = moe_prune.summary(out)["meta"]
    assert meta["preprocess"]["mean"] == list(MEAN) and meta["preprocess"]["interpolation"] == "bicubic"
    assert meta["calibration"]["inputs"] == len(folder["train"])  # train/ only: val/ is held out
    assert meta["held_out"].endswith("val (accuracy before and after healing only)")
    assert 0 <= meta["heal"]["accuracy_after"] <= 1
    # every later command reads the recorded preprocessing: no --mean needed for the compressed checkpoint
    small = moe_prune.load(out)
    assert moe_prune.summary(out)["preprocess"]["source"] == "checkpoint"
    model = moe_prune.load(CheckpointFile(vit_pt, kwargs={"num_heads": 2}))
    from moe_prune.measurement.accuracy import accuracy
    from moe_prune.core.preprocess import for_model

    val = open_data(folder["root"], "test", for_model(small), labelled=True)
    assert accuracy(small, val) == pytest.approx(meta["heal"]["accuracy_after"])
    recorded, given = for_model(small).to_dict(), for_model(model, mean=MEAN, std=STD).to_dict()
    assert {k: v for k, v in recorded.items() if k != "source"} == {k: v for k, v in given.items() if k != "source"}


def test_unlabelled_folder_list_and_arrays_calibrate(folder, tmp_path):
    from moe_prune.data.sources import calibration_batches

    skel = moe_prune.load(moe_prune.save(SoftMoEViT(ViTConfig(num_experts=4, moe_layer_index=1, img_size=32,
                                                                patch_size=8, in_chans=3, num_classes=10, embed_dim=32,
                                                                depth=2, num_heads=2)), tmp_path / "m.safetensors"))
    root = folder["root"]
    listing = tmp_path / "calib.txt"
    listing.write_text("\n".join(str(root / rel) for rel, _, _ in folder["train"][:40]))
    rgb = np.random.default_rng(0).integers(0, 255, (12, 40, 30, 3), dtype=np.uint8)
    np.save(tmp_path / "nhwc.npy", rgb)
    np.save(tmp_path / "nchw.npy", np.ascontiguousarray(rgb.transpose(0, 3, 1, 2)))
    for source, n in ((root / "train" / "bag", None), (listing, 40), (tmp_path / "nhwc.npy", 12),
                      (tmp_path / "nchw.npy", 12)):
        batches = calibration_batches(source, batch_size=8, model=skel, options=DataOptions(cache_mb=0))
        xs = list(batches)
        assert all(x.shape[1:] == (3, 32, 32) for x in xs)
        assert n is None or sum(len(x) for x in xs) == n
    a = torch.cat(list(calibration_batches(tmp_path / "nhwc.npy", model=skel)))
    b = torch.cat(list(calibration_batches(tmp_path / "nchw.npy", model=skel)))
    assert torch.equal(a, b)  # the same pixels in either layout
    # a folder with a limit: spread over the classes, not the first classes' files
    limited = calibration_batches(root, limit=20, batch_size=20, model=skel, options=DataOptions(cache_mb=0))
    assert len(set(limited.examples.labels.tolist())) == 10


def test_memory_stays_a_batch_beyond_the_cache_budget(folder):
    pre = Preprocess(size=32, channels=3, mean=MEAN, std=STD)
    from moe_prune.data.examples import Batches

    examples = open_data(folder["root"], "train", pre)
    streamed = Batches(examples, 16).cached(budget_mb=0.1)  # 120 images of 12 KB do not fit 0.1 MB
    kept = Batches(examples, 16).cached(budget_mb=100)
    assert isinstance(streamed.examples, FileExamples) and isinstance(kept.examples, TensorExamples)
    assert torch.equal(torch.cat(list(streamed)), torch.cat(list(kept)))


def test_bad_images_stop_the_run_in_one_line(folder, vit_pt, tmp_path, capsys):
    import shutil

    root = tmp_path / "data"
    shutil.copytree(folder["root"], root)
    bad = make_bad_files(root / "train" / "bag")
    out = tmp_path / "o"
    for name in ("truncated_jpeg", "cut_png", "empty_png", "text_jpg"):
        for other in set(bad) - {name, "ignored"}:
            bad[other].rename(bad[other].with_suffix(bad[other].suffix + ".off"))
        assert main(["compress", str(vit_pt), *KWARGS, "--calib", str(root), "--rule", "mass", "--out", f"{out}/"]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("moe-prune: error:") and "\n" not in err and bad[name].name in err and "--skip-bad" in err
        assert not out.exists()
        for other in set(bad) - {name, "ignored"}:
            bad[other].with_suffix(bad[other].suffix + ".off").rename(bad[other])
    # all four at once, left out and counted
    assert main(["compress", str(vit_pt), *KWARGS, "--calib", str(root), "--rule", "mass", "--skip-bad",
                 "--out", f"{out}/"]) == 0
    assert "skipped 4 unreadable image(s)" in capsys.readouterr().err
    (root / "val" / "empty-class").mkdir()
    assert main(["eval", str(vit_pt), *KWARGS, "--data", str(root), "--out-dir", str(tmp_path / "e")]) == 2
    assert "empty-class" in capsys.readouterr().err
    assert not (tmp_path / "e").exists()


def test_classes_txt_maps_folders_to_a_larger_head(folder, tmp_path):
    import shutil

    root = tmp_path / "data"
    shutil.copytree(folder["root"] / "val", root)
    names = ["unused-a", *reversed(CLASS_NAMES), "unused-b"]  # the model's 12 classes, in its own order
    (root / "classes.txt").write_text("\n".join(names))
    pre = Preprocess(size=32, channels=3)
    examples = open_data(root, "test", pre, labelled=True)
    assert examples.classes == names
    files = sorted(folder["val"], key=lambda f: (f[2], f[0]))
    assert examples.labels.tolist() == [names.index(c) for _, _, c in files]
    (root / "classes.txt").write_text("\n".join(names[:5]))
    with pytest.raises(DataError, match="not in classes.txt"):
        open_data(root, "test", pre, labelled=True)


def test_export_with_preprocessing_answers_image_files_like_torch(folder, vit_pt, tmp_path):
    """The whole path without user code: compress on the folder, export --preprocess, then the predictor on the
    val/ files (any size) equals torch on the independently preprocessed images."""
    from moe_prune.serving.predictor import Predictor

    small = tmp_path / "small.safetensors"
    assert main(["compress", str(vit_pt), *KWARGS, *NORM, "--calib", str(folder["root"]), "--rule", "mass",
                 "--out", str(small)]) == 0
    onnx_path = tmp_path / "small.onnx"
    assert main(["export", str(small), "--preprocess", "--out", str(onnx_path)]) == 0
    predictor = Predictor(onnx_path)
    files = [folder["root"] / rel for rel, _, _ in folder["val"][:24]]
    got = predictor.logits(files)
    model = moe_prune.load(small)
    x = np.stack([reference_preprocess(f, 32, 3, "bicubic", 0.9, MEAN, STD) for f in files])
    with torch.no_grad():
        want = model(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)
