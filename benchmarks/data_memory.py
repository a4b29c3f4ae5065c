"""Peak memory of `moe-prune compress --heal` on an image folder: does it grow with the calibration set?

Question: calibration and healing read their images a batch at a time (decoded and preprocessed by worker
threads), so the memory of `compress --heal --calib FOLDER` should not depend on how many images FOLDER holds,
except for what is kept per image on purpose: the teacher's logits (N x classes floats) and, when the decoded set
fits `--cache-mb`, the decoded set itself. Measured: the peak resident memory of the command (a fresh process;
ru_maxrss from wait4) with 1,000 and with 5,000 calibration images at 224x224, each with the default cache budget
(1024 MB: 1,000 decoded images take 602 MB and are kept; 5,000 take 3 GB and are streamed) and with
--cache-mb 0 (always streamed).

The model: a ViT-S-sized Soft MoE ViT at 224x224 (patch 16, width 384, 6 heads, MLP ratio 4), 4 blocks of which
the last 2 are Soft MoE layers with 32 experts (303 MB of float32 weights), random weights with ImageNet
mean/std recorded. The images: JPEG files of mixed sizes (160 to 320 px) made from Fashion-MNIST, tinted, in
10 class folders. Rule mass (the data is what is measured, not the rule), 20 heal steps.

    nice -n 10 .venv/bin/python benchmarks/data_memory.py          # writes benchmarks/results/data_memory.{json,md}
    .venv/bin/python benchmarks/data_memory.py --sizes 100,300 --out /tmp/dm.json   # quick
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
MiB = 2**20
IMAGENET = {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}


def write_folder(root: pathlib.Path, n: int, seed: int = 0) -> None:
    """n JPEGs of 160-320 px in 10 class folders, from the bundled Fashion-MNIST sample, tinted per image."""
    import numpy as np
    from PIL import Image

    with np.load(ROOT / "moe_prune" / "assets" / "fashion_mnist_sample.npz") as z:
        images, labels = z["images"], z["labels"]
    rng = np.random.default_rng(seed)
    for i in range(n):
        j = i % len(images)
        tint = rng.uniform(0.5, 1.0, 3)
        rgb = np.clip(images[j][..., None] * tint + rng.uniform(0, 40, 3), 0, 255).astype(np.uint8)
        side = int(rng.integers(160, 321))
        img = Image.fromarray(rgb, "RGB").resize((side, int(side * rng.uniform(0.8, 1.25))), Image.Resampling.BILINEAR)
        folder = root / f"class{int(labels[j])}"
        folder.mkdir(parents=True, exist_ok=True)
        img.save(folder / f"{i:05d}.jpg", quality=90)


def write_model(path: pathlib.Path) -> int:
    import torch

    import moe_prune
    from moe_prune.core.models import SoftMoEViT, ViTConfig
    from moe_prune.core.preprocess import Preprocess

    torch.manual_seed(0)
    model = SoftMoEViT(ViTConfig(num_experts=32, moe_layer_index=2, img_size=224, patch_size=16, in_chans=3,
                                 num_classes=10, embed_dim=384, depth=4, num_heads=6, mlp_ratio=4.0))
    pre = Preprocess(size=224, channels=3, interpolation="bicubic", crop_pct=0.9, **IMAGENET)
    moe_prune.save(model, path, meta={"preprocess": pre.to_dict(), "made_by": "benchmarks/data_memory.py"})
    return sum(p.numel() for p in model.parameters())


def run(args: list[str]) -> dict:
    """`moe-prune ARGS` in a child; its peak resident memory from wait4's ru_maxrss (the child exec's its own
    process image, so nothing of this parent is counted)."""
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "moe_prune.cli", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True)
    stdout = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        raise SystemExit(f"moe-prune {' '.join(args)} failed with status {code}")
    return {"peak_rss_mib": usage.ru_maxrss / 1024, "seconds": time.perf_counter() - t0, "stdout": stdout}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default="1000,5000", help="calibration set sizes (default 1000,5000)")
    p.add_argument("--heal-steps", type=int, default=20, help="heal steps (default 20)")
    p.add_argument("--workdir", type=pathlib.Path, default=pathlib.Path(tempfile.gettempdir()))
    p.add_argument("--out", type=pathlib.Path, default=RESULTS / "data_memory.json")
    args = p.parse_args(argv)
    sizes = [int(v) for v in args.sizes.split(",")]

    from moe_prune.measurement.reports import table, write_json, write_text
    from moe_prune.measurement.timing import environment

    work = pathlib.Path(tempfile.mkdtemp(prefix="data_memory.", dir=args.workdir))
    try:
        ckpt = work / "vit-s-moe.safetensors"
        params = write_model(ckpt)
        rows = []
        for n in sizes:
            folder = work / f"images{n}"
            t0 = time.perf_counter()
            write_folder(folder, n)
            print(f"wrote {n} JPEGs in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
            for cache in (None, 0):
                cmd = ["compress", str(ckpt), "--calib", str(folder), "--calib-limit", str(n), "--rule", "mass",
                       "--heal", "--heal-steps", str(args.heal_steps), "--batch-size", "64",
                       "--out", str(work / "small.safetensors")]
                if cache is not None:
                    cmd += ["--cache-mb", str(cache)]
                print(f"running moe-prune {' '.join(cmd[3:])} ...", file=sys.stderr)
                r = run(cmd)
                rows.append({"images": n, "cache_mb": 1024 if cache is None else cache,
                             "decoded_set_mib": n * 3 * 224 * 224 * 4 / MiB,
                             "peak_rss_mib": r["peak_rss_mib"], "seconds": r["seconds"],
                             "command": "moe-prune " + " ".join(cmd).replace(str(work), "$WORK")})
                print(f"  peak {r['peak_rss_mib']:.0f} MiB in {r['seconds']:.0f} s", file=sys.stderr)
            shutil.rmtree(folder)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    by = {(r["images"], r["cache_mb"]): r["peak_rss_mib"] for r in rows}
    growth = {str(c): by[(sizes[-1], c)] - by[(sizes[0], c)] for c in (1024, 0)}
    result = {"question": __doc__.split("\n\n")[1].replace("\n", " "), "model_parameters": params, "rows": rows,
              "growth_mib": growth, "env": environment()}
    write_json(args.out, result)
    text = table([[r["images"], r["cache_mb"], f"{r['decoded_set_mib']:.0f}", f"{r['peak_rss_mib']:.0f}",
                   f"{r['seconds']:.0f}"] for r in rows],
                 ["calibration images", "--cache-mb", "decoded set MiB", "peak RSS MiB", "seconds"], markdown=True)
    md = (f"Command: `{result['env']['command']}`\n\n{text}\n\n"
          + "\n".join(f"Growth from {sizes[0]} to {sizes[-1]} images with --cache-mb {c}: {g:+.0f} MiB" for c, g in growth.items())
          + "\n")
    write_text(args.out.with_suffix(".md"), md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
