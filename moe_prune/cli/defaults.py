"""The defaults `moe-prune --help` shows, kept here rather than imported: the CLI (and `serve`) must not import
torch. tests/test_heal.py checks they equal selection.calibration.RULES / DEFAULT_RULE / DEFAULT_SEARCH and
HealConfig().
"""

from __future__ import annotations

import argparse

CALIBRATION_RULES = ("loss", "reconstruct", "output", "mass")
DEFAULT_RULE = "loss"
LOSS_SEARCH = "256,2,2"  # the loss rule's DEFAULT_SEARCH: inputs, candidates, rounds
HEAL_DEFAULTS = argparse.Namespace(steps=3000, lr=1e-2, temperature=2.0, parts="experts+router+head", seed=0,
                                   held_out=0.1, max_epochs=20.0,
                                   patience=3)

# The Soft MoE ViT for 28x28 inputs: 49 patches + a class token, Soft MoE in the last 3 of 4 blocks.
VIT_DEFAULTS = dict(
    img_size=28, patch_size=4, in_chans=1, num_classes=10, embed_dim=64, depth=4, num_heads=4, mlp_ratio=2.0,
    moe_layer_index=1, slots_per_expert=1,
)
