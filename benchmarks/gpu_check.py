"""Everything a GPU must show, in one prepared run (`make gpu-check`): under 8 minutes on one H100.

Question: does every path work on CUDA, compute what it computes on the CPU, and how fast is it? Steps (each
timed, each failure recorded and the run going on; partial results are written after every step):

  1. tests     the routing and grouped-expert kernel tests compiled for this GPU (the interpreter off; fp32,
               fp16, bf16), and every test marked `gpu`
  2. parity    `compress --rule loss --heal` on the bundled model with --device cpu and --device cuda: the same
               kept experts, accuracy on the bundled sample's held-out half equal to within 0.1 point; a
               ViT-S-sized random model (224x224, 6 Soft MoE layers of 32 experts) with --rule mass --heal: the same
               kept experts, the healed loss equal to within 1%; and the Python verb, compress(CPU model, CPU
               batches, CompressConfig(device="cuda")): the same kept experts, the caller's model left on the CPU
  3. torchrun  the same compress under torchrun with one GPU (NCCL), equal to the single-process output
  4. kernels   benchmarks/kernel_bench.py: the routing kernel and the grouped-expert kernel against torch
               (time, GB/s, % of peak bandwidth)
  5. latency   torch eager on CUDA: full, compressed (1/8), Algorithm 2 and Algorithm 1 at batch 1, 8 and 64 in
               fp32, fp16 and bf16, for the Soft MoE layer alone and the whole model, ViT-S/16 (128 experts) and
               Chung et al.'s ViT-B/16, beside the FLOP and weight-bytes bounds

Writes benchmarks/results/gpu_check.json and gpu_check.md (device, versions, every step's output). Without a GPU
it says so in one line and exits 0 (CI runs it that way); `--allow-cpu --quick` runs its own plumbing on the
CPU with tiny sizes (no result is written unless --out is given), to test the script itself.

    make gpu-check                                  # = python benchmarks/gpu_check.py
    python benchmarks/gpu_check.py --allow-cpu --quick --out /tmp/gpu_check.json
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import time
import traceback

ROOT = pathlib.Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
MOE_PRUNE = [sys.executable, "-m", "moe_prune.cli"]


def _run(cmd: list[str], timeout: float, env: dict | None = None) -> dict:
    t0 = time.perf_counter()
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT,
                           env={**os.environ, **(env or {})})
        out = {"returncode": p.returncode, "stdout": p.stdout[-6000:], "stderr": p.stderr[-4000:]}
    except subprocess.TimeoutExpired as e:
        out = {"returncode": None, "timeout_s": timeout, "stdout": (e.stdout or b"")[-4000:].decode(errors="replace")
               if isinstance(e.stdout, bytes) else str(e.stdout)[-4000:]}
    out["seconds"] = time.perf_counter() - t0
    out["command"] = " ".join(cmd)
    return out


# -- steps --------------------------------------------------------------------------------------------------------


def step_tests(args) -> dict:
    """The kernel tests compiled for this device, and every `gpu`-marked test."""
    env = {"TRITON_INTERPRET": "0"} if args.device == "cuda" else {}
    kernels = _run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", "tests/test_kernels.py",
                    "tests/test_grouped_experts.py"], timeout=args.budget(150), env=env)
    marked = _run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "gpu", "tests"],
                  timeout=args.budget(90), env=env)
    tail = lambda r: (r.get("stdout") or "").strip().splitlines()[-1:]  # noqa: E731
    return {"kernel_tests": {**kernels, "summary": tail(kernels)}, "gpu_tests": {**marked, "summary": tail(marked)},
            "passed": kernels["returncode"] == 0 and marked["returncode"] in (0, 5)}


def _compress(ckpt, calib, out, device, extra, timeout) -> dict:
    r = _run([*MOE_PRUNE, "compress", str(ckpt), "--calib", str(calib), "--device", device, "--out", str(out),
              *extra], timeout=timeout)
    if r["returncode"] == 0:
        import moe_prune

        meta = moe_prune.summary(out)["meta"]
        r["kept"] = meta["kept_experts"]
        r["heal"] = {k: meta["heal"].get(k) for k in ("loss_before", "loss_after", "seconds")} if "heal" in meta else None
    return r


def _accuracy(path, images, labels) -> float:
    import moe_prune
    from moe_prune.measurement.accuracy import accuracy

    return accuracy(moe_prune.load(path), images, labels)


def step_parity(args, work: pathlib.Path) -> dict:
    """compress on the CPU and on the GPU: the same experts kept, the same accuracy or heal loss."""
    import numpy as np
    import torch

    import moe_prune
    from moe_prune.data.mnist import load_images
    from moe_prune.core.models import SoftMoEViT, ViTConfig
    from moe_prune.flows.demo import default_checkpoint

    images, labels = load_images("sample", split="test")
    calib = work / "calib.npy"
    np.save(calib, images[:500])  # calibrate on images 0-499, measure on 500-999
    steps = "60" if args.quick else "300"
    out = {}
    runs = {}
    for device in ("cpu", args.device):
        runs[device] = _compress(default_checkpoint(), calib, work / f"default.{device}.safetensors", device,
                                 ["--rule", "loss", "--heal", "--heal-steps", steps], args.budget(120))
    out["default"] = {d: {k: v for k, v in r.items() if k not in ("stdout",)} for d, r in runs.items()}
    if all(r["returncode"] == 0 for r in runs.values()):
        acc = {d: _accuracy(work / f"default.{d}.safetensors", images[500:], labels[500:]) for d in runs}
        out["default"]["accuracy"] = acc
        out["default"]["same_experts"] = runs["cpu"]["kept"] == runs[args.device]["kept"]
        out["default"]["accuracy_within_0.1_point"] = abs(acc["cpu"] - acc[args.device]) <= 0.001 + 1e-12
    # The Python verb: a CPU model and CPU batches compressed with CompressConfig(device=...) run on the GPU.
    model = moe_prune.load(default_checkpoint())
    batches = [torch.from_numpy(images[i:i + 250]).float().div(255).unsqueeze(1) for i in (0, 250)]
    py = {}
    for device in ("cpu", args.device):
        small, record = moe_prune.compress(model, batches, moe_prune.CompressConfig(keep="1/8", rule="mass",
                                                                                      device=device))
        py[device] = {"kept": record["kept_experts"], "devices": sorted({str(q.device) for q in small.parameters()})}
    out["python_device"] = {**py, "same_experts": py["cpu"]["kept"] == py[args.device]["kept"],
                            "caller_model_stayed": {str(q.device) for q in model.parameters()} == {"cpu"}}
    # A ViT-S-sized random model at 224x224 with six Soft MoE layers.
    torch.manual_seed(0)
    size = dict(img_size=64, embed_dim=64, depth=4, num_heads=2, moe_layer_index=2, num_experts=8) if args.quick else \
        dict(img_size=224, embed_dim=384, depth=12, num_heads=6, moe_layer_index=6, num_experts=32)
    vit = SoftMoEViT(ViTConfig(patch_size=16, in_chans=3, num_classes=10, mlp_ratio=4.0, **size))
    ckpt = moe_prune.save(vit, work / "vit-s.safetensors")
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (64 if args.quick else 256, size["img_size"], size["img_size"], 3), dtype=np.uint8)
    np.save(work / "vit-calib.npy", x)
    vruns = {}
    for device in ("cpu", args.device):
        vruns[device] = _compress(ckpt, work / "vit-calib.npy", work / f"vit.{device}.safetensors", device,
                                  ["--rule", "mass", "--heal", "--heal-steps", "10" if args.quick else "30",
                                   "--batch-size", "32"], args.budget(240))
    out["vit_s"] = {d: {k: v for k, v in r.items() if k not in ("stdout",)} for d, r in vruns.items()}
    if all(r["returncode"] == 0 for r in vruns.values()):
        a, b = vruns["cpu"]["heal"]["loss_after"], vruns[args.device]["heal"]["loss_after"]
        out["vit_s"]["same_experts"] = vruns["cpu"]["kept"] == vruns[args.device]["kept"]
        out["vit_s"]["heal_loss_within_1pct"] = abs(a - b) <= 0.01 * max(abs(a), 1e-12)
    out["passed"] = bool(out["default"].get("same_experts") and out["default"].get("accuracy_within_0.1_point")
                         and out["python_device"]["same_experts"] and out["python_device"]["caller_model_stayed"]
                         and out["vit_s"].get("same_experts") and out["vit_s"].get("heal_loss_within_1pct"))
    return out


def step_torchrun(args, work: pathlib.Path) -> dict:
    """The same compress under torchrun, one process on the GPU (NCCL), against the single-process file."""
    import moe_prune
    from moe_prune.flows.demo import default_checkpoint

    calib = work / "calib.npy"
    one = _compress(default_checkpoint(), calib, work / "one.safetensors", args.device, ["--rule", "mass"],
                    args.budget(60))
    exe = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "1", "--no-python",
           str(pathlib.Path(sys.executable).with_name("moe-prune"))]
    run = _run([*exe, "compress", str(default_checkpoint()), "--calib", str(calib), "--device", args.device,
                "--rule", "mass", "--out", str(work / "torchrun.safetensors")], timeout=args.budget(90))
    out = {"single": {k: v for k, v in one.items() if k != "stdout"}, "torchrun": run}
    if one["returncode"] == 0 and run["returncode"] == 0:
        kept = moe_prune.summary(work / "torchrun.safetensors")["meta"]["kept_experts"]
        out["same_experts"] = kept == one["kept"]
    out["passed"] = bool(out.get("same_experts"))
    return out


def step_kernels(args, work: pathlib.Path) -> dict:
    if args.device != "cuda":
        return {"skipped": "the kernels' timing needs CUDA"}
    batches = ["1", "8"] if args.quick else ["1", "8", "64", "256"]
    out_json = args.out.parent / "gpu_kernel_bench.json"
    r = _run([sys.executable, "benchmarks/kernel_bench.py", "--batches", *batches, "--rep-ms", "50" if args.quick else "100",
              "--out", str(out_json), "--bytes-out", str(work / "bytes.json")], timeout=args.budget(150))
    r["results"] = str(out_json) if out_json.exists() else None
    r["passed"] = r["returncode"] == 0
    return r


def step_latency(args) -> dict:
    """torch eager on the device: full, compressed, Algorithm 2 and Algorithm 1, layer alone and whole model."""
    import torch

    from moe_prune.compression.compress import compress_model
    from moe_prune.core.flops import bounds, model_cost, moe_cost
    from moe_prune.core.models import SoftMoEViT, ViTConfig, moe_layers
    from moe_prune.selection.scores import keep_per_layer, random_subsets, with_selection
    from moe_prune.measurement.timing import BenchConfig, alternate

    configs = {
        "vit_s16": dict(img_size=224, patch_size=16, embed_dim=384, depth=12, num_heads=6, mlp_ratio=4.0,
                        moe_layer_index=6, num_experts=128),
        "vit_b16_chung": dict(img_size=224, patch_size=16, embed_dim=768, depth=12, num_heads=12, mlp_ratio=0.5,
                              moe_layer_index=6, num_experts=128),
    }
    if args.quick:
        configs = {"tiny": dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, mlp_ratio=2.0,
                                moe_layer_index=1, num_experts=16)}
    dtypes = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
    if args.device == "cpu":
        dtypes = {"fp32": torch.float32}
    batches = (1, 8) if args.quick else (1, 8, 64)
    bench = BenchConfig(batch_sizes=batches, warmup=3, rounds=3, iters_per_round=5, min_seconds=0.0 if args.quick else 0.3)
    rows = []
    for name, cfg in configs.items():
        torch.manual_seed(0)
        full = SoftMoEViT(ViTConfig(in_chans=3, num_classes=1000, **cfg)).eval()
        k = keep_per_layer(full, "1/8")
        subsets = random_subsets(full, k, torch.Generator().manual_seed(0))
        small = compress_model(full, subsets)
        name0, layer0 = next(iter(moe_layers(full).items()))
        tokens = (cfg["img_size"] // cfg["patch_size"]) ** 2 + 1
        bound = {"model": bounds(model_cost(full), model_cost(small)),
                 "layer": bounds(moe_cost(layer0, tokens), moe_cost(moe_layers(small)[name0], tokens))}
        for dtype_name, dtype in dtypes.items():
            models = {"full": full, "compressed": small, "alg2": with_selection(full, "1/8", per="batch"),
                      "alg1": with_selection(full, "1/8", per="input")}
            layers = {"full": layer0, "compressed": moe_layers(small)[name0],
                      "alg2": with_selection(layer0, k[name0], per="batch"),
                      "alg1": with_selection(layer0, k[name0], per="input")}
            for what, mods in (("model", models), ("layer", layers)):
                mods = {n: m.to(args.device, dtype) for n, m in mods.items()}
                for b in batches:
                    if what == "model":
                        x = torch.rand(b, 3, cfg["img_size"], cfg["img_size"], device=args.device, dtype=dtype)
                    else:
                        x = torch.randn(b, tokens, cfg["embed_dim"], device=args.device, dtype=dtype)

                    def runner(m, x=x):
                        def run():
                            with torch.inference_mode():
                                m(x)
                            if args.device == "cuda":
                                torch.cuda.synchronize()
                        return run

                    stats = alternate({n: runner(m) for n, m in mods.items()}, bench, b)
                    ref = stats["full"]["p50_ms"]
                    rows.append({"config": name, "dtype": dtype_name, "what": what, "batch": b,
                                 "p50_ms": {n: s["p50_ms"] for n, s in stats.items()},
                                 "speedup": {n: ref / s["p50_ms"] for n, s in stats.items()},
                                 "flop_bound": bound[what]["flop_ratio"], "bytes_bound": bound[what]["bytes_ratio"]})
            full.to("cpu", torch.float32)
            small.to("cpu", torch.float32)
    return {"rows": rows, "passed": True}


# -- the run ------------------------------------------------------------------------------------------------------


def markdown(result: dict) -> str:
    lines = [f"# GPU check: {result['env'].get('device', '?')}", "", f"Command: `{result['command']}`", "",
             f"torch {result['env'].get('torch')}, triton {result['env'].get('triton')}, "
             f"{result['seconds']:.0f} s in all", "", "| step | passed | seconds |", "|---|---|---|"]
    for name, r in result["steps"].items():
        lines.append(f"| {name} | {r.get('passed', r.get('skipped', 'error'))} | {r.get('_seconds', 0):.0f} |")
    lat = result["steps"].get("latency", {}).get("rows", [])
    if lat:
        lines += ["", "Latency (torch eager, p50 ms; speedup over full), against the FLOP and weight-bytes bounds:", "",
                  "| config | dtype | what | batch | full ms | compressed | alg2 | alg1 | FLOP bound | bytes bound |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for r in lat:
            s = r["speedup"]
            lines.append(f"| {r['config']} | {r['dtype']} | {r['what']} | {r['batch']} | {r['p50_ms']['full']:.3f} | "
                         f"{s['compressed']:.2f}x | {s['alg2']:.2f}x | {s['alg1']:.2f}x | "
                         f"{r['flop_bound']:.2f}x | {r['bytes_bound']:.2f}x |")
    for name, r in result["steps"].items():
        if "error" in r:
            lines += ["", f"{name} failed: {r['error']}"]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=pathlib.Path, default=None, help="the JSON result (default: "
                   "benchmarks/results/gpu_check.json on a GPU; nothing on --allow-cpu)")
    p.add_argument("--steps", default="tests,parity,torchrun,kernels,latency", help="comma-separated steps to run")
    p.add_argument("--quick", action="store_true", help="tiny sizes (a test of this script)")
    p.add_argument("--allow-cpu", action="store_true", help="run the steps on the CPU (a test of this script)")
    p.add_argument("--budget-s", type=float, default=470, help="the whole run's time budget; each step's timeout "
                   "is cut to what is left")
    args = p.parse_args(argv)
    import torch

    if not torch.cuda.is_available() and not args.allow_cpu:
        print("gpu-check: skipped: no CUDA GPU here (torch.cuda.is_available() is False); run it where one is")
        return 0
    args.device = "cuda" if torch.cuda.is_available() else "cpu"
    start = time.perf_counter()
    args.budget = lambda want: max(10.0, min(want, args.budget_s - (time.perf_counter() - start)))
    if args.out is None:
        args.out = RESULTS / "gpu_check.json" if args.device == "cuda" else pathlib.Path(tempfile.gettempdir()) / "gpu_check.json"
    from moe_prune.measurement.reports import write_json, write_text
    from moe_prune.measurement.timing import environment

    args.out.parent.mkdir(parents=True, exist_ok=True)
    env = environment("cuda" if args.device == "cuda" else "cpu")
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    result = {"command": " ".join([pathlib.Path(sys.executable).name, *sys.argv]), "env": env, "steps": {}}
    work = pathlib.Path(tempfile.mkdtemp(prefix="gpu_check."))
    steps = {"tests": lambda: step_tests(args), "parity": lambda: step_parity(args, work),
             "torchrun": lambda: step_torchrun(args, work), "kernels": lambda: step_kernels(args, work),
             "latency": lambda: step_latency(args)}
    try:
        for name in args.steps.split(","):
            t0 = time.perf_counter()
            print(f"gpu-check: {name} ...", flush=True)
            try:
                r = steps[name]()
            except Exception as e:  # recorded; the run goes on
                r = {"error": f"{type(e).__name__}: {str(e)[:500]}", "traceback": traceback.format_exc()[-3000:],
                     "passed": False}
            r["_seconds"] = time.perf_counter() - t0
            result["steps"][name] = r
            result["seconds"] = time.perf_counter() - start
            write_json(args.out, result)  # partial results survive a run cut short
            print(f"gpu-check: {name}: {'passed' if r.get('passed') else r.get('skipped') or 'FAILED'} "
                  f"({r['_seconds']:.0f} s)", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    result["seconds"] = time.perf_counter() - start
    write_json(args.out, result)
    write_text(args.out.with_suffix(".md"), markdown(result))
    print(markdown(result))
    return 0 if all(r.get("passed") or r.get("skipped") for r in result["steps"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
