"""moe-prune: run Soft Mixture-of-Experts models with 1/8 of their experts, export them to ONNX, measure.

The public API, re-exported from the modules that implement it. Names are imported on first use (PEP 562), so
`import moe_prune` costs nothing and a serving environment without torch can import the package and its CLI.
"""

from importlib import import_module

from .errors import (
    CheckpointError, ConfigError, DataError, DefaultedWarning, ExportError, MoePruneError, OutputError, SelectionError,
    ServeError,
)
from .version import __version__


# public name -> the module that defines it
_EXPORTS = {
    **dict.fromkeys(["CheckpointFile", "load", "save"], "core.checkpoint"),
    **dict.fromkeys(["convert_file", "from_bwconrad", "from_lucidrains"], "core.library_files"),
    **dict.fromkeys(["summary"], "core.summary"),
    **dict.fromkeys(["convert"], "core.convert"),
    **dict.fromkeys(["Batches", "DataOptions"], "data.examples"),
    **dict.fromkeys(["open_data"], "data.sources"),
    **dict.fromkeys(["Preprocess"], "core.preprocess"),
    **dict.fromkeys(["measure"], "measurement.accuracy"),
    **dict.fromkeys(["choose_subsets"], "selection.calibration"),
    **dict.fromkeys(["compress_layer"], "core.subsets"),
    **dict.fromkeys(["compress_and_heal", "compress_file", "compress_model", "static_subsets"],
                    "compression.compress"),
    **dict.fromkeys(["HealConfig", "heal"], "compression.healing"),
    **dict.fromkeys(["QuantConfig", "quantize_", "quantize_file"], "compression.quantize"),
    **dict.fromkeys(["export_onnx"], "onnx.export"),
    **dict.fromkeys(["ExportConfig", "export"], "onnx.stage"),
    **dict.fromkeys(["CompressConfig", "compress"], "compression.stage"),
    **dict.fromkeys(["SoftMoE", "SoftMoEConfig"], "core.layers"),
    **dict.fromkeys(["MnistConfig", "MnistSoftMoE", "SoftMoEViT", "ViTConfig", "build", "model_spec", "moe_layers"],
                    "core.models"),
    **dict.fromkeys(["PrunedSoftMoE", "calibrate", "expert_scores", "parse_keep", "select_experts", "with_experts",
                     "with_selection"], "selection.scores"),
    **dict.fromkeys(["write_triton_repo"], "serving.repository"),
    **dict.fromkeys(["Predictor"], "serving.predictor"),
    **dict.fromkeys(["ServeConfig", "serve_model"], "serving.server"),
    **dict.fromkeys(["validate_onnx"], "onnx.validate"),
}


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'moe_prune' has no attribute {name!r}")
    value = getattr(import_module(f".{module}", __name__), "serve" if name == "serve_model" else name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__():
    return sorted([*globals(), *_EXPORTS])


__all__ = sorted([
    "CheckpointError", "ConfigError", "DataError", "DefaultedWarning", "ExportError", "MoePruneError", "OutputError", "SelectionError",
    "ServeError", *_EXPORTS,
])
