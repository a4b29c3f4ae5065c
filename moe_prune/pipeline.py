"""The whole flow on one checkpoint (the `moe-prune demo` command): load, select, compress, measure.

    load -> calibrate on half of the bundled sample, keep the top 1/8 experts per layer -> compress ->
    accuracy kept on the other half (beside a random subset and no experts at all) -> export full and
    reduced models to ONNX, validate them -> benchmark -> one summary.
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import torch

from .bench import BenchConfig

DEFAULT_CHECKPOINT = "default.safetensors"


def default_checkpoint() -> Path:
    """The small trained checkpoint shipped with the package (see moe_prune/assets/README.md)."""
    return Path(str(resources.files("moe_prune") / "assets" / DEFAULT_CHECKPOINT))


@dataclass(frozen=True)
class DemoConfig:
    checkpoint: str | None = None  # None: the bundled default
    out_dir: str = "demo-output"
    keep: str = "1/8"
    mode: str = "drop"
    random_seeds: int = 10
    export: bool = True
    bench: bool = True


def _say(step: str, text: str = "") -> None:
    print(f"[{step}] {text}", file=sys.stderr, flush=True)


def run_demo(config: DemoConfig = DemoConfig()) -> dict:
    """Run the flow and return its summary (also printed by the CLI).

    Example:
        >>> summary = run_demo(DemoConfig(out_dir="/tmp/demo"))
        >>> summary["accuracy"]["static"] / summary["accuracy"]["full"]
    """
    from .files import output_folder

    if config.random_seeds < 1:
        from .errors import ConfigError

        raise ConfigError(f"random_seeds={config.random_seeds}: give at least 1")
    ckpt = Path(config.checkpoint) if config.checkpoint else default_checkpoint()
    _check_demo_model(ckpt)  # before any output exists
    with output_folder(config.out_dir) as out:  # a failed demo leaves no output behind
        return _demo(config, ckpt, out)


def _check_demo_model(ckpt: Path) -> None:
    """The demo measures accuracy on the bundled Fashion-MNIST images: refuse other models in one line."""
    from .checkpoint import skeleton
    from .data import check_inputs, describe_input, load_images, model_input
    from .errors import DataError

    model = skeleton(ckpt)
    try:
        check_inputs(model, load_images("sample", split="test")[0], "the bundled sample")
    except DataError:
        raise DataError(f"{ckpt}: the demo runs on the bundled 28x28 Fashion-MNIST images, but this model takes "
                        f"{describe_input(model_input(model))}; for other models use `moe-prune compress --calib "
                        "INPUTS.npy` and `moe-prune bench`") from None



def random_subsets(model, k_of, generator: torch.Generator) -> dict:
    """A random subset of each layer's held experts, as router ids (what with_experts and compress take).

    Args:
        k_of: {layer name: k}, or one k for every layer.
    """
    from .models import moe_layers

    out = {}
    for name, layer in moe_layers(model).items():
        k = k_of[name] if isinstance(k_of, dict) else k_of
        out[name] = layer.held_experts()[torch.randperm(layer.config.num_held, generator=generator)[:k]].sort().values
    return out


def _demo(config: DemoConfig, ckpt: Path, out: Path) -> dict:
    from .checkpoint import load, summary
    from .compress import compress_file, static_subsets
    from .data import iterate_batches, load_images
    from .evaluate import accuracy
    from .models import moe_layers
    from .selection import with_experts, with_selection

    t0 = time.perf_counter()
    _say("1/5 load", str(ckpt))
    model = load(ckpt)
    info = summary(ckpt)
    layers = moe_layers(model)
    images, labels = load_images("sample", split="test")
    calib, test = (images[:500], labels[:500]), (images[500:], labels[500:])

    _say("2/5 select", f"calibrating on 500 sample images, keeping the top {config.keep} experts of every Soft MoE layer")
    subsets, _ = static_subsets(model, [x for x, _ in iterate_batches(calib[0], None, 250)], config.keep)
    small_path = out / f"{ckpt.stem}.keep{config.keep.replace('/', 'of')}.{config.mode}.safetensors"
    _say("3/5 compress", str(small_path))
    compress_file(ckpt, subsets, small_path, mode=config.mode, meta={"keep": config.keep, "calibration": "bundled sample, images 0-499"})
    small_info = summary(small_path)
    small = load(small_path)

    _say("4/5 accuracy", "on sample images 500-999: full, static subset, Algorithm 1, random subsets, no experts")
    acc = {"full": accuracy(model, *test), "static": accuracy(small, *test),
           "alg1": accuracy(with_selection(model, config.keep, per="input", mode=config.mode), *test)}
    k = len(next(iter(subsets.values())))
    rand = []
    for seed in range(config.random_seeds):
        subset = random_subsets(model, k, torch.Generator().manual_seed(seed))
        rand.append(accuracy(with_experts(model, subset, mode=config.mode), *test))
    acc["random_mean"] = sum(rand) / len(rand)
    acc["random_std"] = math.sqrt(sum((r - acc["random_mean"]) ** 2 for r in rand) / max(1, len(rand) - 1))
    acc["no_experts"] = accuracy(with_experts(model, {name: torch.zeros(0, dtype=torch.long) for name in layers}), *test)
    result = {
        "checkpoint": str(ckpt), "compressed": str(small_path), "keep": config.keep, "k": k, "mode": config.mode,
        "experts": {name: layer.config.num_experts for name, layer in layers.items()},
        "kept_experts": {name: s.tolist() for name, s in subsets.items()},
        "accuracy": acc,
        "size": {"parameters": (info["parameters"], small_info["parameters"]),
                 "expert_parameters": (info["expert_parameters"], small_info["expert_parameters"]),
                 "bytes": (info["bytes"], small_info["bytes"])},
    }
    if config.export:
        _say("5/5 export + bench", "ONNX export of the full, compressed, Algorithm 2 and Algorithm 1 models, validation, latency")
        setup = BenchSetup(keep=config.keep, mode=config.mode, out_dir=str(out / "onnx"), layers_alone=False,
                           bench=BenchConfig(batch_sizes=(1, 8, 32), min_seconds=1.0) if config.bench else None)
        result["speed"] = benchmark(model, small, setup)
    result["seconds"] = time.perf_counter() - t0
    return result


@dataclass(frozen=True)
class BenchSetup:
    """What `benchmark` compares: the full model, its static subset (compressed), and Algorithms 2 (per batch)
    and 1 (per input) in the graph.

    Args:
        keep, mode: the subset size and mode (Algorithm 2 keeps `keep` per batch; a static subset of the same
            size is used when no compressed model is given).
        out_dir: where the ONNX files go.
        provider: ONNX Runtime execution provider: "cpu", "cuda" or "tensorrt".
        layers_alone: also compare the first Soft MoE layer alone (full against reduced).
        bench: timing settings; None exports and validates only.
        atol: validation tolerance.
    """

    keep: str = "1/8"
    mode: str = "drop"
    out_dir: str = "bench-output"
    provider: str = "cpu"
    layers_alone: bool = True
    bench: BenchConfig | None = BenchConfig()
    atol: float = 1e-4
    looped_baseline: bool = False  # also time the full model with a Python loop over experts (soft-moe's way)


def reduced_model(full, keep: str, mode: str = "drop") -> tuple:
    """A compressed copy of `full` for benchmarking: calibrated on the bundled sample for 28x28 one-channel
    classifiers, else a seeded random subset (latency does not depend on which experts are kept).

    Returns:
        (model, a sentence saying how the subset was chosen).
    """
    from .compress import compress_model, static_subsets
    from .data import iterate_batches, load_images
    from .models import MnistSoftMoE, SoftMoEViT, moe_layers
    from .selection import parse_keep

    c = getattr(full, "config", None)
    if isinstance(full, (MnistSoftMoE, SoftMoEViT)) and c.in_chans == 1 and c.img_size in (28, (28, 28)):
        images = load_images("sample", split="test")[0][:500]
        subsets, _ = static_subsets(full, [x for x, _ in iterate_batches(images, None, 250)], keep)
        how = f"static top {keep} calibrated on 500 images of the bundled sample"
    else:
        k = {name: parse_keep(keep, layer.config.num_held) for name, layer in moe_layers(full).items()}
        subsets = random_subsets(full, k, torch.Generator().manual_seed(0))
        how = f"a random {keep} of the experts (seed 0): latency does not depend on which experts are kept"
    return compress_model(full, subsets, mode), how


def check_compressed_from(full, small, full_path, small_path) -> None:
    """Refuse a `bench --compressed` checkpoint that was not compressed from the full one.

    Same family and architecture, the same Soft MoE layers with the same widths, kept experts (`origin`) that
    are router ids of the full model, and those experts' weights equal to the full model's rows.

    Raises:
        CheckpointError: naming both files and what differs.
    """
    from .errors import CheckpointError
    from .models import model_spec, moe_layers

    def refuse(why):
        raise CheckpointError(f"{small_path}: was not compressed from {full_path} ({why}); pass the checkpoint "
                              f"`moe-prune compress {full_path} ...` wrote, or leave out --compressed")

    a, b = model_spec(full), model_spec(small)
    if a["family"] != b["family"]:
        refuse(f"a {b['family']} model, the full one is a {a['family']} model")
    if a["family"] != "layer" and a["config"] != b["config"]:
        diff = sorted(key for key in a["config"] if a["config"].get(key) != b["config"].get(key))
        refuse(f"its architecture differs in {', '.join(diff)}")
    fl, sl = moe_layers(full), moe_layers(small)
    if list(fl) != list(sl):
        refuse(f"Soft MoE layers {list(sl)}, the full model has {list(fl)}")
    for name, f in fl.items():
        s, where = sl[name], f"layer {name or '(layer)'}"
        same = ("dim", "out_dim", "hidden", "slots_per_expert", "expert", "token_norm", "dispatch_input")
        diff = [key for key in same if getattr(f.config, key, None) != getattr(s.config, key, None)]
        if diff:
            refuse(f"{where} differs in {', '.join(diff)}")
        if s.config.origin is None:
            refuse(f"{where} records no kept experts: it is not a compressed checkpoint")
        origin = list(s.config.origin)
        if f.config.origin is not None or f.config.present is not None:
            held = list(f.config.origin or f.config.present)
            if not set(origin) <= set(held):
                refuse(f"{where} keeps experts {origin}, not all among the full model's {held}")
            rows = [held.index(e) for e in origin]
        else:
            if not all(0 <= e < f.config.num_experts for e in origin):
                refuse(f"{where} keeps experts {origin}, the full model has {f.config.num_experts}")
            rows = origin
        with torch.no_grad():
            if not torch.equal(f.experts.w1[rows], s.experts.w1):
                refuse(f"{where}: the kept experts' weights differ from the full model's experts {origin}")


def _variants(full, small, keep: str, mode: str) -> dict:
    from .selection import with_selection

    return {"full": full, "compressed": small, "alg2": with_selection(full, keep, per="batch", mode=mode),
            "alg1": with_selection(full, keep, per="input", mode=mode)}


def union_of_choices(alg1, x: torch.Tensor) -> dict:
    """{layer name: how many distinct experts the inputs of batch x kept}, for a model made by with_selection
    (per input): the experts whose weights that batch reads."""
    from .selection import PrunedSoftMoE

    seen, handles = {}, []
    for name, m in alg1.named_modules():
        if isinstance(m, PrunedSoftMoE):
            handles.append(m.choice.register_forward_hook(
                lambda mod, args, out, name=name: seen.__setitem__(name, int(out.unique().numel()))))
    try:
        with torch.inference_mode():
            alg1(x)
    finally:
        for h in handles:
            h.remove()
    return seen


def _costs(full, small, alg1, k: dict, mode: str, inputs: dict, tokens=None) -> tuple[dict, dict]:
    """Costs of the variants, and Algorithm 1's per batch size (its weight bytes are the union its batch kept)."""
    from .flops import model_cost

    costs = {"full": model_cost(full, tokens=tokens), "compressed": model_cost(small, mode=mode, tokens=tokens),
             "alg2": model_cost(full, kept=k, mode=mode, dynamic=True, tokens=tokens)}
    by_batch = {}
    for bs, x in inputs.items():
        union = union_of_choices(alg1, x)
        by_batch[bs] = (union, model_cost(full, kept=k, mode=mode, dynamic=True, tokens=tokens, union=union))
    costs["alg1"] = by_batch[min(by_batch)][1] if by_batch else model_cost(full, kept=k, mode=mode, dynamic=True, tokens=tokens)
    return costs, by_batch


def _bounds(costs: dict, by_batch: dict, machine: dict | None) -> dict:
    """Each variant's FLOP and weight-byte bounds, and per batch size its roofline bound (and, for Algorithm 1,
    the weight-byte bound of the experts that batch kept)."""
    from .flops import bounds, roofline_ratio

    out = {}
    for name, c in costs.items():
        if name == "full":
            continue
        b = bounds(costs["full"], c)
        b["by_batch"] = {}
        for bs in by_batch:
            cb = by_batch[bs][1] if name == "alg1" else c
            entry = {"bytes_ratio": bounds(costs["full"], cb)["bytes_ratio"]}
            if name == "alg1":
                entry["union"] = by_batch[bs][0]
            if machine:
                entry["roofline"] = roofline_ratio(costs["full"], cb, int(bs), machine["flops_per_s"], machine["bytes_per_s"])
            b["by_batch"][bs] = entry
        out[name] = b
    return out


def _export_all(models: dict, out: Path, atol: float, tokens=None) -> tuple[dict, dict]:
    from .export import export_onnx
    from .validate import validate_onnx

    paths, reports = {}, {}
    for name, m in models.items():
        example = None if tokens is None else torch.randn(2, tokens, m_dim(m))
        path = export_onnx(m, out / f"{name}.onnx", example=example)
        report = validate_onnx(path, m, atol=atol, check=False)
        _say("  validate", report.format().splitlines()[-1].strip() + f"  {path}")
        report.raise_for_failure()
        paths[name], reports[name] = path, report.format()
    return paths, reports


def m_dim(module) -> int:
    from .selection import PrunedSoftMoE

    return (module.layer if isinstance(module, PrunedSoftMoE) else module).config.dim


def benchmark(full, small, setup: BenchSetup = BenchSetup()) -> dict:
    """Export full, compressed, Algorithm 2 and Algorithm 1 models to ONNX, validate them, time them against
    their bounds (FLOP, weight-byte and roofline ratios; Algorithm 1's bytes and roofline per batch size).

    Args:
        full: the full native model. small: its compressed version (see compress.compress_model).
        setup: see BenchSetup.

    Returns:
        A JSON-able dict: ONNX paths and validation checklists, bounds (FLOP and weight-byte ratios, whole model
        and per layer kind), latency results per engine and batch size, and "text", the summary table.

    Example:
        >>> small = compress_model(model, subsets)
        >>> r = benchmark(model, small, BenchSetup(out_dir="bench"))
        >>> print(r["text"])
    """
    from .bench import bench_models, environment, machine_roofline
    from .export import example_input
    from .models import moe_layers
    from .selection import parse_keep

    if setup.bench is not None:
        from .bench import check_provider

        check_provider(setup.provider)  # before minutes of exporting
    from .export import DEFAULT_TOKENS as _DEFAULT_TOKENS
    from .layers import SoftMoE

    out = Path(setup.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    bare = isinstance(full, SoftMoE)  # a bare layer runs on example tokens [B, 16, D]; it is its own "layer alone"
    tokens = _DEFAULT_TOKENS if bare else None
    models = _variants(full, small, setup.keep, setup.mode)
    k = {name: parse_keep(setup.keep, layer.config.num_held) for name, layer in moe_layers(full).items()}
    batch_sizes = setup.bench.batch_sizes if setup.bench is not None else (1, 32)
    gen = torch.Generator().manual_seed(0)
    inputs = {bs: example_input(full, bs, generator=gen) for bs in batch_sizes}
    machine = None
    if setup.bench is not None:
        machine = machine_roofline(setup.bench.threads, "cpu" if setup.provider == "cpu" else "cuda")
    costs, by_batch = _costs(full, small, models["alg1"], k, setup.mode, inputs, tokens)
    result = {"keep": setup.keep, "mode": setup.mode, "k": k, "machine": machine,
              "bounds": _bounds(costs, by_batch, machine),
              "cost_per_input": {name: c.as_dict() for name, c in costs.items()}}
    paths, reports = _export_all(models, out, setup.atol)
    result["onnx"] = {name: str(p) for name, p in paths.items()}
    result["validation"] = reports
    if bare:
        result["tokens"] = tokens
    if setup.layers_alone and not bare:
        name0, layer0 = next(iter(moe_layers(full).items()))
        tokens = full.config.tokens
        layers = _variants(layer0, moe_layers(small)[name0], str(k[name0]), setup.mode)
        linputs = {bs: torch.randn(bs, tokens, layer0.config.dim, generator=gen) for bs in batch_sizes}
        lcosts, lby_batch = _costs(layer0, layers["compressed"], layers["alg1"], k[name0], setup.mode, linputs, tokens)
        result["layer"] = {"name": name0, "tokens": tokens, "bounds": _bounds(lcosts, lby_batch, machine)}
        (out / "layer").mkdir(exist_ok=True)
        lpaths, _ = _export_all(layers, out / "layer", setup.atol, tokens=tokens)
        result["layer"]["onnx"] = {n: str(p) for n, p in lpaths.items()}
    if setup.bench is None:
        result["env"] = environment(setup.provider)
        return result
    _say("  bench", f"whole models, ONNX Runtime {setup.provider} and torch eager, batch sizes {list(setup.bench.batch_sizes)}")
    eager = dict(models)
    if setup.looped_baseline:
        from .bench import looped

        eager["full, looped experts"] = looped(full)
    result["latency"] = bench_models(paths, eager, inputs.__getitem__, setup.bench, setup.provider)
    if setup.layers_alone and not bare:
        _say("  bench", f"the Soft MoE layer {result['layer']['name']} alone")
        result["layer"]["latency"] = bench_models(lpaths, layers, linputs.__getitem__, setup.bench, setup.provider)
    result["env"] = result["latency"].pop("env")
    from .reports import format_bench

    result["text"] = format_bench(result)
    return result
