"""The benchmark of a full model against its reduced versions (the `moe-prune bench` command, and the demo's step 5).

    full, compressed (static subset), Algorithm 2 (per batch) and Algorithm 1 (per input) models
      -> each exported to ONNX and validated against PyTorch
      -> their analytic costs and bounds (FLOP, weight-byte and roofline ratios; Algorithm 1's per batch size,
         from the experts its batch kept)
      -> timed side by side on ONNX Runtime and in torch eager (timing.bench_models), whole model and the first
         Soft MoE layer alone -> one JSON-able result with its table

`reduced_model` makes the compressed model when none is given; `check_compressed_from` refuses one that was not
compressed from the full model; `looped` is the Python-loop-over-experts baseline (soft-moe's way).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from .reports import format_bench, say
from .timing import BenchConfig, bench_models, check_provider, environment, machine_roofline


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
    device: str | None = None  # where torch's rows run (None: CUDA when the provider is, else the CPU)


def reduced_model(full, keep: str, mode: str = "drop") -> tuple:
    """A compressed copy of `full` for benchmarking: calibrated on the bundled sample for 28x28 one-channel
    classifiers, else a seeded random subset (latency does not depend on which experts are kept).

    Returns:
        (model, a sentence saying how the subset was chosen).
    """
    from ..compression.compress import compress_model, static_subsets
    from ..data.mnist import iterate_batches, load_images
    from ..core.models import MnistSoftMoE, SoftMoEViT
    from ..selection.scores import keep_per_layer, random_subsets

    c = getattr(full, "config", None)
    if isinstance(full, (MnistSoftMoE, SoftMoEViT)) and c.in_chans == 1 and c.img_size in (28, (28, 28)):
        images = load_images("sample", split="test")[0][:500]
        subsets, _ = static_subsets(full, [x for x, _ in iterate_batches(images, None, 250)], keep)
        how = f"static top {keep} calibrated on 500 images of the bundled sample"
    else:
        k = keep_per_layer(full, keep)
        subsets = random_subsets(full, k, torch.Generator().manual_seed(0))
        how = f"a random {keep} of the experts (seed 0): latency does not depend on which experts are kept"
    return compress_model(full, subsets, mode), how


def check_compressed_from(full, small, full_path, small_path) -> None:
    """Refuse a `bench --compressed` checkpoint that was not compressed from the full one.

    Same family and architecture, the same Soft MoE layers with the same widths, kept experts (`origin`) that
    are router ids of the full model, and those experts' weights equal to the full model's rows; for a healed
    checkpoint (`compress --heal`, whose kept experts were trained), instead its recorded source metadata equal
    to the full checkpoint's.

    Raises:
        CheckpointError: naming both files and what differs.
    """
    from ..errors import CheckpointError
    from ..core.models import model_spec, moe_layers

    def refuse(why):
        raise CheckpointError(f"{small_path}: was not compressed from {full_path} ({why}); pass the checkpoint "
                              f"`moe-prune compress {full_path} ...` wrote, or leave out --compressed")

    a, b = model_spec(full), model_spec(small)
    if a["family"] != b["family"]:
        refuse(f"a {b['family']} model, the full one is a {a['family']} model")
    if a["family"] != "layer" and a["config"] != b["config"]:
        diff = sorted(key for key in a["config"] if a["config"].get(key) != b["config"].get(key))
        refuse(f"its architecture differs in {', '.join(diff)}")
    small_meta = getattr(small, "checkpoint_meta", {})
    healed = "heal" in small_meta  # `compress --heal`: the kept experts were trained, so their weights differ
    if healed and small_meta.get("source_meta") != getattr(full, "checkpoint_meta", {}):
        refuse("a healed checkpoint whose recorded source metadata is not this checkpoint's")
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
        if f.config.origin is not None or f.config.held is not None:
            held = list(f.config.origin or f.config.held)
            if not set(origin) <= set(held):
                refuse(f"{where} keeps experts {origin}, not all among the full model's {held}")
            rows = [held.index(e) for e in origin]
        else:
            if not all(0 <= e < f.config.num_experts for e in origin):
                refuse(f"{where} keeps experts {origin}, the full model has {f.config.num_experts}")
            rows = origin
        if healed:
            continue  # its experts were trained on purpose; the provenance is checked from its metadata above
        with torch.no_grad():
            w1 = f.experts.w1[rows]
            if s.config.quant == "int8":  # the full model's rows, quantized as `--quantize int8` does it
                from ..compression.quantize import quantize_weights

                q, scale = quantize_weights(w1.to(s.experts.w1_scale.dtype))
                same = torch.equal(q, s.experts.w1) and torch.equal(scale, s.experts.w1_scale)
            else:
                same = torch.equal(w1, s.experts.w1)
            if not same:
                refuse(f"{where}: the kept experts' weights differ from the full model's experts {origin}")


def _variants(full, small, keep: str, mode: str) -> dict:
    from ..selection.scores import with_selection

    return {"full": full, "compressed": small, "alg2": with_selection(full, keep, per="batch", mode=mode),
            "alg1": with_selection(full, keep, per="input", mode=mode)}


def union_of_choices(alg1, x: torch.Tensor) -> dict:
    """{layer name: how many distinct experts the inputs of batch x kept}, for a model made by with_selection
    (per input): the experts whose weights that batch reads."""
    from ..selection.scores import pruned_layers, recorded_choices

    with recorded_choices(pruned_layers(alg1)) as seen, torch.inference_mode():
        alg1(x)
        return {name: int(ids.unique().numel()) for name, ids in seen.items()}


def _costs(full, small, alg1, k: dict, mode: str, inputs: dict, tokens=None) -> tuple[dict, dict]:
    """Costs of the variants, and Algorithm 1's per batch size (its weight bytes are the union its batch kept)."""
    from ..core.flops import model_cost

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
    from ..core.flops import bounds, roofline_ratio

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
    from ..onnx.export import export_onnx
    from ..onnx.validate import validate_onnx

    paths, reports = {}, {}
    for name, m in models.items():
        example = None if tokens is None else torch.randn(2, tokens, _dim(m))
        path = export_onnx(m, out / f"{name}.onnx", example=example)
        report = validate_onnx(path, m, atol=atol, check=False)
        say("  validate", report.format().splitlines()[-1].strip() + f"  {path}")
        report.raise_for_failure()
        paths[name], reports[name] = path, report.format()
    return paths, reports


def _dim(module) -> int:
    from ..selection.scores import PrunedSoftMoE

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
    from ..onnx.export import DEFAULT_TOKENS, example_input
    from ..core.layers import SoftMoE
    from ..core.models import moe_layers
    from ..selection.scores import keep_per_layer

    if setup.bench is not None:
        check_provider(setup.provider)  # before minutes of exporting

    out = Path(setup.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    bare = isinstance(full, SoftMoE)  # a bare layer runs on example tokens [B, 16, D]; it is its own "layer alone"
    tokens = DEFAULT_TOKENS if bare else None
    models = _variants(full, small, setup.keep, setup.mode)
    k = keep_per_layer(full, setup.keep)
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
    say("  bench", f"whole models, ONNX Runtime {setup.provider} and torch eager, batch sizes {list(setup.bench.batch_sizes)}")
    eager = dict(models)
    if setup.looped_baseline:
        eager["full, looped experts"] = looped(full)
    result["latency"] = bench_models(paths, eager, inputs.__getitem__, setup.bench, setup.provider,
                                     device=setup.device)
    if setup.layers_alone and not bare:
        say("  bench", f"the Soft MoE layer {result['layer']['name']} alone")
        result["layer"]["latency"] = bench_models(lpaths, layers, linputs.__getitem__, setup.bench, setup.provider,
                                                  device=setup.device)
    result["env"] = result["latency"].pop("env")
    result["text"] = format_bench(result)
    return result


def bench_checkpoint(checkpoint, *, compressed=None, keep: str = "1/8", mode: str = "drop", provider: str = "cpu",
                     layers_alone: bool = True, config: BenchConfig = BenchConfig(), out_dir: str = "bench-output",
                     command: str = "", device=None) -> dict:
    """`benchmark` of a native checkpoint, written to files (the `moe-prune bench` command).

    Checks come first (the provider, `keep` against every layer, `compressed` against `checkpoint`); then the
    models are exported under OUT_DIR/onnx and timed; writes OUT_DIR/bench.json (the result, the command, how
    the reduced model was made), bench.md and bench.png (with matplotlib). A failed run leaves no output.

    Args:
        checkpoint: the full native checkpoint.
        compressed: its compressed checkpoint (checked to come from it); None: `reduced_model` makes one.
        keep, mode, provider, layers_alone: see BenchSetup. config: see BenchConfig.
        out_dir: the folder the files go to. command: the command line, recorded in bench.json and bench.md.
        device: where torch's rows run (None: CUDA with a CUDA provider, else the CPU; "auto": a GPU if any).

    Returns:
        {"result": benchmark's result (with "text", the table), "files": [paths written], "plot":
        OUT_DIR/bench.png, "plotted": whether it was written (False without matplotlib)}.

    Raises:
        ExportError: the provider cannot run here, or an export or validation failed. SelectionError: a bad
            keep. CheckpointError: see `load` and `check_compressed_from`. OutputError: see files.output_folder.

    Example:
        >>> r = bench_checkpoint("mnist-e128.safetensors", keep="1/8", config=BenchConfig(batch_sizes=(1, 32)))
        >>> print(r["result"]["text"])
    """
    from ..core.checkpoint import load
    from ..core.files import output_folder
    from .reports import bench_plot, write_json, write_text
    from ..selection.scores import keep_per_layer

    check_provider(provider)
    if device is not None:
        from ..core.devices import resolve_device

        device = str(resolve_device(device))
    # timed in float32, whatever the file holds, and frozen: inference only (a frozen layer reuses its router)
    full = load(checkpoint, dtype=torch.float32).requires_grad_(False)
    keep_per_layer(full, keep)
    if compressed:
        small, how = load(compressed, dtype=torch.float32).requires_grad_(False), f"compressed checkpoint {compressed}"
        check_compressed_from(full, small, checkpoint, compressed)
    else:
        small, how = reduced_model(full, keep, mode)
    with output_folder(out_dir) as out:  # a failed run leaves no output behind
        setup = BenchSetup(keep=keep, mode=mode, out_dir=str(out / "onnx"), provider=provider,
                           layers_alone=layers_alone, bench=config, device=device)
        result = benchmark(full, small, setup)
        result.update(command=command, checkpoint=str(checkpoint), reduced=how)
        write_json(out / "bench.json", result)
        write_text(out / "bench.md", f"Command: `{result['command']}`\n\nReduced model: {how}\n\n"
                   + format_bench(result, markdown=True) + "\n")
        plotted = bench_plot(result, out / "bench.png")
    files = [out / "bench.json", out / "bench.md"] + ([out / "bench.png"] if plotted else [])
    return {"result": result, "files": files, "plot": out / "bench.png", "plotted": plotted}


# -- the looped baseline ------------------------------------------------------------------------------------


class LoopedExperts(torch.nn.Module):
    """The same experts computed one after another in a Python loop, as soft-moe (bwconrad) runs them: the
    baseline that shows what stacking the experts into batched matmuls buys."""

    def __init__(self, stacked):
        super().__init__()
        self.stacked = stacked

    def forward(self, slots: torch.Tensor, idx: torch.Tensor | None = None) -> torch.Tensor:
        from ..core.mlp import expert_mlp

        e = self.stacked
        ids = range(slots.shape[0]) if idx is None else idx.tolist()
        at = lambda t, i: None if t is None else t[i]  # noqa: E731
        # slots[k] [N, D] through expert i, one matmul pair at a time (addmm with a bias, as F.linear runs it)
        return torch.stack([expert_mlp(e.kind, slots[k], e.w1[i], at(e.b1, i), e.w2[i], at(e.b2, i))
                            for k, i in enumerate(ids)])


def looped(model: torch.nn.Module) -> torch.nn.Module:
    """A copy of `model` (sharing its weights) whose Soft MoE layers loop over their experts in Python."""
    import copy

    from ..core.layers import SoftMoE

    memo = {id(t): t for t in list(model.parameters()) + list(model.buffers())}
    out = copy.deepcopy(model, memo)
    for m in out.modules():
        if isinstance(m, SoftMoE):
            m.experts = LoopedExperts(m.experts)
    return out
