"""Timing: models side by side in one run, alternating, on ONNX Runtime and in PyTorch eager; the machine.

Each batch size is measured in rounds; every round runs each model for a few iterations in turn, so slow drifts
of the machine (other load, clocks) hit all models alike. Warm-up iterations are excluded. Reported per model
and batch size: p50/p90/p99 latency, throughput at the median, the speedup over the first model (the full one)
as a ratio of medians, and the process's peak resident memory while that model ran (Linux: /proc VmHWM, reset
before each model through /proc/self/clear_refs; the figure includes everything else the process holds).

Also here: this machine's roofline corners (`machine_roofline`) and the versions and settings every results file
records (`environment`). What to compare, and against which bounds, is bench.py's job.
"""

from __future__ import annotations

import importlib.util
import os
import platform
import shlex
import sys
import time
from dataclasses import asdict, dataclass
from typing import Callable

import numpy as np
import torch

from ..errors import ExportError

PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider", "tensorrt": "TensorrtExecutionProvider"}


@dataclass(frozen=True)
class BenchConfig:
    """How long and how to measure.

    Args:
        batch_sizes: measured one after another.
        warmup: iterations per model and batch size before timing.
        rounds: alternation rounds; each runs every model `iters_per_round` times.
        iters_per_round: timed calls per model per round.
        min_seconds: keep adding rounds until every model has been timed this long (stable medians).
        threads: intra-op threads for ONNX Runtime and torch (None: their defaults).
    """

    batch_sizes: tuple = (1, 8, 32)
    warmup: int = 5
    rounds: int = 5
    iters_per_round: int = 10
    min_seconds: float = 2.0
    threads: int | None = None

    def __post_init__(self):
        from ..errors import ConfigError

        if not self.batch_sizes or min(self.batch_sizes) < 1:
            raise ConfigError(f"batch sizes {list(self.batch_sizes)}: give positive integers, e.g. 1,8,32")
        if not self.min_seconds >= 0:  # also refuses NaN
            raise ConfigError(f"--min-seconds {self.min_seconds:g}: must be 0 or more (0: just the fixed rounds)")
        if self.warmup < 0 or self.rounds < 1 or self.iters_per_round < 1:
            raise ConfigError(f"bench config: warmup >= 0, rounds >= 1 and iters_per_round >= 1; got {self}")
        if self.threads is not None and self.threads < 1:
            raise ConfigError(f"--threads {self.threads}: give at least 1 (or leave it out for the default)")


def _peak_rss_reset() -> None:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def _peak_rss_mb() -> float | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def _quantiles(samples: list[float]) -> dict:
    s = np.asarray(samples) * 1e3
    return {"p10_ms": float(np.percentile(s, 10)), "p50_ms": float(np.percentile(s, 50)),
            "p90_ms": float(np.percentile(s, 90)), "p99_ms": float(np.percentile(s, 99)), "n": len(samples)}


def alternate(runners: dict[str, Callable[[], object]], config: BenchConfig, batch_size: int) -> dict:
    """Time callables side by side: warm-up, then rounds in which each runs `iters_per_round` times in turn."""
    samples = {name: [] for name in runners}
    peak = {}
    for name, run in runners.items():
        _peak_rss_reset()
        for _ in range(config.warmup):
            run()
        peak[name] = _peak_rss_mb()
    rounds = 0
    while rounds < config.rounds or min(sum(s) for s in samples.values()) < config.min_seconds:
        for name, run in runners.items():
            for _ in range(config.iters_per_round):
                t = time.perf_counter()
                run()
                samples[name].append(time.perf_counter() - t)
        rounds += 1
        if rounds > 1000:
            break
    out = {}
    for name, s in samples.items():
        q = _quantiles(s)
        q["throughput_per_s"] = batch_size / (q["p50_ms"] / 1e3)
        q["peak_rss_mb"] = peak[name]
        out[name] = q
    return out


def check_provider(provider: str) -> str:
    """The ONNX Runtime name of an execution provider ("cpu", "cuda", "tensorrt"), if it can run here.

    Raises:
        ExportError: onnxruntime is missing, or the provider is unknown or not available (e.g. no GPU).
    """
    try:
        import onnxruntime as ort
    except ImportError:
        raise ExportError("onnxruntime is not installed: `pip install moe-prune[cpu]` (or [gpu] for CUDA)") from None
    name = PROVIDERS.get(provider)
    if name is None:
        raise ExportError(f"provider {provider!r}: choose one of {sorted(PROVIDERS)}")
    available = ort.get_available_providers()
    if name not in available:
        hint = ("install onnxruntime-gpu instead of onnxruntime (`pip install moe-prune[gpu]`, never both) and run on a "
                "machine with an NVIDIA GPU and CUDA" if provider != "cpu" else "")
        raise ExportError(f"ONNX Runtime has no {name} here (available: {available}); {hint}")
    if provider != "cpu" and not torch.cuda.is_available():
        raise ExportError(f"provider {provider!r} needs a CUDA GPU, and there is none here; use --provider cpu")
    return name


def ort_session(path, provider: str = "cpu", threads: int | None = None, shared_threads: bool = False):
    """An ONNX Runtime session on the asked execution provider; a clear error when it is not available.

    shared_threads: run on the process-wide thread pool (made by the caller with ort.set_global_thread_pool_sizes)
    instead of a pool of the session's own; see _time_onnx.
    """
    import onnxruntime as ort

    name = check_provider(provider)
    opts = ort.SessionOptions()
    if shared_threads:
        opts.use_per_session_threads = False
    elif threads:
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
    providers = [name] + (["CPUExecutionProvider"] if name != "CPUExecutionProvider" else [])
    return ort.InferenceSession(str(path), opts, providers=providers)


def _time_onnx(onnx_paths: dict, inputs: dict, config: BenchConfig, provider: str, progress: bool) -> dict:
    """Time the ONNX models, their sessions on one process-wide thread pool: {batch size: {name: stats}}.

    With a pool per session, the workers of the session that just ran keep spinning and steal the cores from the
    next one: on 2 cores the compressed ViT-S Soft MoE layer at batch 32, taking turns with the full one, ran in
    28.2 ms against 23.9 ms on one shared pool (benchmarks/results/ort_profile_vit-s16.md). Turning spinning off
    instead slowed the tiny default model at batch 1 (a probe: compressed layer 0.040 -> 0.063 ms).
    Runs in a fresh process (see _time_onnx_apart).
    """
    import onnxruntime as ort

    ort.set_global_thread_pool_sizes(config.threads or 0, 1)  # 0: ONNX Runtime's default (one per physical core)
    sessions = {name: ort_session(p, provider, shared_threads=True) for name, p in onnx_paths.items()}
    out = {}
    for bs, x in inputs.items():
        if progress:
            print(f"  batch {bs}: onnxruntime ...", file=sys.stderr, flush=True)
        feed = {"input": x}
        out[bs] = alternate({n: (lambda s=s: s.run(None, feed)) for n, s in sessions.items()}, config, bs)
    return out


def _time_onnx_apart(onnx_paths: dict, inputs: dict, config: BenchConfig, provider: str, progress: bool) -> dict:
    """_time_onnx in a child process: once ONNX Runtime's shared pool exists, it refuses every session with its
    own pool in that process, and the caller's later sessions (validation, serving, a user's own) need them."""
    import multiprocessing

    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(_time_onnx, (onnx_paths, inputs, config, provider, progress))


def bench_models(onnx_paths: dict, modules: dict, make_input: Callable[[int], torch.Tensor],
                 config: BenchConfig = BenchConfig(), provider: str = "cpu", progress: bool = True,
                 device=None) -> dict:
    """Benchmark ONNX models (ONNX Runtime) and torch modules (eager), alternating within each engine.

    ONNX Runtime runs in a child process, its sessions on one shared thread pool (see _time_onnx); its
    peak RSS column is the child's.

    Args:
        onnx_paths: {name: .onnx path}; the first is the reference for speedups.
        modules: {name: torch module} (same names as onnx_paths, ideally), run under torch.inference_mode.
        make_input: batch size -> an input batch (the same batch feeds every model of both engines).
        config: see BenchConfig.
        provider: "cpu", "cuda" or "tensorrt" for ONNX Runtime.
        device: where torch runs (None: CUDA when provider is not "cpu", else the CPU).

    Returns:
        {"onnxruntime": {bs: {name: stats}}, "torch": {...}, "speedup": {engine: {bs: {name: ratio}}}, "env": ...}.

    Example:
        >>> r = bench_models({"full": "full.onnx", "reduced": "small.onnx"}, {"full": model, "reduced": small},
        ...                  lambda b: torch.rand(b, 1, 28, 28))
    """
    if config.threads:
        torch.set_num_threads(config.threads)
    if onnx_paths:
        check_provider(provider)  # here, not as a traceback from the child
    device = torch.device(device) if device is not None else torch.device("cpu" if provider == "cpu" else "cuda")
    modules = {name: m.to(device).eval() for name, m in modules.items()}
    inputs = {bs: make_input(bs) for bs in config.batch_sizes}
    result = {"onnxruntime": {}, "torch": {}, "speedup": {"onnxruntime": {}, "torch": {}}}
    if onnx_paths:
        paths = {name: str(p) for name, p in onnx_paths.items()}
        result["onnxruntime"] = _time_onnx_apart(paths, {bs: x.numpy() for bs, x in inputs.items()}, config, provider, progress)
    for bs, x in inputs.items():
        xd = x.to(device)

        def torch_runner(m):
            def run():
                with torch.inference_mode():
                    m(xd)
                if device.type == "cuda":
                    torch.cuda.synchronize()
            return run

        if progress and modules:
            print(f"  batch {bs}: torch eager ...", file=sys.stderr, flush=True)
        if modules:
            result["torch"][bs] = alternate({n: torch_runner(m) for n, m in modules.items()}, config, bs)
    for engine in ("onnxruntime", "torch"):
        for bs, stats in result[engine].items():
            ref = next(iter(stats.values()))["p50_ms"]
            result["speedup"][engine][bs] = {n: ref / s["p50_ms"] for n, s in stats.items()}
    result["env"] = environment(provider, config)
    result["env"]["onnxruntime_threads"] = "a child process, its sessions on one shared thread pool (timing._time_onnx)"
    return result


def median_seconds(fn: Callable[[], object], reps: int = 7, device: str = "cpu") -> float:
    """The median wall time of `reps` calls of fn after one warm-up call (CUDA synchronized after each)."""
    fn()
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        ts.append(time.perf_counter() - t0)
    return float(np.median(ts))


def machine_roofline(threads: int | None = None, device: str = "cpu") -> dict:
    """This machine's peak fp32 matmul rate and weight-read bandwidth, measured in torch: the roofline's corners.

    Peak: the median of 2048x2048 @ 2048x2048 products. Bandwidth: the median time to sum 256 MiB (a read of
    memory much larger than the caches, as reading a large model's weights once per batch is).
    Returns {"flops_per_s", "bytes_per_s"}.
    """
    if threads:
        torch.set_num_threads(threads)

    a = torch.randn(2048, 2048, device=device)
    flops = 2 * 2048**3 / median_seconds(lambda: a @ a, 7, device)
    big = torch.ones(64 << 20, device=device)  # 256 MiB of fp32
    bandwidth = big.numel() * 4 / median_seconds(lambda: big.sum(), 7, device)
    return {"flops_per_s": flops, "bytes_per_s": bandwidth}


def environment(provider: str = "cpu", config: BenchConfig | None = None) -> dict:
    """Versions, device and thread settings, for every results file."""
    import subprocess

    env = {"python": platform.python_version(), "torch": torch.__version__, "numpy": np.__version__,
           "machine": platform.machine(), "cpu": _cpu_name(), "cpu_count": os.cpu_count(),
           "torch_threads": torch.get_num_threads(), "provider": provider}
    try:
        import onnxruntime as ort

        env["onnxruntime"] = ort.__version__
    except ImportError:
        env["onnxruntime"] = None
    try:
        import onnx

        env["onnx"] = onnx.__version__
    except ImportError:
        pass
    if importlib.util.find_spec("triton") is not None:
        import triton

        env["triton"] = triton.__version__
    env["cuda"] = torch.version.cuda
    env["device"] = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU only ({env['cpu']})"
    env["command"] = " ".join(shlex.quote(a) for a in [sys.executable, *sys.argv])
    if config is not None:
        env["bench_config"] = asdict(config)
    try:
        env["git_commit"] = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                                           cwd=os.path.dirname(__file__)).stdout.strip() or None
    except OSError:
        env["git_commit"] = None
    return env


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()
