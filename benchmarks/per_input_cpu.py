"""Does Algorithm 1 (per-input subsets) cost what a shared subset costs? Torch eager, one Soft MoE layer.

Question: with K of E experts kept per input, does the sparse per-input path (`StackedExperts.grouped`) run at
the cost of B*K expert evaluations, as a shared subset of K does, and how far is it from its roofline (FLOPs of
B*K evaluations at the machine's peak, or the weights of the experts the batch kept read once, whichever is
longer)? And which of its three regimes wins where (weights gathered per row, a padded batched matmul over the
stack, a loop over the used experts), which is how the thresholds in moe_prune/core/experts.py were chosen.

Compared side by side in one run, interleaved call by call, at each layer shape and batch size: the full layer,
a shared subset of K (Algorithm 2's cost), per-input subsets through the automatic choice and through each
regime forced, and the dense per-input formulation (every expert on every slot, then 7/8 discarded: what the
layer did before). Reported: median and p10/p90 per call, speedups over the full layer, the roofline bound and
the union of experts the batch kept.

    python benchmarks/per_input_cpu.py                  # table + benchmarks/results/per_input_cpu.{json,md}
    python benchmarks/per_input_cpu.py --shapes vit_s16 --batches 32 --threads 2
"""

from __future__ import annotations

import argparse
import contextlib
import os
import pathlib
import sys

import torch

import moe_prune.core.experts as experts_mod
from moe_prune.measurement.timing import BenchConfig, alternate, machine_roofline, median_seconds
from moe_prune.measurement.timing import environment as bench_environment
from moe_prune.core.flops import model_cost, roofline_ratio
from moe_prune.core.routing import Routing
from moe_prune.core.layers import SoftMoE, SoftMoEConfig
from moe_prune.measurement.reports import table, write_json, write_text
from moe_prune.selection.scores import select_experts

ROOT = pathlib.Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
# Soft MoE layers of the reference configurations (and one of small experts, where the loop costs most).
SHAPES = {
    "default": dict(M=4, D=196, E=128, S=1, H=6, expert="relu_mlp"),  # the bundled MNIST model's layer
    "vit_s16": dict(M=197, D=384, E=128, S=1, H=1536, expert="gelu_mlp"),  # ViT-S/16, full-size experts
    "vit_s16_small": dict(M=197, D=384, E=128, S=1, H=192, expert="gelu_mlp"),  # ViT-S/16, experts of hidden 192
    "vit_b16_chung": dict(M=197, D=768, E=128, S=1, H=384, expert="gelu_mlp"),  # Chung et al.'s ViT-B/16
}
REGIMES = {"gather": dict(row_gather_limit=1 << 40, loop_overhead=0),  # changes to the CPU execution policy
           "padded": dict(row_gather_limit=0, loop_overhead=None), "loop": dict(row_gather_limit=0, loop_overhead=0)}


@contextlib.contextmanager
def forced(regime: str | None):
    """Force one regime of StackedExperts.grouped (None: the shipped CPU policy)."""
    import dataclasses

    saved = experts_mod.CPU_POLICY
    if regime is not None:
        experts_mod.CPU_POLICY = dataclasses.replace(saved, **REGIMES[regime])
    try:
        yield
    finally:
        experts_mod.CPU_POLICY = saved


def dense_per_input(layer: SoftMoE, x: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
    """The formulation the sparse path replaced: every expert on every slot, the unkept slots' combine zeroed."""
    r = layer.route(x)
    kept = torch.zeros(x.shape[0], layer.config.num_experts, dtype=torch.bool)
    kept.scatter_(1, experts, True)
    combine = r.combine_weights * kept.repeat_interleave(layer.config.slots_per_expert, 1).unsqueeze(1)
    return layer.mix(Routing(layer, x, None, r.tokens, dispatch=r.dispatch_weights, combine=combine))


def skinny_matmul_bandwidth(threads: int) -> dict:
    """The profile behind a missed roofline: GB/s at which torch's batched matmul reads a stack of ViT-S/16
    expert weights (112 x [384, 1536], 264 MB) when each expert has 1, 4 or 16 rows, the rows per expert of
    Algorithm 1 at batch 32 (about 4), against a streaming read of as many bytes."""
    torch.set_num_threads(threads)
    w = torch.randn(112, 384, 1536)  # [E, D, H], the checkpoint's layout
    out = {}
    for rows in (1, 4, 16):
        x = torch.randn(112, rows, 384)
        out[f"bmm, {rows} rows per expert"] = w.numel() * 4 / median_seconds(lambda: torch.bmm(x, w)) / 1e9
    x = torch.randn(112, 4, 384)
    out["loop of mm, 4 rows per expert"] = w.numel() * 4 / median_seconds(lambda: [x[e] @ w[e] for e in range(112)]) / 1e9
    out["streaming read (sum)"] = w.numel() * 4 / median_seconds(lambda: w.sum()) / 1e9
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--keep", type=int, default=16, help="experts kept per input (default 16 of 128: 1/8)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    parser.add_argument("--warmup", type=int, default=2, help="calls per path before timing (default 2)")
    parser.add_argument("--rounds", type=int, default=5, help="alternation rounds, 2 calls per path each (default 5)")
    parser.add_argument("--min-seconds", type=float, default=0.3,
                        help="keep adding rounds until every path was timed this long (default 0.3)")
    parser.add_argument("--out", type=pathlib.Path, default=RESULTS / "per_input_cpu.json")
    args = parser.parse_args(argv)
    env = bench_environment()
    torch.set_num_threads(args.threads)
    machine = machine_roofline(args.threads)
    load_before = os.getloadavg()
    rows = []
    torch.manual_seed(0)
    with torch.inference_mode():
        for name in args.shapes:
            s = SHAPES[name]
            layer = SoftMoE(SoftMoEConfig(dim=s["D"], num_experts=s["E"], slots_per_expert=s["S"], hidden=s["H"],
                                          expert=s["expert"])).eval()
            layer.scale.fill_(10.0)  # peaked routing, as trained models with a large router scale have
            for batch in args.batches:
                x = torch.randn(batch, s["M"], s["D"])  # [B, M, D]
                scores = layer.route(x).scores
                per_input = select_experts(scores, args.keep, per="input")  # [B, K]
                shared = select_experts(scores, args.keep, per="batch")  # [K]
                union = int(per_input.unique().numel())
                ref = dense_per_input(layer, x, per_input)
                paths = {"full": lambda: layer(x), "shared": lambda: layer(x, experts=shared),
                         "per-input": lambda: layer(x, experts=per_input)}
                for regime in REGIMES:
                    paths[f"per-input {regime}"] = (lambda reg: lambda: _with(reg, layer, x, per_input))(regime)
                paths["per-input dense (before)"] = lambda: dense_per_input(layer, x, per_input)
                for pname in [p for p in paths if p.startswith("per-input")]:
                    out = paths[pname]()  # every per-input path computes the same thing
                    torch.testing.assert_close(out, ref, atol=1e-5 * ref.abs().max().item(), rtol=1e-4, msg=pname)
                config = BenchConfig(warmup=args.warmup, rounds=args.rounds, iters_per_round=2, min_seconds=args.min_seconds)
                timing = alternate(paths, config, batch)
                full_cost = model_cost(layer, tokens=s["M"])
                alg1_cost = model_cost(layer, kept=args.keep, dynamic=True, tokens=s["M"], union=union)
                shared_cost = model_cost(layer, kept=args.keep, tokens=s["M"])
                bound = lambda c: roofline_ratio(full_cost, c, batch, machine["flops_per_s"], machine["bytes_per_s"])  # noqa: E731
                base = timing["full"]["p50_ms"]
                rows.append(dict(shape=name, **s, batch=batch, keep=args.keep, union=union, timing=timing,
                                 speedup={k: base / t["p50_ms"] for k, t in timing.items()},
                                 roofline={"shared": bound(shared_cost), "per-input": bound(alg1_cost)}))
    with torch.inference_mode():
        profile = skinny_matmul_bandwidth(args.threads)
    load_after = os.getloadavg()
    names = list(rows[0]["timing"])
    head = ["shape", "B", "union"] + [f"{n} ms" for n in names] + ["per-input / shared", "per-input of roofline",
                                                                  "shared of roofline"]
    body = []
    for r in rows:
        t = r["timing"]
        sp = r["speedup"]
        body.append([r["shape"], r["batch"], r["union"]] + [f"{t[n]['p50_ms']:.3f}" for n in names]
                    + [f"{sp['per-input'] / sp['shared']:.0%}", f"{sp['per-input'] / r['roofline']['per-input']:.0%}",
                       f"{sp['shared'] / r['roofline']['shared']:.0%}"])
    command = "python benchmarks/per_input_cpu.py " + " ".join(sys.argv[1:] if argv is None else argv)
    note = (f"torch {torch.__version__} eager, {args.threads} threads, {env.get('cpu', '')}; keep {args.keep} per "
            f"input; medians of alternating rounds (p10/p90 in the JSON); measured peak {machine['flops_per_s'] / 1e9:.0f} GFLOP/s, "
            f"bandwidth {machine['bytes_per_s'] / 1e9:.1f} GB/s; load average {load_before[0]:.2f} before, "
            f"{load_after[0]:.2f} after, on {os.cpu_count()} cores")
    text = table(body, head)
    profile_text = "weight-read bandwidth by access pattern (GB/s): " + ", ".join(f"{k} {v:.1f}" for k, v in profile.items())
    print(text)
    print(note)
    print(profile_text)
    write_json(args.out, dict(env, command=command, machine=machine, bandwidth_profile_gb_s=profile, load_average_1min=dict(before=load_before[0], after=load_after[0]),
                              results=rows))
    write_text(args.out.with_suffix(".md"), f"# Per-input subsets in torch eager\n\nCommand: `{command}`\n\n{note}\n\n"
               + table(body, head, markdown=True) + f"\n\n{profile_text}\n")
    print(f"wrote {args.out} and {args.out.with_suffix('.md')}")
    return 0


def _with(regime, layer, x, experts):
    with forced(regime):
        return layer(x, experts=experts)


if __name__ == "__main__":
    sys.exit(main())
