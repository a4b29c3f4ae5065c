"""Which of issue 23's levers make Algorithm 1 and compressed layers faster on this machine? Measured, one layer alone.

The levers, each against today's layer call (the library keeps only what wins):
  cache     the router's normalized Phi computed once and reused without gradients: it won, and ships
            (SoftMoE.router); measured here as "no cache", today's call with Phi normalized on every call again;
  fold      the l2 token norm folded into the logits and the kept dispatch columns: logits = (X @ g*Phi_n) / |X|,
            slots = (dispatch / |X|)^T X * g, so the normalized tokens [B, M, D] are never written;
  lse       drop mode's combine weights for the kept columns only, exp(logit - logsumexp over all slots), instead
            of the full combine softmax [B, M, E*S] and a gather (a compressed drop layer; Algorithm 1 computes the
            full combine weights anyway, for its scores; on the full layer it changes nothing: a noise control);
  fold+lse  the two together.
fold and lse are written here as variants of the Routing class (they did not win, so the library does not carry
them). Each is timed against today's call side by side (alternating, one process) on the full layer, Algorithm 1
(route, score, keep 16 of 128 per input, mix) and a compressed drop layer holding 16 experts, in torch eager and in
ONNX Runtime (the layer exported with and without the variant; there the router is a constant either way, so "no
cache" is a second noise control), and its outputs are checked against today's.

Then the experts, which are most of Algorithm 1's time: the GB/s at which the ways torch can run R rows that each
belong to one expert read the weights (padded batched matmul, which ships; the first weight in nn.Linear's
[E, H, D] layout; torch's grouped_mm; a loop of matmuls; MKL's packed GEMM per expert), against a streaming read.

    python benchmarks/router_levers.py        # table + benchmarks/results/router_levers.{json,md}
    python benchmarks/router_levers.py --shapes default --batches 1 --no-onnx --min-seconds 0.1   # quick
"""

from __future__ import annotations

import argparse
import os
import pathlib
import sys
import tempfile
import time

import numpy as np
import torch

from moe_prune.core.layers import SoftMoE, SoftMoEConfig
from moe_prune.core.routing import Routing, dispatch_softmax, router_weight
from moe_prune.measurement.reports import table, write_json, write_text
from moe_prune.measurement.timing import BenchConfig, alternate, machine_roofline, median_seconds
from moe_prune.measurement.timing import environment as bench_environment
from moe_prune.selection.scores import select_experts

ROOT = pathlib.Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
SHAPES = {  # the reference layers of benchmarks/per_input_cpu.py
    "default": dict(M=4, D=196, E=128, S=1, H=6, expert="relu_mlp"),
    "vit_s16": dict(M=197, D=384, E=128, S=1, H=1536, expert="gelu_mlp"),
    "vit_s16_small": dict(M=197, D=384, E=128, S=1, H=192, expert="gelu_mlp"),
    "vit_b16_chung": dict(M=197, D=768, E=128, S=1, H=384, expert="gelu_mlp"),
}
KEEP = 16


class Folded(Routing):
    """fold: 1/|x| on the logits and the dispatch columns, the token gain on Phi_n and on the slots."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        x = self.x
        self.inv = torch.linalg.vector_norm(x, dim=-1, keepdim=True).clamp_min(self.layer.config.eps).reciprocal()

    @property
    def logits(self):
        if self._logits is None:
            w = self.layer.router()
            gain = self.layer.norm_weight
            self._logits = (self.x @ (w if gain is None else gain.unsqueeze(1) * w)) * self.inv
        return self._logits

    def slots(self, dispatch):
        s = (dispatch * self.inv).transpose(1, 2) @ self.x
        return s if self.layer.norm_weight is None else s * self.layer.norm_weight


class Lse(Routing):
    """lse: a compressed drop layer's combine weights at the kept columns only, through a logsumexp."""

    def kept_weights(self, cols, mode):
        if mode != "drop" or self._combine is not None:
            return super().kept_weights(cols, mode)
        dispatch = dispatch_softmax(self.columns(self.logits, cols), self.mask)
        combine = (self.columns(self.logits, cols) - self.logits.logsumexp(dim=-1, keepdim=True)).exp()
        return dispatch, combine if self.mask is None else combine * self.mask.unsqueeze(-1)


class FoldedLse(Folded, Lse):
    pass


def variant(layer: SoftMoE, name: str) -> SoftMoE:
    """`layer` routing through the variant `name` ("today": as it is)."""
    if name == "no cache":
        layer.router = lambda: router_weight(layer.phi, layer.scale, layer.config.eps)  # this instance only
    kind = {"fold": Folded, "lse": Lse, "fold+lse": FoldedLse}.get(name)
    if kind is not None:
        layer.route = lambda x, mask=None: kind(layer, x, mask, layer.route_tokens(x) if kind is Lse else None)
    return layer


def make_layers(s: dict, names) -> dict:
    """{variant: (full layer, compressed drop layer)}, equal weights across variants."""
    out = {}
    for name in names:
        torch.manual_seed(0)
        cfg = dict(dim=s["D"], num_experts=s["E"], slots_per_expert=s["S"], hidden=s["H"], expert=s["expert"])
        full = SoftMoE(SoftMoEConfig(**cfg)).eval().requires_grad_(False)
        small = SoftMoE(SoftMoEConfig(**cfg, held=tuple(range(0, s["E"], s["E"] // KEEP)))).eval().requires_grad_(False)
        for m in (full, small):
            m.scale.fill_(10.0)  # peaked routing, as trained models with a large router scale have
        out[name] = (variant(full, name), variant(small, name))
    return out


def alg1(layer, x):
    r = layer.route(x)
    return layer.mix(r, select_experts(r.scores, KEEP, per="input"))


def torch_times(s: dict, batch: int, names, config: BenchConfig) -> dict:
    layers = make_layers(s, names)
    x = torch.randn(batch, s["M"], s["D"])
    out = {}
    with torch.inference_mode():
        for what, call in (("full", lambda m: m[0](x)), ("alg1", lambda m: alg1(m[0], x)),
                           ("compressed", lambda m: m[1](x))):
            ref = call(layers["today"])
            for name in names:  # every variant computes today's output
                got = call(layers[name])
                err = ((got - ref).abs().max() / ref.abs().max()).item()
                assert err < 1e-5, f"{what} {name}: relative error {err:.1e}"
            timing = alternate({n: (lambda m: lambda: call(m))(layers[n]) for n in names}, config, batch)
            out[what] = {n: t["p50_ms"] for n, t in timing.items()}
    return out


def onnx_times(s: dict, batches, names, config: BenchConfig, threads: int) -> dict:
    import onnxruntime as ort

    from moe_prune.onnx.export import export_onnx

    layers = make_layers(s, names)
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        sessions = {}
        for name in names:
            for i, what in enumerate(("full", "compressed")):
                path = export_onnx(layers[name][i], pathlib.Path(tmp) / f"{name}_{what}.onnx",
                                   example=torch.randn(2, s["M"], s["D"]))
                opts = ort.SessionOptions()
                opts.intra_op_num_threads = threads
                sessions[name, what] = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        for batch in batches:
            x = np.random.default_rng(0).standard_normal((batch, s["M"], s["D"]), dtype=np.float32)
            for what in ("full", "compressed"):
                run = {n: (lambda sess: lambda: sess.run(None, {sess.get_inputs()[0].name: x}))(sessions[n, what])
                       for n in names}
                ref = run["today"]()[0]
                for n in names:
                    err = float(np.abs(run[n]()[0] - ref).max() / np.abs(ref).max())
                    assert err < 1e-5, f"onnx {what} {n}: relative error {err:.1e}"
                timing = alternate(run, config, batch)
                out[batch, what] = {n: t["p50_ms"] for n, t in timing.items()}
    return out


def weight_reads(s: dict, batch: int) -> dict:
    """GB/s of expert weights read (w1 only, the first matmul; all E experts' bytes for the padded paths, the used
    experts' for the others) by each way of running Algorithm 1's rows at this batch."""
    E, D, H = s["E"], s["D"], s["H"] * (2 if s["expert"] == "geglu" else 1)
    g = torch.Generator().manual_seed(0)
    idx = torch.stack([torch.randperm(E, generator=g)[:KEEP] for _ in range(batch)]).reshape(-1)
    counts = torch.bincount(idx, minlength=E)
    used, C = int((counts > 0).sum()), int(counts.max())
    w = torch.randn(E, D, H)
    w_t = w.transpose(1, 2).contiguous()  # [E, H, D]: nn.Linear's layout
    rows = torch.randn(len(idx), D)
    padded = torch.randn(E, C, D)
    offs = counts.cumsum(0).to(torch.int32)
    starts = (offs - counts).tolist()
    ids = [e for e in range(E) if counts[e] > 0]
    reads = {
        "padded bmm [E,D,H] (ships)": (E, lambda: torch.bmm(padded, w)),
        "padded bmm [E,H,D]": (E, lambda: torch.bmm(padded, w_t.transpose(1, 2))),
        "grouped_mm [E,D,H]": (used, lambda: torch.nn.functional.grouped_mm(rows, w, offs=offs)),
        "loop of mm": (used, lambda: [rows[starts[e]:starts[e] + counts[e]] @ w[e] for e in ids]),
    }
    if hasattr(torch.ops.mkl, "_mkl_reorder_linear_weight") and torch.backends.mkl.is_available():
        packed = {e: torch.ops.mkl._mkl_reorder_linear_weight(w_t[e], int(counts[e])) for e in ids}
        reads["loop of MKL packed GEMM"] = (used, lambda: [torch.ops.mkl._mkl_linear(
            rows[starts[e]:starts[e] + counts[e]], packed[e], w_t[e], None, int(counts[e])) for e in ids])
    reads["streaming read (sum)"] = (E, lambda: w.sum())
    out = {"rows_per_used_expert": len(idx) / used, "padded_rows": C, "used": used}
    for name, (experts, fn) in reads.items():
        try:
            out[name] = experts * D * H * 4 / median_seconds(fn, 9) / 1e9
        except RuntimeError:  # grouped_mm takes only 16-byte aligned strides (H = 6 is not)
            out[name] = float("nan")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--threads", type=int, default=2, help="torch and ONNX Runtime threads (default 2)")
    parser.add_argument("--min-seconds", type=float, default=0.5,
                        help="each variant timed at least this long per row (default 0.5)")
    parser.add_argument("--no-onnx", action="store_true", help="torch eager only")
    parser.add_argument("--out", type=pathlib.Path, default=RESULTS / "router_levers.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    env = bench_environment()
    machine = machine_roofline(args.threads)
    load_before = os.getloadavg()
    config = BenchConfig(warmup=2, rounds=5, iters_per_round=2, min_seconds=args.min_seconds)
    names = ["today", "no cache", "fold", "lse", "fold+lse"]
    rows, reads = [], {}
    for shape in args.shapes:
        s = SHAPES[shape]
        for batch in args.batches:
            for what, t in torch_times(s, batch, names, config).items():
                rows.append(dict(shape=shape, batch=batch, runtime="torch", call=what, ms=t))
                print(_row_text(rows[-1], names), flush=True)
            with torch.inference_mode():
                reads[f"{shape} B{batch}"] = weight_reads(s, batch)
        if not args.no_onnx:
            for (batch, what), t in onnx_times(s, args.batches, names, config, args.threads).items():
                rows.append(dict(shape=shape, batch=batch, runtime="onnxruntime", call=what, ms=t))
                print(_row_text(rows[-1], names), flush=True)
    load_after = os.getloadavg()
    command = "python benchmarks/router_levers.py " + " ".join(sys.argv[1:] if argv is None else argv)
    head = ["layer", "B", "runtime", "call", "today ms"] + [f"{n} / today" for n in names[1:]]
    body = [[r["shape"], r["batch"], r["runtime"], r["call"], f"{r['ms']['today']:.3f}"]
            + [f"{r['ms']['today'] / r['ms'][n]:.2f}x" for n in names[1:]] for r in rows]
    read_names = [k for k in next(iter(reads.values())) if k not in ("rows_per_used_expert", "padded_rows", "used")]
    read_head = ["layer, batch", "used experts", "rows per used expert", "padded rows"] + read_names
    read_body = [[k, v["used"], f"{v['rows_per_used_expert']:.1f}", v["padded_rows"]]
                 + [f"{v[n]:.1f}" for n in read_names] for k, v in reads.items()]
    note = (f"torch {torch.__version__}, {args.threads} threads, {env.get('cpu', '')}; each variant's speed over "
            f"today's call (>1: the variant is faster; 'no cache' below 1: the cache wins), medians of alternating calls in one process; keep {KEEP} of 128; load "
            f"average {load_before[0]:.2f} before, {load_after[0]:.2f} after, on {os.cpu_count()} cores; measured "
            f"bandwidth {machine['bytes_per_s'] / 1e9:.1f} GB/s")
    print(table(body, head))
    print(table(read_body, read_head))
    print(note)
    write_json(args.out, dict(env, command=command, machine=machine, note=note, rows=rows, weight_reads_gb_s=reads))
    write_text(args.out.with_suffix(".md"),
               f"# Router levers and expert weight reads\n\nCommand: `{command}`\n\n{note}\n\n"
               + table(body, head, markdown=True)
               + "\n\n## Expert weight reads (GB/s of the first matmul's weights, w1)\n\n"
               + table(read_body, read_head, markdown=True) + "\n")
    print(f"wrote {args.out} and {args.out.with_suffix('.md')}")
    return 0


def _row_text(r: dict, names) -> str:
    return (f"{r['shape']} B{r['batch']} {r['runtime']} {r['call']}: today {r['ms']['today']:.3f} ms, "
            + ", ".join(f"{n} {r['ms']['today'] / r['ms'][n]:.2f}x" for n in names[1:]))


if __name__ == "__main__":
    sys.exit(main())
