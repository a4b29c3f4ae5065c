"""Load test of `moe-prune serve` on localhost: what a reduced-expert model buys a Triton Inference Server.

For each reference configuration, every model is an ONNX file made by the existing commands:
  full        moe-prune export CKPT
  compressed  moe-prune compress CKPT --keep 1/8, then export (the static subset)
  alg2        moe-prune export CKPT --keep 1/8 --dynamic (Algorithm 2, experts chosen per server batch)
  alg1        moe-prune export CKPT --keep 1/8 --dynamic --per input (Algorithm 1), when that option exists
All of a configuration's models are served at once (`moe-prune serve`, each its own server, from the serving
environment without torch) and loaded in turn, interleaved: for each concurrency, R rounds, and in each round every
model gets its share of the requests, the order rotated per round. A request is one input (batch 1); C client
threads each send a request, wait for the answer, send the next (closed loop), until the cell's requests are done
or its wall-clock cap is hit. Latency is measured per request at the client (tritonclient HTTP); warm-up requests
are excluded. Server, clients and this script share the machine's cores.

    python benchmarks/serve_load.py                          # default config, concurrency 1, 8, 32
    python benchmarks/serve_load.py --configs default,vit-b16-chung,vit-s16 --wait-load 0.8   # the committed run

Results: benchmarks/results/serve_load.{json,md}, with the command, versions, git commit and load averages.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import shlex
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
HOST = "127.0.0.1"
MODELS = ("full", "compressed", "alg2", "alg1")


def loadavg() -> list[float]:
    return [float(v) for v in Path("/proc/loadavg").read_text().split()[:3]]


def wait_for_quiet(limit: float, max_s: float, every_s: float = 20.0) -> dict:
    """Poll the 1-minute load average until it is below `limit` (at most `max_s` seconds)."""
    t0 = time.monotonic()
    seen = [loadavg()]
    while seen[-1][0] >= limit and time.monotonic() - t0 < max_s:
        time.sleep(every_s)
        seen.append(loadavg())
    return {"limit": limit, "waited_s": round(time.monotonic() - t0, 1), "reached": seen[-1][0] < limit,
            "polls": len(seen), "loadavg": seen[-1]}


def moe_prune(*args: str) -> None:
    exe = Path(sys.executable).with_name("moe-prune")
    cmd = [str(exe) if exe.exists() else sys.executable, *([] if exe.exists() else ["-m", "moe_prune.cli"]), *args]
    print("+ moe-prune " + " ".join(shlex.quote(a) for a in args), file=sys.stderr, flush=True)
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, cwd=ROOT)


def per_input_supported() -> bool:
    exe = [sys.executable, "-m", "moe_prune.cli", "export", "--help"]
    return "--per" in subprocess.run(exe, capture_output=True, text=True, cwd=ROOT).stdout


def checkpoint_for(config: str, work: Path) -> tuple[Path, Path | None]:
    """The full checkpoint and calibration inputs (None: the bundled sample) of a reference configuration."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from bench_reference import VITS  # the reference architectures, defined once

    from moe_prune.flows.demo import default_checkpoint

    if config == "default":
        return default_checkpoint(), None
    import torch

    from moe_prune.core.checkpoint import save
    from moe_prune.core.models import SoftMoEViT, ViTConfig

    ckpt, calib = work / f"{config}.safetensors", work / f"{config}.calib.npy"
    if not ckpt.exists():
        torch.manual_seed(0)  # random weights, as in bench_reference: latency does not depend on the values
        save(SoftMoEViT(ViTConfig(**VITS[config])).eval(), ckpt)
    if not calib.exists():
        c = VITS[config]
        np.save(calib, np.random.default_rng(0).random((8, c["in_chans"], c["img_size"], c["img_size"]), dtype=np.float32))
    return ckpt, calib


def make_models(config: str, work: Path, keep: str, validate: bool) -> tuple[dict, dict]:
    """ONNX files by the existing commands; returns ({model: path}, {model: reason it was skipped})."""
    work.mkdir(parents=True, exist_ok=True)
    ckpt, calib = checkpoint_for(config, work)
    check = [] if validate else ["--no-validate"]
    paths, skipped = {m: work / f"{config}-{m}.onnx" for m in MODELS}, {}
    if not paths["full"].exists():
        moe_prune("export", str(ckpt), "--out", str(paths["full"]), *check)
    small = work / f"{config}.keep1of8.safetensors"
    if not paths["compressed"].exists():
        calib_args = ["--calib", "sample", "--calib-limit", "500"] if calib is None else ["--calib", str(calib)]
        moe_prune("compress", str(ckpt), "--keep", keep, *calib_args, "--batch-size", "8", "--out", str(small))
        moe_prune("export", str(small), "--out", str(paths["compressed"]), *check)
    if not paths["alg2"].exists():
        moe_prune("export", str(ckpt), "--out", str(paths["alg2"]), "--keep", keep, "--dynamic", *check)
    if per_input_supported():
        if not paths["alg1"].exists():
            moe_prune("export", str(ckpt), "--out", str(paths["alg1"]), "--keep", keep, "--dynamic", "--per", "input", *check)
    else:
        skipped["alg1"] = ("`moe-prune export --per input` does not exist in this version (Algorithm 1 in the graph is "
                           "being added on main); the row is made when it does")
        del paths["alg1"]
    return paths, skipped


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind((HOST, 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


class Server:
    def __init__(self, python: str, model: Path, threads: int | None, max_batch_size: int, log: Path):
        self.http, grpc, metrics = free_ports(3)
        self.name = model.stem
        cmd = [python, "-m", "moe_prune.cli", "serve", str(model), "--host", HOST, "--http-port", str(self.http),
               "--grpc-port", str(grpc), "--metrics-port", str(metrics), "--max-batch-size", str(max_batch_size)]
        cmd += ["--threads", str(threads)] if threads else []
        self.log = log
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=open(log, "wb"), cwd=ROOT,
                                     start_new_session=True)

    def wait_ready(self, timeout_s: float = 600) -> None:
        url = f"http://{HOST}:{self.http}/v2/models/{self.name}/ready"
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server for {self.name} exited: {self.log.read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(url, timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.5)
        raise RuntimeError(f"server for {self.name} not ready after {timeout_s} s")

    def stop(self) -> int:
        self.proc.terminate()
        try:
            return self.proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait(timeout=30)


def run_cell(server: Server, inputs: np.ndarray, requests: int, concurrency: int, cap_s: float) -> dict:
    """`requests` batch-1 requests from `concurrency` closed-loop client threads; latencies in ms, errors."""
    import tritonclient.http as httpclient

    lock = threading.Lock()
    state = {"next": 0, "errors": 0, "messages": []}
    latencies: list[float] = []
    deadline = time.monotonic() + cap_s

    def worker():
        client = httpclient.InferenceServerClient(f"{HOST}:{server.http}", connection_timeout=60, network_timeout=120)
        try:
            loop(client)
        finally:
            client.close()  # in the thread that made it: the client's gevent pool refuses other threads

    def loop(client):
        while time.monotonic() < deadline:
            with lock:
                i = state["next"]
                if i >= requests:
                    return
                state["next"] += 1
            x = inputs[i % len(inputs)][None]
            inp = httpclient.InferInput("input", list(x.shape), "FP32")
            inp.set_data_from_numpy(x)
            t = time.perf_counter()
            try:
                out = client.infer(server.name, [inp], outputs=[httpclient.InferRequestedOutput("output")])
                ok = out.as_numpy("output").shape[0] == 1
            except Exception as e:  # an error answer or a broken connection: counted, the loop goes on
                ok = False
                with lock:
                    state["messages"].append(str(e)[:200])
            dt = (time.perf_counter() - t) * 1e3
            with lock:
                if ok:
                    latencies.append(dt)
                else:
                    state["errors"] += 1

    t0 = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(concurrency) as pool:
        for f in [pool.submit(worker) for _ in range(concurrency)]:
            f.result()
    return {"wall_s": time.perf_counter() - t0, "latencies_ms": latencies, "errors": state["errors"],
            "messages": state["messages"][:5], "sent": state["next"]}


def summarize(cells: list[dict]) -> dict:
    lat = np.concatenate([np.asarray(c["latencies_ms"]) for c in cells]) if cells else np.zeros(0)
    wall = sum(c["wall_s"] for c in cells)
    q = (lambda p: float(np.percentile(lat, p))) if len(lat) else (lambda p: None)
    return {"requests": int(sum(c["sent"] for c in cells)), "answered": int(len(lat)),
            "errors": int(sum(c["errors"] for c in cells)), "wall_s": round(wall, 3),
            "throughput_rps": round(len(lat) / wall, 2) if wall else None,
            "p50_ms": q(50), "p90_ms": q(90), "p99_ms": q(99), "error_messages": sum((c["messages"] for c in cells), [])[:5]}


def serving_versions(python: str) -> dict:
    code = ("import json, platform, numpy, onnxruntime, importlib.metadata as m; print(json.dumps({'python': "
            "platform.python_version(), 'numpy': numpy.__version__, 'onnxruntime': onnxruntime.__version__, "
            "'nvidia-pytriton': m.version('nvidia-pytriton'), 'tritonclient': m.version('tritonclient')}))")
    out = subprocess.run([python, "-c", code], capture_output=True, text=True, timeout=120)
    return json.loads(out.stdout) if out.returncode == 0 else {"error": out.stderr[-300:]}


def run_config(config: str, args, python: str) -> dict:
    work = Path(args.work_dir)
    paths, skipped = make_models(config, work, args.keep, validate=not args.no_validate)
    requests = args.requests if config == "default" else args.vit_requests
    if requests // args.rounds < 2 * max(args.concurrency):  # else the highest concurrency is never reached
        raise SystemExit(f"serve_load: {requests} requests in {args.rounds} rounds give fewer than 2 per client at "
                         f"concurrency {max(args.concurrency)}; raise the requests or lower --rounds")
    c0 = paths["full"]
    shape = None
    import onnxruntime as ort

    shape = ort.InferenceSession(str(c0), providers=["CPUExecutionProvider"]).get_inputs()[0].shape[1:]
    inputs = np.random.default_rng(0).random((16, *shape), dtype=np.float32)
    servers = {}
    try:
        for m, p in paths.items():  # one at a time: each loads its ONNX Runtime session
            servers[m] = Server(python, p, args.threads, args.max_batch_size, work / f"{config}-{m}.serve.log")
            servers[m].wait_ready()
        rows = []
        for c in args.concurrency:
            cells = {m: [] for m in servers}
            for m, s in servers.items():  # warm-up, excluded: sessions, connections, the batcher
                run_cell(s, inputs, c + 2, c, args.cap_s)
            order = list(servers)
            for r in range(args.rounds):
                share = requests // args.rounds + (1 if r < requests % args.rounds else 0)
                for m in order[r % len(order):] + order[:r % len(order)]:  # rotate who goes first
                    cells[m].append(run_cell(servers[m], inputs, share, c, args.cap_s / args.rounds))
            for m in servers:
                row = {"config": config, "model": m, "concurrency": c, "batch": 1, **summarize(cells[m])}
                rows.append(row)
                print(f"{config:>14} {m:>10} c={c:<3} {row['throughput_rps']:>8} req/s  p50 {row['p50_ms']:.2f}  "
                      f"p99 {row['p99_ms']:.2f} ms  errors {row['errors']}", file=sys.stderr, flush=True)
    finally:
        codes = {m: s.stop() for m, s in servers.items()}
    return {"config": config, "models": {m: str(p) for m, p in paths.items()}, "skipped": skipped,
            "requests_per_cell": requests, "rows": rows, "server_exit_codes": codes,
            "model_bytes": {m: sum(f.stat().st_size for f in p.parent.glob(p.name + "*")) for m, p in paths.items()}}


def markdown(result: dict) -> str:
    from moe_prune.measurement.reports import table

    lines = [f"# Serving under load: `moe-prune serve` (Triton Inference Server via PyTriton)\n",
             f"Command: `{result['command']}`\n",
             f"Git commit {result['environment'].get('git_commit')}; serving environment {json.dumps(result['serving_env'])}; "
             f"client Python {result['environment']['python']}, {result['environment']['cpu']} "
             f"({result['environment']['cpu_count']} cores, shared by server and client).\n",
             f"Load average (1, 5, 15 min) before {result['loadavg_before']}, after {result['loadavg_after']}"
             f" (waited {result['quiet_wait']['waited_s']} s for the 1-minute load to fall below "
             f"{result['quiet_wait']['limit']}: {'reached' if result['quiet_wait']['reached'] else 'NOT reached'}).\n",
             "Batch-1 requests, closed loop, HTTP; latency at the client; speed ratios against the full model at "
             "the same concurrency (throughput: higher is better; p99: full / model, higher is better).\n"]
    for cfg in result["configs"]:
        full = {r["concurrency"]: r for r in cfg["rows"] if r["model"] == "full"}
        rows = []
        for r in cfg["rows"]:
            f = full[r["concurrency"]]
            rows.append([r["model"], r["concurrency"], r["answered"], r["errors"], f"{r['throughput_rps']:.1f}",
                         f"{r['p50_ms']:.2f}", f"{r['p90_ms']:.2f}", f"{r['p99_ms']:.2f}",
                         f"{r['throughput_rps'] / f['throughput_rps']:.2f}x", f"{f['p99_ms'] / r['p99_ms']:.2f}x"])
        lines.append(f"## {cfg['config']} ({cfg['requests_per_cell']} requests per cell)\n")
        lines.append(table(rows, ["model", "concurrency", "answered", "errors", "req/s", "p50 ms", "p90 ms", "p99 ms",
                                  "throughput vs full", "p99 vs full"], markdown=True) + "\n")
        for m, why in cfg["skipped"].items():
            lines.append(f"Not measured: {m}: {why}.\n")
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", default="default", help="comma-separated: default, vit-s16, vit-b16-chung")
    p.add_argument("--concurrency", default="1,8,32")
    p.add_argument("--requests", type=int, default=2000, help="requests per model and concurrency, default config")
    p.add_argument("--vit-requests", type=int, default=128, help="requests per model and concurrency for the ViTs "
                   "(a full ViT-S/16 answers about 5 images a second on 2 cores)")
    p.add_argument("--rounds", type=int, default=2, help="interleaving rounds per concurrency")
    p.add_argument("--cap-s", type=float, default=300.0, help="wall-clock cap per model and concurrency")
    p.add_argument("--keep", default="1/8")
    p.add_argument("--threads", type=int, default=1, help="ONNX Runtime threads per server (default 1: the client "
                   "threads need the other core; with 2 threads a batch-1 call waits for a busy core to wake the second)")
    p.add_argument("--max-batch-size", type=int, default=64)
    p.add_argument("--serve-python", default=os.environ.get("MOE_PRUNE_SERVE_PYTHON", str(ROOT / ".venv-serve/bin/python")))
    p.add_argument("--wait-load", type=float, default=None, help="first wait for the 1-minute load to fall below this")
    p.add_argument("--wait-max-s", type=float, default=600.0)
    p.add_argument("--no-validate", action="store_true", help="skip the exports' validation against PyTorch")
    p.add_argument("--work-dir", default="bench-work/serve", help="ONNX files and server logs (large; not committed)")
    p.add_argument("--out", default=str(RESULTS / "serve_load"), help="results stem (.json and .md are written)")
    args = p.parse_args(argv)
    args.concurrency = [int(c) for c in args.concurrency.split(",")]
    if not Path(args.serve_python).exists():
        sys.exit(f"serve_load: no serving Python at {args.serve_python}; `make serve-env` makes one")
    from moe_prune.measurement.timing import environment
    from moe_prune.measurement.reports import write_json, write_text

    configs = [c for c in args.configs.split(",") if c]
    for config in configs:  # exports first: they load torch models and must not overlap the timed load
        make_models(config, Path(args.work_dir), args.keep, validate=not args.no_validate)
    quiet = wait_for_quiet(args.wait_load, args.wait_max_s) if args.wait_load else {"limit": None, "waited_s": 0,
                                                                                   "reached": True}
    before = loadavg()
    result = {"command": "python benchmarks/serve_load.py " + " ".join(sys.argv[1:] if argv is None else argv),
              "environment": environment(), "serving_env": serving_versions(args.serve_python),
              "settings": {k: v for k, v in vars(args).items() if k not in ("out",)}, "quiet_wait": quiet,
              "loadavg_before": before, "configs": []}
    for config in configs:
        result["configs"].append(run_config(config, args, args.serve_python))
    result["loadavg_after"] = loadavg()
    stem = Path(args.out)
    stem.parent.mkdir(parents=True, exist_ok=True)
    write_json(stem.with_suffix(".json"), result)
    md = markdown(result)
    write_text(stem.with_suffix(".md"), md)
    print(md)


if __name__ == "__main__":
    main()
