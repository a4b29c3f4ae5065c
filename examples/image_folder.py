"""Write an image folder like the ones users keep, from the bundled Fashion-MNIST sample: RGB-tinted and gray
PNG and JPEG files of mixed sizes in one sub-folder per class, with a train/ (sample images 0-499) and a val/
(500-999), and a classes.txt naming the model's classes in its own order. Then every moe-prune command reads it
as it is:

    python examples/image_folder.py photos
    moe-prune eval moe_prune/assets/default.safetensors --data photos --keep 1/8 --modes drop
    moe-prune compress moe_prune/assets/default.safetensors --calib photos --heal --out small.safetensors

(the bundled model takes 28x28 gray images: its preprocessing converts, resizes and crops each file).
"""

import argparse
import pathlib

import numpy as np
from PIL import Image

SAMPLE = pathlib.Path(__file__).resolve().parents[1] / "moe_prune" / "assets" / "fashion_mnist_sample.npz"
CLASSES = ("t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle-boot")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", nargs="?", default="photos", help="the folder to write (default: photos)")
    p.add_argument("--seed", type=int, default=0, help="seed of the tints, sizes and formats (default 0)")
    args = p.parse_args()
    with np.load(SAMPLE) as z:
        images, labels = z["images"], z["labels"]
    rng = np.random.default_rng(args.seed)
    root = pathlib.Path(args.out)
    for i, (pixels, label) in enumerate(zip(images, labels)):
        split = "train" if i < 500 else "val"
        folder = root / split / CLASSES[int(label)]
        folder.mkdir(parents=True, exist_ok=True)
        if rng.random() < 0.7:  # most files RGB, tinted; the rest gray
            tint = rng.uniform(0.6, 1.0, 3)
            img = Image.fromarray(np.clip(pixels[..., None] * tint, 0, 255).astype(np.uint8), "RGB")
        else:
            img = Image.fromarray(pixels, "L")
        side = int(rng.choice([28, 32, 40, 56]))  # mixed sizes: the model's preprocessing resizes them
        img = img.resize((side, side), Image.Resampling.BILINEAR)
        if rng.random() < 0.5:
            img.save(folder / f"{i:04d}.png")
        else:
            img.save(folder / f"{i:04d}.jpg", quality=92)
    # The model's class i is CLASSES[i]; folder names sorted by name (torchvision's ImageFolder rule) would give
    # other indices ("ankle-boot" would be 0), so the folder says which class each index is.
    (root / "classes.txt").write_text("\n".join(CLASSES) + "\n")
    print(f"wrote {len(images)} images to {root}/train and {root}/val, and {root}/classes.txt")


if __name__ == "__main__":
    main()
