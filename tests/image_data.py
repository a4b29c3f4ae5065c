"""Image folders as users keep them, built from the bundled Fashion-MNIST sample, and an independent reference of
timm's evaluation transform.

Users' folders are never the clean 28x28 gray PNGs a dataset ships: they hold tinted RGB photos, gray scans, PNGs
with alpha, JPEGs, the odd GIF/WebP/BMP, mixed sizes, and now and then a broken file. `make_image_folder` writes
such a folder (torchvision ImageFolder layout), `make_bad_files` writes the files a run must stop on, and
`reference_preprocess` is the oracle other tests compare a loader against. It uses numpy and Pillow only (no torch,
no torchvision, nothing from moe_prune) so that it cannot share a bug with the code it checks.
"""

from __future__ import annotations

import io
import math
import pathlib

import numpy as np
from PIL import Image

SAMPLE = pathlib.Path(__file__).resolve().parents[1] / "moe_prune" / "assets" / "fashion_mnist_sample.npz"

# Index = Fashion-MNIST label. Sorted by name they are in another order, which is what ImageFolder assigns, so a
# loader that mixes up "label" and "folder index" fails the tests built on this.
CLASS_NAMES = (
    "t-shirt",
    "trouser",
    "pullover",
    "dress",
    "coat",
    "sandal",
    "shirt",
    "sneaker",
    "bag",
    "ankle-boot",
)

# (mode, format) of the ordinary files; cycled so every kind appears once a split has six images.
_KINDS = (
    ("RGB", "PNG"),
    ("RGB", "JPEG"),
    ("L", "PNG"),
    ("RGBA", "PNG"),
    ("RGB", "JPEG"),
    ("L", "JPEG"),
)
# (width, height) on disk; 7 is coprime with the 6 kinds, so sizes and kinds combine. Portrait and landscape both,
# because torchvision's shorter-side resize takes a different branch for each.
_SIZES = ((28, 28), (20, 20), (32, 40), (56, 56), (28, 35), (40, 30), (28, 28))
# One of each rarer format somewhere in the folder.
_RARE_FORMATS = ("GIF", "WEBP", "BMP")
_EXTENSIONS = {"PNG": ".png", "JPEG": ".jpg", "GIF": ".gif", "WEBP": ".webp", "BMP": ".bmp"}

_RESAMPLE = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
    "box": Image.Resampling.BOX,
    "hamming": Image.Resampling.HAMMING,
}


def load_sample() -> tuple[np.ndarray, np.ndarray]:
    """The bundled Fashion-MNIST sample.

    Returns:
        (images uint8 [1000, 28, 28], labels uint8 [1000]), labels 0..9 in Fashion-MNIST order (see CLASS_NAMES).

    Example:
        images, labels = load_sample()
        CLASS_NAMES[labels[0]]
        images[0].shape  # (28, 28)
    """
    with np.load(SAMPLE) as data:
        return data["images"], data["labels"]


def _split_indices(labels: np.ndarray, n_train: int, n_val: int) -> tuple[list[int], list[int]]:
    """Sample indices for train and val: round-robin over classes so every class is in both splits, train taking
    each class's first images and val the ones after them (disjoint by construction)."""
    per_class = [list(np.flatnonzero(labels == c)) for c in range(len(CLASS_NAMES))]
    cursor = [0] * len(CLASS_NAMES)

    def take(n: int) -> list[int]:
        picked: list[int] = []
        while len(picked) < n:
            progressed = False
            for c in range(len(CLASS_NAMES)):
                if len(picked) == n:
                    break
                if cursor[c] < len(per_class[c]):
                    picked.append(int(per_class[c][cursor[c]]))
                    cursor[c] += 1
                    progressed = True
            if not progressed:
                raise ValueError(f"the sample at {SAMPLE} has only {len(labels)} images; ask for fewer")
        return sorted(picked)

    train = take(n_train)
    return train, take(n_val)


def _tinted(gray: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A gray [h, w] image as RGB [h, w, 3]: times a random per-channel tint plus a small offset."""
    tint = rng.uniform(0.5, 1.0, size=3)
    offset = rng.uniform(0.0, 24.0, size=3)
    return np.clip(gray[..., None].astype(np.float64) * tint + offset, 0, 255).round().astype(np.uint8)


def _user_image(gray: np.ndarray, mode: str, size: tuple[int, int], rgb: bool, rng: np.random.Generator):
    """One sample image in the given mode and (width, height), as a PIL image."""
    if not rgb:
        # Gray folders keep their content gray: RGB kinds stay "L", RGBA becomes "LA".
        mode = {"RGB": "L", "RGBA": "LA"}.get(mode, mode)
    if mode == "L":
        img = Image.fromarray(gray, "L")
    elif mode == "LA":
        alpha = rng.integers(0, 256, size=gray.shape, dtype=np.uint8)
        img = Image.fromarray(np.stack([gray, alpha], axis=-1), "LA")
    elif mode == "RGB":
        img = Image.fromarray(_tinted(gray, rng), "RGB")
    else:
        # Random alpha: convert("RGB") drops it, so a loader that composites onto a background is caught.
        alpha = rng.integers(0, 256, size=gray.shape, dtype=np.uint8)
        img = Image.fromarray(np.concatenate([_tinted(gray, rng), alpha[..., None]], axis=-1), "RGBA")
    if size != img.size:
        img = img.resize(size, Image.Resampling.BICUBIC)
    return img


def _save(img: Image.Image, path: pathlib.Path, fmt: str, rgb: bool) -> None:
    if fmt == "JPEG":
        img.save(path, "JPEG", quality=90)
    elif fmt == "GIF":
        # Two frames, the second the negative (Pillow merges identical frames), so the file is really animated.
        negative = Image.fromarray(255 - np.asarray(img), img.mode)
        img.save(path, "GIF", save_all=True, append_images=[negative], duration=100, loop=0)
    elif fmt == "WEBP":
        # WebP has no gray mode; lossless keeps a gray folder's content exactly gray.
        img.save(path, "WEBP", quality=90, lossless=not rgb)
    else:
        img.save(path, fmt)


def make_image_folder(root, n_train: int = 200, n_val: int = 100, seed: int = 0, rgb: bool = True) -> dict:
    """Write a torchvision ImageFolder tree of Fashion-MNIST sample images made to look like users' files.

    Layout: root/train/<class>/<sample index>.<ext> and root/val/<class>/<sample index>.<ext>, where <class> is
    CLASS_NAMES[label] and the file name is the image's index in `load_sample()`. Train takes each class's first
    sample images and val the ones after them, so the splits are disjoint and every class is in both.

    With rgb=True the files mix tinted RGB, gray ("L") and RGBA PNGs and JPEGs (quality 90), plus exactly one
    animated GIF, one WebP and one BMP; sizes mix 28x28, 20x20, 32x40, 56x56, 28x35 and 40x30 (width x height).
    With rgb=False every image has gray content (modes "L", "LA", "P", and RGB only for the lossless WebP).
    The same seed gives byte-identical files.

    Args:
        root: folder to write into (created if missing).
        n_train: images in train, at least 10 (one per class).
        n_val: images in val, at least 10.
        seed: seeds the tints, alpha channels and which image gets which kind and size.
        rgb: tinted colour images among the files (True) or gray content only (False).

    Returns:
        {"root": Path, "train": [(relative path, label, class name), ...], "val": [...],
         "class_to_index": {class name: ImageFolder index}}, the relative paths POSIX strings relative to root
         (e.g. "train/t-shirt/0000.png"), labels ints in Fashion-MNIST order, entries sorted by path.

    Raises:
        ValueError: n_train or n_val below 10, or more images asked for than the sample holds.

    Example:
        folder = make_image_folder(tmp_path, n_train=20, n_val=10)
        path, label, name = folder["train"][0]
        folder["class_to_index"][name]  # the index ImageFolder gives this image
    """
    if n_train < len(CLASS_NAMES) or n_val < len(CLASS_NAMES):
        raise ValueError(f"n_train={n_train}, n_val={n_val}: each split needs at least one image per class (10)")
    root = pathlib.Path(root)
    images, labels = load_sample()
    rng = np.random.default_rng(seed)
    train_idx, val_idx = _split_indices(labels, n_train, n_val)
    jobs = [("train", int(i)) for i in train_idx] + [("val", int(i)) for i in val_idx]

    # Kinds and sizes cycled (so all appear), then shuffled by the seed (so which image gets what varies).
    kinds = [_KINDS[k % len(_KINDS)] for k in rng.permutation(len(jobs))]
    sizes = [_SIZES[k % len(_SIZES)] for k in rng.permutation(len(jobs))]
    rare_at = dict(zip(rng.choice(len(jobs), size=len(_RARE_FORMATS), replace=False).tolist(), _RARE_FORMATS))

    result = {"root": root, "train": [], "val": []}
    for k, (split, index) in enumerate(jobs):
        label = int(labels[index])
        name = CLASS_NAMES[label]
        mode, fmt = kinds[k]
        if k in rare_at:
            # GIF/WebP/BMP: plain colour (or gray) images, no alpha.
            mode, fmt = "RGB", rare_at[k]
        img = _user_image(images[index], mode, sizes[k], rgb, rng)
        rel = f"{split}/{name}/{index:04d}{_EXTENSIONS[fmt]}"
        (root / split / name).mkdir(parents=True, exist_ok=True)
        _save(img, root / rel, fmt, rgb)
        result[split].append((rel, label, name))
    for split in ("train", "val"):
        result[split].sort()
    result["class_to_index"] = {name: i for i, name in enumerate(sorted(CLASS_NAMES))}
    return result


def make_bad_files(folder) -> dict[str, pathlib.Path]:
    """Write the broken files a run must stop on (with the file named), and one non-image it must skip.

    Args:
        folder: folder to write into (created if missing).

    Returns:
        {"truncated_jpeg": a valid JPEG cut to half its bytes (opens, fails on decode),
         "cut_png": a PNG cut right after its header, signature + IHDR + the IDAT chunk header (fails on decode),
         "empty_png": a zero-byte ".png",
         "text_jpg": "notes.jpg", a text file,
         "ignored": "README.txt", which a folder reader should skip by its extension}.

    Example:
        bad = make_bad_files(tmp_path / "train" / "bag")
        with pytest.raises(OSError), Image.open(bad["truncated_jpeg"]) as img:
            img.load()
    """
    folder = pathlib.Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    images, _ = load_sample()
    # 112x112 so the JPEG's scan data outweighs its headers: the cut lands in the pixels, and Image.open still
    # succeeds, as with a download that stopped early.
    big = Image.fromarray(images[0], "L").resize((112, 112), Image.Resampling.BICUBIC).convert("RGB")
    buf = io.BytesIO()
    big.save(buf, "JPEG", quality=90)
    jpeg = buf.getvalue()
    buf = io.BytesIO()
    Image.fromarray(images[1], "L").save(buf, "PNG")
    png = buf.getvalue()
    # Cut after the first IDAT chunk's length and type: everything before the pixel data, none of it.
    png_header = png[: png.index(b"IDAT") + 4]

    paths = {
        "truncated_jpeg": folder / "truncated.jpg",
        "cut_png": folder / "header_only.png",
        "empty_png": folder / "empty.png",
        "text_jpg": folder / "notes.jpg",
        "ignored": folder / "README.txt",
    }
    paths["truncated_jpeg"].write_bytes(jpeg[: len(jpeg) // 2])
    paths["cut_png"].write_bytes(png_header)
    paths["empty_png"].write_bytes(b"")
    paths["text_jpg"].write_text("photos from the 2023 shoot, see the shared drive\n")
    paths["ignored"].write_text("Fashion-MNIST sample images, one folder per class.\n")
    return paths


def reference_preprocess(
    path,
    size,
    channels: int,
    interpolation: str = "bicubic",
    crop_pct: float = 0.9,
    mean=(0.5, 0.5, 0.5),
    std=(0.5, 0.5, 0.5),
) -> np.ndarray:
    """timm's evaluation transform (resize, center crop, to tensor, normalize) as torchvision applies it to a PIL
    image, written from the spec with numpy and Pillow only.

    Args:
        path: image file.
        size: (H, W), or an int for H = W.
        channels: 3 (Pillow's convert("RGB"), alpha dropped) or 1 (convert("L")).
        interpolation: one of nearest, bilinear, bicubic, lanczos, box, hamming.
        crop_pct: the crop's share of the resized image; the resize target is floor(H / crop_pct).
        mean: per-channel mean, `channels` values.
        std: per-channel standard deviation, `channels` values.

    Returns:
        float32 [channels, H, W].

    Raises:
        ValueError: channels not 1 or 3, unknown interpolation, or mean/std not of length `channels`.

    Example:
        x = reference_preprocess(path, 224, 3, crop_pct=0.875, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
        x.shape  # (3, 224, 224)
        x.dtype  # float32
    """
    if channels not in (1, 3):
        raise ValueError(f"channels={channels}: must be 1 or 3")
    if interpolation not in _RESAMPLE:
        raise ValueError(f"interpolation={interpolation!r}: must be one of {sorted(_RESAMPLE)}")
    if len(mean) != channels or len(std) != channels:
        raise ValueError(f"mean {tuple(mean)} and std {tuple(std)} need {channels} values each")
    resample = _RESAMPLE[interpolation]
    height, width = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))

    # a. Open; an animated GIF's first frame; Pillow's own conversion.
    with Image.open(path) as img:
        if getattr(img, "is_animated", False):
            img.seek(0)
        img = img.convert("RGB" if channels == 3 else "L")

    # b. Resize.
    w, h = img.size
    if height == width:
        # Shorter side to s, the longer one scaled and truncated with int(), as torchvision computes it.
        s = math.floor(height / crop_pct)
        if w <= h:
            new_w, new_h = s, int(s * h / w)
        else:
            new_h, new_w = s, int(s * w / h)
    else:
        # Exactly (floor(H / crop_pct), floor(W / crop_pct)), aspect ratio not kept.
        new_h, new_w = math.floor(height / crop_pct), math.floor(width / crop_pct)
    if (new_w, new_h) != (w, h):
        img = img.resize((new_w, new_h), resample)

    # c. Center crop, zero-padding first where the image is smaller than the crop.
    pixels = np.asarray(img, dtype=np.uint8)
    if pixels.ndim == 2:
        pixels = pixels[:, :, None]  # [h, w, 1]
    h, w = pixels.shape[:2]
    if height > h or width > w:
        pad_top = (height - h) // 2 if height > h else 0
        pad_bottom = (height - h + 1) // 2 if height > h else 0
        pad_left = (width - w) // 2 if width > w else 0
        pad_right = (width - w + 1) // 2 if width > w else 0
        pixels = np.pad(pixels, ((pad_top, pad_bottom), (pad_left, pad_right), (0, 0)), constant_values=0)
        h, w = pixels.shape[:2]
    # Python's round(): half to even, as torchvision's center_crop uses it.
    top = int(round((h - height) / 2.0))
    left = int(round((w - width) / 2.0))
    pixels = pixels[top : top + height, left : left + width]  # [H, W, C]

    # d. To float32 in [0, 1], HWC -> CHW.
    x = pixels.astype(np.float32) / np.float32(255.0)
    x = np.ascontiguousarray(x.transpose(2, 0, 1))  # [C, H, W]

    # e. Per-channel normalization, in float32 as torchvision does it.
    mean = np.asarray(mean, dtype=np.float32).reshape(channels, 1, 1)
    std = np.asarray(std, dtype=np.float32).reshape(channels, 1, 1)
    return (x - mean) / std
