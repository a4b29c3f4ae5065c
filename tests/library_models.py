"""What Soft MoE users have, built with the real libraries: their checkpoint files (a real PyTorch Lightning
checkpoint, torch.save files, sharded safetensors) around the soft-moe ViT fixture, and models of their own
with soft-moe / soft-moe-pytorch layers inside.

soft-moe's package imports timm (whose torchvision does not install beside the CPU torch build), so its layer
module is loaded by path after `pip install --no-deps soft-moe`; soft-moe-pytorch installs with einops.
"""

from __future__ import annotations

import importlib.util
import json
import pathlib

import numpy as np
import pytest
import torch
from torch import nn

from conftest import FIXTURES

VIT = FIXTURES / "bwconrad_vit_mnist"


def vit_fixture():
    """(state dict, constructor kwargs, input, output) of the soft-moe SoftMoEVisionTransformer fixture."""
    from safetensors.torch import load_file

    kwargs = json.loads((VIT / "config.json").read_text())["kwargs"]
    x = torch.from_numpy(np.load(VIT / "input.npy"))
    y = torch.from_numpy(np.load(VIT / "output.npy"))
    return load_file(VIT / "model.safetensors"), kwargs, x, y


def soft_moe_layer_module():
    """soft-moe's `soft_moe/soft_moe.py` (SoftMoELayerWrapper), loaded by path: its package imports timm."""
    spec = importlib.util.find_spec("soft_moe")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("soft-moe is not installed (pip install --no-deps soft-moe)")
    path = pathlib.Path(next(iter(spec.submodule_search_locations))) / "soft_moe.py"
    module_spec = importlib.util.spec_from_file_location("soft_moe_layer", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


def soft_moe_pytorch():
    return pytest.importorskip("soft_moe_pytorch", reason="soft-moe-pytorch is not installed")


class Shell(nn.Module):
    """A module whose parameters have exactly the given state dict's names (nested submodules): the weights of a
    library model whose class cannot be built here (soft-moe's ViT needs timm), held as a training loop holds
    them."""

    def __init__(self, state: dict[str, torch.Tensor]):
        super().__init__()
        for name, t in state.items():
            *path, leaf = name.split(".")
            owner = self
            for part in path:
                if not hasattr(owner, part):
                    owner.add_module(part, nn.Module())
                owner = getattr(owner, part)
            owner.register_parameter(leaf, nn.Parameter(t.clone()))


def lightning_checkpoint(path, state: dict, hparams: dict, ema_state: dict | None = None) -> pathlib.Path:
    """A real PyTorch Lightning checkpoint: a LightningModule holding the weights as `self.model` (and an EMA copy
    as `self.model_ema.module`, timm's ModelEmaV2 layout), a loss with a weight buffer beside them, hyper-parameters
    saved with save_hyperparameters, one optimizer step of Adam at learning rate 0 (optimizer state, loops and
    callbacks in the file; the weights unchanged), written by Trainer.save_checkpoint."""
    pl = pytest.importorskip("pytorch_lightning", reason="pytorch-lightning is not installed")

    class Ema(nn.Module):
        def __init__(self, s):
            super().__init__()
            self.module = Shell(s)

    class Module(pl.LightningModule):
        def __init__(self, **hp):
            super().__init__()
            self.save_hyperparameters()
            self.model = Shell(state)
            self.criterion = nn.CrossEntropyLoss(weight=torch.ones(10))
            if ema_state is not None:
                self.model_ema = Ema(ema_state)

        def training_step(self, batch, _):
            return sum((p * 0).sum() for p in self.model.parameters()) + batch.sum() * 0

        def configure_optimizers(self):
            return torch.optim.Adam(self.model.parameters(), lr=0.0)

    module = Module(**hparams)
    trainer = pl.Trainer(max_steps=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False)
    loader = torch.utils.data.DataLoader(torch.zeros(2, 1, requires_grad=False), batch_size=2)
    trainer.fit(module, loader)
    for name, t in state.items():  # lr 0: one real optimizer step that changed nothing
        assert torch.equal(module.model.get_parameter(name).detach(), t)
    trainer.save_checkpoint(path)
    return pathlib.Path(path)


class Mlp(nn.Module):
    """timm's Mlp as users pass it to soft-moe (fc1, act, drop1, norm, fc2, drop2)."""

    def __init__(self, in_features, hidden_features, act_layer=nn.GELU, bias=True, drop=0.0):
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features, bias=bias)
        self.act = act_layer()
        self.drop1 = nn.Dropout(drop)
        self.norm = nn.Identity()
        self.fc2 = nn.Linear(hidden_features, in_features, bias=bias)
        self.drop2 = nn.Dropout(drop)

    def forward(self, x):
        return self.drop2(self.fc2(self.norm(self.drop1(self.act(self.fc1(x))))))


def relu_mlp(width, hidden):
    """A user's own expert: any two-Linear MLP with a known activation (SoftMoELayerWrapper passes its keyword
    arguments to it; `dim` is the wrapper's own)."""
    return nn.Sequential(nn.Linear(width, hidden), nn.ReLU(), nn.Dropout(0.1), nn.Linear(hidden, width))


class UserNet(nn.Module):
    """A small image classifier of a user's own, with Soft MoE layers of both libraries inside its blocks.

    images [B, 1, 16, 16] -> 16 patches of 16 -> width 32 -> block(soft-moe) -> block(soft-moe-pytorch) -> 10 classes
    """

    def __init__(self, expert: str = "timm", lucidrains: dict | None = None, experts: int = 16):
        super().__init__()
        sm, smp = soft_moe_layer_module(), soft_moe_pytorch()
        D = 32
        self.embed = nn.Linear(16, D)
        if expert == "timm":
            layer = sm.SoftMoELayerWrapper(dim=D, num_experts=experts, slots_per_expert=2, layer=Mlp,
                                           in_features=D, hidden_features=48)
        else:
            layer = sm.SoftMoELayerWrapper(dim=D, num_experts=experts, slots_per_expert=2, layer=relu_mlp, width=D,
                                           hidden=40)
        self.blocks = nn.ModuleList([nn.ModuleDict({"norm": nn.LayerNorm(D), "moe": layer}),
                                     nn.ModuleDict({"norm": nn.LayerNorm(D),
                                                    "moe": smp.SoftMoE(dim=D, num_experts=experts,
                                                                       **(lucidrains or {"num_slots": 1}))})])
        self.head = nn.Linear(D, 10)

    def forward(self, images):
        B = images.shape[0]
        t = images.reshape(B, 1, 4, 4, 4, 4).permute(0, 2, 4, 1, 3, 5).reshape(B, 16, 16)
        t = self.embed(t)
        for block in self.blocks:
            t = t + block["moe"](block["norm"](t))
        return self.head(t.mean(1))


def soft_moe_vit_state(model) -> dict[str, torch.Tensor]:
    """A moe-prune SoftMoEViT's weights in soft-moe's own layout (each expert a timm Mlp: fc1 [H, D], fc2 [D, H]):
    the state dict soft_moe.SoftMoEVisionTransformer would have saved for these weights."""
    from moe_prune.core.models import moe_layers

    state = {}
    moe = moe_layers(model)
    for name, t in model.state_dict().items():
        owner = next((n for n in moe if name.startswith(n + ".experts.")), None)
        if owner is None:
            state[name] = t.clone()
            continue
        key = name.rsplit(".", 1)[1]
        fc, part = {"w1": ("fc1", "weight"), "b1": ("fc1", "bias"), "w2": ("fc2", "weight"), "b2": ("fc2", "bias")}[key]
        for e in range(t.shape[0]):
            state[f"{owner}.experts.{e}.{fc}.{part}"] = (t[e].T if part == "weight" else t[e]).clone()
    return state
