"""Tests of the image-folder helpers themselves: other tests trust `make_image_folder` to write what users keep and
`reference_preprocess` to be timm's evaluation transform, so both are checked here against hand-computed answers."""

from __future__ import annotations

import collections
import io
import pathlib

import numpy as np
import pytest
from PIL import Image, UnidentifiedImageError

from image_data import CLASS_NAMES, load_sample, make_bad_files, make_image_folder, reference_preprocess

# Spelled out rather than computed with sorted(): folder names in alphabetical order, as ImageFolder numbers them.
IMAGEFOLDER_INDEX = {
    "ankle-boot": 0,
    "bag": 1,
    "coat": 2,
    "dress": 3,
    "pullover": 4,
    "sandal": 5,
    "shirt": 6,
    "sneaker": 7,
    "t-shirt": 8,
    "trouser": 9,
}
NO_NORM = {"mean": (0.0, 0.0, 0.0), "std": (1.0, 1.0, 1.0)}
NO_NORM_GRAY = {"mean": (0.0,), "std": (1.0,)}


def _write(folder: pathlib.Path, pixels, mode: str, name: str = "x.png") -> pathlib.Path:
    """A lossless PNG of the given uint8 pixels ([h, w] or [h, w, C])."""
    path = folder / name
    Image.fromarray(np.asarray(pixels, dtype=np.uint8), mode).save(path)
    return path


def _scan(root: pathlib.Path, entries) -> list[dict]:
    """Format, mode, size and frame count of each listed file, as Pillow reads them."""
    out = []
    for rel, label, name in entries:
        with Image.open(root / rel) as img:
            out.append(
                {
                    "rel": rel,
                    "label": label,
                    "name": name,
                    "index": int(pathlib.PurePosixPath(rel).stem),
                    "format": img.format,
                    "mode": img.mode,
                    "size": img.size,
                    "frames": getattr(img, "n_frames", 1),
                    "pixels": np.asarray(img.convert(img.mode if img.mode in ("L", "RGB", "RGBA", "LA") else "RGB")),
                }
            )
    return out


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp("users_folder"))


@pytest.fixture(scope="module")
def scanned(folder):
    return {split: _scan(folder["root"], folder[split]) for split in ("train", "val")}


# --- make_image_folder ---------------------------------------------------------------------------------------------


def test_class_names_and_imagefolder_mapping(folder):
    assert len(set(CLASS_NAMES)) == 10
    assert CLASS_NAMES[0] == "t-shirt" and CLASS_NAMES[9] == "ankle-boot"
    assert folder["class_to_index"] == IMAGEFOLDER_INDEX
    # The point of keeping both: label order and folder order differ.
    assert [folder["class_to_index"][n] for n in CLASS_NAMES] != list(range(10))


def test_layout_matches_listing(folder):
    root = folder["root"]
    assert len(folder["train"]) == 200 and len(folder["val"]) == 100
    listed = {rel for split in ("train", "val") for rel, _, _ in folder[split]}
    on_disk = {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()}
    assert on_disk == listed
    for split in ("train", "val"):
        assert sorted(p.name for p in (root / split).iterdir()) == sorted(CLASS_NAMES)
        assert {label for _, label, _ in folder[split]} == set(range(10))
        for rel, label, name in folder[split]:
            assert rel.startswith(f"{split}/{name}/")
            assert name == CLASS_NAMES[label]


def test_labels_and_content_come_from_the_sample(scanned):
    images, labels = load_sample()
    exact = tinted = 0
    for entry in scanned["train"] + scanned["val"]:
        gray = images[entry["index"]]
        assert entry["label"] == labels[entry["index"]]
        if entry["format"] == "PNG" and entry["size"] == (28, 28) and entry["mode"] == "L":
            np.testing.assert_array_equal(entry["pixels"], gray)
            exact += 1
        if entry["format"] == "PNG" and entry["size"] == (28, 28) and entry["mode"] == "RGB":
            # Each channel is gray * tint + offset, rounded and clipped: almost perfectly correlated with the sample.
            for c in range(3):
                assert np.corrcoef(entry["pixels"][..., c].ravel(), gray.ravel())[0, 1] > 0.99
            tinted += 1
    assert exact > 0 and tinted > 0


def test_splits_disjoint_train_takes_each_class_first(folder):
    _, labels = load_sample()
    idx = {s: [int(pathlib.PurePosixPath(rel).stem) for rel, _, _ in folder[s]] for s in ("train", "val")}
    assert len(set(idx["train"])) == 200 and len(set(idx["val"])) == 100
    assert not set(idx["train"]) & set(idx["val"])
    for c in range(10):
        in_class = list(np.flatnonzero(labels == c))
        train_c = sorted(i for i in idx["train"] if labels[i] == c)
        val_c = sorted(i for i in idx["val"] if labels[i] == c)
        assert train_c == in_class[: len(train_c)]
        assert val_c == in_class[len(train_c) : len(train_c) + len(val_c)]


def test_mix_of_modes_formats_sizes(scanned):
    everything = scanned["train"] + scanned["val"]
    formats = collections.Counter(e["format"] for e in everything)
    assert formats["GIF"] == 1 and formats["WEBP"] == 1 and formats["BMP"] == 1
    assert formats["PNG"] > 50 and formats["JPEG"] > 50
    assert {"RGB", "L", "RGBA"} <= {e["mode"] for e in everything}
    sizes = {e["size"] for e in everything}
    assert {(28, 28), (20, 20), (32, 40), (56, 56), (28, 35), (40, 30)} <= sizes
    for split in ("train", "val"):
        assert {"PNG", "JPEG"} <= {e["format"] for e in scanned[split]}
        assert {"RGB", "L", "RGBA"} <= {e["mode"] for e in scanned[split]}
        assert len({e["size"] for e in scanned[split]}) >= 5
    # Suffixes match the real format.
    suffix = {"PNG": ".png", "JPEG": ".jpg", "GIF": ".gif", "WEBP": ".webp", "BMP": ".bmp"}
    assert all(e["rel"].endswith(suffix[e["format"]]) for e in everything)
    gif = next(e for e in everything if e["format"] == "GIF")
    assert gif["frames"] == 2
    rgba = [e for e in everything if e["mode"] == "RGBA"]
    assert all(e["pixels"][..., 3].min() < 255 for e in rgba)


def test_jpegs_are_quality_90(folder, scanned):
    buf = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buf, "JPEG", quality=90)
    q90 = Image.open(buf).quantization[0]
    jpegs = [e for e in scanned["train"] + scanned["val"] if e["format"] == "JPEG"]
    for e in jpegs:
        with Image.open(folder["root"] / e["rel"]) as img:
            assert img.quantization[0] == q90, e["rel"]


def test_rgb_images_are_tinted_differently(scanned):
    colour = [e for e in scanned["train"] + scanned["val"] if e["mode"] == "RGB" and e["format"] == "PNG"]
    assert len(colour) > 20
    ratios = []
    for e in colour:
        px = e["pixels"].astype(np.int64)
        assert (px[..., 0] != px[..., 1]).any() or (px[..., 1] != px[..., 2]).any(), e["rel"]
        ratios.append(round(px[..., 0].mean() / max(px[..., 1].mean(), 1e-9), 2))
    assert len(set(ratios)) > len(colour) // 2


def _contents(result) -> dict[str, bytes]:
    return {rel: (result["root"] / rel).read_bytes() for s in ("train", "val") for rel, _, _ in result[s]}


def test_deterministic_for_a_seed(tmp_path):
    a = make_image_folder(tmp_path / "a", n_train=20, n_val=12, seed=3)
    b = make_image_folder(tmp_path / "b", n_train=20, n_val=12, seed=3)
    c = make_image_folder(tmp_path / "c", n_train=20, n_val=12, seed=4)
    assert a["train"] == b["train"] and a["val"] == b["val"]
    assert _contents(a) == _contents(b)
    assert _contents(a) != _contents(c)
    # The seed changes the looks, not which sample images go where.
    assert [(pathlib.PurePosixPath(r).stem, l) for r, l, _ in a["train"]] == [
        (pathlib.PurePosixPath(r).stem, l) for r, l, _ in c["train"]
    ]


def test_gray_folder_has_gray_content(tmp_path):
    result = make_image_folder(tmp_path, n_train=20, n_val=10, seed=1, rgb=False)
    images, _ = load_sample()
    exact = 0
    for rel, _, _ in result["train"] + result["val"]:
        with Image.open(tmp_path / rel) as img:
            assert img.mode in ("L", "LA", "P") or img.format == "WEBP", (rel, img.mode)
            rgb = np.asarray(img.convert("RGB"))
            if img.format == "PNG" and img.mode == "L" and img.size == (28, 28):
                np.testing.assert_array_equal(np.asarray(img), images[int(pathlib.PurePosixPath(rel).stem)])
                exact += 1
        np.testing.assert_array_equal(rgb[..., 0], rgb[..., 1])
        np.testing.assert_array_equal(rgb[..., 1], rgb[..., 2])
    assert exact > 0


@pytest.mark.parametrize("n_train, n_val", [(9, 10), (10, 9), (900, 101)])
def test_rejects_impossible_sizes(tmp_path, n_train, n_val):
    with pytest.raises(ValueError):
        make_image_folder(tmp_path, n_train=n_train, n_val=n_val)


# --- make_bad_files ------------------------------------------------------------------------------------------------


def test_bad_files_fail_to_decode(tmp_path):
    bad = make_bad_files(tmp_path / "bag")
    assert set(bad) == {"truncated_jpeg", "cut_png", "empty_png", "text_jpg", "ignored"}
    assert {p.name for p in (tmp_path / "bag").iterdir()} == {p.name for p in bad.values()}

    # Truncated JPEG and header-only PNG open (headers are intact) and fail only when the pixels are decoded.
    data = bad["truncated_jpeg"].read_bytes()
    assert data[:2] == b"\xff\xd8" and not data.endswith(b"\xff\xd9")
    with Image.open(bad["truncated_jpeg"]) as img:
        assert img.size == (112, 112)
        with pytest.raises(OSError, match="truncated"):
            img.load()
    data = bad["cut_png"].read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data.endswith(b"IDAT")
    with Image.open(bad["cut_png"]) as img:
        assert img.size == (28, 28)
        with pytest.raises(OSError):
            img.load()

    assert bad["empty_png"].stat().st_size == 0 and bad["empty_png"].suffix == ".png"
    assert bad["text_jpg"].name == "notes.jpg"
    bad["text_jpg"].read_text(encoding="utf-8")
    for key in ("empty_png", "text_jpg"):
        with pytest.raises(UnidentifiedImageError):
            Image.open(bad[key])

    assert bad["ignored"].name == "README.txt"
    assert bad["ignored"].read_text().strip()


# --- reference_preprocess: hand-computed answers -------------------------------------------------------------------


def test_pure_center_crop(tmp_path):
    # 4x4, size 2, crop_pct 0.5: s = floor(2 / 0.5) = 4 = the short side, so no resize; crop rows/cols 1..2.
    # (crop_pct 1.0 would resize 4x4 to 2x2 first: see the next test.)
    base = np.array([[0, 1, 2, 3], [10, 11, 12, 13], [20, 21, 22, 23], [30, 31, 32, 33]])
    path = _write(tmp_path, np.stack([base, base + 100, base + 200], axis=-1), "RGB")
    out = reference_preprocess(path, 2, 3, crop_pct=0.5, **NO_NORM)
    expected = np.array(
        [[[11, 12], [21, 22]], [[111, 112], [121, 122]], [[211, 212], [221, 222]]], dtype=np.float32
    ) / np.float32(255)
    assert out.shape == (3, 2, 2) and out.dtype == np.float32
    np.testing.assert_allclose(out, expected, rtol=0, atol=1e-7)


def test_crop_pct_one_resizes_to_the_crop(tmp_path):
    # 4x4, size 2, crop_pct 1.0: s = 2, so the image is resized to 2x2; "box" averages each 2x2 block.
    pixels = [[0, 2, 4, 6], [4, 6, 8, 10], [10, 20, 30, 40], [30, 40, 50, 60]]
    path = _write(tmp_path, pixels, "L")
    out = reference_preprocess(path, 2, 1, interpolation="box", crop_pct=1.0, **NO_NORM_GRAY)
    np.testing.assert_allclose(out, np.array([[[3, 7], [25, 45]]]) / 255, rtol=0, atol=1e-7)


def test_nearest_upscale_landscape_and_portrait(tmp_path):
    # 2x3 (h x w), size 4, crop_pct 1: w > h, so new_h = 4, new_w = int(4 * 3 / 2) = 6; nearest doubles each
    # pixel; crop top = 0, left = round(2 / 2) = 1 -> columns 1..4 of [10 10 20 20 30 30].
    path = _write(tmp_path, [[10, 20, 30], [40, 50, 60]], "L", "landscape.png")
    out = reference_preprocess(path, 4, 1, interpolation="nearest", crop_pct=1.0, **NO_NORM_GRAY)
    expected = np.array([[10, 20, 20, 30], [10, 20, 20, 30], [40, 50, 50, 60], [40, 50, 50, 60]]) / 255
    np.testing.assert_allclose(out[0], expected, rtol=0, atol=1e-7)
    # The transposed image takes the w <= h branch and gives the transposed answer.
    path = _write(tmp_path, [[10, 40], [20, 50], [30, 60]], "L", "portrait.png")
    out = reference_preprocess(path, 4, 1, interpolation="nearest", crop_pct=1.0, **NO_NORM_GRAY)
    np.testing.assert_allclose(out[0], expected.T, rtol=0, atol=1e-7)


def test_long_side_is_truncated_not_rounded(tmp_path):
    # 2x3, size 5, crop_pct 1: new_w = int(5 * 3 / 2) = int(7.5) = 7 (rounding would give 8).
    # Nearest 3 -> 7 columns takes source columns [0 0 1 1 1 2 2]; 2 -> 5 rows takes [0 0 1 1 1].
    # Crop left = round((7 - 5) / 2) = 1 -> source columns [0 1 1 1 2]. (A width of 8 would give [0 1 1 2 2].)
    path = _write(tmp_path, [[10, 20, 30], [40, 50, 60]], "L")
    out = reference_preprocess(path, 5, 1, interpolation="nearest", crop_pct=1.0, **NO_NORM_GRAY)
    row0, row1 = [10, 20, 20, 20, 30], [40, 50, 50, 50, 60]
    expected = np.array([row0, row0, row1, row1, row1]) / 255
    np.testing.assert_allclose(out[0], expected, rtol=0, atol=1e-7)


@pytest.mark.parametrize("width", [5, 7])
def test_crop_offset_rounds_half_to_even(tmp_path, width):
    # 2 x width, size 2, crop_pct 1: the short side is already 2 and new_w = int(2 * width / 2) = width, so no
    # resize. left = round(1.5) = 2 for width 5 and round(2.5) = 2 for width 7 (half to even, as Python rounds).
    row = [0, 10, 20, 30, 40, 50, 60][:width]
    path = _write(tmp_path, [row, [v + 1 for v in row]], "L")
    out = reference_preprocess(path, 2, 1, crop_pct=1.0, **NO_NORM_GRAY)
    np.testing.assert_allclose(out[0], np.array([[20, 30], [21, 31]]) / 255, rtol=0, atol=1e-7)


def test_padding_when_smaller_than_crop(tmp_path):
    path = _write(tmp_path, [[100, 200], [50, 150]], "L")
    # size 4, crop_pct 2: s = 2, no resize; pad 1 on every side.
    out = reference_preprocess(path, 4, 1, crop_pct=2.0, **NO_NORM_GRAY)
    expected = np.array([[0, 0, 0, 0], [0, 100, 200, 0], [0, 50, 150, 0], [0, 0, 0, 0]]) / 255
    np.testing.assert_allclose(out[0], expected, rtol=0, atol=1e-7)
    # size 3, crop_pct 1.5: s = 2; odd padding goes right and bottom (left = top = 1 // 2 = 0, right = bottom = 1).
    # Padding comes before normalization, so the padded zeros become (0 - 0.5) / 0.5 = -1.
    out = reference_preprocess(path, 3, 1, crop_pct=1.5, mean=(0.5,), std=(0.5,))
    expected = (np.array([[100, 200, 0], [50, 150, 0], [0, 0, 0]]) / 255 - 0.5) / 0.5
    np.testing.assert_allclose(out[0], expected, rtol=0, atol=1e-6)


def test_mean_std_normalization(tmp_path):
    path = _write(tmp_path, [[[51, 102, 255]]], "RGB")
    # 51, 102, 255 / 255 = 0.2, 0.4, 1.0.
    out = reference_preprocess(path, 1, 3, crop_pct=1.0, mean=(0.1, 0.2, 0.3), std=(0.5, 0.25, 2.0))
    np.testing.assert_allclose(out.ravel(), [0.2, 0.8, 0.35], rtol=0, atol=1e-6)
    assert out.dtype == np.float32
    # Defaults mean = std = 0.5: (v - 0.5) / 0.5.
    out = reference_preprocess(path, 1, 3, crop_pct=1.0)
    np.testing.assert_allclose(out.ravel(), [-0.6, -0.2, 1.0], rtol=0, atol=1e-6)


def test_gray_and_rgb_conversions(tmp_path):
    # RGB -> "L" with Pillow's ITU-R 601-2 luma: red 76, green 150, blue 29. size (1, 3) with crop_pct 1: no resize.
    path = _write(tmp_path, [[[255, 0, 0], [0, 255, 0], [0, 0, 255]]], "RGB", "primaries.png")
    out = reference_preprocess(path, (1, 3), 1, crop_pct=1.0, **NO_NORM_GRAY)
    assert out.shape == (1, 1, 3)
    np.testing.assert_allclose(out[0, 0], np.array([76, 150, 29]) / 255, rtol=0, atol=1e-7)
    # "L" -> "RGB" repeats the value in every channel.
    path = _write(tmp_path, [[7, 200]], "L", "gray.png")
    out = reference_preprocess(path, (1, 2), 3, crop_pct=1.0, **NO_NORM)
    assert out.shape == (3, 1, 2)
    np.testing.assert_allclose(out[:, 0], np.array([[7, 200]] * 3) / 255, rtol=0, atol=1e-7)
    # RGBA -> "RGB" drops alpha, no compositing onto black or white.
    path = _write(tmp_path, [[[10, 20, 30, 0], [40, 50, 60, 128]]], "RGBA", "alpha.png")
    out = reference_preprocess(path, (1, 2), 3, crop_pct=1.0, **NO_NORM)
    np.testing.assert_allclose(out[:, 0].T, np.array([[10, 20, 30], [40, 50, 60]]) / 255, rtol=0, atol=1e-7)


def test_resize_target_is_floored(tmp_path):
    # size 2, crop_pct 0.7: s = floor(2 / 0.7) = floor(2.86) = 2, the image's size, so no resize and the output is
    # the image itself. (Rounding to 3 would resize with bicubic and blend the checkerboard.)
    path = _write(tmp_path, [[0, 255], [255, 0]], "L")
    out = reference_preprocess(path, 2, 1, crop_pct=0.7, **NO_NORM_GRAY)
    np.testing.assert_allclose(out[0], np.array([[0, 1], [1, 0]]), rtol=0, atol=1e-7)
    # Same for each side of a non-square size: (floor(2 / 0.7), floor(3 / 0.7)) = (2, 4) for a 2x4 image.
    path = _write(tmp_path, [[0, 255, 0, 255], [255, 0, 255, 0]], "L", "wide.png")
    out = reference_preprocess(path, (2, 3), 1, crop_pct=0.7, **NO_NORM_GRAY)
    # Crop left = round((4 - 3) / 2) = round(0.5) = 0.
    np.testing.assert_allclose(out[0], np.array([[0, 1, 0], [1, 0, 1]]), rtol=0, atol=1e-7)


def test_non_square_size_resizes_exactly(tmp_path):
    # size (2, 3), crop_pct 0.5: resize to exactly 4x6 (h x w), aspect ignored: nearest takes source rows
    # [0 0 1 1] and columns [0 0 0 1 1 1]; crop top = round(1.0) = 1, left = round(1.5) = 2.
    path = _write(tmp_path, [[10, 20], [30, 40]], "L")
    out = reference_preprocess(path, (2, 3), 1, interpolation="nearest", crop_pct=0.5, **NO_NORM_GRAY)
    np.testing.assert_allclose(out[0], np.array([[10, 20, 20], [30, 40, 40]]) / 255, rtol=0, atol=1e-7)


def test_int_size_is_square_tuple_and_defaults(tmp_path):
    # 5x7 (h x w) of one value: any filter keeps it; size 4, crop_pct 0.9: s = 4, resized to 4x5, cropped to 4x4.
    path = _write(tmp_path, np.full((5, 7, 3), 128), "RGB")
    out = reference_preprocess(path, 4, 3)
    assert out.shape == (3, 4, 4) and out.dtype == np.float32
    np.testing.assert_allclose(out, np.full((3, 4, 4), (128 / 255 - 0.5) / 0.5), rtol=0, atol=1e-6)
    np.testing.assert_array_equal(out, reference_preprocess(path, (4, 4), 3))


@pytest.mark.parametrize("interpolation", ["nearest", "bilinear", "bicubic", "lanczos", "box", "hamming"])
def test_every_interpolation_keeps_a_flat_image(tmp_path, interpolation):
    path = _write(tmp_path, np.full((6, 9), 90), "L")
    out = reference_preprocess(path, 3, 1, interpolation=interpolation, crop_pct=0.5, **NO_NORM_GRAY)
    assert out.shape == (1, 3, 3)
    np.testing.assert_allclose(out, np.full((1, 3, 3), 90 / 255), rtol=0, atol=1e-7)


@pytest.mark.parametrize(
    "interpolation, pil_filter",
    [
        ("nearest", Image.Resampling.NEAREST),
        ("bilinear", Image.Resampling.BILINEAR),
        ("bicubic", Image.Resampling.BICUBIC),
        ("lanczos", Image.Resampling.LANCZOS),
        ("box", Image.Resampling.BOX),
        ("hamming", Image.Resampling.HAMMING),
    ],
)
def test_interpolation_name_picks_that_pillow_filter(tmp_path, interpolation, pil_filter):
    # 9x9 random down to 4x4 (size 4, crop_pct 1: s = 4, square, so no crop): the output is Pillow's resize with
    # that filter, and no other filter gives the same answer on this image (upscaling would not do: there box and
    # nearest agree).
    pixels = np.random.default_rng(0).integers(0, 256, size=(9, 9), dtype=np.uint8)
    path = _write(tmp_path, pixels, "L")
    out = reference_preprocess(path, 4, 1, interpolation=interpolation, crop_pct=1.0, **NO_NORM_GRAY)
    expected = np.asarray(Image.fromarray(pixels, "L").resize((4, 4), pil_filter))
    np.testing.assert_allclose(out[0], expected / 255, rtol=0, atol=1e-7)
    for other in Image.Resampling:
        if other != pil_filter:
            resized = np.asarray(Image.fromarray(pixels, "L").resize((4, 4), other))
            assert not np.array_equal(resized, expected), other


def test_animated_gif_uses_first_frame(tmp_path):
    first = np.array([[0, 85], [170, 255]], dtype=np.uint8)
    path = tmp_path / "anim.gif"
    Image.fromarray(first, "L").save(path, save_all=True, append_images=[Image.fromarray(255 - first, "L")])
    with Image.open(path) as img:
        assert img.n_frames == 2
    out = reference_preprocess(path, 2, 1, crop_pct=1.0, **NO_NORM_GRAY)
    np.testing.assert_allclose(out[0], first / 255, rtol=0, atol=1e-7)


def test_rejects_bad_arguments(tmp_path):
    path = _write(tmp_path, [[1, 2], [3, 4]], "L")
    with pytest.raises(ValueError, match="channels"):
        reference_preprocess(path, 2, 2)
    with pytest.raises(ValueError, match="interpolation"):
        reference_preprocess(path, 2, 1, interpolation="area", mean=(0.5,), std=(0.5,))
    with pytest.raises(ValueError, match="mean"):
        reference_preprocess(path, 2, 1)  # default mean/std have 3 values


def test_reads_every_generated_file(folder, scanned):
    # Every format and mode in the folder goes through; a 28x28 gray PNG at crop_pct 1 is the sample, normalized.
    images, _ = load_sample()
    rare = [e for e in scanned["train"] if e["format"] not in ("PNG", "JPEG")]
    entries = scanned["train"][:40] + rare + scanned["val"]
    assert {"GIF", "WEBP", "BMP", "PNG", "JPEG"} <= {e["format"] for e in entries}
    for entry in entries:
        path = folder["root"] / entry["rel"]
        for channels in (1, 3):
            norm = {"mean": (0.5,) * channels, "std": (0.5,) * channels}
            out = reference_preprocess(path, 28, channels, crop_pct=1.0, **norm)
            assert out.shape == (channels, 28, 28) and np.isfinite(out).all()
            assert out.min() >= -1.0 and out.max() <= 1.0
        if entry["format"] == "PNG" and entry["mode"] == "L" and entry["size"] == (28, 28):
            out = reference_preprocess(path, 28, 1, crop_pct=1.0, mean=(0.5,), std=(0.5,))
            np.testing.assert_allclose(out[0], (images[entry["index"]] / 255 - 0.5) / 0.5, rtol=0, atol=1e-6)
