"""How `heal`'s defaults were chosen: each setting varied around them on trained models, everything else fixed.

For each checkpoint: the `loss` rule's 1/8 subset (drop mode), then `compress_and_heal` with the defaults and
with one setting changed at a time (what is trained, the learning rate, the steps, the temperature). Accuracy on
the 10,000 Fashion-MNIST test images; calibration and healing on the first 10,000 training images.

    python benchmarks/heal_settings.py runs/fmnist-s10/mnist-e32-s10.safetensors runs/fmnist-s10/mnist-e128-s10.safetensors
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path

import torch

import moe_prune as mp
from moe_prune.calibration import choose_subsets
from moe_prune.compress import compress_and_heal
from moe_prune.data import calibration_batches, load_images
from moe_prune.evaluate import accuracy
from moe_prune.healing import HealConfig

VARIANTS = [("default", {}), ("parts", {"parts": "experts"}), ("parts", {"parts": "experts+router"}),
            ("lr", {"lr": 1e-3}), ("lr", {"lr": 3e-3}), ("steps", {"steps": 1000}),
            ("temperature", {"temperature": 1.0}), ("temperature", {"temperature": 4.0})]


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoints", nargs="+", type=Path)
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/heal_settings"))
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    test = load_images("fashion-mnist", split="test")
    rows = []
    for path in args.checkpoints:
        model = mp.load(path)
        calib = calibration_batches("fashion-mnist", limit=10000, batch_size=256, model=model)
        subsets, _ = choose_subsets(model, calib, "1/8", rule="loss")
        full = accuracy(model, *test)
        for what, change in VARIANTS:
            cfg = replace(HealConfig(), **change)
            small, rec = compress_and_heal(model, subsets, calib, config=cfg, progress=False)
            rows.append({"checkpoint": str(path), "full": full, "varied": what, "config": cfg.to_dict(),
                         "accuracy": accuracy(small, *test), "loss_after": rec["loss_after"], "seconds": rec["seconds"]})
            print(f"{path.stem} {what} {change}: {100 * rows[-1]['accuracy']:.2f}", file=sys.stderr, flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    command = "python benchmarks/heal_settings.py " + " ".join(sys.argv[1:] if argv is None else argv)
    (args.out / "heal_settings.json").write_text(json.dumps({"command": command, "rows": rows}, indent=1))
    d = HealConfig()
    lines = [f"Command: `{command}`", "", f"Defaults: {d}. Accuracy (%) on the Fashion-MNIST test set after healing "
             "the `loss` rule's 1/8 subset (drop); one setting changed per row.", "",
             "| model | full | varied | setting | accuracy | % of full | distillation loss after | seconds |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        setting = ", ".join(f"{k}={v}" for k, v in r["config"].items() if v != getattr(d, k)) or "(defaults)"
        lines.append(f"| {Path(r['checkpoint']).stem} | {100 * r['full']:.2f} | {r['varied']} | {setting} | "
                     f"{100 * r['accuracy']:.2f} | {100 * r['accuracy'] / r['full']:.1f}% | {r['loss_after']:.4f} | "
                     f"{r['seconds']:.0f} |")
    (args.out / "heal_settings.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
