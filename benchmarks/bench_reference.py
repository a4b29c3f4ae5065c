"""Latency of the reference configurations: full vs reduced (keep 1/8) vs Algorithm 2, against the bounds.

Configurations (issue #5):
  default        the checkpoint shipped with moe-prune (Chung et al.'s MNIST model, trained on Fashion-MNIST)
  vit-s16        Soft MoE ViT-S/16: 224x224, 197 tokens, Soft MoE in the last 6 of 12 blocks, 128 experts x 1 slot
  vit-b16-chung  Chung et al.'s ImageNet model: ViT-B/16, 128 experts of hidden 384 (mlp ratio 0.5) in blocks 6-11
The ViTs have RANDOM weights: latency does not depend on the values, and the reduced model keeps a seeded random
1/8 of the experts. Results go to benchmarks/results/bench_<config>.{json,md,png} with the command and versions.

    python benchmarks/bench_reference.py --config default
    python benchmarks/bench_reference.py --config vit-b16-chung --batch-sizes 1,8,32
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from moe_prune.measurement.bench import BenchSetup, benchmark, reduced_model
from moe_prune.core.checkpoint import load
from moe_prune.core.models import SoftMoEViT, ViTConfig
from moe_prune.flows.demo import default_checkpoint
from moe_prune.measurement.reports import bench_plot, format_bench, write_json, write_text
from moe_prune.measurement.timing import BenchConfig

RESULTS = Path(__file__).resolve().parent / "results"

VITS = {
    "vit-s16": dict(num_experts=128, moe_layer_index=6, img_size=224, patch_size=16, in_chans=3, num_classes=1000,
                    embed_dim=384, depth=12, num_heads=6, mlp_ratio=4.0),
    "vit-b16-chung": dict(num_experts=128, moe_layer_index=6, img_size=224, patch_size=16, in_chans=3,
                          num_classes=1000, embed_dim=768, depth=12, num_heads=12, mlp_ratio=4.0, moe_mlp_ratio=0.5),
}


def soft_moe_status() -> str:
    """soft-moe's own model is the baseline most users run; it needs timm, and timm needs torchvision."""
    try:
        import soft_moe  # noqa: F401
    except Exception as e:  # ImportError, or torchvision failing to load beside this torch
        return (f"not importable here ({type(e).__name__}: {str(e)[:120]}); the 'full, looped experts' row runs the "
                "same weights with soft-moe's Python loop over experts instead")
    return "installed, but not timed: build its SoftMoEVisionTransformer with the same arguments to compare"


def model_for(name: str):
    if name == "default":
        return load(default_checkpoint())
    torch.manual_seed(0)
    return SoftMoEViT(ViTConfig(**VITS[name])).eval()


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", choices=["default", *VITS], default="default")
    p.add_argument("--keep", default="1/8")
    p.add_argument("--mode", choices=["drop", "renorm"], default="drop")
    p.add_argument("--batch-sizes", default="1,8,32")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--provider", default="cpu", choices=["cpu", "cuda", "tensorrt"])
    p.add_argument("--quick", action="store_true", help="few iterations (for the large ViTs on a small CPU)")
    p.add_argument("--work-dir", default="bench-work", help="where the ONNX files go (large; not committed)")
    args = p.parse_args(argv)
    batch_sizes = tuple(int(b) for b in args.batch_sizes.split(","))
    # --quick: 2 rounds of 4 calls per model; the first call after a switch of model runs with cold caches (the
    # full model's expert weights evict the reduced model's), the median of the 8 is a warm one.
    timing = (BenchConfig(batch_sizes=batch_sizes, warmup=1, rounds=2, iters_per_round=4, min_seconds=0.0, threads=args.threads)
              if args.quick else BenchConfig(batch_sizes=batch_sizes, threads=args.threads))
    full = model_for(args.config)
    small, how = reduced_model(full, args.keep, args.mode)
    setup = BenchSetup(keep=args.keep, mode=args.mode, out_dir=str(Path(args.work_dir) / args.config),
                       provider=args.provider, bench=timing, looped_baseline=True)
    result = benchmark(full, small, setup)
    result["soft_moe_package"] = soft_moe_status()
    result.update(config=args.config, architecture=getattr(full, "config").to_dict() if args.config != "default" else "default checkpoint",
                  weights="random" if args.config != "default" else "trained (bundled default)", reduced=how,
                  command="python benchmarks/bench_reference.py " + " ".join(sys.argv[1:] if argv is None else argv))
    RESULTS.mkdir(parents=True, exist_ok=True)
    stem = RESULTS / f"bench_{args.config}"
    write_json(stem.with_suffix(".json"), result)
    header = (f"# Latency: {args.config}\n\nCommand: `{result['command']}`\n\nWeights: {result['weights']}. "
              f"Reduced model: {how}.\n\n")
    write_text(stem.with_suffix(".md"), header + format_bench(result, markdown=True) + "\n")
    bench_plot(result, stem.with_suffix(".png"))
    print(result["text"])


if __name__ == "__main__":
    main()
