"""Serving (Triton model repository, ONNX Runtime predictor) and calibration sharded over processes."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import moe_prune
from moe_prune.compression.compress import compress_model
from moe_prune.core.models import MnistConfig, MnistSoftMoE
from moe_prune.selection.scores import calibrate, with_selection
from moe_prune.serving.predictor import Predictor
from moe_prune.serving.repository import model_config, parse_model_config, write_triton_repo

from conftest import importable

# Each capability gates only the tests that use it: parsing a Triton config needs tritonclient (the [serve] extra);
# the torchrun calibration tests need torch.distributed with gloo and the console script, not tritonclient.




HAS_TRITONCLIENT = importable("tritonclient.grpc")
needs_tritonclient = pytest.mark.skipif(not HAS_TRITONCLIENT,
                                        reason="tritonclient[grpc] (the [serve] extra) is needed to parse configs")
HAS_GLOO = torch.distributed.is_available() and torch.distributed.is_gloo_available()
needs_gloo = pytest.mark.skipif(not HAS_GLOO, reason="torchrun on the CPU needs torch.distributed with gloo")
MOE_PRUNE = Path(sys.executable).with_name("moe-prune")
needs_cli = pytest.mark.skipif(not MOE_PRUNE.is_file(), reason=f"the moe-prune console script is not at {MOE_PRUNE}")


def tiny():
    return MnistSoftMoE(MnistConfig(num_experts=16)).eval()


@needs_tritonclient
@pytest.mark.parametrize("variant", ["compressed", "alg2"])
@pytest.mark.parametrize("kind", ["cpu", "gpu"])
def test_triton_repo_config_parses_and_names_the_tensors(tmp_path, variant, kind):
    model = tiny()
    served = compress_model(model, {"moe": torch.tensor([1, 5, 9, 12])}) if variant == "compressed" else \
        with_selection(model, "1/4", per="batch")
    root = write_triton_repo(served, tmp_path / "repo", "fmnist_small", kind=kind, max_batch_size=32)
    assert (root / "1" / "model.onnx").is_file()
    cfg = parse_model_config((root / "config.pbtxt").read_text())
    assert cfg.name == "fmnist_small" and cfg.backend == "onnxruntime" and cfg.max_batch_size == 32
    assert [(i.name, list(i.dims)) for i in cfg.input] == [("input", [1, 28, 28])]
    assert [(o.name, list(o.dims)) for o in cfg.output] == [("output", [10])]
    assert cfg.input[0].data_type == cfg.output[0].data_type == 11  # TYPE_FP32 in Triton's DataType enum
    assert cfg.HasField("dynamic_batching")
    assert cfg.instance_group[0].kind == (1 if kind == "gpu" else 2)  # KIND_GPU = 1, KIND_CPU = 2
    assert sorted(p.name for p in (tmp_path / "repo").iterdir()) == ["fmnist_small"]  # no staging left


@needs_tritonclient  # write_triton_repo parses the config it writes
def test_triton_repo_replaces_a_model_whole(tmp_path):
    write_triton_repo(tiny(), tmp_path, "m")
    first = (tmp_path / "m" / "1" / "model.onnx").read_bytes()
    write_triton_repo(compress_model(tiny(), {"moe": torch.tensor([0, 3])}), tmp_path, "m")
    assert (tmp_path / "m" / "1" / "model.onnx").read_bytes() != first
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]


@needs_tritonclient
def test_config_parser_rejects_garbage():
    with pytest.raises(moe_prune.ExportError):
        parse_model_config("name: 'x' max_batch_size: lots")


def test_fixed_batch_model_is_refused(tmp_path):
    from moe_prune.onnx.export import export_onnx

    path = export_onnx(tiny(), tmp_path / "fixed.onnx", dynamic_batch=False)
    with pytest.raises(moe_prune.ExportError, match="batch"):
        model_config("m", path)


def test_predictor_matches_pytorch(tmp_path):
    from moe_prune.data.mnist import load_images, to_tensor
    from moe_prune.onnx.export import export_onnx

    model = compress_model(tiny(), {"moe": torch.tensor([2, 3, 7])})
    path = export_onnx(model, tmp_path / "m.onnx")
    images, _ = load_images("sample", split="test")
    images = images[:64]
    with torch.no_grad():
        ref = model(to_tensor(images))
    p = Predictor(path)
    np.testing.assert_allclose(p.logits(images), ref.numpy(), atol=1e-5, rtol=1e-4)
    assert (p.predict(images) == ref.argmax(-1).numpy()).all()
    assert p.predict(images[0]).shape == (1,)  # one image
    np.testing.assert_allclose(p.predict_proba(images).sum(-1), 1, rtol=1e-5)


def test_calibration_sums_are_exact_and_order_free():
    model = tiny()
    batches = [torch.rand(8, 1, 28, 28, generator=torch.Generator().manual_seed(i)) for i in range(6)]
    a = calibrate(model, batches)
    b = calibrate(model, list(reversed(batches)))
    assert torch.equal(a["moe"], b["moe"])  # integer accumulation: bit for bit, whatever the order


def _one_and_two_processes(tmp_path, seed: int, options: list) -> tuple[dict, dict]:
    """`moe-prune compress` of a tiny model, once in one process and once under torchrun with 2 CPU processes
    (gloo); the summaries of one.safetensors and two.safetensors."""
    src = moe_prune.save(tiny(), tmp_path / "m.safetensors")
    calib = tmp_path / "calib.npy"
    np.save(calib, (np.random.default_rng(seed).random((100, 28, 28)) * 255).astype(np.uint8))
    exe = str(MOE_PRUNE)
    args = ["compress", str(src), "--keep", "1/4", "--calib", str(calib), "--batch-size", "16", *options]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    one = subprocess.run([exe, *args, "--out", str(tmp_path / "one.safetensors")], capture_output=True, text=True, env=env)
    assert one.returncode == 0, one.stderr
    two = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "--no-python", exe, *args,
         "--out", str(tmp_path / "two.safetensors")], capture_output=True, text=True, env=env, timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]
    return moe_prune.summary(tmp_path / "one.safetensors"), moe_prune.summary(tmp_path / "two.safetensors")


@pytest.mark.slow
@needs_gloo
@needs_cli
def test_two_process_calibration_equals_one_process(tmp_path):
    """torchrun with 2 CPU processes (gloo): the compressed checkpoint equals the single-process one."""
    # --rule mass sums in fixed point (bit-exact over any sharding); the other rules all-reduce float64 sums
    a, b = _one_and_two_processes(tmp_path, 0, ["--rule", "mass"])
    assert a["meta"]["calibration_scores"] == b["meta"]["calibration_scores"]
    assert a["moe_layers"][0]["kept_original_ids"] == b["moe_layers"][0]["kept_original_ids"]
    assert json.dumps(a["moe_layers"]) == json.dumps(b["moe_layers"])


@pytest.mark.slow
@needs_gloo
@needs_cli
@pytest.mark.parametrize("rule, extra", [("reconstruct", []), ("output", []),
                                         ("loss", ["--heal", "--heal-steps", "20", "--heal-held-out", "0"])])
def test_two_process_rules_and_healing_equal_one_process(tmp_path, rule, extra):
    """torchrun, the other rules: `reconstruct` and `output` all-reduce float64 sums (the subset equals one process's),
    `loss` shards its chunks and all-reduces its KL sums and gradient predictions, and healing runs data-parallel
    (each rank half of every batch, gradients summed: the healed weights equal one process's to float rounding)."""
    a, b = _one_and_two_processes(tmp_path, 1, ["--rule", rule, *extra])
    assert a["moe_layers"][0]["kept_original_ids"] == b["moe_layers"][0]["kept_original_ids"]
    assert a["meta"]["rule"] == b["meta"]["rule"] == rule
    # the sums themselves: each rank saw half the batches, so a missing all-reduce shows here
    if rule == "output":
        assert np.allclose(a["meta"]["calibration_scores"]["moe"], b["meta"]["calibration_scores"]["moe"], rtol=1e-9)
    if rule == "reconstruct":
        ea, eb = a["meta"]["relative_output_error"]["moe"], b["meta"]["relative_output_error"]["moe"]
        assert ea["error"] == pytest.approx(eb["error"], rel=1e-9) and ea["error_mass"] == pytest.approx(eb["error_mass"], rel=1e-9)
    if extra:
        x, y = moe_prune.load(tmp_path / "one.safetensors"), moe_prune.load(tmp_path / "two.safetensors")
        full = moe_prune.load(tmp_path / "m.safetensors")
        for (name, p), q in zip(x.state_dict().items(), y.state_dict().values()):
            torch.testing.assert_close(q, p, rtol=1e-4, atol=1e-6, msg=name)
        # and the healing did move the kept experts (equal weights would also come from no healing at all)
        kept = x.moe.config.origin
        assert not torch.allclose(x.moe.experts.w1, full.moe.experts.w1[list(kept)])
        assert b["meta"]["heal"]["config"]["steps"] == 20
        assert b["meta"]["heal"]["loss_before"] == pytest.approx(a["meta"]["heal"]["loss_before"], rel=1e-9)
        # a KL of about 1e-6: float rounding of the summed gradients shows in its third digit
        assert b["meta"]["heal"]["loss_after"] == pytest.approx(a["meta"]["heal"]["loss_after"], rel=1e-2)
