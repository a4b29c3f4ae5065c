"""moe-prune: run Soft Mixture-of-Experts models with 1/8 of their experts, export them to ONNX, measure.

The public API, re-exported from the modules that implement it.
"""

from .checkpoint import from_bwconrad, from_lucidrains, load, save, summary
from .errors import (
    CheckpointError, ConfigError, DataError, ExportError, MoePruneError, OutputError, SelectionError,
)
from .layers import SoftMoE, SoftMoEConfig
from .models import MnistConfig, MnistSoftMoE, SoftMoEViT, ViTConfig, build, model_spec, moe_layers
from .selection import (
    PrunedSoftMoE, calibrate, expert_scores, parse_keep, select_experts, with_experts, with_selection,
)

__version__ = "0.1.0"

__all__ = [
    "CheckpointError", "ConfigError", "DataError", "ExportError", "MnistConfig", "MnistSoftMoE", "MoePruneError",
    "OutputError", "PrunedSoftMoE", "SelectionError", "SoftMoE", "SoftMoEConfig", "SoftMoEViT", "ViTConfig",
    "build", "calibrate", "expert_scores", "from_bwconrad", "from_lucidrains", "load", "model_spec", "moe_layers",
    "parse_keep", "save", "select_experts", "summary", "with_experts", "with_selection",
]
