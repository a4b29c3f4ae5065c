"""The `moe-prune` command: argparse only. Each subcommand parses, calls one library function, prints.

Errors a user can cause (moe_prune.errors) print as one line on stderr with exit status 2.
"""

from __future__ import annotations

import argparse
import json
import sys

from .errors import ConfigError, MoePruneError


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


def cmd_info(args) -> None:
    from .checkpoint import summary
    from .reports import format_summary

    s = summary(args.checkpoint)
    print(json.dumps(s, indent=2) if args.json else format_summary(s))


def cmd_convert(args) -> None:
    from .checkpoint import convert

    model, source = convert(args.source, args.out, args.source_format, _json_arg(args.kwargs))
    print(f"converted {args.source} ({source}) -> {args.out}")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="moe-prune",
        description="Run Soft MoE models with a fraction of their experts (Chung et al., TMLR 2025): "
        "inspect, convert, select, compress, export to ONNX, benchmark.",
    )
    p.add_argument("--traceback", action="store_true", help="show the full traceback of an error (for bug reports)")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    s = sub.add_parser("info", help="print a checkpoint's architecture, Soft MoE layers, experts and parameters",
                       description="Print a native checkpoint's architecture, its Soft MoE layers (experts, slots, "
                       "hidden width, kept experts of a compressed checkpoint) and parameter counts.")
    s.add_argument("checkpoint", help="a native .safetensors checkpoint")
    s.add_argument("--json", action="store_true", help="print JSON instead of a table")
    s.set_defaults(func=cmd_info)

    s = sub.add_parser("convert", help="convert a soft-moe / soft-moe-pytorch checkpoint to the native format",
                       description="Convert a safetensors state dict saved from soft_moe.SoftMoEVisionTransformer "
                       "(bwconrad) or soft_moe_pytorch.SoftMoE (lucidrains) to a native checkpoint, which carries "
                       "its architecture. The source library's constructor arguments are needed: pass them with --kwargs.")
    s.add_argument("source", help="the library's state dict as .safetensors")
    s.add_argument("--from", dest="source_format", choices=["auto", "bwconrad", "lucidrains"], default="auto",
                   help="which library saved it (default: detect from the tensor names)")
    s.add_argument("--kwargs", required=True,
                   help="the model's constructor keyword arguments: inline JSON ('{\"num_experts\": 16, ...}') or a "
                   "JSON file (an object, or {\"kwargs\": {...}} as in shared/fixtures/*/config.json)")
    s.add_argument("--out", required=True, help="the native .safetensors file to write (atomically)")
    s.set_defaults(func=cmd_convert)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
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
