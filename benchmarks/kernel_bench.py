"""GPU time of the fused routing kernel and of the grouped-expert kernel against torch, and the bytes each must move.

Question: how close does `soft_moe_routing` (one launch: dispatch, combine and expert scores) come to the memory
bound, and how much faster is it than torch's matmul + two softmaxes + sum (`soft_moe_routing_ref`)?
Shapes: the ViT-S/16 and ViT-B/16 Soft MoE routers (M=197 tokens, D=384 / 768, E=128 experts, S=1), batch 1, 8,
64 and 256, fp32 / fp16 / bf16, with the learned scale (Phi normalized in the kernel). Timed with
triton.testing.do_bench (L2 flushed between calls; median, p10, p90). Reported: time, GB/s achieved on the
minimum bytes (read X and Phi, write dispatch, combine and scores), percent of the device's peak bandwidth.

    python benchmarks/kernel_bench.py                       # table + benchmarks/results/kernel_bench.json
    python benchmarks/kernel_bench.py --dtypes fp16 --batches 64 256

The grouped-expert kernel (Algorithm 1's kept experts on their kept slots, `kernels/grouped_experts.py`) is timed
on the same two layers' experts (ViT-S/16: D=384, H=1536; Chung et al.'s ViT-B/16: D=768, H=384; 128 experts, 16
kept per input, one slot each) against torch's sync-free CUDA path (StackedExperts.grouped, the kernel off), with
its bound: the union of the kept experts' weights read once, the rows read and written.

Without a GPU it prints the minimum-bytes table (and the time each implies at 3 TB/s), writes it to
benchmarks/results/kernel_bench_bytes.json, says it skipped the timing, and exits 0.
"""

from __future__ import annotations

import argparse
import functools
import pathlib
import sys

import torch

from moe_prune.measurement.timing import environment as bench_environment
from moe_prune.measurement.reports import write_json

ROOT = pathlib.Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
SHAPES = {"vit_s16": dict(M=197, D=384, E=128, S=1), "vit_b16": dict(M=197, D=768, E=128, S=1)}
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
REFERENCE_BANDWIDTH = 3e12  # bytes/s: an H100-class HBM3 figure for the analytic table


def min_bytes(batch: int, M: int, D: int, E: int, S: int, dtype: torch.dtype) -> dict:
    """Bytes any implementation must move: read X [B, M, D] and Phi [D, E*S] (and the scale), write dispatch and
    combine [B, M, E*S] in the input's dtype and scores [B, E] in fp32."""
    elt = torch.tensor([], dtype=dtype).element_size()
    N = E * S
    parts = dict(x=batch * M * D * elt, phi=D * N * elt, scale=elt, dispatch=batch * M * N * elt,
                 combine=batch * M * N * elt, scores=batch * E * 4)
    return dict(parts, total=sum(parts.values()))


def bytes_table(shapes, batches, dtypes) -> list[dict]:
    rows = []
    for shape_name in shapes:
        s = SHAPES[shape_name]
        for dtype_name in dtypes:
            for batch in batches:
                b = min_bytes(batch, **s, dtype=DTYPES[dtype_name])
                rows.append(dict(shape=shape_name, **s, batch=batch, dtype=dtype_name, bytes=b,
                                 us_at_3tbs=1e6 * b["total"] / REFERENCE_BANDWIDTH))
    return rows


def peak_bandwidth(device: int, override_gbps: float | None) -> float | None:
    """Device peak DRAM bandwidth in bytes/s: --peak-gbps, else 2 x memory clock x bus width (DDR / HBM)."""
    if override_gbps:
        return override_gbps * 1e9
    props = torch.cuda.get_device_properties(device)
    clock_khz, bus_bits = getattr(props, "memory_clock_rate", 0), getattr(props, "memory_bus_width", 0)
    if clock_khz and bus_bits:
        return 2 * clock_khz * 1e3 * bus_bits / 8
    return None




def print_bytes_table(rows: list[dict]) -> None:
    header = (f"{'shape':8} {'dtype':5} {'B':>4} {'X MB':>9} {'Phi MB':>7} {'D+C MB':>9} {'total MB':>9} "
              f"{'us @3TB/s':>10}")
    print(header)
    print("-" * len(header))
    for r in rows:
        b = r["bytes"]
        print(f"{r['shape']:8} {r['dtype']:5} {r['batch']:>4} {b['x'] / 1e6:9.3f} {b['phi'] / 1e6:7.3f} "
              f"{(b['dispatch'] + b['combine']) / 1e6:9.3f} {b['total'] / 1e6:9.3f} {r['us_at_3tbs']:10.2f}")


def bench_gpu(rows: list[dict], peak: float | None, warmup_ms: int, rep_ms: int) -> list[dict]:
    import triton.testing

    from moe_prune.kernels.routing import soft_moe_routing, soft_moe_routing_ref

    out = []
    for r in rows:
        dtype = DTYPES[r["dtype"]]
        torch.manual_seed(0)
        x = torch.randn(r["batch"], r["M"], r["D"], device="cuda", dtype=dtype)  # [B, M, D]
        phi = (torch.randn(r["D"], r["E"], r["S"], device="cuda") / r["D"] ** 0.5).to(dtype)  # [D, E, S]
        scale = torch.tensor([2.0], device="cuda", dtype=dtype)

        fused = functools.partial(soft_moe_routing, x, phi, scale)
        unfused = functools.partial(soft_moe_routing_ref, x, phi, scale)  # normalize, matmul, 2 softmaxes, sum
        got, ref = fused(), unfused()  # the timed kernel must be right first
        tol = dict(atol=1e-5, rtol=1e-4) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
        for a, b in zip(got, ref):
            torch.testing.assert_close(a.float(), b.float(), **tol)
        row = dict(r)
        for name, fn in (("fused", fused), ("torch", unfused)):
            p50, p10, p90 = triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, quantiles=[0.5, 0.1, 0.9])
            gbs = r["bytes"]["total"] / (p50 * 1e-3) / 1e9
            row[name] = dict(median_ms=p50, p10_ms=p10, p90_ms=p90, gb_per_s=gbs,
                             pct_of_peak=(100 * gbs * 1e9 / peak) if peak else None)
        row["speedup"] = row["torch"]["median_ms"] / row["fused"]["median_ms"]
        out.append(row)
    return out


EXPERTS = {"vit_s16": dict(D=384, H=1536, E=128), "vit_b16_chung": dict(D=768, H=384, E=128)}


def bench_grouped_gpu(batches, dtypes, peak: float | None, warmup_ms: int, rep_ms: int, keep: int = 16) -> list[dict]:
    """The grouped-expert kernel against torch's grouped path on B inputs x `keep` experts each (one slot)."""
    import triton.testing

    from moe_prune.core.experts import StackedExperts

    out = []
    for shape, s in EXPERTS.items():
        for dtype_name in dtypes:
            dtype = DTYPES[dtype_name]
            torch.manual_seed(0)
            experts = StackedExperts("gelu_mlp", s["E"], s["D"], s["H"], s["D"]).to("cuda", dtype).eval()
            for batch in batches:
                g = torch.Generator(device="cuda").manual_seed(batch)
                idx = torch.stack([torch.randperm(s["E"], device="cuda", generator=g)[:keep] for _ in range(batch)])
                rows = torch.randn(batch * keep, 1, s["D"], device="cuda", dtype=dtype)  # [R, N=1, D]
                flat = idx.reshape(-1)

                def run(kernel: bool):
                    experts.use_triton = kernel
                    with torch.inference_mode():
                        return experts.grouped(rows, flat, capacity=batch)

                got, ref = run(True), run(False)
                tol = dict(atol=1e-4, rtol=1e-3) if dtype == torch.float32 else dict(atol=3e-2, rtol=3e-2)
                torch.testing.assert_close(got.float(), ref.float(), **tol)
                used = int(torch.unique(flat).numel())
                elt = torch.tensor([], dtype=dtype).element_size()
                weights = used * (2 * s["D"] * s["H"] + s["H"] + s["D"]) * elt
                total = weights + 2 * rows.numel() * elt
                row = dict(shape=shape, **s, batch=batch, keep=keep, dtype=dtype_name, used_experts=used,
                           bytes=dict(weights=weights, rows=2 * rows.numel() * elt, total=total))
                for name, kernel in (("fused", True), ("torch", False)):
                    p50, p10, p90 = triton.testing.do_bench(lambda k=kernel: run(k), warmup=warmup_ms, rep=rep_ms,
                                                            quantiles=[0.5, 0.1, 0.9])
                    gbs = total / (p50 * 1e-3) / 1e9
                    row[name] = dict(median_ms=p50, p10_ms=p10, p90_ms=p90, gb_per_s=gbs,
                                     pct_of_peak=(100 * gbs * 1e9 / peak) if peak else None)
                row["speedup"] = row["torch"]["median_ms"] / row["fused"]["median_ms"]
                out.append(row)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 64, 256])
    parser.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=list(DTYPES))
    parser.add_argument("--warmup-ms", type=int, default=25)
    parser.add_argument("--rep-ms", type=int, default=200)
    parser.add_argument("--peak-gbps", type=float, default=None,
                        help="device peak bandwidth, GB/s (default: from the memory clock and bus width)")
    parser.add_argument("--out", type=pathlib.Path, default=RESULTS / "kernel_bench.json")
    parser.add_argument("--bytes-out", type=pathlib.Path, default=RESULTS / "kernel_bench_bytes.json")
    args = parser.parse_args(argv)

    rows = bytes_table(args.shapes, args.batches, args.dtypes)
    print("Minimum bytes per call (read X, Phi, scale; write dispatch, combine in the input dtype, scores fp32):")
    print_bytes_table(rows)
    env = bench_environment()
    write_json(args.bytes_out, dict(env, reference_bandwidth_bytes_per_s=REFERENCE_BANDWIDTH, shapes=rows))
    print(f"wrote {args.bytes_out}")
    if not torch.cuda.is_available():
        print("\nSKIPPED the GPU timing: no CUDA device here (torch.cuda.is_available() is False). "
              "Run this script on a GPU machine to time the fused kernel against torch.")
        return 0

    peak = peak_bandwidth(0, args.peak_gbps)
    results = bench_gpu(rows, peak, args.warmup_ms, args.rep_ms)
    print(f"\n{env['device']}, peak bandwidth {peak / 1e9:.0f} GB/s" if peak else f"\n{env['device']}")
    header = (f"{'shape':8} {'dtype':5} {'B':>4} {'fused us':>9} {'GB/s':>7} {'%peak':>6} {'torch us':>9} "
              f"{'GB/s':>7} {'%peak':>6} {'speedup':>8} {'bound us':>9}")
    print(header)
    print("-" * len(header))
    for r in results:
        f, t = r["fused"], r["torch"]
        bound = 1e6 * r["bytes"]["total"] / peak if peak else float("nan")
        print(f"{r['shape']:8} {r['dtype']:5} {r['batch']:>4} {1e3 * f['median_ms']:9.1f} {f['gb_per_s']:7.0f} "
              f"{f['pct_of_peak'] or 0:6.1f} {1e3 * t['median_ms']:9.1f} {t['gb_per_s']:7.0f} "
              f"{t['pct_of_peak'] or 0:6.1f} {r['speedup']:8.2f} {bound:9.1f}")
    print("GB/s and %peak count the minimum bytes; speedup = torch median / fused median; bound = minimum bytes at "
          "the device's peak bandwidth")
    grouped = bench_grouped_gpu(args.batches, args.dtypes, peak, args.warmup_ms, args.rep_ms)
    print("\nGrouped experts (Algorithm 1: 16 kept per input, one slot): the kernel against torch's grouped path")
    print(f"{'experts':14} {'dtype':5} {'B':>4} {'used':>5} {'fused us':>9} {'%peak':>6} {'torch us':>9} {'speedup':>8} "
          f"{'bound us':>9}")
    for r in grouped:
        bound = 1e6 * r["bytes"]["total"] / peak if peak else float("nan")
        print(f"{r['shape']:14} {r['dtype']:5} {r['batch']:>4} {r['used_experts']:>5} {1e3 * r['fused']['median_ms']:9.1f} "
              f"{r['fused']['pct_of_peak'] or 0:6.1f} {1e3 * r['torch']['median_ms']:9.1f} {r['speedup']:8.2f} {bound:9.1f}")
    write_json(args.out, dict(env, peak_bandwidth_bytes_per_s=peak, results=results, grouped=grouped))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
