"""The Python API in one page: load, score, select, run reduced, compress, heal, export, check.

    python examples/quickstart.py            # about a minute on two CPU cores; writes to quickstart-output/
"""

from pathlib import Path

import torch

import moe_prune as mp
from moe_prune.data.mnist import iterate_batches, load_images
from moe_prune.measurement.accuracy import accuracy
from moe_prune.flows.demo import default_checkpoint


def main() -> None:
    out = Path("quickstart-output")
    out.mkdir(exist_ok=True)
    model = mp.load(default_checkpoint())  # the bundled Fashion-MNIST model
    images, labels = load_images("sample", split="test")  # 1,000 bundled test images
    calib, test = images[:500], (images[500:], labels[500:])

    # Scores: each expert's combine-weight mass for each input, in every Soft MoE layer.
    layers = mp.moe_layers(model)
    name, layer = next(iter(layers.items()))
    tokens = {}
    handle = layer.register_forward_pre_hook(lambda mod, args: tokens.setdefault("x", args[0]))
    with torch.no_grad():
        model(next(iterate_batches(calib, None, 8))[0])
    handle.remove()
    scores = mp.expert_scores(layer, tokens["x"])  # [8, E]; each row sums to the token count
    print(f"{name}: scores {tuple(scores.shape)}, row sums {scores.sum(-1)[:3].tolist()}")
    print("Algorithm 1 (per input):", mp.select_experts(scores, "1/8", per="input")[:2].tolist())
    print("Algorithm 2 (per batch):", mp.select_experts(scores, "1/8", per="batch").tolist())

    # Static subsets over calibration data: the paper's combine mass, and the default rule ("loss").
    batches = [x for x, _ in iterate_batches(calib, None, 250)]
    by_mass, _ = mp.choose_subsets(model, batches, "1/8", rule="mass")
    subsets, _ = mp.choose_subsets(model, batches, "1/8")
    print(f"accuracy: full {accuracy(model, *test):.3f}, static 1/8 by mass {accuracy(mp.with_experts(model, by_mass), *test):.3f}, "
          f"by the default rule {accuracy(mp.with_experts(model, subsets), *test):.3f}, "
          f"per-input 1/8 {accuracy(mp.with_selection(model, '1/8', per='input'), *test):.3f}")

    # A smaller checkpoint, healed by distillation from the full model on the calibration images, then ONNX,
    # validated against PyTorch.
    # One verb per stage: compress (choose by the default rule, cut, heal) and export (write, validate).
    small, record = mp.compress(model, batches, mp.CompressConfig(keep="1/8", heal=mp.HealConfig(steps=1000)))
    healed = record["heal"]
    print(f"healed: distillation loss {healed['loss_before']:.3f} -> {healed['loss_after']:.3f}, "
          f"accuracy {accuracy(small, *test):.3f}")
    mp.save(small, out / "small.safetensors", meta=record)
    onnx_path, report = mp.export(small, out / "small.onnx")
    print(report.format())
    print("served by ONNX Runtime:", mp.Predictor(onnx_path).predict(test[0][:10]).tolist(), "labels:", test[1][:10].tolist())


if __name__ == "__main__":
    main()
