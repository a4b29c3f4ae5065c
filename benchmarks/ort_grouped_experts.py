"""Per-input expert rows in ONNX Runtime: our standard-operator graphs against the com.microsoft.MoE contrib op.

Question: for the B*K slot rows of Algorithm 1 (each row through its own expert of a stacked bank), which graph
runs fastest (and does the shipped graph, an ONNX If between the first two by the batch's row count, pick well) on ONNX Runtime's CPU provider: weights gathered per row (Gather + batched MatMul), the rows padded
into a [E, C, D] batch over the whole stack (ScatterElements + batched MatMul, C = the busiest expert's rows),
or onnxruntime's `com.microsoft.MoE` operator (k = 1, one-hot router probabilities, so every row goes to its own
expert with weight 1)? The contrib op's weights are laid out fc1 [E, H, D], fc2 [E, D, H], and its GELU is the
tanh approximation (checked below against the exact erf GELU our experts use: relu_mlp is exact, gelu_mlp not),
so it can serve only ReLU experts exactly. Experts only; the rows come from 16 of 128 experts per input, chosen
at random. Sessions share one thread pool per process and run alternately; medians (p10/p90 in the JSON).

    python benchmarks/ort_grouped_experts.py       # table + benchmarks/results/ort_grouped_experts.{json,md}
"""

from __future__ import annotations

import argparse
import contextlib
import os
import pathlib
import sys
import tempfile

import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnx import TensorProto, helper, numpy_helper

import moe_prune.core.experts as experts_mod
from moe_prune.measurement.timing import BenchConfig, alternate, ort_session
from moe_prune.measurement.timing import environment as bench_environment
from moe_prune.onnx.export import export_onnx
from moe_prune.core.layers import StackedExperts
from moe_prune.measurement.reports import table, write_json, write_text

ROOT = pathlib.Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
SHAPES = {  # D, H of the reference configurations' experts (ReLU here, so the contrib op is exact)
    "default": (196, 6),
    "vit_s16": (384, 1536),
    "vit_s16_small": (384, 192),
    "vit_b16_chung": (768, 384),
}


class Rows(torch.nn.Module):
    """rows [R, 1, D], expert ids [R] -> StackedExperts.grouped, as an Algorithm 1 graph computes it."""

    def __init__(self, experts: StackedExperts):
        super().__init__()
        self.experts = experts

    def forward(self, rows, ids):
        return self.experts.grouped(rows, ids)


@contextlib.contextmanager
def graph_regime(gather: bool | None):
    """The graph's row-count limit for gathering weights per row: forced on, off, or the shipped one (None)."""
    import dataclasses

    saved = experts_mod.CPU_POLICY
    if gather is not None:
        experts_mod.CPU_POLICY = dataclasses.replace(saved, row_gather_limit=1 << 40 if gather else 0, graph_few_rows=0.0)
    try:
        yield
    finally:
        experts_mod.CPU_POLICY = saved


def export_rows(experts: StackedExperts, path: pathlib.Path, gather: bool | None, D: int) -> str:
    """Our graph of the grouped rows (gathered, padded, or the shipped If between them), dynamic row axis."""
    import warnings

    with graph_regime(gather), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(Rows(experts), (torch.randn(6, 1, D), torch.tensor([0, 3, 3, 1, 0, 2])), str(path),
                          input_names=["rows", "ids"], output_names=["y"], opset_version=18, dynamo=False,
                          dynamic_axes={"rows": {0: "r"}, "ids": {0: "r"}, "y": {0: "r"}})
    return str(path)


def moe_op_model(experts: StackedExperts, path: pathlib.Path, activation: str) -> str:
    E, D, H = experts.w1.shape
    w1 = experts.w1.detach().transpose(1, 2).contiguous().numpy()  # [E, H, D]: the contrib op's layout
    w2 = experts.w2.detach().transpose(1, 2).contiguous().numpy()  # [E, D, H]
    inits = [numpy_helper.from_array(w1, "fc1"), numpy_helper.from_array(w2, "fc2")]
    names = ["x", "probs", "fc1", "", "fc2"]
    if experts.b1 is not None:
        inits += [numpy_helper.from_array(experts.b1.detach().numpy(), "b1"), numpy_helper.from_array(experts.b2.detach().numpy(), "b2")]
        names = ["x", "probs", "fc1", "b1", "fc2", "b2"]
    node = helper.make_node("MoE", names, ["y"], domain="com.microsoft", activation_type=activation, k=1,
                            normalize_routing_weights=1)
    graph = helper.make_graph([node], "moe", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["r", D]),
                                              helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["r", E])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["r", D])], inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("com.microsoft", 1)]), str(path))
    return str(path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--keep", type=int, default=16, help="experts per input (default 16)")
    parser.add_argument("--experts", type=int, default=128, help="experts in the stack (default 128)")
    parser.add_argument("--threads", type=int, default=2, help="ONNX Runtime intra-op threads (default 2)")
    parser.add_argument("--min-seconds", type=float, default=0.5, help="per (shape, batch), each model (default 0.5)")
    parser.add_argument("--out", type=pathlib.Path, default=RESULTS / "ort_grouped_experts.json")
    args = parser.parse_args(argv)
    env = bench_environment()
    ort.set_global_thread_pool_sizes(args.threads, 1)  # one pool for every timed session (see timing._time_onnx)
    load_before = os.getloadavg()
    torch.manual_seed(0)
    rows_out = []
    gelu_error = None
    with tempfile.TemporaryDirectory() as tmp, torch.inference_mode():
        tmp = pathlib.Path(tmp)
        for name in args.shapes:
            D, H = SHAPES[name]
            experts = StackedExperts("relu_mlp", args.experts, D, H, D).eval()
            models = {"moe_prune graph (If on rows)": export_rows(experts, tmp / f"{name}-a.onnx", None, D),
                      "gathered per row": export_rows(experts, tmp / f"{name}-g.onnx", True, D),
                      "padded over the stack": export_rows(experts, tmp / f"{name}-p.onnx", False, D),
                      "com.microsoft.MoE": moe_op_model(experts, tmp / f"{name}-m.onnx", "relu")}
            sessions = {n: ort_session(p, "cpu", args.threads, shared_threads=True) for n, p in models.items()}
            for batch in args.batches:
                ids = torch.stack([torch.randperm(args.experts)[:args.keep] for _ in range(batch)]).reshape(-1)  # [B*K]
                x = torch.randn(len(ids), 1, D)
                ref = experts.grouped(x, ids).reshape(len(ids), D).numpy()
                probs = np.full((len(ids), args.experts), -1e4, np.float32)
                probs[np.arange(len(ids)), ids.numpy()] = 0.0  # softmax -> one-hot: each row to its own expert
                feeds = {"moe_prune graph (If on rows)": {"rows": x.numpy(), "ids": ids.numpy()},
                         "gathered per row": {"rows": x.numpy(), "ids": ids.numpy()},
                         "padded over the stack": {"rows": x.numpy(), "ids": ids.numpy()},
                         "com.microsoft.MoE": {"x": x.reshape(-1, D).numpy(), "probs": probs}}
                errors = {}
                for n, s in sessions.items():
                    y = s.run(None, feeds[n])[0].reshape(len(ids), D)
                    errors[n] = float(np.abs(y - ref).max() / np.abs(ref).max())
                    assert errors[n] < 1e-5, (n, errors[n])
                runners = {n: (lambda s, f: lambda: s.run(None, f))(s, feeds[n]) for n, s in sessions.items()}
                timing = alternate(runners, BenchConfig(warmup=3, rounds=5, iters_per_round=3, min_seconds=args.min_seconds), batch)
                rows_out.append(dict(shape=name, D=D, H=H, batch=batch, rows=len(ids), union=int(ids.unique().numel()),
                                     timing=timing, max_rel_error=errors))
        # The contrib op's GELU against the exact one our gelu_mlp experts use.
        experts = StackedExperts("gelu_mlp", 8, 32, 48, 32).eval()
        for p in experts.parameters():
            p.add_(0.3 * torch.randn_like(p))
        s = ort_session(moe_op_model(experts, tmp / "gelu.onnx", "gelu"), "cpu", shared_threads=True)
        ids = torch.randint(0, 8, (64,))
        x = torch.randn(64, 1, 32)
        probs = np.full((64, 8), -1e4, np.float32)
        probs[np.arange(64), ids.numpy()] = 0.0
        y = s.run(None, {"x": x.reshape(64, 32).numpy(), "probs": probs})[0]
        ref = experts.grouped(x, ids).reshape(64, 32).numpy()
        gelu_error = float(np.abs(y - ref).max())
    load_after = os.getloadavg()
    names = list(rows_out[0]["timing"])
    head = ["experts", "batch", "rows", "used experts"] + [f"{n} ms" for n in names] + ["best"]
    body = [[r["shape"], r["batch"], r["rows"], r["union"]] + [f"{r['timing'][n]['p50_ms']:.3f}" for n in names]
            + [min(names, key=lambda n: r["timing"][n]["p50_ms"])] for r in rows_out]
    command = "python benchmarks/ort_grouped_experts.py " + " ".join(sys.argv[1:] if argv is None else argv)
    note = (f"onnxruntime {ort.__version__} CPU, {args.threads} threads, one shared pool; ReLU experts; {args.keep} of "
            f"{args.experts} per input; the contrib op's gelu against the exact erf GELU: max abs error {gelu_error:.1e} "
            f"(inputs O(1)); load average {load_before[0]:.2f} before, {load_after[0]:.2f} after")
    print(table(body, head))
    print(note)
    write_json(args.out, dict(env, command=command, gelu_max_abs_error=gelu_error,
                              load_average_1min=dict(before=load_before[0], after=load_after[0]), results=rows_out))
    write_text(args.out.with_suffix(".md"), f"# Grouped expert rows in ONNX Runtime\n\nCommand: `{command}`\n\n{note}\n\n"
               + table(body, head, markdown=True) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
