"""One function per `moe-prune` subcommand: its parsed arguments into one library call, the result printed.

Everything a command needs is imported inside it, so that `moe-prune --help` and `moe-prune serve` import no torch.
"""

from __future__ import annotations

import contextlib
import json
import shlex
import sys
from pathlib import Path

from ..errors import ConfigError
from .defaults import VIT_DEFAULTS


def _command(args) -> str:
    """The command line this run was called with, quoted so that it can be pasted back into a shell."""
    return shlex.join(["moe-prune", *args.argv])


def _no_plot_note(path) -> None:
    print(f"moe-prune: note: {path} not written: matplotlib is not installed (pip install matplotlib, or the "
          "[dev] extra)", file=sys.stderr)


def _json_arg(text: str) -> dict:
    """A JSON object given inline or as a path to a JSON file (a {"kwargs": {...}} wrapper is unwrapped)."""
    from pathlib import Path

    src = Path(text).read_text() if not text.lstrip().startswith("{") and Path(text).is_file() else text
    try:
        obj = json.loads(src)
    except ValueError as e:
        raise ConfigError(f"--kwargs: not a JSON object or a JSON file: {e}") from None
    if not isinstance(obj, dict):
        raise ConfigError("--kwargs: expected a JSON object")
    return obj.get("kwargs", obj) if isinstance(obj.get("kwargs"), dict) else obj


def _source(args, path):
    """A checkpoint argument with the options that say how to read another library's file."""
    from ..core.checkpoint import CheckpointFile

    kwargs = _json_arg(args.kwargs) if getattr(args, "kwargs", None) else None
    return CheckpointFile(path, kwargs=kwargs, ema=getattr(args, "ema", False),
                          library=getattr(args, "source_format", "auto"))


def _data_options(args):
    """The data-reading and preprocessing options of a command, as datasets.DataOptions."""
    from ..data.examples import DataOptions

    return DataOptions(workers=getattr(args, "workers", None), skip_bad=getattr(args, "skip_bad", False),
                       cache_mb=getattr(args, "cache_mb", 1024.0), interpolation=getattr(args, "interpolation", None),
                       crop_pct=getattr(args, "crop_pct", None), mean=getattr(args, "mean", None),
                       std=getattr(args, "std", None))


def cmd_info(args) -> None:
    import warnings

    from ..core.summary import summary
    from ..measurement.reports import format_summary

    with warnings.catch_warnings():  # `info` says which values are defaults in its own lines
        warnings.simplefilter("ignore")
        s = summary(_source(args, args.checkpoint))
    print(json.dumps(s, indent=2) if args.json else format_summary(s))


def cmd_convert(args) -> None:
    from ..core.library_files import convert_file
    from ..core.files import resolve_out
    from ..measurement.reports import format_found

    kwargs = _json_arg(args.kwargs) if args.kwargs else None
    stem = Path(args.source).name.split(".")[0]
    out = resolve_out(args.out, ".safetensors", f"{stem}.native.safetensors")
    with _folder_for(out, args.out):
        overrides = {k: v for k, v in _data_options(args).preprocess_overrides().items() if v is not None}
        model, found = convert_file(args.source, out, args.source_format, kwargs, ema=args.ema, preprocess=overrides,
                                    dtype=args.dtype)
    print("\n".join(format_found(found)))
    print(f"converted {args.source} -> {out}")


def _folder_form(out: Path, given: str) -> bool:
    """Whether --out named a folder (see files.resolve_out), which the run creates if missing."""
    return out.name != Path(given).name


def _folder_for(out: Path, given: str):
    """Create the folder of a folder-form --out for the run; else nothing to create."""
    from ..core.files import output_folder

    return output_folder(out.parent) if _folder_form(out, given) else contextlib.nullcontext()


def cmd_train(args) -> None:
    from ..flows.train import TrainConfig, train_models

    cfg = TrainConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                      validation=args.validation)
    vit = {**VIT_DEFAULTS, **(_json_arg(args.vit) if args.vit else {})} if args.model == "vit" else None
    for out, result in train_models(args.model, args.experts, args.data, args.out_dir, vit=vit,
                                    scale_init=args.scale_init, config=cfg,
                                    meta={"data": args.data, "command": _command(args)}, device=args.device):
        print(f"{out}: test accuracy {result['test_accuracy']:.4f}")


def cmd_eval(args) -> None:
    from ..measurement.evaluate import StudyConfig, eval_checkpoints

    config = StudyConfig(keeps=tuple(args.keep), modes=tuple(args.modes), batch_sizes=tuple(args.batch_sizes),
                         random_seeds=args.random_seeds)
    r = eval_checkpoints([_source(args, c) for c in args.checkpoints], data=args.data, calib=args.calib, calib_limit=args.calib_limit,
                         config=config, out_dir=args.out_dir, command=_command(args), options=_data_options(args),
                         device=args.device)
    if not r["plotted"]:
        _no_plot_note(r["plot"])
    print(r["markdown"])
    print(f"\nwrote {', '.join(map(str, r['files']))}")


def cmd_demo(args) -> None:
    from ..flows.demo import DemoConfig, run_demo
    from ..measurement.reports import format_demo

    config = DemoConfig(checkpoint=_source(args, args.checkpoint) if args.checkpoint else None, out_dir=args.out_dir, keep=args.keep, mode=args.mode,
                        export=not args.no_export, bench=not args.no_bench,
                        heal_steps=None if args.heal_steps == 0 else args.heal_steps, device=args.device)
    print(format_demo(run_demo(config)))


def cmd_bench(args) -> None:
    from ..measurement.bench import bench_checkpoint
    from ..measurement.timing import BenchConfig

    config = BenchConfig(batch_sizes=tuple(args.batch_sizes), threads=args.threads, min_seconds=args.min_seconds)
    r = bench_checkpoint(_source(args, args.checkpoint), compressed=args.compressed, keep=args.keep, mode=args.mode,
                         provider=args.provider, layers_alone=not args.no_layer, config=config,
                         out_dir=args.out_dir, command=_command(args), device=args.device)
    if not r["plotted"]:
        _no_plot_note(r["plot"])
    print(r["result"]["text"])
    print(f"\nwrote {', '.join(map(str, r['files']))}")


def cmd_compress(args) -> None:
    from ..compression.compress import compress_from_data
    from ..core.files import resolve_out

    src = Path(args.checkpoint)
    if args.calib is None:  # --quantize alone: the checkpoint's experts as they are (a compressed one, typically)
        return _quantize_only(args, src)
    int8 = ".int8" if args.quantize else ""
    out = resolve_out(args.out, ".safetensors", f"{src.name.split('.')[0]}.keep{args.keep.replace('/', 'of')}.{args.mode}{int8}.safetensors")
    heal = None
    if args.heal:
        from ..compression.healing import HealConfig

        heal = HealConfig(steps=args.heal_steps, lr=args.heal_lr, temperature=args.heal_temperature,
                          parts=args.heal_parts, seed=args.heal_seed, held_out=args.heal_held_out,
                          max_epochs=args.heal_max_epochs, patience=args.heal_patience)
    r = compress_from_data(_source(args, src), out, args.keep, args.calib, calib_limit=args.calib_limit, batch_size=args.batch_size,
                           mode=args.mode, rule=args.rule, heal=heal, create_folder=_folder_form(out, args.out),
                           meta={"command": _command(args)}, options=_data_options(args), device=args.device,
                           dtype=args.dtype, budget=args.budget, quantize=args.quantize, search=args.search)
    if r is None:  # a torchrun rank other than 0: rank 0 reports
        return
    before, after = r["before"], r["after"]
    for name, ids in r["subsets"].items():
        print(f"  {name or '(layer)'}: kept experts {ids.tolist()} (rule: {args.rule})")
    if r["heal"] is not None:
        h = r["heal"]
        line = f"  healed: {h['steps_run']} of {h['steps_planned']} steps in {h['seconds']:.0f} s, distillation loss {h['loss_before']:.4g} -> {h['loss_after']:.4g}"
        held = h.get("held_out") or {}
        if held.get("best_step") is not None:
            first, best = held["losses"][0]["loss"], min(x["loss"] for x in held["losses"])
            kept = "the unhealed weights kept: healing never beat them there" if held["best_step"] == 0 else \
                f"weights of step {held['best_step']} kept"
            line += f" (on {held['inputs']} held-out inputs: {first:.4g} -> {best:.4g}, {kept})"
        if h.get("stopped"):
            line += f"; stopped early: {h['stopped']}"
        if "accuracy_after" in h:
            line += (f"; held-out accuracy {100 * h['accuracy_before']:.2f}% -> {100 * h['accuracy_after']:.2f}% "
                     f"(full model {100 * h['accuracy_full']:.2f}%)")
        else:
            line += "; no held-out accuracy (--calib has no test split or val/ folder)"
        print(line)
    _print_sizes(before, after)
    print(f"wrote {r['path']}")


def _print_sizes(before: dict, after: dict) -> None:
    from ..measurement.reports import human_bytes, human_count

    for key, label in (("parameters", "parameters"), ("expert_parameters", "expert parameters")):
        if before[key] <= after[key]:  # quantizing alone adds the scales and removes nothing: bytes say it
            continue
        print(f"  {label:<18} {human_count(before[key]):>9} -> {human_count(after[key]):>9}  ({before[key] / after[key]:.2f}x smaller)")
    if any(layer.get("quant") for layer in after["moe_layers"]):  # int8 experts: their bytes, scales included
        print(f"  {'expert weights':<18} {human_bytes(before['expert_bytes']):>9} -> {human_bytes(after['expert_bytes']):>9}  "
              f"({before['expert_bytes'] / after['expert_bytes']:.2f}x smaller, int8 with per-channel scales)")
    print(f"  {'weights':<18} {human_bytes(before['weight_bytes']):>9} -> {human_bytes(after['weight_bytes']):>9}  "
          f"({before['weight_bytes'] / after['weight_bytes']:.2f}x smaller, {after['dtype']})")
    if before["native"]:  # another library's file also holds what is not weights (optimizer state, ...)
        print(f"  {'file size':<18} {human_bytes(before['bytes']):>9} -> {human_bytes(after['bytes']):>9}  ({before['bytes'] / after['bytes']:.2f}x smaller)")


def _quantize_only(args, src: Path) -> None:
    """`compress CKPT --quantize int8` without --calib: quantize the experts the checkpoint holds, nothing chosen."""
    from ..core.files import resolve_out
    from ..compression.quantize import quantize_file

    given = [flag for flag in ("--keep", "--heal", "--rule", "--budget", "--mode", "--calib-limit")
             if any(a == flag or a.startswith(flag + "=") for a in args.argv)]
    if not args.quantize or given:
        why = f"{', '.join(given)} choose{'s' if len(given) == 1 else ''} experts on it" if given else "it is the data the experts are chosen on"
        raise ConfigError(f"compress: --calib is required ({why}); without it only --quantize int8 runs, on the "
                          "experts the checkpoint holds (e.g. a compressed one); see `moe-prune compress --help`")
    out = resolve_out(args.out, ".safetensors", f"{src.name.split('.')[0]}.int8.safetensors")
    r = quantize_file(_source(args, src), out, args.quantize, meta={"command": _command(args)},
                      create_folder=_folder_form(out, args.out))
    print(f"  quantized the experts of {src} as they are ({args.quantize}, nothing recalibrated)")
    _print_sizes(r["before"], r["after"])
    print(f"wrote {r['path']}")


def cmd_export(args) -> None:
    from ..onnx.export_file import export_checkpoint
    from ..core.files import resolve_out

    # The checkpoint's own preprocessing with --mean/--std/--interpolation/--crop-pct on top (the options every
    # command that reads images shares); --preprocess puts it inside the graph.
    pre = dict(preprocess=args.preprocess, mean=args.mean, std=args.std, interpolation=args.interpolation,
               crop_pct=args.crop_pct)
    if args.format == "triton-repo":
        from ..serving.repository import export_triton_repo

        root = export_triton_repo(_source(args, args.checkpoint), args.out, args.name, keep=args.keep, dynamic=args.dynamic,
                                  per=args.per, mode=args.mode, atol=args.atol, kind=args.instance_kind,
                                  max_batch_size=args.max_batch_size, opset=args.opset,
                                  validate=not args.no_validate, **pre)
        print(f"wrote the Triton model repository {args.out}: {root / 'config.pbtxt'}, {root / '1' / 'model.onnx'}")
        print(f"serve it with: tritonserver --model-repository {Path(args.out).resolve()}")
        return
    out = resolve_out(args.out, ".onnx", f"{Path(args.checkpoint).name.split('.')[0]}.onnx")
    with _folder_for(out, args.out):
        path, report = export_checkpoint(
            _source(args, args.checkpoint), out, keep=args.keep, dynamic=args.dynamic, per=args.per, mode=args.mode, opset=args.opset,
            dynamo=args.exporter == "dynamo", atol=args.atol, validate=not args.no_validate,
            keep_invalid=args.keep_invalid, dtype=args.dtype, **pre,
        )
        if report is not None:
            print(report.format())
            if not args.keep_invalid:  # a failure here takes back the folder this run made
                report.raise_for_failure()
    if report is not None:
        report.raise_for_failure()  # the kept model and its folder stay; the message says where
    print(f"exported {args.checkpoint} -> {path}")


def cmd_serve(args) -> None:
    import logging

    from ..serving.server import ServeConfig, serve

    # Logs go to stderr (PyTriton's and ours); stdout stays free for whoever wraps the server.
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(name)s %(levelname)s: %(message)s")
    serve(ServeConfig(model=args.model, name=args.name, host=args.host, http_port=args.http_port,
                      grpc_port=args.grpc_port, metrics_port=args.metrics_port, max_batch_size=args.max_batch_size,
                      queue_delay_us=args.queue_delay_us, threads=args.threads, provider=args.provider))
