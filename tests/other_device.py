"""A second device on a CPU-only machine, to catch code that mixes devices: tensors on `OTHER` (cpu:7, standing in
for a GPU) compute on the CPU with real numbers, and refuse to meet a tensor of the default CPU in any op that a
real CUDA device refuses.

    with other_device():
        model = to_other(model)                # parameters and buffers move to OTHER
        x = torch.randn(4, 8, device=OTHER)    # factories with device=OTHER (or x.device) make them too
        model(x)                               # an accumulator left on the CPU raises DeviceMixError

Real CUDA allows two mixes, and so does this: a 0-dim CPU tensor (a scalar) as an operand, and CPU index tensors
in advanced indexing (`x[idx]`). `.cpu()`, `.tolist()`, `.item()` give real values, so whole calibration rules,
healing and compression run and can be compared with a plain CPU run. (A fake "cuda" device is not possible
here: a CPU-only torch refuses CUDA device guards, which indexing takes; cpu:7 has none.)
"""

from __future__ import annotations

import contextlib

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten, tree_map

OTHER = torch.device("cpu", 7)


class DeviceMixError(RuntimeError):
    """A tensor of the default CPU met an OTHER tensor in an op that a real second device would refuse."""


class OtherDeviceTensor(torch.Tensor):
    """A CPU tensor that reports device OTHER."""

    @staticmethod
    def __new__(cls, elem: torch.Tensor):
        return torch.Tensor._make_wrapper_subclass(cls, elem.shape, strides=elem.stride(),
                                                   storage_offset=elem.storage_offset(), dtype=elem.dtype,
                                                   layout=elem.layout, device=OTHER, requires_grad=elem.requires_grad)

    def __init__(self, elem: torch.Tensor):
        self.elem = elem

    def __repr__(self):
        return f"OtherDeviceTensor({self.elem!r})"

    def tolist(self):  # a host copy, as CUDA's tolist is (torch refuses it on subclasses by default)
        return self.elem.tolist()

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        return _run(func, args, kwargs or {})


def _is_other(t) -> bool:
    return isinstance(t, OtherDeviceTensor)


def _wants_other(device) -> bool:
    try:
        return device is not None and torch.device(device) == OTHER
    except (RuntimeError, TypeError):
        return False


def _wrap(out):
    return tree_map(lambda t: OtherDeviceTensor(t) if isinstance(t, torch.Tensor) and not _is_other(t) else t, out)


# aten ops in which real CUDA accepts CPU index tensors beside a CUDA tensor.
_CPU_INDICES_OK = ("aten.index.Tensor", "aten.index_put.default", "aten.index_put_.default",
                   "aten._index_put_impl_.default")


def _mixed(func, args, kwargs) -> torch.Tensor | None:
    """The first CPU tensor that a real second device would refuse in this call, or None."""
    if str(func) in _CPU_INDICES_OK:
        # x[idx] / x[idx] = v: CPU indices are moved to x's device; x and v must share a device
        self_, indices = args[0], args[1]
        rest = [t for t in tree_flatten((args[2:], kwargs))[0] if isinstance(t, torch.Tensor) and t.dim() > 0]
        on_other = _is_other(self_)
        bad = [t for t in rest if _is_other(t) != on_other]
        if not on_other:
            bad += [t for t in tree_flatten(indices)[0] if isinstance(t, torch.Tensor) and _is_other(t)]
        return bad[0] if bad else None
    tensors = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
    if any(_is_other(t) for t in tensors):
        return next((t for t in tensors if not _is_other(t) and t.dim() > 0), None)
    return None


def _run(func, args, kwargs):
    tensors = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
    others = [t for t in tensors if _is_other(t)]
    bad = _mixed(func, args, kwargs)
    if bad is not None:
        raise DeviceMixError(f"{func}: a tensor {list(bad.shape)} on {'the other device' if _is_other(bad) else 'the CPU'} "
                             "met tensors on another device")
    target = kwargs.get("device")
    plain_args, plain_kwargs = tree_map(lambda t: t.elem if _is_other(t) else t, (args, kwargs))
    if _wants_other(target):
        plain_kwargs = {**plain_kwargs, "device": torch.device("cpu")}
    out = func(*plain_args, **plain_kwargs)
    if target is not None and not _wants_other(target):
        return out  # copied to the CPU on purpose (.cpu(), .to("cpu"))
    return _wrap(out) if others or _wants_other(target) else out


class _Factories(TorchFunctionMode):
    """Calls that ask for OTHER (factories, `.to(OTHER)`) make OtherDeviceTensors."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if name == "to" and (_wants_other(kwargs.get("device")) or any(_wants_other(a) for a in args[1:]
                                                                         if isinstance(a, (str, torch.device)))):
            t = args[0]
            # Module.to passes (device, dtype or None, non_blocking): keep only a dtype
            rest = [a for a in args[1:] if not _wants_other(a) and a is not None and not isinstance(a, bool)]
            kw = {k: v for k, v in kwargs.items() if k not in ("device", "non_blocking", "memory_format", "copy")}
            out = t.to(*rest, **kw) if (rest or kw) else t
            return out if _is_other(out) else OtherDeviceTensor(out)
        if _wants_other(kwargs.get("device")):
            return _wrap(func(*args, **{**kwargs, "device": torch.device("cpu")}))
        return func(*args, **kwargs)


@contextlib.contextmanager
def other_device():
    """Within the block, `device=OTHER` (or a tensor's `.device` that is OTHER) makes OtherDeviceTensors."""
    with _Factories():
        yield


def to_other(module: torch.nn.Module) -> torch.nn.Module:
    """The module's parameters and buffers moved to OTHER (in place; returns the module)."""
    for m in module.modules():
        for name, p in list(m._parameters.items()):
            if p is not None and not _is_other(p):
                m._parameters[name] = torch.nn.Parameter(OtherDeviceTensor(p.detach()), requires_grad=p.requires_grad)
        for name, b in list(m._buffers.items()):
            if b is not None and not _is_other(b):
                m._buffers[name] = OtherDeviceTensor(b)
    return module
