"""Is moe_prune's Soft MoE layer at least as fast as the libraries it replaces? Torch eager, same weights.

Question: on the CPU, for one Soft MoE layer with the same weights, how do moe_prune's full layer, its shared
subset (K = E/8, static or Algorithm 2) and its per-input subsets (Algorithm 1, K = E/8 each) compare with
bwconrad/soft-moe (PyPI soft-moe 0.0.1, `SoftMoELayerWrapper`, GELU MLP experts as timm's Mlp) and
lucidrains/soft-moe-pytorch (PyPI soft-moe-pytorch 0.1.9, `SoftMoE`), across regimes of rows per expert
(batch 4, dim 512, 1024 tokens; 128 experts x 1 slot up to 128 x 128)? Each library's layer is built with its
own constructor, its weights copied into moe_prune's layer, and the outputs checked equal before timing.
Reported: medians (p10/p90 in the JSON) of alternating rounds, and ratios library / moe_prune (> 1: moe_prune
is faster).

soft-moe's package imports timm, and timm imports torchvision, which PyPI cannot give beside this torch build;
its layer module (soft_moe/soft_moe.py) needs only torch, so it is loaded from the installed package by path.

    pip install soft-moe==0.0.1 --no-deps soft-moe-pytorch==0.1.9      # not dependencies of moe-prune
    python benchmarks/vs_libraries.py               # table + benchmarks/results/vs_libraries.{json,md}
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import pathlib
import sys

import torch
from torch import nn

from moe_prune.measurement.timing import BenchConfig, alternate
from moe_prune.measurement.timing import environment as bench_environment
from moe_prune.core.library_files import from_lucidrains
from moe_prune.core.layers import SoftMoE, SoftMoEConfig
from moe_prune.measurement.reports import table, write_json, write_text
from moe_prune.selection.scores import select_experts

ROOT = pathlib.Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
# (experts, slots per expert): rows per expert = batch * slots, from 4 to 512.
REGIMES = [(128, 1), (32, 8), (16, 64), (128, 128)]


def bwconrad_module():
    """soft-moe's layer module, loaded by path (its package __init__ imports timm), or None if not installed."""
    spec = importlib.util.find_spec("soft_moe")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = pathlib.Path(next(iter(spec.submodule_search_locations))) / "soft_moe.py"
    mod_spec = importlib.util.spec_from_file_location("soft_moe_layer_only", path)
    module = importlib.util.module_from_spec(mod_spec)
    mod_spec.loader.exec_module(module)
    return module


class TimmMlp(nn.Module):
    """timm's Mlp at inference (fc1, exact GELU, fc2; dropout 0, no norm): soft-moe's default expert."""

    def __init__(self, in_features: int, hidden_features: int):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(in_features, hidden_features), nn.GELU(), nn.Linear(hidden_features, in_features)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


def ours_from_bwconrad(lib, dim: int, E: int, S: int, hidden: int) -> SoftMoE:
    ours = SoftMoE(SoftMoEConfig(dim=dim, num_experts=E, slots_per_expert=S, hidden=hidden)).eval()
    with torch.no_grad():
        ours.phi.copy_(lib.phi)
        ours.scale.copy_(lib.scale)
        for e, expert in enumerate(lib.experts):
            ours.experts.w1[e].copy_(expert.fc1.weight.T)
            ours.experts.b1[e].copy_(expert.fc1.bias)
            ours.experts.w2[e].copy_(expert.fc2.weight.T)
            ours.experts.b2[e].copy_(expert.fc2.bias)
    return ours


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=4, help="inputs per call (default 4)")
    parser.add_argument("--dim", type=int, default=512, help="model width D (default 512)")
    parser.add_argument("--tokens", type=int, default=1024, help="tokens per input M (default 1024)")
    parser.add_argument("--regimes", default=",".join(f"{e}x{s}" for e, s in REGIMES),
                        help="experts x slots, comma-separated (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    parser.add_argument("--rounds", type=int, default=3, help="alternation rounds, 1 call per path each (default 3)")
    parser.add_argument("--out", type=pathlib.Path, default=RESULTS / "vs_libraries.json")
    args = parser.parse_args(argv)
    env = bench_environment()
    torch.set_num_threads(args.threads)
    bw = bwconrad_module()
    try:
        import soft_moe_pytorch
    except ImportError:
        soft_moe_pytorch = None
    if bw is None and soft_moe_pytorch is None:
        print("neither soft-moe nor soft-moe-pytorch is installed; see the docstring", file=sys.stderr)
        return 2
    load_before = os.getloadavg()
    B, D, M = args.batch, args.dim, args.tokens
    rows = []
    torch.manual_seed(0)
    with torch.inference_mode():
        for regime in args.regimes.split(","):
            E, S = (int(v) for v in regime.split("x"))
            x = torch.randn(B, M, D)
            libs = {}
            if bw is not None:
                lib = bw.SoftMoELayerWrapper(dim=D, num_experts=E, slots_per_expert=S, layer=TimmMlp,
                                             in_features=D, hidden_features=4 * D).eval()
                ours = ours_from_bwconrad(lib, D, E, S, 4 * D)
                torch.testing.assert_close(ours(x), lib(x), atol=1e-4, rtol=1e-4)
                libs["soft-moe"] = (lib, ours)
            if soft_moe_pytorch is not None:
                kwargs = dict(dim=D, num_slots=S, num_experts=E)  # soft-moe-pytorch: num_slots per expert
                lib = soft_moe_pytorch.SoftMoE(**kwargs).eval()
                ours = from_lucidrains(lib.state_dict(), **kwargs)
                torch.testing.assert_close(ours(x), lib(x), atol=1e-4, rtol=1e-4)
                libs["soft-moe-pytorch"] = (lib, ours)
            for lib_name, (lib, ours) in libs.items():
                scores = ours.route(x).scores
                k = max(1, E // 8)
                shared, per_input = select_experts(scores, k, per="batch"), select_experts(scores, k, per="input")
                paths = {lib_name: lambda: lib(x), "moe_prune full": lambda: ours(x),
                         f"moe_prune shared {k}": lambda: ours(x, experts=shared),
                         f"moe_prune per-input {k}": lambda: ours(x, experts=per_input)}
                timing = alternate(paths, BenchConfig(warmup=1, rounds=args.rounds, iters_per_round=1, min_seconds=0), B)
                base = timing[lib_name]["p50_ms"]
                rows.append(dict(library=lib_name, experts=E, slots=S, rows_per_expert=B * S, k=k, timing=timing,
                                 ratio={n: base / t["p50_ms"] for n, t in timing.items() if n != lib_name}))
                print(f"{lib_name:16} {E:>4}x{S:<4} " + "  ".join(f"{n} {t['p50_ms']:.1f} ms" for n, t in timing.items()),
                      file=sys.stderr, flush=True)
    load_after = os.getloadavg()
    head = ["library", "experts x slots", "rows/expert", "library ms", "full ms", "shared ms", "per-input ms",
            "full ratio", "shared ratio", "per-input ratio"]
    body = []
    for r in rows:
        t = list(r["timing"].values())
        ratios = list(r["ratio"].values())
        body.append([r["library"], f"{r['experts']} x {r['slots']}", r["rows_per_expert"]]
                    + [f"{v['p50_ms']:.1f}" for v in t] + [f"{v:.2f}x" for v in ratios])
    command = "python benchmarks/vs_libraries.py " + " ".join(sys.argv[1:] if argv is None else argv)
    note = (f"torch {torch.__version__} eager, {args.threads} threads, {env.get('cpu', '')}; batch {B}, dim {D}, "
            f"{M} tokens, GELU experts of hidden {4 * D}; k = E/8 for the subsets; ratio = library median / moe_prune "
            f"median (> 1: moe_prune is faster); load average {load_before[0]:.2f} before, {load_after[0]:.2f} after")
    print(table(body, head))
    print(note)
    write_json(args.out, dict(env, command=command, load_average_1min=dict(before=load_before[0], after=load_after[0]),
                              batch=B, dim=D, tokens=M, results=rows))
    write_text(args.out.with_suffix(".md"), f"# moe_prune's layer against soft-moe and soft-moe-pytorch\n\nCommand: "
               f"`{command}`\n\n{note}\n\n" + table(body, head, markdown=True) + "\n")
    print(f"wrote {args.out} and {args.out.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
