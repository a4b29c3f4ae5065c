"""Every path keeps its tensors on the model's device: run on a second device (tests/other_device.py: tensors
on cpu:7 that refuse to meet default-CPU tensors, as a GPU's do), every calibration rule, healing, Algorithms 1
and 2, the sparse per-input path, compression and evaluation give what they give on the CPU."""

import copy

import pytest
import torch

import moe_prune
from moe_prune.selection.calibration import RULES, choose_subsets
from moe_prune.measurement.accuracy import measure
from moe_prune.compression.healing import HealConfig
from moe_prune.compression.compress import compress_and_heal, compress_model
from moe_prune.core.models import SoftMoEViT, ViTConfig, moe_layers

from other_device import OTHER, DeviceMixError, other_device, to_other

pytestmark = pytest.mark.usefixtures("one_thread")


def _vit():
    torch.manual_seed(0)
    model = SoftMoEViT(ViTConfig(num_experts=8, slots_per_expert=2, moe_layer_index=1, img_size=16, patch_size=4,
                                 in_chans=1, num_classes=10, embed_dim=32, depth=3, num_heads=2)).eval()
    for layer in moe_layers(model).values():  # the Triton kernels are CUDA's; this device runs torch
        layer.use_triton = False
        layer.experts.use_triton = False
    return model


def _batches(device=None):
    g = torch.Generator().manual_seed(1)
    return [torch.rand(12, 1, 16, 16, generator=g).to(device or "cpu") for _ in range(3)]


def _on_other(fn):
    """fn(model, batches) on the CPU and on the other device."""
    cpu = fn(_vit(), _batches())
    with other_device():
        other = fn(to_other(_vit()), _batches(OTHER))
    return cpu, other


def test_the_other_device_refuses_a_cpu_accumulator():
    def leaky(x):  # the bug this file guards against: an accumulator made without device=
        total = torch.zeros(x.shape[-1])
        total += x.sum(0)
        return total

    with other_device():
        with pytest.raises(DeviceMixError):
            leaky(torch.rand(3, 4, device=OTHER))
        ok = torch.zeros(4, device=OTHER) + torch.rand(3, 4, device=OTHER).sum(0)
        assert ok.device == OTHER


@pytest.mark.parametrize("rule", RULES)
def test_every_rule_runs_on_the_models_device(rule):
    cpu, other = _on_other(lambda m, b: choose_subsets(m, b, "1/4", rule=rule)[0])
    assert {n: s.tolist() for n, s in cpu.items()} == {n: s.tolist() for n, s in other.items()}


@pytest.mark.parametrize("per", ["input", "batch"])
@pytest.mark.parametrize("mode", ["drop", "renorm"])
def test_algorithms_1_and_2_on_the_models_device(per, mode):
    def run(model, batches):
        with torch.no_grad():
            y = moe_prune.with_selection(model, "1/4", per=per, mode=mode)(batches[0])
        assert y.device == batches[0].device
        return y.cpu()

    cpu, other = _on_other(run)
    torch.testing.assert_close(other, cpu)


POLICIES = {  # each execution choice of StackedExperts.grouped, forced by its policy
    "gather": dict(row_gather_limit=1 << 40, loop_overhead=0),
    "loop": dict(row_gather_limit=0, loop_overhead=0),
    "padded": dict(row_gather_limit=0, loop_overhead=None),
    "padded to the batch": dict(row_gather_limit=0, loop_overhead=None, padded_capacity="batch"),
}


@pytest.mark.parametrize("path", sorted(POLICIES))
def test_the_sparse_per_input_path_on_the_models_device(path):
    from moe_prune.core.experts import CPU_POLICY, set_policy

    def run(model, batches):
        set_policy(model, CPU_POLICY, **POLICIES[path])
        layer = moe_layers(model)["blocks.1.mlp"]
        x = batches[0].reshape(12, 16, 16)[:, :, :1].repeat(1, 1, 32) + 0.1 * batches[1].reshape(12, 16, 16).repeat(1, 1, 2)
        keep = torch.stack([torch.randperm(8, generator=torch.Generator().manual_seed(i))[:2].sort().values
                            for i in range(12)])
        with torch.no_grad():
            return layer(x, experts=keep).cpu()

    cpu, other = _on_other(run)
    torch.testing.assert_close(other, cpu)


def test_compress_heal_and_measure_on_the_models_device():
    def run(model, batches):
        subsets, _ = choose_subsets(model, batches, "1/4", rule="mass")
        small, record = compress_and_heal(model, subsets, batches, config=HealConfig(steps=4, lr=1e-3),
                                          progress=False)
        assert {p.device for p in small.parameters()} == {batches[0].device}
        labels = torch.arange(12) % 10
        acc = measure(small, torch.cat(batches[:1]).cpu() if batches[0].device.type == "cpu" else batches[0], labels)
        return record["loss_before"], record["loss_after"], acc["top1"]

    cpu, other = _on_other(run)
    assert other == pytest.approx(cpu, rel=1e-5)


def test_a_copied_model_keeps_its_device():
    with other_device():
        model = to_other(_vit())
        small = compress_model(model, {"blocks.1.mlp": torch.tensor([0, 3]), "blocks.2.mlp": torch.tensor([1, 2])})
        assert {p.device for p in small.parameters()} == {OTHER}
        pruned = moe_prune.with_experts(copy.deepcopy(model), {"blocks.1.mlp": torch.tensor([0, 3]),
                                                                "blocks.2.mlp": torch.tensor([1, 2])})
        with torch.no_grad():
            assert pruned(torch.rand(2, 1, 16, 16, device=OTHER)).device == OTHER


def test_compress_config_device():
    """CompressConfig(device=...): on the device the model is already on, the same result as without it; a bad
    device is one clear error before any work. (Moving to another device runs Module.to, which the stand-in
    device cannot take; make gpu-check compresses a CPU model with device="cuda".)"""
    config = dict(keep="1/4", rule="loss", heal=HealConfig(steps=3, lr=1e-3))
    cpu_small, cpu_record = moe_prune.compress(_vit(), _batches(), moe_prune.CompressConfig(**config))
    small, record = moe_prune.compress(_vit(), _batches(), moe_prune.CompressConfig(**config, device="cpu"))
    assert record["kept_experts"] == cpu_record["kept_experts"]
    x = torch.rand(4, 1, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(small(x), cpu_small(x), rtol=1e-5, atol=1e-6)
    with other_device():
        model = to_other(_vit())
        small, _ = moe_prune.compress(model, _batches(OTHER), moe_prune.CompressConfig(**config, device=str(OTHER)))
        assert {p.device for p in small.parameters()} == {OTHER}
    with pytest.raises(moe_prune.ConfigError, match="device"):
        moe_prune.compress(_vit(), _batches(), moe_prune.CompressConfig(keep="1/4", device="tpu"))
