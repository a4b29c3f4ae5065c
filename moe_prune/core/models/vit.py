"""Soft MoE Vision Transformer, numerically and by parameter name the model of `soft_moe.SoftMoEVisionTransformer`
(PyPI soft-moe 0.0.1, bwconrad; built on timm's ViT Block), without depending on timm or soft-moe.

Parameter names match the source library's state dict except inside Soft MoE layers, whose experts are stacked
(`blocks.{i}.mlp.experts.w1` [E, D, H] instead of `blocks.{i}.mlp.experts.{e}.fc1.weight` [H, D]);
`moe_prune.from_bwconrad` converts. `model.blocks[i].mlp` is block i's MLP or Soft MoE layer, as in the source.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from ...errors import ConfigError
from ..layers import SoftMoE, SoftMoEConfig


def _pair(v) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else tuple(v)


@dataclass(frozen=True)
class ViTConfig:
    """The constructor arguments of soft_moe.SoftMoEVisionTransformer that describe the architecture.

    Dropout and stochastic-depth rates and `weight_init` are kept for the record; inference ignores them.
    Two additions: `moe_mlp_ratio` (expert hidden width / embed_dim; None: mlp_ratio, as in soft-moe) and
    `moe_dispatch_input` ("normalized" as soft-moe, or "raw" as google-research/vmoe).

    Example:
        >>> cfg = ViTConfig(num_experts=16, moe_layer_index=2, img_size=28, patch_size=4, in_chans=1,
        ...                 num_classes=10, embed_dim=64, depth=4, num_heads=4)
        >>> SoftMoEViT(cfg)(torch.rand(2, 1, 28, 28)).shape
        torch.Size([2, 10])
    """

    num_experts: int = 128
    slots_per_expert: int = 1
    moe_layer_index: int | tuple[int, ...] = 6
    img_size: int | tuple[int, int] = 224
    patch_size: int | tuple[int, int] = 16
    in_chans: int = 3
    num_classes: int = 1000
    global_pool: Literal["", "avg", "token"] = "token"
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    qk_norm: bool = False
    init_values: float | None = None
    class_token: bool = True
    no_embed_class: bool = False
    pre_norm: bool = False
    fc_norm: bool | None = None
    drop_rate: float = 0.0
    pos_drop_rate: float = 0.0
    patch_drop_rate: float = 0.0
    proj_drop_rate: float = 0.0
    attn_drop_rate: float = 0.0
    drop_path_rate: float = 0.0
    weight_init: str = ""
    moe_mlp_ratio: float | None = None
    moe_dispatch_input: Literal["normalized", "raw"] = "normalized"

    def __post_init__(self):
        if isinstance(self.moe_layer_index, list):
            object.__setattr__(self, "moe_layer_index", tuple(self.moe_layer_index))
        for name in ("img_size", "patch_size"):
            if isinstance(getattr(self, name), list):
                object.__setattr__(self, name, tuple(getattr(self, name)))
        if self.global_pool not in ("", "avg", "token"):
            raise ConfigError(f"ViT config: global_pool must be '', 'avg' or 'token', got {self.global_pool!r}")
        if self.global_pool == "token" and not self.class_token:
            raise ConfigError("ViT config: global_pool='token' needs class_token=True")
        if self.embed_dim % self.num_heads:
            raise ConfigError(f"ViT config: embed_dim {self.embed_dim} is not divisible by num_heads {self.num_heads}")
        img, patch = _pair(self.img_size), _pair(self.patch_size)
        if img[0] % patch[0] or img[1] % patch[1]:
            raise ConfigError(f"ViT config: img_size {img} is not a multiple of patch_size {patch}")
        idx = self.moe_layer_index
        if isinstance(idx, tuple):
            if not idx or not all(isinstance(i, int) and 0 <= i < self.depth for i in idx):
                raise ConfigError(f"ViT config: moe_layer_index {list(idx)} must name blocks in [0, {self.depth})")
        elif not (isinstance(idx, int) and 0 <= idx < self.depth):
            raise ConfigError(f"ViT config: moe_layer_index {idx!r} must be in [0, {self.depth})")

    @property
    def moe_blocks(self) -> list[int]:
        """Indices of the blocks whose MLP is a Soft MoE layer (an int means that block and all after it)."""
        idx = self.moe_layer_index
        return sorted(set(idx)) if isinstance(idx, tuple) else list(range(idx, self.depth))

    @property
    def num_patches(self) -> int:
        img, patch = _pair(self.img_size), _pair(self.patch_size)
        return (img[0] // patch[0]) * (img[1] // patch[1])

    @property
    def num_prefix_tokens(self) -> int:
        return 1 if self.class_token else 0

    @property
    def tokens(self) -> int:
        return self.num_patches + self.num_prefix_tokens

    def moe_config(self) -> SoftMoEConfig:
        ratio = self.mlp_ratio if self.moe_mlp_ratio is None else self.moe_mlp_ratio
        return SoftMoEConfig(
            dim=self.embed_dim, num_experts=self.num_experts, slots_per_expert=self.slots_per_expert,
            hidden=int(self.embed_dim * ratio), expert="gelu_mlp", dispatch_input=self.moe_dispatch_input,
        )

    def to_dict(self) -> dict:
        d = asdict(self)
        for k, v in d.items():
            if isinstance(v, tuple):
                d[k] = list(v)
        return d


def _layer_norm(dim: int) -> nn.LayerNorm:
    return nn.LayerNorm(dim, eps=1e-6)  # timm's ViT uses eps 1e-6


class PatchEmbed(nn.Module):
    def __init__(self, cfg: ViTConfig):
        super().__init__()
        patch = _pair(cfg.patch_size)
        self.proj = nn.Conv2d(cfg.in_chans, cfg.embed_dim, patch, stride=patch, bias=not cfg.pre_norm)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)  # [B, C, H, W] -> [B, N, D]


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))


class Attention(nn.Module):
    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.num_heads = cfg.num_heads
        self.head_dim = cfg.embed_dim // cfg.num_heads
        self.qkv = nn.Linear(cfg.embed_dim, 3 * cfg.embed_dim, bias=cfg.qkv_bias)
        self.q_norm = _layer_norm(self.head_dim) if cfg.qk_norm else nn.Identity()
        self.k_norm = _layer_norm(self.head_dim) if cfg.qk_norm else nn.Identity()
        self.proj = nn.Linear(cfg.embed_dim, cfg.embed_dim)

    def forward(self, x):
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # each [B, heads, N, head_dim]
        q, k = self.q_norm(q), self.k_norm(k)
        x = F.scaled_dot_product_attention(q, k, v)
        return self.proj(x.transpose(1, 2).reshape(B, N, C))


class LayerScale(nn.Module):
    def __init__(self, dim: int, init_values: float):
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), float(init_values)))

    def forward(self, x):
        return x * self.gamma


class Block(nn.Module):
    def __init__(self, cfg: ViTConfig, mlp: nn.Module):
        super().__init__()
        self.norm1 = _layer_norm(cfg.embed_dim)
        self.attn = Attention(cfg)
        self.ls1 = LayerScale(cfg.embed_dim, cfg.init_values) if cfg.init_values else nn.Identity()
        self.norm2 = _layer_norm(cfg.embed_dim)
        self.mlp = mlp
        self.ls2 = LayerScale(cfg.embed_dim, cfg.init_values) if cfg.init_values else nn.Identity()

    def forward(self, x):
        x = x + self.ls1(self.attn(self.norm1(x)))
        return x + self.ls2(self.mlp(self.norm2(x)))


class SoftMoEViT(nn.Module):
    """A ViT whose blocks `cfg.moe_blocks` have a Soft MoE layer as their MLP.

    Args:
        config: the architecture.
        moe: optional per-layer Soft MoE configs by module name (`blocks.{i}.mlp`), e.g. for compressed layers;
            layers not named use `config.moe_config()`.
    """

    def __init__(self, config: ViTConfig, moe: dict[str, SoftMoEConfig] | None = None):
        super().__init__()
        self.config = cfg = config
        moe = moe or {}
        unknown = set(moe) - {f"blocks.{i}.mlp" for i in cfg.moe_blocks}
        if unknown:
            raise ConfigError(f"ViT config: Soft MoE configs given for {sorted(unknown)}, which are not MoE blocks")
        D = cfg.embed_dim
        self.patch_embed = PatchEmbed(cfg)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, D)) if cfg.class_token else None
        embed_len = cfg.num_patches if cfg.no_embed_class else cfg.tokens
        self.pos_embed = nn.Parameter(torch.randn(1, embed_len, D) * 0.02)
        self.norm_pre = _layer_norm(D) if cfg.pre_norm else nn.Identity()
        blocks = []
        for i in range(cfg.depth):
            if i in cfg.moe_blocks:
                layer_cfg = moe.get(f"blocks.{i}.mlp") or cfg.moe_config()
                if layer_cfg.dim != D or layer_cfg.out_features != D:
                    raise ConfigError(f"ViT config: Soft MoE layer blocks.{i}.mlp maps {layer_cfg.dim} -> "
                                      f"{layer_cfg.out_features}, the model width is {D}")
                mlp = SoftMoE(layer_cfg)
            else:
                mlp = Mlp(D, int(D * cfg.mlp_ratio))
            blocks.append(Block(cfg, mlp))
        self.blocks = nn.Sequential(*blocks)
        use_fc_norm = cfg.global_pool == "avg" if cfg.fc_norm is None else cfg.fc_norm
        self.norm = _layer_norm(D) if not use_fc_norm else nn.Identity()
        self.fc_norm = _layer_norm(D) if use_fc_norm else nn.Identity()
        self.head = nn.Linear(D, cfg.num_classes) if cfg.num_classes > 0 else nn.Identity()

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """images [B, C, H, W] -> tokens [B, M, D] after the final norm."""
        x = self.patch_embed(x.to(self.pos_embed.dtype))  # [B, N, D]; float32 images into a half-precision model
        if self.config.no_embed_class:
            x = x + self.pos_embed
            if self.cls_token is not None:
                x = torch.cat((self.cls_token.expand(x.shape[0], -1, -1), x), dim=1)
        else:
            if self.cls_token is not None:
                x = torch.cat((self.cls_token.expand(x.shape[0], -1, -1), x), dim=1)
            x = x + self.pos_embed
        x = self.norm_pre(x)
        x = self.blocks(x)
        return self.norm(x)

    def forward_head(self, x: torch.Tensor) -> torch.Tensor:
        if self.config.global_pool == "avg":
            x = x[:, self.config.num_prefix_tokens:].mean(dim=1)
        elif self.config.global_pool == "token":
            x = x[:, 0]
        return self.head(self.fc_norm(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))
