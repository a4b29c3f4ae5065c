"""Where a Soft MoE layer's time goes in ONNX Runtime, full against compressed, and why `bench` shares one pool.

1. Per-node profile (ONNX Runtime's own profiler) of one Soft MoE layer of a reference ViT (random weights), the
   full layer and a compressed one keeping a seeded random 1/8 of the experts: the evidence behind the README's
   "what is left in a compressed layer".
2. The three layer models (full, compressed, Algorithm 2) timed side by side, each in a fresh process, once with a
   thread pool per session (ONNX Runtime's default) and once with one process-wide pool (what `bench` does):
   with a pool per session, the spinning workers of the session that just ran steal the cores from the next one.

    python benchmarks/ort_profile.py --config vit-b16-chung
Results: benchmarks/results/ort_profile_<config>.{json,md}.
"""

from __future__ import annotations

import argparse
import collections
import json
import multiprocessing
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_reference import VITS  # noqa: E402

from moe_prune.measurement.bench import reduced_model  # noqa: E402
from moe_prune.onnx.export import export_onnx  # noqa: E402
from moe_prune.core.models import SoftMoEViT, ViTConfig, moe_layers  # noqa: E402
from moe_prune.measurement.reports import table, write_json, write_text  # noqa: E402
from moe_prune.selection.scores import with_selection  # noqa: E402
from moe_prune.measurement.timing import environment, ort_session  # noqa: E402
from moe_prune.onnx.validate import validate_onnx  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def profile(path: str, x: np.ndarray, runs: int, threads: int) -> dict:
    """{node: mean microseconds per run} from ONNX Runtime's profiler, and the mean sum over nodes."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.enable_profiling = True
    opts.profile_file_prefix = str(Path(path).with_suffix("")) + "_profile"
    session = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
    for _ in range(runs):
        session.run(None, {"input": x})
    trace = Path(session.end_profiling())
    per_node = collections.Counter()
    for event in json.loads(trace.read_text()):
        if event.get("cat") == "Node" and event["name"].endswith("_kernel_time"):
            per_node[f"{event['args']['op_name']} {event['name'][:-len('_kernel_time')]}"] += event["dur"]
    trace.unlink()
    nodes = {k: v / runs for k, v in per_node.most_common()}
    return {"nodes_us": nodes, "sum_us": sum(nodes.values())}


def side_by_side(paths: dict, x: np.ndarray, shared: bool, threads: int, rounds: int) -> dict:
    """Median ms per model, models taking turns (4 calls each per round); run in a fresh process."""
    if shared:
        import onnxruntime as ort

        ort.set_global_thread_pool_sizes(threads, 1)
    sessions = {n: ort_session(p, threads=None if shared else threads, shared_threads=shared) for n, p in paths.items()}
    times = {n: [] for n in sessions}
    for _ in range(rounds):
        for n, s in sessions.items():
            for _ in range(4):
                t = time.perf_counter()
                s.run(None, {"input": x})
                times[n].append(time.perf_counter() - t)
    return {n: 1e3 * float(np.median(v[4:])) for n, v in times.items()}


def in_child(fn, *args):
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(fn, args)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", choices=list(VITS), default="vit-b16-chung")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--runs", type=int, default=20, help="profiled runs per model")
    p.add_argument("--rounds", type=int, default=6, help="side-by-side rounds per pool setting")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--work-dir", default="bench-work/profile")
    args = p.parse_args(argv)

    torch.manual_seed(0)
    vit = SoftMoEViT(ViTConfig(**{**VITS[args.config], "depth": VITS[args.config]["moe_layer_index"] + 1})).eval()
    small, how = reduced_model(vit, "1/8")
    name, layer = next(iter(moe_layers(vit).items()))
    models = {"full": layer, "compressed": moe_layers(small)[name], "alg2": with_selection(layer, "1/8", per="batch")}
    tokens = vit.config.tokens
    out = Path(args.work_dir) / args.config
    out.mkdir(parents=True, exist_ok=True)
    paths = {}
    for n, m in models.items():
        paths[n] = str(export_onnx(m, out / f"{n}.onnx", example=torch.randn(2, tokens, layer.config.dim)))
        validate_onnx(paths[n], m, check=True)
    x = torch.randn(args.batch, tokens, layer.config.dim, generator=torch.Generator().manual_seed(0)).numpy()

    prof = {n: in_child(profile, paths[n], x, args.runs, args.threads) for n in ("full", "compressed")}
    pools = {"a pool per session": in_child(side_by_side, paths, x, False, args.threads, args.rounds),
             "one shared pool": in_child(side_by_side, paths, x, True, args.threads, args.rounds)}

    command = "python benchmarks/ort_profile.py " + " ".join(sys.argv[1:] if argv is None else argv)
    result = {"command": command, "config": args.config, "layer": name, "tokens": tokens, "batch": args.batch,
              "keep": "1/8", "reduced": how, "weights": "random", "profile": prof, "side_by_side_ms": pools,
              "env": environment("cpu")}
    lines = [f"# ONNX Runtime profile: {args.config}, Soft MoE layer {name}", "", f"Command: `{command}`", "",
             f"Random weights; compressed = {how}. Batch {args.batch}, {tokens} tokens, {args.threads} threads, "
             f"ONNX Runtime {result['env'].get('onnxruntime')}, {result['env']['cpu']}.", ""]
    for n, r in prof.items():
        rows = [[node, f"{us / 1e3:.3f}", f"{100 * us / r['sum_us']:.1f}%"] for node, us in list(r["nodes_us"].items())[:12]]
        lines += [f"## {n}: {r['sum_us'] / 1e3:.2f} ms per run (sum over nodes; top 12 nodes)", "",
                  table(rows, ["node", "ms per run", "share"], markdown=True), ""]
    rows = [[setting, *(f"{v:.2f}" for v in ms.values()), f"{ms['full'] / ms['compressed']:.2f}x"]
            for setting, ms in pools.items()]
    lines += ["## Side by side (median ms, models taking turns, each setting in a fresh process)", "",
              table(rows, ["threads", *(f"{n} ms" for n in paths), "speedup of compressed"], markdown=True), ""]
    RESULTS.mkdir(parents=True, exist_ok=True)
    write_json(RESULTS / f"ort_profile_{args.config}.json", result)
    write_text(RESULTS / f"ort_profile_{args.config}.md", "\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
