"""Reports for people: terminal tables, markdown, JSON files (written atomically)."""

from __future__ import annotations

import json
import math
import os
import sys
from typing import Any, Sequence

from ..core.files import atomic_output


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    return f"{n:.2f} GB"


def human_count(n: float) -> str:
    for unit, div in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.2f}{unit}"
    return f"{n:.0f}"


def table(rows: Sequence[Sequence[Any]], header: Sequence[str], markdown: bool = False) -> str:
    """A plain-text (aligned) or markdown table."""
    cells = [[str(c) for c in header]] + [[str(c) for c in r] for r in rows]
    if markdown:
        lines = ["| " + " | ".join(cells[0]) + " |", "|" + "|".join("---" for _ in header) + "|"]
        lines += ["| " + " | ".join(r) + " |" for r in cells[1:]]
        return "\n".join(lines)
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    fmt = lambda r: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))  # noqa: E731
    return "\n".join([fmt(cells[0]), "  ".join("-" * w for w in widths)] + [fmt(r) for r in cells[1:]])


def format_summary(s: dict) -> str:
    """The text `moe-prune info` prints for a checkpoint summary (see checkpoint.summary)."""
    cfg = s["config"]
    if s["family"] == "vit":
        arch = (f"Soft MoE ViT: {cfg['depth']} blocks, width {cfg['embed_dim']}, {cfg['num_heads']} heads, "
                f"image {cfg['img_size']} patch {cfg['patch_size']}, {cfg['num_classes']} classes")
    elif s["family"] == "mnist":
        arch = (f"Chung et al. MNIST model: {(cfg['img_size'] // cfg['patch_size']) ** 2} tokens of "
                f"{cfg['in_chans'] * cfg['patch_size'] ** 2}, one Soft MoE layer, {cfg['num_classes']} classes")
    elif s["family"] == "module":
        arch = f"your own model class {s.get('class')} with {len(s['moe_layers'])} moe-prune Soft MoE layer(s)"
    else:
        arch = f"a single Soft MoE layer of width {cfg['dim']}"
    lines = [
        f"{s['path']}  ({human_bytes(s['bytes'])})",
        f"  architecture: {arch}",
        f"  dtype:        {s.get('dtype', '?')}",
        *([f"  preprocess:   {s['preprocess']['text']}"] if s.get("preprocess") else []),
        f"  parameters:   {s['parameters']:,} ({human_count(s['parameters'])}), of which experts "
        f"{s['expert_parameters']:,} ({100 * s['expert_parameters'] / max(1, s['parameters']):.1f}%)",
        "",
    ]
    rows = []
    for layer in s["moe_layers"]:
        held = layer["experts_held"]
        kept = layer["kept_original_ids"]
        rows.append([
            layer["name"], layer["router_experts"], held, layer["slots_per_expert"], layer["hidden"],
            layer["expert"] + (f", {layer['quant']}" if layer.get("quant") else ""),
            f"{layer['parameters']:,}",
            "all" if kept is None else ",".join(map(str, kept)) if len(kept) <= 16 else f"{len(kept)} ids (see --json)",
        ])
    lines.append(table(rows, ["Soft MoE layer", "router E", "held", "slots", "hidden", "kind", "params", "kept (original ids)"]))
    if "found" in s:
        lines += ["", *format_found(s["found"])]
    meta = {k: v for k, v in s["meta"].items() if k not in ("source_kwargs", "history", "source_meta", "source", "preprocess")}
    if meta:
        shown = lambda v: v if isinstance(v, str) else json.dumps(v)  # noqa: E731
        clip = lambda t: t if len(t) <= 100 else t[:97] + "... (see --json)"  # noqa: E731
        lines += ["", "  metadata:"] + [f"    {k}: {clip(shown(v))}" for k, v in sorted(meta.items())]
    return "\n".join(lines)


def format_found(found: dict) -> list[str]:
    """What `info` says about another library's checkpoint: the file, the library, and where each constructor
    argument came from (the tensor shapes, the checkpoint's hyper-parameters, --kwargs, or a default)."""
    where = found["file_format"] + (f", entry '{found['entry']}'" if found.get("entry") else "")
    if found.get("prefix"):
        where += f", names under '{found['prefix']}'"
        if found.get("ignored_tensors"):
            where += f" ({found['ignored_tensors']} other tensor(s) not used)"
    if found.get("ema"):
        where += ", EMA weights"
    lines = [f"  read from:    {where}", f"  library:      {found['library']} {found['model']}"]
    for item in found.get("not_used", []):
        lines.append(f"  not used:     {item}")
    if found.get("other_ema_entries"):
        lines.append(f"  not used:     EMA weights in {', '.join(found['other_ema_entries'])} (take them with --ema)")
    groups: dict[str, list[str]] = {}
    for name, value in found["kwargs"].items():
        source = found["sources"].get(name, "default")
        if source == "default (training only)":
            continue
        groups.setdefault(source, []).append(f"{name}={json.dumps(value)}")
    labels = {"tensors": "from the tensor shapes", "hyper_parameters": "from the checkpoint's hyper_parameters",
              "given": "from --kwargs", "default": "library defaults (not in the file)"}
    lines.append(f"  arguments ({found['model']}):")
    for source in ("tensors", "hyper_parameters", "given", "default"):
        if groups.get(source):
            lines.append(f"    {labels[source]}: {', '.join(groups[source])}")
    for name in found.get("defaulted", []):
        lines.append(f"  warning:      {name} is the library's default, not read from the file: pass --kwargs "
                     f"'{{\"{name}\": ...}}' if the model was trained with another")
    for note in found.get("notes", []):
        lines.append(f"  note:         {note}")
    return lines


def write_json(path: str | os.PathLike, obj: Any) -> None:
    with atomic_output(path, suffix=".json") as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n")


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_output(path) as tmp:
        tmp.write_text(text)


def _pct(x: float | None) -> str:
    return "" if x is None else f"{100 * x:.2f}"


def study_markdown(reports: list[dict]) -> str:
    """Markdown for `moe-prune eval`: a summary across models, then one table per model (accuracy in %)."""
    out = []
    if len(reports) > 1:
        rows = []
        for r in reports:
            for mode in r["config"]["modes"]:
                k = max(1, math.ceil(r["experts"] / 8))
                get = lambda m, bs=None: next((x for x in r["rows"] if x["k"] == k and x["mode"] == mode and x["method"] == m  # noqa: E731
                                               and (bs is None or x["batch_size"] == bs)), None)
                a1, a2, st, rd = get("alg1"), get("alg2", max(r["config"]["batch_sizes"])), get("static"), get("random")
                if a1 is None:
                    continue
                rows.append([r.get("name", ""), r["experts"], f"{k}/{r['experts']}", mode, _pct(r["full"]), _pct(r["no_experts"]),
                             _pct(a1["accuracy"]), _pct(a2["accuracy"]) if a2 else "", _pct(st["accuracy"]),
                             f"{_pct(rd['accuracy'])} ± {_pct(rd['std'])}", f"{100 * a1['accuracy'] / r['full']:.1f}%"])
        out += ["### Keeping 1/8 of the experts (accuracy, %)", "",
                table(rows, ["model", "n", "k", "mode", "full", "k=0", "alg1 (per input)", f"alg2 (batch {max(reports[0]['config']['batch_sizes'])})",
                             "static", "random (mean ± std)", "alg1 / full"], markdown=True), ""]
    for r in reports:
        bss = r["config"]["batch_sizes"]
        rows = []
        for mode in r["config"]["modes"]:
            for k in sorted({x["k"] for x in r["rows"]}):
                sel = [x for x in r["rows"] if x["k"] == k and x["mode"] == mode]
                get = lambda m, bs=None: next(x for x in sel if x["method"] == m and (bs is None or x["batch_size"] == bs))  # noqa: E731
                rd = get("random")
                top5 = lambda x: _pct(x["top5"]) if x.get("top5") is not None else ""  # noqa: E731
                rows.append([f"{k}/{r['experts']}", mode, _pct(get("alg1")["accuracy"])]
                            + [_pct(get("alg2", bs)["accuracy"]) for bs in bss]
                            + [_pct(get("static")["accuracy"]), f"{_pct(rd['accuracy'])} ± {_pct(rd['std'])}",
                               top5(get("alg1")), top5(get("static"))])
        five = (f" (top-5 {_pct(r['full_top5'])}%)" if r.get("full_top5") is not None else "")
        out += [f"### {r.get('name', 'model')}: n = {r['experts']}, full {_pct(r['full'])}%{five}, no experts (k=0) {_pct(r['no_experts'])}%",
                "", table(rows, ["k/n", "mode", "alg1"] + [f"alg2 b={bs}" for bs in bss]
                          + ["static", "random", "alg1 top-5", "static top-5"], markdown=True), ""]
    return "\n".join(out)


def study_plot(reports: list[dict], path) -> bool:
    """Accuracy against k/n, one line per model (Algorithm 1, drop), dashed: random subsets. False without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    for ax, mode in zip(axes, ("drop", "renorm")):
        for i, r in enumerate(reports):
            color = plt.cm.viridis(i / max(1, len(reports) - 1))
            for method, style in (("alg1", "-o"), ("random", "--")):
                pts = sorted((x["fraction"], x["accuracy"]) for x in r["rows"] if x["mode"] == mode and x["method"] == method)
                if pts:
                    ax.plot(*zip(*pts), style, color=color, ms=3, label=f"n={r['experts']}" if method == "alg1" else None)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("fraction of experts kept, k/n")
        ax.set_title(f"{mode}: selected (solid) vs random (dashed)")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("test accuracy")
    for ax in axes:
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7, ncol=2)
    save_figure(fig, path)
    return True


def save_figure(fig, path) -> None:
    """Lay out a matplotlib figure, write it as a PNG atomically, and close it."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    with atomic_output(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)


def format_demo(r: dict) -> str:
    """The summary `moe-prune demo` prints."""
    a = r["accuracy"]
    n = ", ".join(f"{name}: {e}" for name, e in r["experts"].items())
    kept = lambda v: f"{100 * v:6.2f}%  ({100 * v / a['full']:.1f}% of full)"  # noqa: E731
    lines = [
        f"moe-prune demo: {r['checkpoint']}",
        f"  experts per Soft MoE layer: {n}; keep {r['keep']} -> k = {r['k']}, {r['mode']} mode",
        f"  compressed checkpoint: {r['compressed']}",
        *([f"  healed checkpoint:     {r['healed']}"] if r.get("healed") else []),
        "",
        "accuracy on 500 held-out images of the bundled Fashion-MNIST sample:",
        *[f"  {label:<36}{value}" for label, value in [
            ("full model", f"{100 * a['full']:6.2f}%"),
            (f"static {r['k']}, combine mass (the paper)", kept(a["static_mass"])),
            (f"static {r['k']}, rule {r['rule']} (compressed)", kept(a["static"])),
            *([("compressed + healed", kept(a["healed"]))] if "healed" in a else []),
            (f"Algorithm 1 (per-input top-{r['k']})", kept(a["alg1"])),
            (f"random {r['k']} experts (mean ± std)", f"{100 * a['random_mean']:6.2f}% ± {100 * a['random_std']:.2f}"),
            ("no experts (k = 0)", f"{100 * a['no_experts']:6.2f}%"),
        ]],
        "",
        "size:",
    ]
    for key, label in (("parameters", "parameters"), ("expert_parameters", "expert parameters"), ("bytes", "file size")):
        before, after = r["size"][key]
        fmt = human_bytes if key == "bytes" else human_count
        lines.append(f"  {label:<18} {fmt(before):>10} -> {fmt(after):>10}  ({before / max(1, after):.2f}x smaller)")
    if "speed" in r:
        lines += ["", demo_speed(r["speed"])]
    lines += ["", f"done in {r['seconds']:.0f} s"]
    return "\n".join(lines)


def _bound_at(b: dict | None, bs) -> tuple:
    """(FLOP bound, weight-byte bound, roofline bound) of a variant at batch size bs; None where unknown. The
    bytes bound of Algorithm 1 depends on the batch (the experts its inputs kept); the roofline on both."""
    if b is None:
        return None, None, None
    at = b.get("by_batch", {}).get(bs) or b.get("by_batch", {}).get(str(bs)) or {}
    return b["flop_ratio"], at.get("bytes_ratio", b["bytes_ratio"]), at.get("roofline")


# A speedup this far above its analytic bound is not the model: it is timing noise (a busy machine, one slow
# run of the full model) or a cache effect; the table flags it instead of printing it as a result.
ABOVE_BOUND = 1.25
ABOVE_BOUND_NOTE = (f"! more than {ABOVE_BOUND:.2f}x its bound: that is not the model's speedup but timing "
                    "noise (a busy machine) or a cache effect; re-measure with a larger --min-seconds on an idle machine")


def of_bound(speed: float, applicable: float | None) -> tuple[str, bool]:
    """The "of roofline" cell ("84%", "333% !") and whether it is flagged as above its bound."""
    if applicable is None:
        return "", False
    flagged = speed > ABOVE_BOUND * applicable
    return f"{100 * speed / applicable:.0f}%" + (" !" if flagged else ""), flagged


def _bench_rows(latency: dict, bounds: dict) -> list:
    rows = []
    for engine in ("onnxruntime", "torch"):
        for bs, stats in latency.get(engine, {}).items():
            for name, s in stats.items():
                speed = latency["speedup"][engine][bs][name]
                fb, bb, rb = _bound_at(bounds.get(name), int(bs)) if name != "full" else (1.0, 1.0, 1.0)
                rows.append([engine, bs, name, f"{s['p50_ms']:.3f}", f"{s['p90_ms']:.3f}", f"{s['p99_ms']:.3f}",
                             f"{s['throughput_per_s']:.0f}", f"{speed:.2f}x", "" if fb is None else f"{fb:.2f}x",
                             "" if bb is None else f"{bb:.2f}x", "" if rb is None else f"{rb:.2f}x",
                             "" if name == "full" else of_bound(speed, rb)[0],
                             "" if s.get("peak_rss_mb") is None else f"{s['peak_rss_mb']:.0f}"])
    return rows


BENCH_HEADER = ["engine", "batch", "model", "p50 ms", "p90 ms", "p99 ms", "inputs/s", "speedup", "FLOP bound",
                "bytes bound", "roofline", "of roofline", "peak RSS MB"]


def format_costs(bounds: dict, markdown: bool = False) -> str:
    """Per-input cost by layer kind, full against each reduced model: where the two bounds come from."""
    kinds = next(iter(bounds.values()))["by_kind"]
    rows = []
    for kind in kinds:
        row = [kind, f"{kinds[kind]['flops'][0] / 1e6:.2f}", f"{kinds[kind]['weight_params'][0] * 4 / 2**20:.2f}"]
        for b in bounds.values():
            k = b["by_kind"][kind]
            row += [f"{k['flops'][1] / 1e6:.2f}", f"{k['weight_params'][1] * 4 / 2**20:.2f}"]
        rows.append(row)
    total = ["total (ratio)", "", ""]
    for b in bounds.values():
        total += [f"{b['flop_ratio']:.2f}x", f"{b['bytes_ratio']:.2f}x"]
    header = ["layer kind", "full MFLOP", "full weight MB"]
    for name in bounds:
        header += [f"{name} MFLOP", f"{name} weight MB"]
    return table(rows + [total], header, markdown=markdown)


def format_bench(r: dict, markdown: bool = False) -> str:
    """The latency table of `bench.benchmark`: speedup over the full model beside its two analytic bounds,
    then the per-input cost by layer kind that the bounds are computed from.

    "of roofline" compares the speedup with the roofline bound at that batch size: each pass costs at least its
    FLOPs at the machine's measured peak or its weight bytes at the measured bandwidth, whichever is longer.
    """
    env = r["env"]
    lines = [f"latency, keep {r['keep']} ({r['mode']}), ONNX Runtime {env.get('onnxruntime')} {env.get('provider')} "
             f"and torch {env['torch']} eager, {env['cpu']}, {env['torch_threads']} threads:"]
    if "latency" not in r:
        return lines[0] + " not measured"
    rows = _bench_rows(r["latency"], r["bounds"])
    lines.append(table(rows, BENCH_HEADER, markdown=markdown))
    if "layer" in r and "latency" in r["layer"]:
        layer_rows = _bench_rows(r["layer"]["latency"], r["layer"]["bounds"])
        rows = rows + layer_rows
        lines += ["", f"the Soft MoE layer {r['layer']['name']} alone ({r['layer']['tokens']} tokens):",
                  table(layer_rows, BENCH_HEADER, markdown=markdown)]
    if any(row[BENCH_HEADER.index("of roofline")].endswith("!") for row in rows):
        lines += ["", ABOVE_BOUND_NOTE]
    lines += ["", "cost per input by layer kind (fp32 weights; the same at every batch size), whole model:",
              format_costs(r["bounds"], markdown=markdown)]
    return "\n".join(lines)


def bench_plot(r: dict, path) -> bool:
    """Median latency against batch size, one line per model and engine (log-log). False without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for engine, style in (("onnxruntime", "-o"), ("torch", "--s")):
        by_bs = r["latency"].get(engine, {})
        names = next(iter(by_bs.values()), {}).keys()
        for name in names:
            pts = sorted((int(bs), stats[name]["p50_ms"]) for bs, stats in by_bs.items())
            ax.plot(*zip(*pts), style, ms=4, label=f"{engine}: {name}")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("batch size")
    ax.set_ylabel("median latency (ms)")
    ax.set_title(f"full vs reduced (keep {r['keep']}, {r['mode']})")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
    save_figure(fig, path)
    return True


def demo_speed(r: dict) -> str:
    """The demo's latency lines: ONNX Runtime only, with the bounds; the full table is in summary.json."""
    if "latency" not in r:
        return "ONNX export and validation passed (latency not measured)"
    env = r["env"]
    rows = []
    for bs, stats in r["latency"]["onnxruntime"].items():
        speed = r["latency"]["speedup"]["onnxruntime"][bs]
        for name in ("compressed", "alg2", "alg1"):
            if name not in stats:
                continue
            fb, bb, rb = _bound_at(r["bounds"][name], int(bs))
            rows.append([bs, name, f"{stats['full']['p50_ms']:.3f}", f"{stats[name]['p50_ms']:.3f}", f"{speed[name]:.2f}x",
                         f"{fb:.2f}x", f"{bb:.2f}x", "" if rb is None else f"{rb:.2f}x", of_bound(speed[name], rb)[0]])
    head = (f"speed (ONNX Runtime {env.get('onnxruntime')} {env.get('provider')}, {env['cpu']}, {env['torch_threads']} "
            "threads; median latency; torch eager and p90/p99 in summary.json):")
    text = head + "\n" + table(rows, ["batch", "reduced", "full ms", "reduced ms", "speedup", "FLOP bound", "bytes bound", "roofline",
                                     "of roofline"])
    return text + ("\n" + ABOVE_BOUND_NOTE if any(row[-1].endswith("!") for row in rows) else "")


def say(step: str, text: str = "") -> None:
    """A progress line on stderr, `[step] text`, as the demo and the benchmark print them."""
    print(f"[{step}] {text}", file=sys.stderr, flush=True)
