"""A model's own input preprocessing: timm's evaluation transform, in numpy and Pillow (no torch, no torchvision),
so that calibration, healing, evaluation, the predictor and the server all feed a model what it was trained on.

    image (any size, gray/RGB/RGBA/palette)
      -> convert to the model's channels ("L" or "RGB")
      -> resize the shorter side to floor(size / crop_pct) (a non-square input size: both sides), `interpolation`
      -> center crop to the input size (zero-padded where the image is smaller, as torchvision does)
      -> float32 / 255, HWC -> CHW
      -> (x - mean) / std per channel                                      -> float32 [C, H, W]

Torchvision applies PIL's own resize to PIL images, so these are timm's numbers for the same file. A native
checkpoint records its preprocessing in its metadata (`meta["preprocess"]`); models trained here use the
identity on 28x28 one-channel images (pixels / 255); converted soft-moe ViTs start from timm's ViT defaults.
This module imports no torch: the serving environment uses it.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace

import numpy as np

from ..errors import ConfigError, DataError

INTERPOLATIONS = ("nearest", "bilinear", "bicubic", "lanczos", "box", "hamming")
# timm's vision_transformer default config (_cfg): crop_pct 0.9, bicubic, the Inception mean and std.
TIMM_VIT = {"interpolation": "bicubic", "crop_pct": 0.9, "mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5)}
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class Preprocess:
    """How images become a model's input.

    Args:
        size: the model's input (H, W).
        channels: 1 (gray) or 3 (RGB).
        interpolation: one of INTERPOLATIONS (Pillow's filters).
        crop_pct: the center crop's share of the resized image (timm's crop_pct; 1.0: resize to the input size).
        mean, std: per channel (length `channels`; one value is repeated), applied to pixels / 255.
        source: where these values came from, for reports ("checkpoint", "timm's ViT defaults", ...).

    Example:
        >>> p = Preprocess(size=(224, 224), channels=3, mean=IMAGENET_MEAN, std=IMAGENET_STD)
        >>> p.image(PIL.Image.open("cat.jpg")).shape
        (3, 224, 224)
    """

    size: tuple[int, int]
    channels: int
    interpolation: str = "bicubic"
    crop_pct: float = 1.0
    mean: tuple[float, ...] = (0.0,)
    std: tuple[float, ...] = (1.0,)
    source: str = "given"

    def __post_init__(self):
        size = (self.size, self.size) if isinstance(self.size, int) else tuple(int(v) for v in self.size)
        object.__setattr__(self, "size", size)
        if len(size) != 2 or min(size) < 1:
            raise ConfigError(f"preprocess: size must be (H, W) of positive integers, got {self.size!r}")
        if self.channels not in (1, 3):
            raise ConfigError(f"preprocess: channels must be 1 or 3, got {self.channels!r}")
        if self.interpolation not in INTERPOLATIONS:
            raise ConfigError(f"--interpolation {self.interpolation!r}: choose one of {', '.join(INTERPOLATIONS)}")
        if not (isinstance(self.crop_pct, (int, float)) and 0 < self.crop_pct <= 1):
            raise ConfigError(f"--crop-pct {self.crop_pct!r}: give a fraction in (0, 1] (timm's ViTs use 0.9)")
        for name in ("mean", "std"):
            values = getattr(self, name)
            values = (values,) if isinstance(values, (int, float)) else tuple(float(v) for v in values)
            if len(values) == 1:
                values = values * self.channels
            if len(values) != self.channels or not all(math.isfinite(v) for v in values):
                raise ConfigError(f"--{name} {list(values)}: give {self.channels} finite value(s), one per channel")
            object.__setattr__(self, name, values)
        if min(self.std) <= 0:
            raise ConfigError(f"--std {list(self.std)}: every value must be positive")

    # -- records -------------------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        """The `preprocess` block of a checkpoint's metadata."""
        d = asdict(self)
        d["size"], d["mean"], d["std"] = list(self.size), list(self.mean), list(self.std)
        return d

    @classmethod
    def from_dict(cls, d: dict, source: str | None = None) -> "Preprocess":
        known = {"size", "channels", "interpolation", "crop_pct", "mean", "std", "source"}
        if not isinstance(d, dict) or set(d) - known:
            raise ConfigError(f"preprocess block: expected keys {sorted(known)}, got {d!r}")
        out = cls(**d)
        return replace(out, source=source) if source else out

    def describe(self) -> str:
        h, w = self.size
        return (f"{self.channels} channel(s) {h}x{w}, resize {self.interpolation} (crop_pct {self.crop_pct:g}), "
                f"mean {list(self.mean)}, std {list(self.std)} ({self.source})")

    @property
    def identity_at_size(self) -> bool:
        """Whether an image already at the input size passes resize and crop unchanged."""
        return all(math.floor(s / self.crop_pct) == s for s in self.size)

    # -- the transform -------------------------------------------------------------------------------------
    def resized_size(self, w: int, h: int) -> tuple[int, int]:
        """(width, height) after the resize step, as torchvision's Resize computes it."""
        H, W = self.size
        if H != W:
            return math.floor(W / self.crop_pct), math.floor(H / self.crop_pct)
        s = math.floor(H / self.crop_pct)
        if w <= h:
            return s, int(s * h / w)
        return int(s * w / h), s

    def image(self, img) -> np.ndarray:
        """One PIL image -> float32 [C, H, W] (see the module docstring)."""
        return self.normalize(self.pixels(img))

    def pixels(self, img) -> np.ndarray:
        """One PIL image -> uint8 [H, W, C] at the input size: the transform up to the crop, before / 255.

        What a model with its preprocessing inside the ONNX graph (`export --preprocess`) takes; `image` is
        `normalize(pixels(img))`.
        """
        from PIL import Image

        img = img.convert("RGB" if self.channels == 3 else "L")
        size = self.resized_size(*img.size)
        if size != img.size:
            img = img.resize(size, getattr(Image.Resampling, self.interpolation.upper()))
        pixels = np.asarray(img)
        return _center_crop(pixels[..., None] if pixels.ndim == 2 else pixels, self.size)

    def normalize(self, hwc: np.ndarray) -> np.ndarray:
        """uint8 pixels [..., H, W, C] at the input size -> float32 [..., C, H, W]: / 255, then per-channel mean/std."""
        x = np.moveaxis(hwc.astype(np.float32) / 255.0, -1, -3)  # HWC -> CHW
        mean = np.asarray(self.mean, np.float32)[:, None, None]
        std = np.asarray(self.std, np.float32)[:, None, None]
        return np.ascontiguousarray((x - mean) / std, dtype=np.float32)

    def array(self, images: np.ndarray) -> np.ndarray:
        """uint8 images [N, H, W], [N, H, W, C] or [N, C, H, W] -> float32 [N, C, H, W].

        Images already at the input size skip resize and crop when those would not change them (the bundled
        models: 28x28, crop_pct 1), so a data set of them is converted with array arithmetic; any other size goes
        through Pillow image by image, exactly as a decoded file would.
        """
        from PIL import Image

        hwc = as_nhwc(images)
        if hwc.shape[1:3] == self.size and self.identity_at_size and hwc.shape[-1] == self.channels:
            return self.normalize(hwc)
        gray = hwc.shape[-1] == 1
        return np.stack([self.image(Image.fromarray(im[..., 0] if gray else im, "L" if gray else "RGB")) for im in hwc])


def _center_crop(a: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """torchvision's center_crop on an array [h, w(, c)]: zero padding where it is smaller than the crop."""
    H, W = size
    h, w = a.shape[:2]
    if h < H or w < W:
        pad_top, pad_left = max(H - h, 0) // 2, max(W - w, 0) // 2
        pads = [(pad_top, max(H - h, 0) - pad_top), (pad_left, max(W - w, 0) - pad_left)] + [(0, 0)] * (a.ndim - 2)
        a = np.pad(a, pads)
        h, w = a.shape[:2]
    top, left = int(round((h - H) / 2.0)), int(round((w - W) / 2.0))
    return a[top:top + H, left:left + W]


def as_nhwc(images: np.ndarray) -> np.ndarray:
    """uint8 images [N, H, W], [N, H, W, C] or [N, C, H, W] (C in 1, 3, 4) -> [N, H, W, C] (RGBA: alpha dropped)."""
    a = np.asarray(images)
    if a.dtype != np.uint8:
        raise DataError(f"images must be uint8, got {a.dtype}")
    if a.ndim == 3:
        return a[..., None]
    if a.ndim != 4:
        raise DataError(f"uint8 images must be [N, H, W], [N, H, W, C] or [N, C, H, W], got {list(a.shape)}")
    if a.shape[-1] in (1, 3, 4):
        out = a
    elif a.shape[1] in (1, 3, 4):
        out = np.moveaxis(a, 1, -1)
    else:
        raise DataError(f"uint8 images {list(a.shape)}: no channel axis of 1, 3 or 4 first or last")
    return out[..., :3] if out.shape[-1] == 4 else out


def recorded_fact(meta: dict, key: str):
    """`key` in a checkpoint's metadata, or in the metadata of the checkpoint it was made from (a compressed
    checkpoint keeps its source's under "source_meta"), nearest first; None if nowhere."""
    while isinstance(meta, dict):
        if key in meta:
            return meta[key]
        meta = meta.get("source_meta")
    return None


def for_model(model, **overrides) -> Preprocess | None:
    """The preprocessing of a model (a native one, or a skeleton): its checkpoint's recorded block, else the
    default for where it came from, with the user's `overrides` (interpolation, crop_pct, mean, std) on top.
    None for a model that takes tokens (a bare Soft MoE layer) or images of an unknown size.

    Defaults: models trained here take 28x28 pixels / 255 (crop_pct 1, no normalization); a converted soft-moe ViT
    takes timm's ViT evaluation transform (bicubic, crop_pct 0.9, mean = std = 0.5 per channel).
    """
    want = model_input(model)
    if want["kind"] != "images":
        return None
    c, h, w = want["shape"]
    meta = getattr(model, "checkpoint_meta", {}) or {}
    overrides = {k: v for k, v in overrides.items() if v is not None}
    recorded = recorded_fact(meta, "preprocess")
    if isinstance(recorded, dict):
        base = Preprocess.from_dict(recorded, source="checkpoint")
        base = replace(base, size=(h, w), channels=c)
    elif recorded_fact(meta, "converted_from"):
        base = Preprocess(size=(h, w), channels=c, **{**TIMM_VIT, "mean": TIMM_VIT["mean"][:c],
                                                       "std": TIMM_VIT["std"][:c]}, source="timm's ViT defaults")
    else:
        base = Preprocess(size=(h, w), channels=c, interpolation="bilinear", crop_pct=1.0, mean=(0.0,), std=(1.0,),
                          source="pixels / 255, as models trained here")
    if overrides:
        base = replace(base, **overrides, source=f"{base.source}; {', '.join(sorted(overrides))} given")
    return base


def model_input(model) -> dict:
    """What a model takes: {"kind": "images", "shape": [C, H, W], "range": (0.0, 1.0) or None} or
    {"kind": "tokens", "shape": [None, D]} (None: any token count). `range` is known for the models trained
    here (pixels / 255); a converted soft-moe ViT has its own normalization, so it is None there.

    Example:
        >>> model_input(MnistSoftMoE(MnistConfig(num_experts=8)))
        {'kind': 'images', 'shape': [1, 28, 28], 'range': (0.0, 1.0)}
    """
    from .layers import SoftMoEConfig

    # A bare Soft MoE layer, or one run with a subset of its experts (selection's PrunedSoftMoE, whose config is
    # its layer's): its config is a SoftMoEConfig, a model's is its family's.
    if isinstance(getattr(model, "config", None), SoftMoEConfig):
        return {"kind": "tokens", "shape": [None, model.config.dim]}
    c = model.config
    size = (c.img_size, c.img_size) if isinstance(c.img_size, int) else tuple(c.img_size)
    converted = recorded_fact(getattr(model, "checkpoint_meta", {}), "converted_from") is not None
    return {"kind": "images", "shape": [c.in_chans, *size], "range": None if converted else (0.0, 1.0)}


def describe_input(want: dict) -> str:
    """`model_input` in words: "images [N, 1, 28, 28] (float in [0, 1], or uint8 [N, 28, 28])"."""
    if want["kind"] == "tokens":
        return f"tokens [N, M, {want['shape'][1]}] (float; a bare Soft MoE layer)"
    c, h, w = want["shape"]
    text = f"images [N, {c}, {h}, {w}]"
    extra = []
    if want.get("range"):
        extra.append(f"float in [{want['range'][0]:g}, {want['range'][1]:g}]")
    extra.append("or uint8 images of any size through its preprocessing")
    return text + (f" ({', '.join(extra)})" if extra else "")
