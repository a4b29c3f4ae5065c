"""The Python API in one page: load, score, select, run reduced, compress, export, check.

    python examples/quickstart.py            # about half a minute on two CPU cores; writes to quickstart-output/
"""

from pathlib import Path

import torch

import moe_prune as mp
from moe_prune.data import iterate_batches, load_images
from moe_prune.evaluate import accuracy
from moe_prune.pipeline import default_checkpoint


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

    # Static subsets over calibration data, and the model run with them (weights shared, nothing copied).
    subsets, _ = mp.static_subsets(model, [x for x, _ in iterate_batches(calib, None, 250)], "1/8")
    print(f"accuracy: full {accuracy(model, *test):.3f}, static 1/8 {accuracy(mp.with_experts(model, subsets), *test):.3f}, "
          f"per-input 1/8 {accuracy(mp.with_selection(model, '1/8', per='input'), *test):.3f}")

    # A smaller checkpoint, then ONNX, validated against PyTorch.
    small = mp.compress_model(model, subsets)
    mp.save(small, out / "small.safetensors")
    onnx_path = mp.export_onnx(small, out / "small.onnx")
    print(mp.validate_onnx(onnx_path, small).format())
    print("served by ONNX Runtime:", mp.Predictor(onnx_path).predict(test[0][:10]).tolist(), "labels:", test[1][:10].tolist())


if __name__ == "__main__":
    main()
