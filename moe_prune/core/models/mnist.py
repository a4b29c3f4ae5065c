"""Chung et al.'s MNIST model: four 14x14 patches as tokens, one Soft MoE layer, a linear classifier.

    image [B, C, 28, 28] -> tokens [B, 4, 196] -> Soft MoE (E experts, 1 slot each, ReLU experts of width
    int(784 / E), so the experts' parameter count stays about constant across E) -> flatten [B, 784]
    -> Linear(784, 10, bias=False)

No residual, no LayerNorm: the Soft MoE layer is the whole network's hidden computation.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

from ...errors import ConfigError
from ..layers import SoftMoE, SoftMoEConfig


@dataclass(frozen=True)
class MnistConfig:
    """The MNIST-family model.

    Args:
        num_experts: E. The paper's suite uses 2, 4, ..., 512.
        hidden: each expert's hidden width; None means int(784 / num_experts).
        num_classes: classifier outputs.
        img_size, patch_size, in_chans: the image is cut into (img_size / patch_size)**2 tokens of
            in_chans * patch_size**2 values each.
        slots_per_expert: S (the paper: 1).

    Example:
        >>> model = MnistSoftMoE(MnistConfig(num_experts=16))
        >>> model(torch.rand(8, 1, 28, 28)).shape
        torch.Size([8, 10])
    """

    num_experts: int = 16
    hidden: int | None = None
    num_classes: int = 10
    img_size: int = 28
    patch_size: int = 14
    in_chans: int = 1
    slots_per_expert: int = 1

    def __post_init__(self):
        for name in ("num_experts", "num_classes", "img_size", "patch_size", "in_chans", "slots_per_expert"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"MNIST config: {name} must be a positive integer, got {value!r}")
        if self.hidden is not None and (not isinstance(self.hidden, int) or self.hidden < 1):
            raise ConfigError(f"MNIST config: hidden must be a positive integer or null, got {self.hidden!r}")
        if self.img_size % self.patch_size:
            raise ConfigError(f"MNIST config: img_size {self.img_size} is not a multiple of patch {self.patch_size}")
        if self.hidden is None:
            object.__setattr__(self, "hidden", max(1, int(784 / self.num_experts)))

    @property
    def tokens(self) -> int:
        return (self.img_size // self.patch_size) ** 2

    @property
    def token_dim(self) -> int:
        return self.in_chans * self.patch_size**2

    def moe_config(self) -> SoftMoEConfig:
        return SoftMoEConfig(
            dim=self.token_dim, num_experts=self.num_experts, slots_per_expert=self.slots_per_expert,
            hidden=self.hidden, expert="relu_mlp",
        )

    def to_dict(self) -> dict:
        return asdict(self)


class MnistSoftMoE(nn.Module):
    """Chung et al.'s MNIST Soft MoE classifier; `moe` is its one Soft MoE layer."""

    def __init__(self, config: MnistConfig, moe: SoftMoEConfig | None = None):
        super().__init__()
        self.config = config
        moe = moe or config.moe_config()
        if moe.dim != config.token_dim:
            raise ConfigError(f"MNIST config: the Soft MoE layer's dim {moe.dim} is not the token size {config.token_dim}")
        self.moe = SoftMoE(moe)
        self.head = nn.Linear(config.tokens * self.moe.config.out_features, config.num_classes, bias=False)

    def tokens(self, images: torch.Tensor) -> torch.Tensor:
        """images [B, C, H, W] -> tokens [B, (H/P)*(W/P), C*P*P], patches in row-major order."""
        c, p = self.config, self.config.patch_size
        if images.dim() != 4 or tuple(images.shape[1:]) != (c.in_chans, c.img_size, c.img_size):
            raise ValueError(
                f"expected images [B, {c.in_chans}, {c.img_size}, {c.img_size}], got {list(images.shape)}"
            )
        B = images.shape[0]
        g = c.img_size // p
        x = images.reshape(B, c.in_chans, g, p, g, p).permute(0, 2, 4, 1, 3, 5)  # [B, gy, gx, C, P, P]
        return x.reshape(B, g * g, c.in_chans * p * p)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        images = images.to(self.head.weight.dtype)  # float32 images into a half-precision model
        return self.head(self.moe(self.tokens(images)).flatten(1))  # [B, num_classes]
