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


# public name -> the module that defines it; one verb per stage of the flow (load -> select -> compress -> export
# -> measure -> serve), with its config. The steps those verbs run stay importable from their modules.
_EXPORTS = {
    # load and convert
    **dict.fromkeys(["CheckpointFile", "load", "save"], "core.checkpoint"),
    **dict.fromkeys(["from_bwconrad", "from_lucidrains"], "core.library_files"),
    **dict.fromkeys(["convert"], "core.convert"),
    **dict.fromkeys(["summary"], "core.summary"),
    **dict.fromkeys(["SoftMoE", "SoftMoEConfig"], "core.layers"),
    **dict.fromkeys(["MnistConfig", "MnistSoftMoE", "SoftMoEViT", "ViTConfig", "build", "model_spec", "moe_layers"],
                    "core.models"),
    **dict.fromkeys(["Preprocess"], "core.preprocess"),
    # data
    **dict.fromkeys(["Batches", "DataOptions"], "data.examples"),
    **dict.fromkeys(["open_data"], "data.sources"),
    # select: per input or per batch at run time, or static subsets chosen on calibration data
    **dict.fromkeys(["PrunedSoftMoE", "expert_scores", "parse_keep", "select_experts", "with_experts",
                     "with_selection"], "selection.scores"),
    **dict.fromkeys(["choose_subsets"], "selection.calibration"),
    # compress (choose, cut, heal, quantize); quantize_ also takes a model compressed before
    **dict.fromkeys(["CompressConfig", "compress"], "compression.stage"),
    **dict.fromkeys(["HealConfig"], "compression.healing"),
    **dict.fromkeys(["QuantConfig", "quantize_"], "compression.quantize"),
    # export (write, validate)
    **dict.fromkeys(["ExportConfig", "export"], "onnx.stage"),
    **dict.fromkeys(["validate_onnx"], "onnx.validate"),
    # measure
    **dict.fromkeys(["measure"], "measurement.accuracy"),
    # serve
    **dict.fromkeys(["write_triton_repo"], "serving.repository"),
    **dict.fromkeys(["Predictor"], "serving.predictor"),
    **dict.fromkeys(["ServeConfig", "serve_model"], "serving.server"),
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
