"""Where code runs: eagerly, traced for an ONNX export, or compiled by torch.compile. Each path forbids something
the others allow (a host synchronisation, a data-dependent shape, a Python loop the graph would unroll).
"""

from __future__ import annotations

import torch


def compiling() -> bool:
    """True while torch.compile traces: no host synchronisation (no .tolist(), no data-dependent shapes)."""
    return torch.compiler.is_compiling()


def check_on_device(ok: torch.Tensor, error: Exception) -> None:
    """Raise `error` unless the boolean tensor `ok` holds, without a host synchronisation where one would cost:
    on CUDA a device-side assert (it fails the stream), in a graph or under torch.compile nothing; on the CPU the
    typed error at once."""
    if in_graph() or compiling():
        return
    if ok.is_cuda:
        torch._assert_async(ok, str(error))
    elif not bool(ok):
        raise error


def in_graph() -> bool:
    """True while torch traces or exports the model: the graph must be plain ONNX operators, shapes dynamic."""
    return torch.jit.is_tracing() or torch.compiler.is_exporting()
