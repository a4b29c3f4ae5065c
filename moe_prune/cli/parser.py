"""The `moe-prune` command: argparse only. Each subcommand parses, calls one library function, prints.

Errors a user can cause (moe_prune.errors) print as one line on stderr with exit status 2.
"""

from __future__ import annotations

import argparse
import json
import sys

from ..errors import MoePruneError
from .commands import (
    cmd_info, cmd_convert, cmd_train, cmd_eval, cmd_demo, cmd_bench, cmd_compress, cmd_export, cmd_serve,
)
from .defaults import CALIBRATION_RULES, DEFAULT_RULE, HEAL_DEFAULTS, LOSS_SEARCH, VIT_DEFAULTS


def _floats(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of numbers, e.g. 0.485,0.456,0.406") from None


def _search(text: str) -> dict:
    """--search INPUTS,CANDIDATES,ROUNDS -> the loss rule's search settings."""
    try:
        inputs, candidates, rounds = (int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: give three integers, INPUTS,CANDIDATES,ROUNDS (e.g. 256,2,2)")
    if inputs < 1 or candidates < 1 or rounds < 0:
        raise argparse.ArgumentTypeError(f"{text!r}: INPUTS and CANDIDATES must be at least 1, ROUNDS at least 0")
    return {"limit": inputs, "candidates": candidates, "rounds": rounds or None}


def _non_negative(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{value} must be 0 or more")
    return value


def _int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of integers") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: give positive integers, e.g. 2,4,8")
    return values


def _csv(text: str) -> list[str]:
    return [v.strip() for v in text.split(",") if v.strip()]


class _Help(argparse.HelpFormatter):
    """Every option with a default value ends its help with "(default: X)"; flags are off unless given."""

    def _get_help_string(self, action):
        text = action.help or ""
        default = action.default
        if "%(default)" in text or any(default is v for v in (None, False, argparse.SUPPRESS)) or not action.option_strings:
            return text
        shown = ",".join(map(str, default)) if isinstance(default, (list, tuple)) else default
        return f"{text} (default: {shown})".replace("%", "%%")


class _Parser(argparse.ArgumentParser):
    """argparse, with a usage error printed as one line like every other error (exit status 2)."""

    def error(self, message):
        self.exit(2, f"moe-prune: error: {self.prog}: {message}; see `{self.prog} --help`\n")


OUT_RULE = ("a FILE.{suffix} is written exactly there (atomically); an existing folder or a path ending in '/' "
            "gets {name} inside it (a missing folder is created, and removed again if the run fails)")


def build_parser() -> argparse.ArgumentParser:
    from ..version import __version__

    p = _Parser(
        prog="moe-prune", formatter_class=_Help,
        description="Run Soft MoE models with a fraction of their experts (Chung et al., TMLR 2025): "
        "inspect, convert, select, compress, export to ONNX, benchmark, serve. Errors a user can cause print one line "
        "and exit with status 2; outputs appear only when a run succeeds.",
    )
    p.add_argument("--version", action="version", version=f"moe-prune {__version__}")
    p.add_argument("--traceback", action="store_true", help="show the full traceback of an error (for bug reports)")
    # --traceback is also accepted after COMMAND; SUPPRESS keeps the subcommand from resetting the global flag.
    common = _Parser(add_help=False)
    common.add_argument("--traceback", action="store_true", default=argparse.SUPPRESS,
                        help="show the full traceback of an error (for bug reports)")
    # How to read a checkpoint saved by another library: every command that takes a checkpoint has these.
    source = _Parser(add_help=False)
    source.add_argument("--kwargs", help="for a soft-moe / soft-moe-pytorch checkpoint: constructor arguments its "
                        "tensor shapes cannot tell, as inline JSON or a JSON file (a soft-moe ViT's num_heads and "
                        "global_pool); everything else is read from the file, see `moe-prune info`")
    source.add_argument("--ema", action="store_true", help="take the checkpoint's EMA weights (an EMA entry such as "
                        "state_dict_ema, or names under a prefix such as model_ema.)")
    source.add_argument("--from", dest="source_format", choices=["auto", "bwconrad", "lucidrains"], default="auto",
                        help="which library saved a checkpoint that is not moe-prune's: bwconrad (soft-moe), "
                        "lucidrains (soft-moe-pytorch), or auto (from its tensor names)")
    # The model's own input preprocessing (timm's evaluation transform), over what the checkpoint records.
    preprocessing = _Parser(add_help=False)
    preprocessing.add_argument("--mean", type=_floats, help="per-channel mean the model was trained with, e.g. "
                               "0.485,0.456,0.406 (default: the checkpoint's record; moe-prune's own models 0, "
                               "converted soft-moe ViTs timm's 0.5); written into every checkpoint the run makes")
    preprocessing.add_argument("--std", type=_floats, help="per-channel std, e.g. 0.229,0.224,0.225 (default: as --mean)")
    preprocessing.add_argument("--interpolation", choices=["nearest", "bilinear", "bicubic", "lanczos", "box", "hamming"],
                               help="resize filter (default: the checkpoint's record; converted ViTs bicubic)")
    preprocessing.add_argument("--crop-pct", type=float, help="center crop share: images are resized to input/crop_pct, "
                               "then center-cropped (default: the checkpoint's record; converted ViTs 0.9)")
    # How image folders are read.
    reading = _Parser(add_help=False)
    reading.add_argument("--workers", type=int, help="threads decoding images (default: up to 4, one per core)")
    reading.add_argument("--skip-bad", action="store_true", help="leave out images that cannot be decoded (counted "
                         "and reported) instead of stopping at the first")
    reading.add_argument("--cache-mb", type=float, default=1024.0, help="keep a data set decoded in memory when it "
                         "fits this many MB; larger ones are decoded again at each pass (memory stays one batch)")
    # Where the models run.
    running = _Parser(add_help=False)
    running.add_argument("--device", default="auto", help="where torch computes: cpu, cuda, cuda:N, or auto (the "
                         "first GPU torch sees, else the CPU)")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=_Parser)

    def command(name, checkpoint: bool = False, data: bool = False, preprocess: bool = False, device: bool = False,
                **kw):
        parents = [common] + ([source] if checkpoint else []) + ([preprocessing] if preprocess else []) \
            + ([reading] if data else []) + ([running] if device else [])
        return sub.add_parser(name, parents=parents, formatter_class=_Help, **kw)

    s = command("demo", checkpoint=True, device=True, help="the whole flow on the bundled checkpoint: select 1/8, compress, export, measure",
                description="Load a checkpoint (default: the small Fashion-MNIST model shipped with moe-prune), "
                "calibrate on half of the bundled sample and keep the top experts of every Soft MoE layer, write "
                "the compressed checkpoint, measure accuracy kept on the other half (beside random subsets and "
                "no experts), export full and reduced models to ONNX, validate them and benchmark them. The model "
                "must take 28x28 one-channel images.")
    s.add_argument("--checkpoint", help="a checkpoint of a 28x28 one-channel image classifier, moe-prune's or "
                   "another library's (default: the bundled one)")
    s.add_argument("--keep", default="1/8", help="fraction or count of experts to keep")
    s.add_argument("--mode", choices=["drop", "renorm"], default="drop", help="drop (the paper) or renorm")
    s.add_argument("--out-dir", default="demo-output", help="the folder the outputs go to")
    s.add_argument("--no-export", action="store_true", help="skip the ONNX export and benchmark")
    s.add_argument("--no-bench", action="store_true", help="export and validate, but skip the benchmark")
    s.add_argument("--heal-steps", type=_non_negative, default=HEAL_DEFAULTS.steps,
                   help="distillation steps for the healed checkpoint (0: no healing)")
    s.set_defaults(func=cmd_demo)

    s = command("compress", checkpoint=True, data=True, preprocess=True, device=True, help="calibrate, keep the best experts of every Soft MoE layer, write a smaller checkpoint",
                description="Choose every Soft MoE layer's experts on calibration data by a rule (see --rule; "
                "layers in order, each on the inputs it sees after the earlier ones are pruned), optionally recover the lost accuracy by "
                "distillation from the full model on the same unlabeled images (--heal: only the kept experts "
                "router and head are trained), and write a native checkpoint holding only those experts (re-indexed; "
                "their original ids in its metadata, see `moe-prune info --json`). drop mode keeps all of the "
                "router (the combine denominator needs every slot); renorm keeps only the kept columns. The "
                "input is never modified; the output is written atomically. Under torchrun the calibration is sharded "
                "over the processes (torchrun --nproc-per-node N --no-python moe-prune compress ...); with --rule mass "
                "the result equals one process's exactly; --heal runs data-parallel over the processes (the same result to "
                "float rounding) and rank 0 writes.")
    s.add_argument("checkpoint", help="the checkpoint (moe-prune's .safetensors, or a soft-moe / soft-moe-pytorch checkpoint: .safetensors, sharded index, .pt/.pth/.bin, Lightning .ckpt)")
    s.add_argument("--keep", default="1/8", help="fraction ('1/8', 0.125) or count (16) of experts to keep")
    s.add_argument("--calib", help="calibration data (labels unused; required, except with --quantize alone, which "
                   "quantizes the experts the checkpoint holds): a folder of images (PNG, JPEG, "
                   "WebP, BMP, GIF; in class sub-folders or not, recursive; its train/ if it has train/ and val/), a "
                   ".txt listing image paths, a .npy/.npz (uint8 images NHW, NHWC or NCHW; or float model inputs as "
                   "they are, e.g. tokens [N, M, D] for a bare Soft MoE layer), 'fashion-mnist' or 'mnist' (train "
                   "split), an IDX folder, or 'sample' (the bundled images 0-499; 500-999 are its test half). Images go through the model's own "
                   "preprocessing (see --mean)")
    s.add_argument("--calib-limit", type=int, default=10000, help="use at most this many calibration inputs (of a "
                   "folder: spread evenly over it, so every class is in)")
    s.add_argument("--batch-size", type=int, default=256, help="calibration batch size")
    s.add_argument("--mode", choices=["drop", "renorm"], default="drop", help="drop (the paper) or renorm")
    s.add_argument("--rule", choices=list(CALIBRATION_RULES), default=DEFAULT_RULE,
                   help="how the kept experts are chosen, and what it costs: loss (greedy on the model's distillation "
                   "loss, searched as --search says; about 5x mass's time with the default search on the study's "
                   "ViTs), reconstruct (greedy on each layer's output error; one pass over the data per Soft MoE "
                   "layer), output (combine weight x slot output size; one pass), mass (the paper's combine mass; "
                   "one pass); the default measured best (README, 'Compressed checkpoints')")
    s.add_argument("--search", type=_search, default=LOSS_SEARCH, metavar="INPUTS,CANDIDATES,ROUNDS",
                   help="the loss rule's search: calibration inputs it runs on, candidates run per step, rounds per "
                   "layer (0: one round per kept expert, the thorough search; 2048,8,0 about 100x mass's time, "
                   "README 'What calibration costs')")
    s.add_argument("--budget", choices=["per-layer", "global"], default="per-layer",
                   help="per-layer: every Soft MoE layer keeps --keep of its experts; global (with --rule loss): the "
                   "same expert FLOPs in all, spent where the distillation loss drops most, so layers may keep "
                   "different numbers")
    s.add_argument("--heal", action="store_true", help="distill the full model into the compressed one on the "
                   "calibration images (KL of the logits at a temperature; Adam); with a data set as --calib, "
                   "accuracy before and after on its test split goes into the metadata")
    s.add_argument("--heal-steps", type=int, default=HEAL_DEFAULTS.steps, help="Adam steps of --heal")
    s.add_argument("--heal-lr", type=float, default=HEAL_DEFAULTS.lr, help="Adam learning rate of --heal")
    s.add_argument("--heal-temperature", type=float, default=HEAL_DEFAULTS.temperature, help="softmax temperature of --heal")
    s.add_argument("--heal-parts", choices=["experts", "experts+router", "experts+router+head"],
                   default=HEAL_DEFAULTS.parts, help="what --heal trains: the kept experts; also the routers (phi, "
                   "scale); also the classifier head. Everything else stays frozen")
    s.add_argument("--heal-seed", type=int, default=HEAL_DEFAULTS.seed, help="seed of --heal's batch order")
    s.add_argument("--heal-held-out", type=float, default=HEAL_DEFAULTS.held_out, help="share of the calibration "
                   "inputs --heal never trains on: their loss is measured every tenth of the steps and the best "
                   "weights kept (the unhealed ones if healing never beats them); 0: none")
    s.add_argument("--heal-max-epochs", type=float, default=HEAL_DEFAULTS.max_epochs, help="at most this many "
                   "passes of --heal over the calibration inputs, whatever --heal-steps says; 0: no cap")
    s.add_argument("--heal-patience", type=_non_negative, default=HEAL_DEFAULTS.patience, help="stop --heal once "
                   "this many held-out measurements in a row did not improve on the best; 0: run every step")
    s.add_argument("--out", required=True, help="the output: " + OUT_RULE.format(
        suffix="safetensors", name="NAME.keepKofN.MODE.safetensors"))
    s.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], help="the output's weights (default: the checkpoint's "
                   "own; calibration and healing compute in fp32 either way)")
    s.add_argument("--quantize", choices=["int8"], help="store the kept experts' weights as int8 with one scale per "
                   "output channel (a quarter of their bytes; router, norms and head keep --dtype), after calibration "
                   "and healing, which run in float. Without --calib: quantize the experts the checkpoint holds "
                   "(e.g. a compressed checkpoint), nothing chosen. `export` keeps them int8 (integer matmuls for large experts)")
    s.set_defaults(func=cmd_compress)

    s = command("bench", checkpoint=True, device=True, help="latency of the full, compressed, Algorithm 2 and Algorithm 1 models side by side, against the bounds",
                description="Export the full model, its reduced version (a compressed checkpoint, or one made "
                "here by calibrating on the bundled sample), the Algorithm 2 (per batch) and the Algorithm 1 (per input) "
                "models to ONNX, validate them, "
                "then time them alternately on ONNX Runtime and in PyTorch eager at each batch size. Prints "
                "p50/p90/p99 latency, throughput, peak memory and the speedup over the full model beside its "
                "analytic bounds (FLOP ratio, weight-bytes ratio and the roofline of this machine's measured peak and "
                "bandwidth, whole model and the Soft MoE layer alone). "
                "A bare Soft MoE layer is timed on random tokens [B, 16, D]. "
                "Writes bench.json, bench.md and bench.png (with matplotlib) to --out-dir.")
    s.add_argument("checkpoint", help="the full checkpoint (moe-prune's .safetensors, or a soft-moe / soft-moe-pytorch checkpoint: .safetensors, sharded index, .pt/.pth/.bin, Lightning .ckpt)")
    s.add_argument("--compressed", help="its compressed checkpoint (checked to come from CHECKPOINT; default: made "
                   "here, see above)")
    s.add_argument("--keep", default="1/8", help="experts kept")
    s.add_argument("--mode", choices=["drop", "renorm"], default="drop", help="drop (the paper) or renorm")
    s.add_argument("--batch-sizes", type=_int_list, default=[1, 8, 32], help="comma-separated batch sizes")
    s.add_argument("--provider", choices=["cpu", "cuda", "tensorrt"], default="cpu",
                   help="ONNX Runtime execution provider (cuda/tensorrt need the [gpu] extra and an NVIDIA GPU)")
    s.add_argument("--threads", type=int, help="intra-op threads for ONNX Runtime and torch (default: theirs)")
    s.add_argument("--min-seconds", type=float, default=2.0, help="time each model at least this long per batch size")
    s.add_argument("--no-layer", action="store_true", help="skip the Soft MoE layer-alone comparison")
    s.add_argument("--out-dir", default="bench-output", help="the folder the outputs go to")
    s.set_defaults(func=cmd_bench)

    s = command("info", checkpoint=True, help="print a checkpoint's architecture, Soft MoE layers, experts and parameters",
                description="Print a checkpoint's architecture, its Soft MoE layers (experts, slots, "
                "hidden width, kept experts of a compressed checkpoint) and parameter counts. The header is "
                "checked against the architecture as `load` checks it. For a soft-moe or soft-moe-pytorch "
                "checkpoint (any format: .safetensors, sharded, .pt/.pth/.bin read with torch.load(weights_only=True), "
                "Lightning .ckpt), also what was found: the file's format, the library, the prefix its names carry, "
                "and each constructor argument with its source (the tensor shapes, the checkpoint's "
                "hyper_parameters, --kwargs, or the library's default).")
    s.add_argument("checkpoint", help="a checkpoint (moe-prune's .safetensors, or a soft-moe / soft-moe-pytorch checkpoint: .safetensors, sharded index, .pt/.pth/.bin, Lightning .ckpt)")
    s.add_argument("--json", action="store_true", help="print JSON instead of a table")
    s.set_defaults(func=cmd_info)

    s = command("convert", checkpoint=True, preprocess=True, help="convert a soft-moe / soft-moe-pytorch checkpoint to the native format",
                description="Convert a checkpoint of soft_moe.SoftMoEVisionTransformer or SoftMoELayerWrapper "
                "(bwconrad) or soft_moe_pytorch.SoftMoE (lucidrains) to a native checkpoint, which carries "
                "its architecture and keeps the file's dtype. Every command reads such checkpoints directly; "
                "converting saves re-reading them. The architecture comes from the tensor shapes; what they "
                "cannot tell (a ViT's num_heads, global_pool) from the checkpoint's hyper_parameters, --kwargs, "
                "or the library's default, and the output says which.")
    s.add_argument("source", help="the library's checkpoint: .safetensors (or a sharded index), .pt/.pth/.bin, or a "
                   "Lightning .ckpt")
    s.add_argument("--out", required=True, help="the output: " + OUT_RULE.format(
        suffix="safetensors", name="SOURCE.native.safetensors"))
    s.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], help="the output's weights (default: the source's)")
    s.set_defaults(func=cmd_convert)

    s = command("train", device=True, help="train Soft MoE classifiers (Chung et al.'s MNIST family, or the ViT) on IDX data",
                description="Train one model per expert count with Adam (Chung et al.'s setup), evaluating on "
                "the test split after each epoch. Writes OUT_DIR/{model}-e{n}.safetensors with the test accuracy, "
                "history and command in its metadata; a killed run resumes from its last completed epoch.")
    s.add_argument("--model", choices=["mnist", "vit"], default="mnist",
                   help="mnist: Chung et al.'s 4-token model with experts of width 784/n; vit: a Soft MoE ViT for 28x28")
    s.add_argument("--experts", type=_int_list, default=[2, 4, 8, 16, 32, 64, 128, 256, 512],
                   help="comma-separated expert counts, one model each")
    s.add_argument("--data", default="fashion-mnist",
                   help="'fashion-mnist' (Debian's dataset-fashion-mnist), 'mnist', or a folder of the four IDX files")
    s.add_argument("--vit", help="ViT constructor arguments as JSON, over the defaults " + json.dumps(VIT_DEFAULTS))
    s.add_argument("--scale-init", type=float, default=1.0,
                   help="initial router scale (inverse softmax temperature) of every Soft MoE layer; 1 as in "
                   "soft-moe and vmoe. Larger values start with sharper routing")
    s.add_argument("--epochs", type=int, default=15, help="epochs per model")
    s.add_argument("--batch-size", type=int, default=256, help="training batch size")
    s.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate")
    s.add_argument("--seed", type=int, default=0, help="seed of the initial weights and of the batch order")
    s.add_argument("--validation", type=int, default=0, help="hold out the last N training images (never trained "
                   "on): the validation split that later choices (calibration rules, heal settings) are made on; "
                   "recorded in the checkpoint")
    s.add_argument("--out-dir", default="runs", help="the folder the checkpoints go to")
    s.set_defaults(func=cmd_train)

    s = command("eval", checkpoint=True, data=True, preprocess=True, device=True, help="the paper's accuracy study: Algorithms 1 and 2, static and random subsets, k = 0",
                description="For each checkpoint and each k: accuracy with Algorithm 1 (per-input top k), "
                "Algorithm 2 (per-batch top k, at several batch sizes), the static subset calibrated on --calib, "
                "and random subsets (mean ± std over seeds), in drop and renorm modes; beside the full model "
                "and the no-experts baseline (k = 0). For models with at most 16 experts every k from 1 to n-1. "
                "Writes eval.json, eval.md and eval.png (with matplotlib) to --out-dir.")
    s.add_argument("checkpoints", nargs="+", help="checkpoints of image classifiers (moe-prune's .safetensors, or a soft-moe / soft-moe-pytorch checkpoint: .safetensors, sharded index, .pt/.pth/.bin, Lightning .ckpt)")
    s.add_argument("--data", default="fashion-mnist", help="labelled test data: a folder of images in class "
                   "sub-folders (its val/ or test/ if it has them; classes sorted by name as torchvision's ImageFolder, "
                   "or named by a classes.txt, one per line in the model's class order), 'fashion-mnist', 'mnist', "
                   "'sample' (the bundled images 500-999; its calibration half is 0-499), an IDX folder, or an .npz "
                   "with `images` and `labels`")
    s.add_argument("--calib", help="calibration data for the static subset (see compress --calib; a folder's train/; "
                   "default: --data, whose train split or train/ folder is used when it has one)")
    s.add_argument("--calib-limit", type=int, default=10000, help="use at most this many calibration inputs")
    s.add_argument("--keep", type=_csv, default=["1/2", "1/4", "1/8"], help="comma-separated fractions or counts")
    s.add_argument("--modes", type=_csv, default=["drop", "renorm"], help="drop and/or renorm")
    s.add_argument("--batch-sizes", type=_int_list, default=[1, 32, 256], help="batch sizes for Algorithm 2")
    s.add_argument("--random-seeds", type=int, default=10, help="random subsets per k (at least 1)")
    s.add_argument("--out-dir", default="eval", help="the folder eval.json, eval.md and eval.png go to")
    s.set_defaults(func=cmd_eval)

    s = command("export", checkpoint=True, preprocess=True, help="export a checkpoint to ONNX (full, compressed, or Algorithm 1 or 2 in the graph) and validate it",
                description="Export a native checkpoint (full or compressed) to ONNX with a dynamic batch axis "
                "(input 'input', output 'output'), then check it: the ONNX checker, and ONNX Runtime against "
                "PyTorch on random batches of two batch sizes. With --keep and --dynamic the graph runs "
                "Chung et al.'s Algorithm 2 per batch (scores, TopK, only the kept experts computed), or with "
                "--per input Algorithm 1 (each input's own top experts, only its kept slots computed), and "
                "also outputs the chosen expert ids of each layer ('experts.<layer>'). A large model's weights "
                "go to OUT.data beside it. With --preprocess the graph takes uint8 pixels [B, H, W, C] and "
                "normalizes them itself (the checkpoint's mean/std, or --mean/--std); every file records its "
                "preprocessing in its metadata (moe_prune.preprocess), which moe_prune.Predictor reads to "
                "resize, crop and normalize images of any size. The model appears at --out only when it passed "
                "validation (see --keep-invalid); exit status 2 if validation fails.")
    s.add_argument("checkpoint", help="a checkpoint, full or compressed (moe-prune's .safetensors, or a soft-moe / soft-moe-pytorch checkpoint: .safetensors, sharded index, .pt/.pth/.bin, Lightning .ckpt)")
    s.add_argument("--out", required=True, help="onnx: " + OUT_RULE.format(suffix="onnx", name="NAME.onnx")
                   + "; triton-repo: the repository folder")
    s.add_argument("--keep", help="with --dynamic: experts to keep per batch in every layer, a fraction (1/8) or a count")
    s.add_argument("--dynamic", action="store_true", help="select the experts inside the graph (see --per)")
    s.add_argument("--per", choices=("batch", "input"), default="batch",
                   help="with --dynamic: 'batch' (Algorithm 2, one subset per batch) or 'input' (Algorithm 1, each "
                        "input its own experts at about the cost of a shared subset; answers do not depend on the "
                        "other inputs of a batch, the one to serve behind dynamic batching)")
    s.add_argument("--mode", choices=["drop", "renorm"], help="with --keep: drop (the paper; the default) or renorm")
    s.add_argument("--opset", type=int, default=18, help="ONNX opset")
    s.add_argument("--exporter", choices=["torchscript", "dynamo"], default="torchscript",
                   help="torchscript (exports every moe-prune model, folds static subsets) or dynamo (torch.export)")
    s.add_argument("--atol", type=float, default=1e-4, help="validation tolerance of an fp32 graph, 0 or more (rtol is "
                   "1e-3); an fp16 graph is validated at atol = rtol = 2e-2")
    s.add_argument("--dtype", choices=["fp32", "fp16"], default="fp32", help="the graph's weights and input: fp16 "
                   "halves the file and is what GPUs without bf16 (RTX 2080 Ti) serve; validated against PyTorch in fp16")
    s.add_argument("--no-validate", action="store_true", help="skip the validation")
    s.add_argument("--keep-invalid", action="store_true",
                   help="write the model to --out even when it fails validation (for inspection; the error says where)")
    s.add_argument("--format", choices=["onnx", "triton-repo"], default="onnx",
                   help="onnx (a file) or triton-repo: a model repository for NVIDIA Triton Inference Server at --out "
                   "(OUT/NAME/1/model.onnx and OUT/NAME/config.pbtxt, checked with Triton's own ModelConfig protobuf)")
    s.add_argument("--name", help="with triton-repo: the model's name (default: the checkpoint's file name)")
    s.add_argument("--instance-kind", choices=["cpu", "gpu"], default="cpu", help="with triton-repo: KIND_CPU or KIND_GPU")
    s.add_argument("--max-batch-size", type=int, default=64, help="with triton-repo: the largest dynamic batch (at least 1)")
    s.add_argument("--preprocess", action="store_true",
                   help="put the model's input normalization inside the graph: its input becomes uint8 pixels "
                   "[B, H, W, C] at the model's input size (/ 255, NHWC -> NCHW and (x - mean) / std run in the graph; "
                   "resize and crop stay outside, e.g. in moe_prune.Predictor). Validation feeds random pixels "
                   "and compares with PyTorch on the same pixels normalized in numpy. Without it the file still "
                   "records the preprocessing in its metadata (moe_prune.preprocess); --mean, --std, "
                   "--interpolation and --crop-pct override the checkpoint's")
    s.set_defaults(func=cmd_export)

    s = command("serve", help="serve an ONNX model on NVIDIA Triton Inference Server (PyTriton), HTTP and gRPC, no torch",
                description="Start Triton Inference Server (the tritonserver binary that the nvidia-pytriton "
                "package ships) with MODEL.onnx bound to it: ONNX Runtime runs in this process, Triton forms "
                "dynamic batches from queued requests, and the model's input and output names, dtypes and "
                "shapes come from the ONNX graph (GET /v2/models/NAME shows them). Needs neither torch nor "
                "triton: in a clone, pip install --no-deps .; pip install numpy onnxruntime nvidia-pytriton. "
                "Requests of the wrong shape or dtype, or larger than --max-batch-size, get an error answer. "
                "A model exported with --preprocess takes uint8 pixels [B, H, W, C] at its input size. "
                "Ready means answering: /v2/health/ready says 200 only once the model is loaded, and the log "
                "says 'ready' after a first request through the server's own HTTP endpoint was answered. "
                "Logs go to stderr; SIGINT or SIGTERM stops the server cleanly. "
                "Which model: dynamic batching puts a request in one ONNX Runtime call with others, so serve "
                "the full, the compressed or the Algorithm 1 (per input: export --keep 1/8 --dynamic --per "
                "input) model when answers must not depend on what a request is batched with; an Algorithm 2 "
                "(per batch) model picks its experts for the whole server batch.")
    s.add_argument("model", help="the .onnx file (from moe-prune export; its .onnx.data beside it, if any)")
    s.add_argument("--name", help="the model's name on the server (default: the file name without .onnx)")
    s.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0 accepts other machines)")
    s.add_argument("--http-port", type=int, default=8000, help="HTTP/REST (KServe v2) port")
    s.add_argument("--grpc-port", type=int, default=8001, help="gRPC port")
    s.add_argument("--metrics-port", type=int, default=8002, help="Prometheus metrics port")
    s.add_argument("--max-batch-size", type=int, default=64, help="the largest dynamic batch, and request")
    s.add_argument("--queue-delay-us", type=int, default=100,
                   help="how long a request may wait for others to batch with, in microseconds")
    s.add_argument("--threads", type=int, help="ONNX Runtime intra-op threads (default: ONNX Runtime's, one per core)")
    s.add_argument("--provider", choices=["cpu", "cuda"], default="cpu",
                   help="ONNX Runtime execution provider (cuda: onnxruntime-gpu instead of onnxruntime, NVIDIA GPU)")
    s.add_argument("--verbose", action="store_true", help="debug logging")
    s.set_defaults(func=cmd_serve)
    return p


def _warning_line(message, category, filename, lineno, file=None, line=None) -> None:
    """moe-prune's own warnings as one line on stderr, like its errors; others as Python prints them."""
    import warnings

    from ..errors import DefaultedWarning

    if issubclass(category, DefaultedWarning):
        print(f"moe-prune: warning: {message}", file=sys.stderr)
    else:
        sys.stderr.write(warnings.formatwarning(message, category, filename, lineno, line))


def main(argv: list[str] | None = None) -> int:
    import warnings

    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = argv  # what the records say this run was (see _command), not sys.argv of whoever called main
    try:
        with warnings.catch_warnings():
            warnings.showwarning = _warning_line
            args.func(args)
    except MoePruneError as e:
        if args.traceback:
            raise
        print(f"moe-prune: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("moe-prune: interrupted; no output was left half-written", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
