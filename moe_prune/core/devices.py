"""Where a run computes: the `--device` of every command that runs a model.

Every stage takes a device and keeps its tensors there (tests/test_devices.py checks it on a stand-in second
device); data is decoded on the host and handed to the model's device a batch at a time.
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import ConfigError


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """The device to compute on: "auto" (or None) is the first GPU when torch sees one, else the CPU.

    Raises:
        ConfigError: an unknown device, or a GPU torch cannot use here (the message says what it can).

    Example:
        >>> resolve_device("auto")
        device(type='cpu')
    """
    if device is None or str(device) == "auto":
        return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    try:
        d = torch.device(device)
    except (RuntimeError, TypeError):
        raise ConfigError(f"--device {device!r}: give cpu, cuda, cuda:N or auto") from None
    if d.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"--device {device}: torch sees no CUDA GPU here (torch {torch.__version__}"
                              f"{', a CPU-only build' if torch.version.cuda is None else ''}); use --device cpu")
        if d.index is not None and d.index >= torch.cuda.device_count():
            raise ConfigError(f"--device {device}: this machine has {torch.cuda.device_count()} GPU(s)")
    elif d.type != "cpu":
        raise ConfigError(f"--device {device}: moe-prune runs on cpu or cuda")
    return d


def device_of(model: nn.Module) -> torch.device:
    """Where a model's weights are (the CPU for a model without any)."""
    return next((p.device for p in model.parameters()), torch.device("cpu"))
