"""The calibration study (issue 12): which static subset, and does healing win the accuracy back?

For every checkpoint, on the 10,000 Fashion-MNIST test images: the full model, no experts, Algorithm 1 (per
input), Algorithm 2 (per batch of 32 and 256), the static subset of every calibration rule (drop and renorm),
the static subsets after `heal` (the same function as `moe-prune compress --heal`), and two random baselines
(a random subset per input, and one random subset shared by all inputs; `--seeds` seeds each, mean ± std).
Calibration and healing use the first `--calib-limit` training images only, never the test set.

Choices are made on the validation split, never on the test set: the last `--validation` (5,000) training
images, which the models of benchmarks/train_vit_experts.sh never trained on and calibration never reads. Every
static and healed row is measured there too (`val_accuracy`), and the "Chosen on validation" section picks the
default rule and budget by it; the test accuracies are reported beside, not used.

Results are appended model by model to OUT/study.json (a model already there is skipped, so a killed run
resumes); OUT/study.md is rewritten from it after every model.

    python benchmarks/calibration_study.py runs/fmnist-s10/*.safetensors --out benchmarks/results/calibration_study
"""

from __future__ import annotations

import argparse
import json
from fractions import Fraction
import sys
import time
from pathlib import Path

import torch

import moe_prune as mp
from moe_prune.selection.calibration import DEFAULT_RULE, RULES, choose_subsets
from moe_prune.compression.compress import compress_and_heal, compress_model
from moe_prune.data.sources import calibration_batches
from moe_prune.data.mnist import load_images
from moe_prune.measurement.accuracy import accuracy
from moe_prune.measurement.evaluate import mean_std, random_accuracies, random_per_input_accuracies
from moe_prune.compression.healing import HealConfig
from moe_prune.core.models import moe_layers
from moe_prune.selection.scores import keep_per_layer, with_experts, with_selection


def _csv(text: str) -> list[str]:
    return [v.strip() for v in text.split(",") if v.strip()]


def study_model(path: Path, args) -> dict:
    model = mp.load(path)
    test = load_images("fashion-mnist", split="test")
    train = load_images("fashion-mnist", split="train")
    val = (train[0][-args.validation:], train[1][-args.validation:])  # never calibrated on: limit <= 55,000
    if args.calib_limit > len(train[0]) - args.validation:
        raise SystemExit(f"--calib-limit {args.calib_limit} would reach the validation split")
    calib = calibration_batches("fashion-mnist", limit=args.calib_limit, batch_size=256, model=model)
    acc = lambda m, bs=256: accuracy(m, *test, batch_size=bs)  # noqa: E731
    vacc = lambda m: accuracy(m, *val)  # noqa: E731
    layers = moe_layers(model)
    meta = mp.summary(path)["meta"]
    empty = {name: torch.zeros(0, dtype=torch.long) for name in layers}
    report = {"checkpoint": str(path), "experts": min(l.config.num_experts for l in layers.values()),
              "layers": len(layers), "scale_init": meta.get("router_scale_init"),
              "train_seconds": sum(h["seconds"] for h in meta.get("history", [])),
              "epochs": len(meta.get("history", [])), "rows": []}
    t0 = time.perf_counter()
    report["full"], report["no_experts"] = acc(model), acc(with_experts(model, empty))
    report["val_full"], report["val_no_experts"] = vacc(model), vacc(with_experts(model, empty))
    report["validation"] = f"Fashion-MNIST training images {len(train[0]) - args.validation}-{len(train[0]) - 1}"

    def row(keep, method, value, **extra):
        report["rows"].append({"keep": keep, "method": method, "accuracy": value, **extra})
        print(f"  {path.stem} keep {keep} {method} {extra.get('rule', '')} {extra.get('mode', '')} "
              f"{extra.get('batch_size', '') or ''}: {100 * value:.2f}", file=sys.stderr, flush=True)

    for keep in args.keeps:
        k = keep_per_layer(model, keep)
        row(keep, "alg1", acc(with_selection(model, keep, per="input")), mode="drop")
        for bs in (32, 256):
            row(keep, "alg2", acc(with_selection(model, keep, per="batch"), bs), mode="drop", batch_size=bs)
        if keep in args.random_keeps:
            for method, fn in (("random_per_input", random_per_input_accuracies), ("random_shared", random_accuracies)):
                m, s = mean_std(list(fn(model, *test, k, args.seeds, "drop")))
                row(keep, method, m, std=s, mode="drop", seeds=args.seeds)
        plans = [(rule, "per-layer") for rule in args.rules]
        if "loss" in args.rules and len(layers) > 1 and "global" in args.budgets:
            plans.append(("loss", "global"))
        for rule, budget in plans:
            chosen = {}
            extra = {} if budget == "per-layer" else {"budget": budget}
            for mode in ("drop", "renorm"):
                if mode == "renorm" and (rule != "loss" or args.renorm_reuse):
                    subsets, seconds = chosen["drop"], None  # only `loss` chooses for the mode it runs in
                else:
                    t = time.perf_counter()
                    subsets, _ = choose_subsets(model, calib, keep, rule=rule, mode=mode, budget=budget)
                    seconds = time.perf_counter() - t
                chosen[mode] = subsets
                small = compress_model(model, subsets, mode=mode)
                row(keep, "static", acc(small), rule=rule, mode=mode, calib_seconds=seconds, val_accuracy=vacc(small),
                    subsets={n: s.tolist() for n, s in subsets.items()}, **extra)
                rules = args.heal_rules if mode == "drop" else args.heal_renorm_rules
                if keep in args.heal_keeps and rule in rules and (budget == "per-layer" or mode == "drop"):
                    cfg = HealConfig(steps=args.heal_steps)
                    healed, rec = compress_and_heal(model, subsets, calib, mode=mode, config=cfg, progress=False)
                    row(keep, "healed", acc(healed), rule=rule, mode=mode, heal_seconds=rec["seconds"],
                        heal_steps=cfg.steps, loss_before=rec["loss_before"], loss_after=rec["loss_after"],
                        val_accuracy=vacc(healed), held_out=rec.get("held_out"), **extra)
    report["seconds"] = time.perf_counter() - t0
    return report


def _share(a: float, r: dict) -> float:
    """The share of the experts' own contribution kept: (acc - acc_no_experts) / (acc_full - acc_no_experts)."""
    gap = r["full"] - r["no_experts"]
    return (a - r["no_experts"]) / gap if abs(gap) > 1e-9 else float("nan")


def _cell(r: dict, keep: str, method: str, **match) -> str:
    for row in r["rows"]:
        if row["keep"] == keep and row["method"] == method and all(row.get(k) == v for k, v in match.items()):
            text = f"{100 * row['accuracy']:.2f}"
            return text + (f" ± {100 * row['std']:.2f}" if row.get("std") is not None else "")
    return "-"


def _value(r: dict, keep: str, method: str, **match) -> float | None:
    for row in r["rows"]:
        if row["keep"] == keep and row["method"] == method and all(row.get(k) == v for k, v in match.items()):
            return row["accuracy"]
    return None


def _seeds(reports) -> str:
    return "/".join(str(s) for s in sorted({row["seeds"] for r in reports for row in r["rows"] if "seeds" in row}))


def _heal_text(reports) -> str:
    steps = sorted({row["heal_steps"] for r in reports for row in r["rows"] if "heal_steps" in row})
    d = HealConfig()
    return (f"at most {'/'.join(map(str, steps))} Adam steps and {d.max_epochs:g} passes over the calibration inputs, "
            f"batch {d.batch_size}, lr {d.lr:g}, temperature {d.temperature:g}, trains {d.parts}; the best of the "
            f"measurements on a held-out {d.held_out:.0%} of the calibration inputs kept, stopped after {d.patience} "
            "without improvement")


def _name(r: dict) -> str:
    return Path(r["checkpoint"]).stem


def _order(r: dict):
    return ("vit" in _name(r), -(r["scale_init"] or 1), r["experts"])


def targets(reports: list[dict]) -> list[str]:
    """Issue 12's targets, checked row by row: the default rule against combine mass where mass loses >= 5 points;
    healed (default rule, 1/8) >= 98% of full on scale-10 models with n >= 32, and >= 90% of the experts' own
    contribution on the ViTs."""
    lines = ["### Targets", "", "Default rule (static, no healing) against combine mass, wherever mass loses 5 points "
             "or more (drop mode):", "", "| model | keep | full | static mass | static " + DEFAULT_RULE
             + " | verdict |", "|---|---|---|---|---|---|"]
    for r in reports:
        for keep in dict.fromkeys(row["keep"] for row in r["rows"]):
            mass = _value(r, keep, "static", rule="mass", mode="drop")
            new = _value(r, keep, "static", rule=DEFAULT_RULE, mode="drop")
            if mass is None or new is None or r["full"] - mass < 0.05:
                continue
            verdict = f"+{100 * (new - mass):.2f} points" if new > mass else (
                "tie (MISS)" if new == mass else f"{100 * (new - mass):.2f} points (MISS)")
            lines.append(f"| {_name(r)} | {keep} | {100 * r['full']:.2f} | {100 * mass:.2f} | {100 * new:.2f} | {verdict} |")
    lines += ["", f"Healed (`{DEFAULT_RULE}` + heal, keep 1/8, drop): target >= 98% of full (scale 10, n >= 32) and, "
              "on the ViTs, >= 90% of the experts' own contribution:", "",
              "| model | full | no experts | healed | % of full | share of the experts' contribution | verdict |",
              "|---|---|---|---|---|---|---|"]
    for r in reports:
        healed = _value(r, "1/8", "healed", rule=DEFAULT_RULE, mode="drop")
        if healed is None:
            continue
        vit = "vit" in _name(r)
        pct, share = healed / r["full"], _share(healed, r)
        checks = []
        if r["scale_init"] == 10 and r["experts"] >= 32:
            checks.append("98%: " + ("met" if pct >= 0.98 else f"MISSED by {100 * (0.98 - pct):.1f} points"))
        if vit:
            checks.append("90% share: " + ("met" if share >= 0.90 else f"MISSED by {100 * (0.90 - share):.0f} points"))
        lines.append(f"| {_name(r)} | {100 * r['full']:.2f} | {100 * r['no_experts']:.2f} | {100 * healed:.2f} | "
                     f"{100 * pct:.1f}% | {100 * share:.0f}% | {'; '.join(checks) or '(no target)'} |")
    return lines + [""]


def chosen_on_validation(reports: list[dict]) -> list[str]:
    """Which rule (and budget) each keep would choose by validation accuracy, static and healed, with the test
    accuracy of every candidate beside it (reported, not used). Models without validation rows are left out."""
    lines = ["### Chosen on validation", "", "The rule and budget with the best mean validation accuracy over these "
             "models (drop mode) are the choice; test accuracy is reported beside, not used to choose.", ""]
    rows_out = []
    for method in ("static", "healed"):
        cands: dict = {}
        for r in reports:
            for row in r["rows"]:
                if row["method"] == method and row.get("mode") == "drop" and row.get("val_accuracy") is not None:
                    key = (row["keep"], row["rule"], row.get("budget", "per-layer"))
                    cands.setdefault(key, []).append((row["val_accuracy"], row["accuracy"]))
        keeps = sorted({k[0] for k in cands}, key=lambda k: -Fraction(k))
        for keep in keeps:
            options = {k: v for k, v in cands.items() if k[0] == keep and len(v) == max(len(w) for w in cands.values())}
            if not options:
                continue
            best = max(options, key=lambda k: sum(v for v, _ in options[k]) / len(options[k]))
            for key, vals in sorted(options.items(), key=lambda kv: -sum(v for v, _ in kv[1])):
                mv = 100 * sum(v for v, _ in vals) / len(vals)
                mt = 100 * sum(t for _, t in vals) / len(vals)
                rows_out.append(f"| {method} | {keep} | {key[1]} | {key[2]} | {mv:.2f} | {mt:.2f} | "
                                f"{'**chosen**' if key == best else ''} |")
    if not rows_out:
        return []
    return lines + ["| | keep | rule | budget | mean validation % | mean test % (reported) | |",
                    "|---|---|---|---|---|---|---|", *rows_out, ""]


def markdown(reports: list[dict], command: str) -> str:
    reports = sorted(reports, key=_order)
    lines = [f"Command: `{command}`", "",
             "Accuracy (%) on the 10,000 Fashion-MNIST test images. Calibration and healing: the first 10,000 "
             "training images (never the test set). drop mode unless marked. Random baselines: "
             f"{_seeds(reports)} seeds, mean ± std. healed: `heal` ({_heal_text(reports)}). "
             "share = (acc - no experts) / (full - no experts).", ""]
    keeps = list(dict.fromkeys(row["keep"] for r in reports for row in r["rows"]))
    rules = [rule for rule in RULES if any(row.get("rule") == rule for r in reports for row in r["rows"])]
    if any("val_full" in r for r in reports):
        lines[2] += (f" Validation: {next(r['validation'] for r in reports if 'validation' in r)}, never trained on "
                     "(the models of train_vit_experts.sh) nor calibrated on; every choice below is made there.")
    lines += chosen_on_validation(reports)
    lines += targets(reports)
    for keep in keeps:
        lines += [f"### Keep {keep}", "",
                  "| model | n | scale | full | no experts | Alg. 1 | Alg. 2 b32 | Alg. 2 b256 | random per input | random shared | "
                  + " | ".join(f"static {rule}" for rule in rules) + " | "
                  + " | ".join(f"healed {rule}" for rule in rules) + " | healed renorm (rule) | healed default: % of full | share |",
                  "|---" * (12 + 2 * len(rules) + 1) + "|"]
        for r in reports:
            if not any(row["keep"] == keep for row in r["rows"]):
                continue
            renorm = [f"{_cell(r, keep, 'healed', rule=rule, mode='renorm')} ({rule})" for rule in rules
                      if _value(r, keep, "healed", rule=rule, mode="renorm") is not None]
            best = _value(r, keep, "healed", rule=DEFAULT_RULE, mode="drop")
            pct = f"{100 * best / r['full']:.1f}%" if best is not None else "-"
            share = f"{100 * _share(best, r):.0f}%" if best is not None else "-"
            lines.append("| " + " | ".join([
                _name(r), str(r["experts"]), str(r["scale_init"]), f"{100 * r['full']:.2f}", f"{100 * r['no_experts']:.2f}",
                _cell(r, keep, "alg1"), _cell(r, keep, "alg2", batch_size=32), _cell(r, keep, "alg2", batch_size=256),
                _cell(r, keep, "random_per_input"), _cell(r, keep, "random_shared"),
                *[_cell(r, keep, "static", rule=rule, mode="drop") for rule in rules],
                *[_cell(r, keep, "healed", rule=rule, mode="drop") for rule in rules],
                "; ".join(renorm) or "-", pct, share]) + " |")
        lines += ["", f"Static subsets in renorm mode (keep {keep}):", "",
                  "| model | " + " | ".join(f"static {rule} renorm" for rule in rules) + " |",
                  "|---" * (1 + len(rules)) + "|"]
        for r in reports:
            if any(row["keep"] == keep for row in r["rows"]):
                lines.append(f"| {_name(r)} | " + " | ".join(_cell(r, keep, "static", rule=rule, mode="renorm")
                                                              for rule in rules) + " |")
        lines += ["", f"Share of the experts' own contribution kept (keep {keep}, drop):", "",
                  "| model | Alg. 1 | " + " | ".join(f"static {rule}" for rule in rules) + " | "
                  + " | ".join(f"healed {rule}" for rule in rules) + " |", "|---" * (2 + 2 * len(rules)) + "|"]
        for r in reports:
            if not any(row["keep"] == keep for row in r["rows"]):
                continue
            cells = [_value(r, keep, "alg1")] + [_value(r, keep, "static", rule=rule, mode="drop") for rule in rules] \
                + [_value(r, keep, "healed", rule=rule, mode="drop") for rule in rules]
            lines.append(f"| {_name(r)} | " + " | ".join("-" if v is None else f"{100 * _share(v, r):.0f}%" for v in cells) + " |")
        lines.append("")
    lines += ["### Cost", "", "| model | epochs | train s | calibration s per rule (keep 1/8, drop) | heal s (default rule) |",
              "|---|---|---|---|---|"]
    for r in reports:
        cal = ", ".join(f"{row['rule']} {row['calib_seconds']:.1f}" for row in r["rows"]
                        if row["method"] == "static" and row["mode"] == "drop" and row["keep"] == "1/8"
                        and row.get("calib_seconds") is not None)
        heal = [row["heal_seconds"] for row in r["rows"] if row["method"] == "healed" and row["rule"] == DEFAULT_RULE
                and row["mode"] == "drop"]
        lines.append(f"| {_name(r)} | {r['epochs']} | {r['train_seconds']:.0f} | {cal} | {heal[0]:.0f} |" if heal else
                     f"| {_name(r)} | {r['epochs']} | {r['train_seconds']:.0f} | {cal} | - |")
    return "\n".join(lines) + "\n"


def plot(reports: list[dict], path: Path) -> bool:
    """At keep 1/8 against n, one panel per family: the fraction of the full model's accuracy (MNIST family) or the
    share of the experts' own contribution (ViTs) of Alg. 1, static mass, static by the default rule, healed
    (default rule), random shared. False without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    from moe_prune.measurement.reports import save_figure

    families = {}
    for r in reports:
        family = ("ViT" if "vit" in _name(r) else "MNIST family") + f", scale {r['scale_init']:g}"
        families.setdefault(family, []).append(r)
    fig, axes = plt.subplots(1, len(families), figsize=(4.2 * len(families), 3.6), squeeze=False)
    lines = [("alg1", {}, "Alg. 1 (per input)", "-"), ("static", {"rule": "mass", "mode": "drop"}, "static, mass", "--"),
             ("static", {"rule": DEFAULT_RULE, "mode": "drop"}, f"static, {DEFAULT_RULE}", "-"),
             ("healed", {"rule": DEFAULT_RULE, "mode": "drop"}, f"{DEFAULT_RULE} + heal", "-"),
             ("random_shared", {}, "random shared", ":")]
    for ax, (family, rs) in zip(axes[0], sorted(families.items())):
        rs = sorted(rs, key=lambda r: r["experts"])
        vit = family.startswith("ViT")  # its experts add ~1.4 points: plot the share of that, not of the accuracy
        measure = (lambda v, r: _share(v, r)) if vit else (lambda v, r: v / r["full"])
        for method, match, label, style in lines:
            pts = [(r["experts"], measure(_value(r, "1/8", method, **match), r)) for r in rs
                   if _value(r, "1/8", method, **match) is not None]
            if pts:
                ax.plot(*zip(*pts), style, marker="o", label=label)
        ax.axhline(0.90 if vit else 0.98, color="grey", lw=0.8)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("experts n (keep 1/8)")
        ax.set_ylabel("share of the experts' contribution" if vit else "fraction of the full model's accuracy")
        ax.set_title(family)
        ax.set_ylim(-0.2 if vit else 0, 1.1)
    axes[0][0].legend(fontsize=7)
    save_figure(fig, path)
    return True


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoints", nargs="*", type=Path)
    p.add_argument("--render", action="store_true", help="only rewrite study.md and study.png from study.json")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/calibration_study"))
    p.add_argument("--keeps", type=_csv, default=["1/8", "1/4", "1/2"])
    p.add_argument("--random-keeps", type=_csv, default=["1/8", "1/4", "1/2"], help="keeps with random baselines")
    p.add_argument("--rules", type=_csv, default=list(RULES))
    p.add_argument("--heal-keeps", type=_csv, default=["1/8"])
    p.add_argument("--heal-rules", type=_csv, default=list(RULES), help="rules healed in drop mode")
    p.add_argument("--heal-renorm-rules", type=_csv, default=[DEFAULT_RULE, "mass"], help="rules healed in renorm mode")
    p.add_argument("--heal-steps", type=int, default=HealConfig().steps)
    p.add_argument("--seeds", type=int, default=10)
    p.add_argument("--renorm-reuse", action="store_true", help="renorm rows use the drop subsets of every rule "
                   "(saves the loss rule's second search, for the ViTs)")
    p.add_argument("--calib-limit", type=int, default=10000)
    p.add_argument("--validation", type=int, default=5000, help="the last N training images: the validation split")
    p.add_argument("--budgets", type=_csv, default=["per-layer", "global"], help="the loss rule's budgets")
    p.add_argument("--threads", type=int, default=2, help="torch threads (1 beside another job on 2 cores)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    store = args.out / "study.json"
    data = json.loads(store.read_text()) if store.exists() else {"reports": [], "commands": []}
    if args.render:
        (args.out / "study.md").write_text(markdown(data["reports"], " ; ".join(data["commands"])))
        plot(data["reports"], args.out / "study.png")
        return
    command = "python benchmarks/calibration_study.py " + " ".join(sys.argv[1:] if argv is None else argv)
    data["commands"].append(command)
    done = {r["checkpoint"] for r in data["reports"]}
    for path in args.checkpoints:
        if str(path) in done:
            print(f"{path}: already in {store}, skipped", file=sys.stderr)
            continue
        print(f"{path}:", file=sys.stderr, flush=True)
        data["reports"].append(study_model(path, args))
        data["versions"] = {"torch": torch.__version__, "moe_prune": mp.__version__}
        tmp = store.with_suffix(".tmp")
        tmp.write_text(json.dumps(data, indent=1))
        tmp.replace(store)
        (args.out / "study.md").write_text(markdown(data["reports"], " ; ".join(data["commands"])))
        plot(data["reports"], args.out / "study.png")


if __name__ == "__main__":
    main()
