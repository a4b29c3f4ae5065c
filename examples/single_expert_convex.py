"""One expert versus many at equal expert parameters, on a convex target over token sets.

Chung et al. ("Beyond Parameter Count: Implicit Bias in Soft Mixture of Experts", TMLR 2025) prove that Soft MoE
with a single expert, however large, cannot represent some simple convex functions, so that more experts are
needed even at a fixed parameter count. This example makes that visible on

    t(X) = sum_i ||x_i||^2        X = (x_1 .. x_M), x_i ~ N(0, I_D), M = 8, D = 16

Why one expert with one slot fails: with E = S = 1 the combine softmax runs over a single slot, so every combine
weight is 1 and every output token is the same vector f(sum_i d_i x_i), d = softmax over tokens of the router
logits. The whole layer output is a function of ONE convex combination of the tokens. Two token sets with the same
combination (e.g. all tokens 0, and x_1 = u, x_2 = -(d_1/d_2) u, the rest 0: the router only sees directions, so d
is the same for u and any positive multiple of it) get the same output but different targets.

Arms, all `moe_prune.core.layers.SoftMoE` with the same expert kind and the same total expert hidden width H_total
(so the same expert parameters, up to the E output biases):
    1 expert x 1 slot (H = H_total)   |   E experts x 1 slot (H = H_total / E)   |   1 expert x S slots (H = H_total)
The third arm keeps the single big expert but gives it S convex combinations: it tells whether the number of
experts or the number of slots is what matters.

Readout, identical for every arm and parameter-free: the layer has out_dim = 1 and the prediction is the sum of its
M outputs, pred(X) = sum_m layer(X)[m, 0]. The target is a sum over tokens, so a sum over tokens is the natural
permutation-invariant readout; having no parameters, it compares the layers alone.

Routing: the router sees l2-normalized tokens (the Soft MoE paper), and the slots average the RAW tokens
(dispatch_input="raw", as google-research/vmoe does). With dispatch_input="normalized" (this library's default,
bwconrad/soft-moe) no part of the layer ever sees a token's norm, so t is unlearnable for EVERY arm (no predictor
beats the mean on test data); `--dispatch-input normalized` runs that control.

    python examples/single_expert_convex.py                      # 4-5 min on one (busy) CPU thread
    python examples/single_expert_convex.py --steps 500 --seeds 0 --experts 16 --slots 0   # a quick look

Writes the JSON report (--out) and a PNG beside it: test relative MSE against step, mean over seeds, band min-max.
Relative MSE = MSE / variance of the split's targets: 1.0 is what predicting the mean gives.
"""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from moe_prune.core.layers import SoftMoE, SoftMoEConfig
from moe_prune.measurement.reports import save_figure, table, write_json

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "convex_single_vs_many.json"


@dataclass(frozen=True)
class Setup:
    tokens: int = 8  # M
    dim: int = 16  # D
    train_sets: int = 16384
    test_sets: int = 4096
    hidden_total: int = 512  # E * H, the same for every arm
    expert: str = "gelu_mlp"
    token_norm: str = "l2"
    dispatch_input: str = "raw"
    steps: int = 2000
    batch: int = 256
    lr: float = 2e-3
    eval_every: int = 100
    eval_train_sets: int = 4096  # train MSE is measured on a fixed subset of this size (cost)


@dataclass(frozen=True)
class Arm:
    experts: int  # E
    slots: int  # S

    @property
    def name(self) -> str:
        return f"{self.experts} expert{'s' if self.experts > 1 else ''} x {self.slots} slot{'s' if self.slots > 1 else ''}"


def make_data(setup: Setup, seed: int) -> dict:
    """Token sets X [N, M, D] ~ N(0, I) and standardized targets (t - mean_train) / std_train [N]."""
    g = torch.Generator().manual_seed(seed)
    x_train = torch.randn(setup.train_sets, setup.tokens, setup.dim, generator=g)  # [N, M, D]
    x_test = torch.randn(setup.test_sets, setup.tokens, setup.dim, generator=g)
    t_train, t_test = x_train.square().sum((1, 2)), x_test.square().sum((1, 2))  # [N]
    mean, std = t_train.mean(), t_train.std()
    return dict(x_train=x_train, y_train=(t_train - mean) / std, x_test=x_test, y_test=(t_test - mean) / std,
                mean=mean.item(), std=std.item())


def build(setup: Setup, arm: Arm) -> SoftMoE:
    cfg = SoftMoEConfig(dim=setup.dim, num_experts=arm.experts, slots_per_expert=arm.slots,
                        hidden=setup.hidden_total // arm.experts, expert=setup.expert, token_norm=setup.token_norm,
                        dispatch_input=setup.dispatch_input, out_dim=1)
    return SoftMoE(cfg)


def predict(layer: SoftMoE, x: torch.Tensor) -> torch.Tensor:
    """The shared readout: x [B, M, D] -> layer [B, M, 1] -> summed over tokens [B]."""
    return layer(x).sum(dim=1)[:, 0]


@torch.no_grad()
def relative_mse(layer: SoftMoE, x: torch.Tensor, y: torch.Tensor) -> float:
    return (torch.mean((predict(layer, x) - y) ** 2) / y.var(unbiased=False)).item()


def train_arm(setup: Setup, arm: Arm, data: dict, seed: int) -> dict:
    """Adam on minibatches of the fixed training set; relative MSE on train (subset) and test along the way."""
    torch.manual_seed(seed)  # the layer's initialization
    layer = build(setup, arm)
    opt = torch.optim.Adam(layer.parameters(), lr=setup.lr)
    batches = torch.Generator().manual_seed(10_000 + seed)  # the minibatch order, the same for every arm
    x, y = data["x_train"], data["y_train"]
    x_eval, y_eval = x[: setup.eval_train_sets], y[: setup.eval_train_sets]
    curve = dict(step=[], train=[], test=[])
    start = time.perf_counter()
    for step in range(setup.steps + 1):
        if step % setup.eval_every == 0 or step == setup.steps:
            curve["step"].append(step)
            curve["train"].append(relative_mse(layer, x_eval, y_eval))
            curve["test"].append(relative_mse(layer, data["x_test"], data["y_test"]))
        if step == setup.steps:
            break
        idx = torch.randint(0, x.shape[0], (setup.batch,), generator=batches)
        loss = torch.mean((predict(layer, x[idx]) - y[idx]) ** 2)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    run = dict(seed=seed, seconds=time.perf_counter() - start, final_train=curve["train"][-1],
               final_test=curve["test"][-1], curve=curve)
    return run, layer


@torch.no_grad()
def blind_pair(layer: SoftMoE, setup: Setup, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Two token sets [2, M, D] with different targets that `layer` (the 1-expert, 1-slot arm) cannot tell apart.

    dispatch_input="raw": X0 has every token 0, so the slot is 0 whatever the dispatch weights; X1 has x_1 = u,
    x_2 = -s u, the rest 0, with s = d_1 / d_2. The router sees only directions, so d is that of (u, -u) for every
    s > 0 and the slot d_1 u - d_2 s u is 0 again. t(X0) = 0, t(X1) = (1 + s^2) ||u||^2. (Zero tokens are far from
    the training data: what the other arms predict there is extrapolation; that they differ is what counts.)
    dispatch_input="normalized": X1 is X0 with each token scaled by a positive factor; no arm sees a token's norm.
    """
    g = torch.Generator().manual_seed(20_000 + seed)
    if setup.dispatch_input == "normalized":
        x0 = torch.randn(setup.tokens, setup.dim, generator=g)  # [M, D]
        x1 = x0 * (0.5 + 1.5 * torch.rand(setup.tokens, 1, generator=g))  # [M, D], norms scaled by 0.5 .. 2
        x = torch.stack([x0, x1])
    else:
        u = torch.randn(setup.dim, generator=g)  # [D]
        x = torch.zeros(2, setup.tokens, setup.dim)  # [2, M, D]
        x[1, 0], x[1, 1] = u, -u
        dispatch = layer.route(x[1:]).dispatch_weights[0, :, 0]  # [M]: the single slot's weights over the tokens
        x[1, 1] = -(dispatch[0] / dispatch[1]) * u
    return x, x.square().sum((1, 2))  # [2, M, D], [2]


def param_counts(setup: Setup, arm: Arm) -> dict:
    layer = build(setup, arm)
    expert = sum(p.numel() for p in layer.experts.parameters())
    return dict(expert_parameters=expert, router_parameters=sum(p.numel() for p in layer.parameters()) - expert,
                hidden_per_expert=setup.hidden_total // arm.experts)


def environment() -> dict:
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                                check=True).stdout.strip()
    except (subprocess.CalledProcessError, OSError):
        commit = None
    return dict(command=" ".join(shlex.quote(a) for a in [sys.executable, *sys.argv]), torch=torch.__version__,
                python=platform.python_version(), device=f"CPU ({platform.machine()}, {os.cpu_count()} logical cores)",
                torch_threads=torch.get_num_threads(), omp_num_threads=os.environ.get("OMP_NUM_THREADS"),
                git_commit=commit)


def _stats(values: list[float]) -> tuple[float, float]:
    t = torch.tensor(values, dtype=torch.float64)
    return t.mean().item(), (t.std().item() if len(values) > 1 else 0.0)


def plot(report: dict, path: Path) -> bool:
    """Test relative MSE against step: one line per arm (mean over seeds), band from min to max. False without
    matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(7, 4.4))
    for i, arm in enumerate(report["arms"]):
        curves = torch.tensor([r["curve"]["test"] for r in arm["runs"]])  # [seeds, evals]
        steps = arm["runs"][0]["curve"]["step"]
        color = plt.cm.tab10(i)
        label = f"{arm['name']} (H={arm['hidden_per_expert']})"
        ax.plot(steps, curves.mean(0), color=color, label=label)
        ax.fill_between(steps, curves.min(0).values, curves.max(0).values, color=color, alpha=0.2, lw=0)
    s = report["setup"]
    ax.axhline(1.0, color="gray", ls=":", lw=1)
    ax.set_yscale("log")
    ax.set_xlabel("Adam step")
    ax.set_ylabel("test MSE / Var(target)  (1 = predict the mean)")
    ax.set_title(f"t(X) = sum ||x_i||^2, M={s['tokens']}, D={s['dim']}, E*H={s['hidden_total']}, "
                 f"dispatch_input={s['dispatch_input']}\nmean over {len(report['seeds'])} seeds, band min-max",
                 fontsize=9)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    save_figure(fig, path)
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=Setup.steps)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--experts", type=int, nargs="+", default=[16, 32],
                        help="expert counts of the many-expert arms (1 slot each); each must divide --hidden-total")
    parser.add_argument("--slots", type=int, default=16,
                        help="slots of the one-expert, many-slot arm (0 leaves that arm out)")
    parser.add_argument("--hidden-total", type=int, default=Setup.hidden_total, help="E * H, the same for every arm")
    parser.add_argument("--dispatch-input", choices=("raw", "normalized"), default=Setup.dispatch_input)
    parser.add_argument("--token-norm", choices=("l2", "layer", "none"), default=Setup.token_norm)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON report; the PNG goes beside it")
    args = parser.parse_args(argv)
    for e in args.experts:
        if e < 1 or args.hidden_total % e:
            parser.error(f"--experts {e}: must be a positive divisor of --hidden-total {args.hidden_total}")

    setup = Setup(steps=args.steps, hidden_total=args.hidden_total, dispatch_input=args.dispatch_input,
                  token_norm=args.token_norm)
    arms = [Arm(1, 1)] + [Arm(e, 1) for e in args.experts if e > 1] + ([Arm(1, args.slots)] if args.slots > 1 else [])
    env = environment()
    report = dict(env, setup=asdict(setup), seeds=args.seeds, target="sum_i ||x_i||^2 over M tokens, x_i ~ N(0, I_D)",
                  readout="out_dim=1, summed over the M tokens (no parameters)", optimizer="Adam, constant lr",
                  arms=[dict(name=a.name, experts=a.experts, slots=a.slots, **param_counts(setup, a), runs=[])
                        for a in arms])
    for seed in args.seeds:
        data = make_data(setup, seed)
        layers = []
        for arm, out in zip(arms, report["arms"]):
            run, layer = train_arm(setup, arm, data, seed)
            out["runs"].append(run)
            layers.append(layer)
            print(f"seed {seed}  {arm.name:<20} train {run['final_train']:.3f}  test {run['final_test']:.3f}  "
                  f"({run['seconds']:.0f} s)", flush=True)
        # The argument, checked on the trained layers: a pair built for the 1x1 layer gets the same prediction from
        # it (with raw dispatch, not from the other arms), although the targets differ.
        x_pair, t_pair = blind_pair(layers[0], setup, seed)
        for layer, out in zip(layers, report["arms"]):
            with torch.no_grad():
                pred = predict(layer, x_pair) * data["std"] + data["mean"]  # [2], in target units
            out["runs"][-1]["blind_pair"] = dict(targets=t_pair.tolist(), predictions=pred.tolist())

    rows = []
    mid = len(report["arms"][0]["runs"][0]["curve"]["step"]) // 2
    mid_step = report["arms"][0]["runs"][0]["curve"]["step"][mid]
    for a in report["arms"]:
        a["final_train_mean"], a["final_train_std"] = _stats([r["final_train"] for r in a["runs"]])
        a["final_test_mean"], a["final_test_std"] = _stats([r["final_test"] for r in a["runs"]])
        a["half_way_step"] = mid_step
        a["half_way_test_mean"] = _stats([r["curve"]["test"][mid] for r in a["runs"]])[0]
        rows.append([a["name"], a["hidden_per_expert"], f"{a['expert_parameters']:,}", a["router_parameters"],
                     f"{a['half_way_test_mean']:.3f}",
                     f"{a['final_train_mean']:.3f} ± {a['final_train_std']:.3f}",
                     f"{a['final_test_mean']:.3f} ± {a['final_test_std']:.3f}"])
    print()
    print(f"relative MSE (1 = predicting the mean), mean ± std over seeds {args.seeds}, {setup.steps} Adam steps, "
          f"token_norm={setup.token_norm}, dispatch_input={setup.dispatch_input}")
    print(table(rows, ["arm", "H", "expert params", "router params", f"test @ {mid_step}",
                       f"train @ {setup.steps}", f"test @ {setup.steps}"]))
    write_json(args.out, report)
    png = args.out.with_suffix(".png")
    print()
    what = ("a token set and the same set with rescaled tokens" if setup.dispatch_input == "normalized"
            else "two token sets that the 1x1 layer maps to the same slot")
    print(f"{what} (see blind_pair), seed {args.seeds[0]}: targets and predictions, in target units")
    pair_rows = []
    for a in report["arms"]:
        p = a["runs"][0]["blind_pair"]
        pair_rows.append([a["name"], f"{p['targets'][0]:.2f}", f"{p['targets'][1]:.2f}", f"{p['predictions'][0]:.3f}",
                          f"{p['predictions'][1]:.3f}", f"{abs(p['predictions'][1] - p['predictions'][0]):.2e}"])
    print(table(pair_rows, ["arm", "t(X0)", "t(X1)", "pred(X0)", "pred(X1)", "|difference|"]))
    print(f"wrote {args.out}" + (f" and {png}" if plot(report, png) else " (no plot: matplotlib is missing)"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
