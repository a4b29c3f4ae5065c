"""CPU time to compute per-input expert scores [B, E]: moe_prune's torch paths against the einsum formulation.

Question: on the CPU, is moe_prune's scoring path at least as fast as the straightforward formulation of
bwconrad/soft-moe (normalize, einsum to [B, M, E, S] logits, both softmaxes, sum the combine weights)?
Compared side by side in one run, interleaved call by call, at the ViT-S/16 and ViT-B/16 Soft MoE router shapes
(M=197 tokens, D=384 / 768, E=128 experts, S=1 slot), batch 1, 8 and 32. Reported: median, p10 and p90 per call
(warm-up excluded) and ratios einsum / moe_prune (> 1: moe_prune is faster).

    python benchmarks/scores_cpu.py                 # table + benchmarks/results/scores_cpu.json
    python benchmarks/scores_cpu.py --threads 2 --batches 1 8

The moe_prune paths: `expert_scores_ref` (only the combine softmax: one matmul, one softmax, one sum) and
`soft_moe_routing_ref` (layers.routing_ref, both softmaxes, then the sum), both from moe_prune.kernels.routing.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import sys
import time

import torch

from moe_prune.measurement.timing import environment as bench_environment
from moe_prune.measurement.reports import write_json
import torch.nn.functional as F

from moe_prune.kernels.routing import expert_scores_ref, soft_moe_routing_ref

ROOT = pathlib.Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
SHAPES = {"vit_s16": dict(M=197, D=384, E=128, S=1), "vit_b16": dict(M=197, D=768, E=128, S=1)}


def einsum_scores(x: torch.Tensor, phi: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The einsum formulation of bwconrad/soft-moe's router, followed by the scores: x [B, M, D], phi [D, E, S]
    -> [B, E]. Written from its description (normalize, einsum, softmax over tokens, softmax over all slots)."""
    x = F.normalize(x, dim=2)
    phi = scale * F.normalize(phi, dim=0)
    logits = torch.einsum("bmd,dnp->bmnp", x, phi)  # [B, M, E, S]
    dispatch = logits.softmax(dim=1)  # over tokens; part of the layer's forward, unused by the scores
    top = logits.amax(dim=(2, 3), keepdim=True)  # softmax over all E*S slots of a token
    combine = torch.exp(logits - top)
    combine = combine / combine.sum(dim=(2, 3), keepdim=True)  # [B, M, E, S]
    del dispatch
    return combine.sum(dim=(1, 3))  # [B, E]


def routing_scores(x: torch.Tensor, phi: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return soft_moe_routing_ref(x, phi, scale)[2]


def fast_scores(x: torch.Tensor, phi: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return expert_scores_ref(x, phi, scale)


METHODS = {"einsum (bwconrad formulation)": einsum_scores, "moe_prune routing_ref + sum": routing_scores,
           "moe_prune expert_scores_ref": fast_scores}


def time_side_by_side(fns: dict, args: tuple, warmup: int, min_reps: int, min_seconds: float) -> dict:
    """Per-call seconds of each fn, interleaved (one call of each per round) so drift hits all alike."""
    for _ in range(warmup):
        for fn in fns.values():
            fn(*args)
    times = {name: [] for name in fns}
    start = time.perf_counter()
    while len(times[next(iter(fns))]) < min_reps or time.perf_counter() - start < min_seconds:
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn(*args)
            times[name].append(time.perf_counter() - t0)
    out = {}
    for name, ts in times.items():
        t = torch.tensor(ts, dtype=torch.float64)
        out[name] = dict(median_ms=1e3 * t.median().item(), p10_ms=1e3 * t.quantile(0.1).item(),
                         p90_ms=1e3 * t.quantile(0.9).item(), reps=len(ts))
    return out




def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--threads", type=int, nargs="+", default=[1, torch.get_num_threads()],
                        help="torch thread counts to run with, one after the other (default: 1 and torch's "
                             "default); one thread is the stable number on a shared machine")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--min-reps", type=int, default=30)
    parser.add_argument("--min-seconds", type=float, default=1.0, help="per (shape, batch), all methods together")
    parser.add_argument("--out", type=pathlib.Path, default=RESULTS / "scores_cpu.json")
    args = parser.parse_args(argv)
    env = bench_environment()  # before the thread count changes
    torch.manual_seed(0)
    load_before = os.getloadavg()
    rows = []
    with torch.inference_mode():
        for threads, shape_name in [(t, s) for t in dict.fromkeys(args.threads) for s in args.shapes]:
            torch.set_num_threads(threads)
            s = SHAPES[shape_name]
            phi = torch.randn(s["D"], s["E"], s["S"]) / s["D"] ** 0.5  # [D, E, S]
            scale = torch.tensor([2.0])
            for batch in args.batches:
                x = torch.randn(batch, s["M"], s["D"])  # [B, M, D]
                ref = routing_scores(x, phi, scale)
                for name, fn in METHODS.items():  # every method computes the same scores
                    torch.testing.assert_close(fn(x, phi, scale), ref, atol=1e-4, rtol=1e-4, msg=name)
                timing = time_side_by_side(METHODS, (x, phi, scale), args.warmup, args.min_reps, args.min_seconds)
                base = timing["einsum (bwconrad formulation)"]["median_ms"]
                rows.append(dict(
                    shape=shape_name, **s, batch=batch, threads=threads, timing=timing,
                    ratio_einsum_over_routing_ref=base / timing["moe_prune routing_ref + sum"]["median_ms"],
                    ratio_einsum_over_expert_scores=base / timing["moe_prune expert_scores_ref"]["median_ms"],
                ))

    header = (f"{'threads':>7} {'shape':8} {'B':>3}  {'einsum ms (p10-p90)':>22}  {'routing_ref+sum ms':>22}  "
              f"{'expert_scores_ref ms':>22}  {'ratio rr':>8} {'ratio esr':>9}")
    print(header)
    print("-" * len(header))

    def cell(t):
        return f"{t['median_ms']:7.3f} ({t['p10_ms']:.3f}-{t['p90_ms']:.3f})"

    for r in rows:
        t = r["timing"]
        print(f"{r['threads']:>7} {r['shape']:8} {r['batch']:>3}  {cell(t['einsum (bwconrad formulation)']):>22}  "
              f"{cell(t['moe_prune routing_ref + sum']):>22}  {cell(t['moe_prune expert_scores_ref']):>22}  "
              f"{r['ratio_einsum_over_routing_ref']:8.2f} {r['ratio_einsum_over_expert_scores']:9.2f}")
    load_after = os.getloadavg()
    print("ratio = einsum median / moe_prune median (> 1: moe_prune is faster); rr: routing_ref + sum, "
          "esr: expert_scores_ref")
    print(f"load average (1 min) before/after: {load_before[0]:.2f}/{load_after[0]:.2f} on {os.cpu_count()} cores "
          "(other processes share this machine; multi-thread timings suffer first)")
    write_json(args.out, dict(env, dtype="float32", methods=list(METHODS),
                              load_average_1min=dict(before=load_before[0], after=load_after[0]), results=rows))
    print(f"wrote {args.out}")
    slow = [r for r in rows if r["ratio_einsum_over_expert_scores"] < 1]
    return 1 if slow else 0


if __name__ == "__main__":
    sys.exit(main())
