"""Typed errors: every problem a user can cause is one of these, raised where it is found.

Each message names the file or value at fault and says how to fix it; the CLI prints it on one line and
exits with status 2. `first_line` puts a third-party cause (an exporter's, ONNX Runtime's) into such a
message.
"""


class MoePruneError(Exception):
    """Base class of every error moe-prune raises on purpose."""


class CheckpointError(MoePruneError):
    """A checkpoint file is missing, unreadable, corrupted, pickled, or does not match its config."""


class ConfigError(MoePruneError):
    """An architecture config is incomplete or contradicts itself or the tensors."""


class SelectionError(MoePruneError):
    """An expert count or fraction (`keep`) or a set of scores cannot give a valid selection."""


class DataError(MoePruneError):
    """A data set is missing, malformed, or does not fit the model."""


class ExportError(MoePruneError):
    """An ONNX export failed, or its validation against PyTorch did not pass."""


class OutputError(MoePruneError):
    """An output path cannot be written safely (it is the input, its folder is missing or read-only, ...)."""


class ServeError(MoePruneError):
    """A model cannot be served (not an ONNX model, no batch axis, ...) or the inference server did not start."""


class DefaultedWarning(UserWarning):
    """A checkpoint's architecture used a library default for a value that changes the outputs (a ViT's
    num_heads): nothing in the file said otherwise, and no check can tell whether it is right."""


def first_line(e: BaseException) -> str:
    """The root cause of a third-party error in one line, for a typed error's message (torch.export and onnx
    wrap the cause in pages of advice).

    Example:
        >>> raise ExportError(f"{path}: the ONNX checker rejects it: {first_line(e)}") from e
    """
    while e.__cause__ is not None:
        e = e.__cause__
    line = next((ln.strip() for ln in str(e).splitlines() if ln.strip()), "")
    text = f"{type(e).__name__}: {line[:300]}" if line else type(e).__name__
    if "data-dependent" in line:
        text += " (the model branches in Python on a tensor value)"
    return text
