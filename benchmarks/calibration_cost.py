"""What the `loss` rule's search costs, and what a cheaper search loses: the settings chosen on validation.

For each trained checkpoint: the `mass` rule (one pass over the calibration data) and the `loss` rule with each
search setting (`limit` inputs searched, `candidates` run per step, `rounds` of prediction per layer; see
moe_prune.selection.loss_rule.loss_subsets), all on the same calibration data (the first `--calib-limit` training
images), keep `--keep`, drop mode, no healing. Each row: calibration seconds (wall, `--threads` threads, nothing
else running), its ratio to `mass`, and the accuracy of the compressed model on the validation split (the last
`--validation` training images, never calibrated on; the ViTs of train_vit_experts.sh never trained on them),
which chooses; the test accuracy is reported beside, never used to choose.

`--random-vit-s` adds a ViT-S-sized random model (width 384, 6 heads, 12 blocks, 6 Soft MoE layers of 128
experts, 32x32 RGB inputs of patch 4): times only (its accuracy means nothing).

    python benchmarks/calibration_cost.py moe_prune/assets/default.safetensors runs/fmnist-vit2/*.safetensors
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

import torch

import moe_prune as mp
from moe_prune.selection.calibration import choose_subsets
from moe_prune.compression.compress import compress_model
from moe_prune.data.sources import calibration_batches
from moe_prune.data.mnist import load_images
from moe_prune.measurement.accuracy import accuracy

# (name, rule, search settings): the settings in use before this study first
SETTINGS = [
    ("mass", "mass", None),
    ("loss 2048x8, every expert", "loss", {"limit": 2048, "candidates": 8, "rounds": None}),
    ("loss 512x8, every expert", "loss", {"limit": 512, "candidates": 8, "rounds": None}),
    ("loss 512x2, every expert", "loss", {"limit": 512, "candidates": 2, "rounds": None}),
    ("loss 512x4, 4 rounds", "loss", {"limit": 512, "candidates": 4, "rounds": 4}),
    ("loss 512x2, 2 rounds", "loss", {"limit": 512, "candidates": 2, "rounds": 2}),
    ("loss 256x2, 2 rounds", "loss", {"limit": 256, "candidates": 2, "rounds": 2}),
    ("loss 512x1, 1 round", "loss", {"limit": 512, "candidates": 1, "rounds": 1}),
]


def random_vit_s() -> torch.nn.Module:
    from moe_prune.core.models import SoftMoEViT, ViTConfig

    torch.manual_seed(0)
    return SoftMoEViT(ViTConfig(img_size=32, patch_size=4, in_chans=3, num_classes=10, embed_dim=384, depth=12,
                                num_heads=6, num_experts=128, moe_layer_index=6)).eval()


def measure(model, calib, keep, name, rule, search, val, test) -> dict:
    t0 = time.perf_counter()
    subsets, record = choose_subsets(model, calib, keep, rule=rule, search=search)
    seconds = time.perf_counter() - t0
    row = {"setting": name, "rule": rule, "search": search, "seconds": seconds}
    if val is not None:
        small = compress_model(model, subsets)
        row.update(val_accuracy=accuracy(small, *val), accuracy=accuracy(small, *test))
    if rule == "loss":
        row["whole_model_chose"] = record["distillation_kl"]["whole_model"]["chosen"]
    print(f"  {name}: {seconds:.1f} s" + (f", val {100 * row['val_accuracy']:.2f}" if val is not None else ""),
          file=sys.stderr, flush=True)
    return row


def table(reports: list[dict]) -> list[str]:
    names = [s[0] for s in SETTINGS]
    lines = ["| model | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for r in reports:
        by = {row["setting"]: row for row in r["rows"]}
        mass = by["mass"]["seconds"]

        def cell(n):
            row = by.get(n)
            if row is None:
                return "-"
            acc = f"val {100 * row['val_accuracy']:.2f} / test {100 * row['accuracy']:.2f}; " if "val_accuracy" in row else ""
            return f"{acc}{row['seconds']:.1f} s ({row['seconds'] / mass:.1f}x)"
        note = " (trained on the validation images: not used to choose)" if r.get("trained") and not r.get(
            "validation_never_trained_on") else ""
        lines.append(f"| {r['model']}{note} | " + " | ".join(cell(n) for n in names) + " |")
    return lines


def chosen(reports: list[dict], within: float) -> list[str]:
    """The cheapest setting (mean time ratio to mass) whose mean validation accuracy is within `within` points of
    the best setting's, over the trained models."""
    trained = [r for r in reports if r.get("trained") and r.get("validation_never_trained_on")]
    if not trained:
        return []
    stats = {}
    for name, rule, _ in SETTINGS:
        if rule != "loss":
            continue
        rows = [next((x for x in r["rows"] if x["setting"] == name), None) for r in trained]
        if any(x is None for x in rows):
            continue
        mass = [next(x for x in r["rows"] if x["setting"] == "mass")["seconds"] for r in trained]
        stats[name] = (100 * sum(x["val_accuracy"] for x in rows) / len(rows),
                       sum(x["seconds"] / m for x, m in zip(rows, mass)) / len(rows),
                       100 * sum(x["accuracy"] for x in rows) / len(rows))
    best = max(v[0] for v in stats.values())
    ok = [n for n, v in stats.items() if v[0] >= best - within]
    pick = min(ok, key=lambda n: stats[n][1])
    lines = ["### Chosen on validation", "", f"Over the {len(trained)} models trained without the validation split: the cheapest `loss` search whose "
             f"mean validation accuracy is within {within} points of the best search's.", "",
             "| setting | mean validation % | mean time / mass | mean test % (reported) | |", "|---|---|---|---|---|"]
    for n, (v, t, te) in stats.items():
        lines.append(f"| {n} | {v:.2f} | {t:.1f}x | {te:.2f} | {'**chosen**' if n == pick else ''} |")
    mass_val = [100 * next(x for x in r["rows"] if x["setting"] == "mass")["val_accuracy"] for r in trained]
    lines.append(f"| mass (baseline) | {sum(mass_val) / len(mass_val):.2f} | 1.0x | | |")
    return lines


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoints", nargs="*", type=Path)
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/calibration_cost"))
    p.add_argument("--keep", default="1/8")
    p.add_argument("--calib-limit", type=int, default=2000, help="calibration images (the first training images)")
    p.add_argument("--validation", type=int, default=5000)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--within", type=float, default=0.5, help="points of validation accuracy a cheaper search may lose")
    p.add_argument("--random-vit-s", action="store_true")
    p.add_argument("--settings", help="setting names to run, separated by semicolons (default: all)")
    p.add_argument("--merge", action="store_true", help="add these models to the reports already in cost.json "
                   "(a model measured again replaces its old report)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    settings = [s for s in SETTINGS if not args.settings or s[0] in [n.strip() for n in args.settings.split(";")]]
    train, test = load_images("fashion-mnist", split="train"), load_images("fashion-mnist", split="test")
    val = (train[0][-args.validation:], train[1][-args.validation:])
    reports = []
    for path in args.checkpoints:
        print(path, file=sys.stderr, flush=True)
        model = mp.load(path)
        calib = calibration_batches("fashion-mnist", limit=args.calib_limit, batch_size=256, model=model)
        meta = mp.summary(path)["meta"]
        rows = [measure(model, calib, args.keep, n, rule, s, val, test) for n, rule, s in settings]
        reports.append({"model": path.stem, "path": str(path), "trained": True, "rows": rows,
                        "validation_never_trained_on": "validation" in meta,
                        "full_val": accuracy(model, *val), "full": accuracy(model, *test)})
    if args.random_vit_s:
        print("random ViT-S", file=sys.stderr, flush=True)
        model = random_vit_s()
        g = torch.Generator().manual_seed(0)
        calib = [torch.randn(256, 3, 32, 32, generator=g) for _ in range(-(-args.calib_limit // 256))]
        rows = [measure(model, calib, args.keep, n, rule, s, None, None) for n, rule, s in settings]
        reports.append({"model": "random ViT-S (6 Soft MoE layers of 128)", "trained": False, "rows": rows})
    command = "python " + shlex.join(sys.argv)
    for r in reports:
        r["command"] = command
    commands = [command]
    if args.merge and (args.out / "cost.json").exists():
        old = json.loads((args.out / "cost.json").read_text())
        if (old["keep"], old["calib_limit"]) != (args.keep, args.calib_limit):
            sys.exit("--merge: cost.json was measured with another --keep or --calib-limit")
        new = {r["model"] for r in reports}
        reports = [r for r in old["reports"] if r["model"] not in new] + reports
        commands = list(dict.fromkeys(r.get("command", old.get("command")) for r in reports))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "cost.json").write_text(json.dumps({"commands": commands, "keep": args.keep,
                                                    "calib_limit": args.calib_limit, "reports": reports}, indent=1))
    lines = ["Commands:", ""] + [f"    {c}" for c in commands] + ["",
             f"Keep {args.keep}, drop mode, no healing; calibration on the first {args.calib_limit} Fashion-MNIST "
             f"training images; {args.threads} threads. Validation: the last {args.validation} training images "
             "(never calibrated on); it chooses. Test: the 10,000 test images, reported only. Times are wall seconds "
             "of choose_subsets; ratios to the mass rule on the same data.", ""]
    lines += table(reports) + [""] + chosen(reports, args.within)
    (args.out / "cost.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
