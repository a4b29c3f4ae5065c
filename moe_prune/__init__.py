"""moe-prune: run Soft Mixture-of-Experts models with 1/8 of their experts, export them to ONNX, measure.

The public API, re-exported from the modules that implement it.
"""

from .checkpoint import from_bwconrad, from_lucidrains, load, save, summary
from .errors import (
    CheckpointError, ConfigError, DataError, ExportError, MoePruneError, OutputError, SelectionError,
)
from .compress import compress_file, compress_model, static_subsets
from .export import export_onnx, validate_onnx
from .layers import SoftMoE, SoftMoEConfig
from .models import MnistConfig, MnistSoftMoE, SoftMoEViT, ViTConfig, build, model_spec, moe_layers
from .selection import (
    PrunedSoftMoE, calibrate, expert_scores, parse_keep, select_experts, with_experts, with_selection,
)

from .serve import Predictor, write_triton_repo

__version__ = "0.1.0"

__all__ = [
    "CheckpointError", "ConfigError", "DataError", "ExportError", "MnistConfig", "MnistSoftMoE", "MoePruneError",
    "OutputError", "Predictor", "PrunedSoftMoE", "SelectionError", "SoftMoE", "SoftMoEConfig", "SoftMoEViT", "ViTConfig",
    "build", "calibrate", "compress_file", "compress_model", "expert_scores", "export_onnx", "from_bwconrad", "from_lucidrains", "load", "model_spec", "moe_layers",
    "parse_keep", "save", "select_experts", "static_subsets", "summary", "validate_onnx", "with_experts",
    "with_selection", "write_triton_repo",
]
