"""Write the kind of file a soft-moe user has: a PyTorch Lightning checkpoint (`last.ckpt`) of a LightningModule
that trains a soft-moe SoftMoEVisionTransformer as `self.model`, with its hyper-parameters, optimizer state and
loops inside. Then moe-prune reads it directly:

    python examples/lightning_checkpoint.py last.ckpt            # needs pytorch-lightning (uses tests/fixtures)
    moe-prune info last.ckpt
    moe-prune compress last.ckpt --calib sample --out small.safetensors
    moe-prune export small.safetensors --out small.onnx

soft-moe's ViT class needs timm, whose torchvision does not install beside the CPU torch build here, so the
weights come from the shared fixture (made by the real soft-moe 0.0.1) and sit in a module with the library's
parameter names; with timm installed, `self.model = soft_moe.SoftMoEVisionTransformer(**kwargs)` is the same.
"""

import argparse
import json
import pathlib

import pytorch_lightning as pl
import torch
from safetensors.torch import load_file
from torch import nn

FIXTURE = pathlib.Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "bwconrad_vit_mnist"


def module_with(state: dict) -> nn.Module:
    """An nn.Module whose state_dict() is `state` (names and all)."""
    root = nn.Module()
    for name, t in state.items():
        *path, leaf = name.split(".")
        owner = root
        for part in path:
            if not hasattr(owner, part):
                owner.add_module(part, nn.Module())
            owner = getattr(owner, part)
        owner.register_parameter(leaf, nn.Parameter(t.clone()))
    return root


class Classifier(pl.LightningModule):
    def __init__(self, lr: float = 1e-3, **vit_kwargs):
        super().__init__()
        self.save_hyperparameters()  # the ViT's arguments travel in the checkpoint
        self.model = module_with(load_file(FIXTURE / "model.safetensors"))
        self.criterion = nn.CrossEntropyLoss()

    def training_step(self, batch, _):  # one step at learning rate 0: optimizer state in the file, weights as trained
        return sum((p * 0).sum() for p in self.model.parameters()) + batch.sum() * 0

    def configure_optimizers(self):
        return torch.optim.AdamW(self.model.parameters(), lr=0.0)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", nargs="?", default="last.ckpt", help="the checkpoint to write")
    args = p.parse_args()
    kwargs = {**json.loads((FIXTURE / "config.json").read_text())["kwargs"], "global_pool": "token"}
    module = Classifier(**kwargs)
    trainer = pl.Trainer(max_steps=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, torch.utils.data.DataLoader(torch.zeros(2, 1), batch_size=2))
    trainer.save_checkpoint(args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
