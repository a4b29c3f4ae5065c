"""How `heal`'s defaults are chosen: each setting varied around them on trained models, everything else fixed,
and the choice made on the validation split.

For each checkpoint: the `loss` rule's 1/8 subset (drop mode), then `compress_and_heal` with the defaults and
with one setting changed at a time (what is trained, the learning rate, the steps, the temperature). Calibration
and healing on the first 10,000 training images; accuracy on the validation split (the last 5,000 training
images: never calibrated or healed on, and never trained on by the models of train_vit_experts.sh), which
chooses; accuracy on the 10,000 test images is reported beside, never used to choose.

    python benchmarks/heal_settings.py runs/fmnist-s10/mnist-e32-s10.safetensors runs/fmnist-vit2/vit-e32-s10.safetensors
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path

import torch

import moe_prune as mp
from moe_prune.selection.calibration import choose_subsets
from moe_prune.compression.compress import compress_and_heal
from moe_prune.data.sources import calibration_batches
from moe_prune.data.mnist import load_images
from moe_prune.measurement.accuracy import accuracy
from moe_prune.compression.healing import HealConfig

VARIANTS = [("default", {}), ("parts", {"parts": "experts"}), ("parts", {"parts": "experts+router"}),
            ("lr", {"lr": 1e-3}), ("lr", {"lr": 3e-3}), ("steps", {"steps": 1000}),
            ("temperature", {"temperature": 1.0}), ("temperature", {"temperature": 4.0}),
            ("max_epochs", {"max_epochs": 5.0}), ("max_epochs", {"max_epochs": 40.0, "steps": 6000}),
            ("max_epochs", {"max_epochs": 80.0}),
            ("patience", {"patience": 0})]
# `--quick`: one change per setting, the one nearest the defaults on the side the earlier MNIST runs left open
QUICK = ["default", "parts=experts+router", "lr=0.003", "temperature=1.0", "max_epochs=5.0"]


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoints", nargs="*", type=Path)
    p.add_argument("--render", action="store_true", help="only rewrite heal_settings.md from heal_settings.json")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/heal_settings"))
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--quick", action="store_true", help="only the variants in QUICK (about 5 minutes each on a "
                   "small ViT on one core)")
    p.add_argument("--only", help="only the variants with these labels, separated by ';' (e.g. "
                   "'default;max_epochs=40.0, steps=6000')")
    p.add_argument("--calib-limit", type=int, default=10000,
                   help="calibration and healing on the first this many training images (default 10000)")
    p.add_argument("--merge", action="store_true", help="add these rows to those already in heal_settings.json")
    args = p.parse_args(argv)
    if args.render:
        stored = json.loads((args.out / "heal_settings.json").read_text())
        (args.out / "heal_settings.md").write_text(markdown(stored["command"], stored["rows"]))
        return
    torch.set_num_threads(args.threads)
    test = load_images("fashion-mnist", split="test")
    train = load_images("fashion-mnist", split="train")
    val = (train[0][-5000:], train[1][-5000:])
    rows = []
    for path in args.checkpoints:
        model = mp.load(path)
        calib = calibration_batches("fashion-mnist", limit=args.calib_limit, batch_size=256, model=model)
        subsets, _ = choose_subsets(model, calib, "1/8", rule="loss")  # the default search
        full, val_full = accuracy(model, *test), accuracy(model, *val)
        for what, change in VARIANTS:
            label = ", ".join(f"{k}={v}" for k, v in change.items()) or "default"
            if (args.quick and label not in QUICK) or (args.only and label not in args.only.split(";")):
                continue
            cfg = replace(HealConfig(), **change)
            small, rec = compress_and_heal(model, subsets, calib, config=cfg, progress=False)
            rows.append({"checkpoint": str(path), "calib_limit": args.calib_limit, "full": full, "val_full": val_full, "varied": what,
                         "config": cfg.to_dict(), "val_accuracy": accuracy(small, *val),
                         "accuracy": accuracy(small, *test), "loss_after": rec["loss_after"], "seconds": rec["seconds"],
                         "best_step": (rec.get("held_out") or {}).get("best_step"),
                         "steps_run": rec.get("steps_run"), "stopped": rec.get("stopped")})
            print(f"{path.stem} {what} {change}: val {100 * rows[-1]['val_accuracy']:.2f}, test "
                  f"{100 * rows[-1]['accuracy']:.2f}", file=sys.stderr, flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    command = "python benchmarks/heal_settings.py " + " ".join(sys.argv[1:] if argv is None else argv)
    store = args.out / "heal_settings.json"
    if args.merge and store.exists():
        old = json.loads(store.read_text())
        command, rows = old["command"] + " ; " + command, old["rows"] + rows
    (args.out / "heal_settings.json").write_text(json.dumps({"command": command, "rows": rows}, indent=1))
    (args.out / "heal_settings.md").write_text(markdown(command, rows))


def markdown(command: str, rows: list[dict]) -> str:
    """The table, and the choice: a setting replaces the default only if its mean validation accuracy beats the
    default's by more than one standard error of a validation accuracy (sqrt(p (1 - p) / 5000)): below that the
    difference is a few images."""
    d = HealConfig()
    lines = [f"Command: `{command}`", "",
             f"Defaults: {d}. Accuracy (%) after healing the `loss` rule's 1/8 subset (drop), calibrated and healed on "
             f"the first {', '.join(sorted({str(r.get('calib_limit', 10000)) for r in rows}))} training images, one setting changed per "
             "row: on the validation split (the last 5,000 training images), which chooses, and on the test set "
             "(reported, not used).", "",
             "| model | full (val / test) | varied | setting | validation | test | % of full (val) | distillation loss "
             "after | best step | steps run | seconds |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        setting = ", ".join(f"{k}={v}" for k, v in r["config"].items() if v != getattr(d, k)) or "(defaults)"
        lines.append(f"| {Path(r['checkpoint']).stem} | {100 * r['val_full']:.2f} / {100 * r['full']:.2f} | {r['varied']} | "
                     f"{setting} | {100 * r['val_accuracy']:.2f} | {100 * r['accuracy']:.2f} | "
                     f"{100 * r['val_accuracy'] / r['val_full']:.1f}% | {r['loss_after']:.4g} | {r['best_step']} | "
                     f"{r.get('steps_run')} | {r['seconds']:.0f} |")
    settings = {}
    for r in rows:
        key = ", ".join(f"{k}={v}" for k, v in r["config"].items() if v != getattr(d, k)) or "(defaults)"
        settings.setdefault(key, []).append(r["val_accuracy"])
    mean = {k: sum(v) / len(v) for k, v in settings.items()}
    ranked = sorted(mean, key=lambda k: -mean[k])
    base = mean.get("(defaults)")
    se = (base * (1 - base) / 5000) ** 0.5 if base is not None else 0.0
    choice = ranked[0] if base is None or mean[ranked[0]] - base > se else "(defaults)"
    lines += ["", f"Mean validation accuracy over the models, best first. A setting replaces the default only if it "
              f"beats it by more than one standard error of a validation accuracy ({100 * se:.2f} points here); "
              f"the choice: **{choice}**.", ""]
    lines += [f"- {k}: {100 * mean[k]:.2f}%" + (f" ({100 * (mean[k] - base):+.2f})" if base is not None else "")
              for k in ranked]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
