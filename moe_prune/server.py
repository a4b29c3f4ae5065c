"""`moe-prune serve`: an ONNX model on NVIDIA Triton Inference Server, through PyTriton, without torch.

    client --HTTP/gRPC--> tritonserver (dynamic batching, shape/dtype checks) --> Python backend stub
           --> this process: OnnxModel(requests) = one ONNX Runtime call on the requests concatenated [B, ...]

PyTriton ships the `tritonserver` binary and runs the bound function in the calling process, so the ONNX Runtime
session lives here. This module imports only the standard library at import time; numpy, onnxruntime and
pytriton are imported when a server is made, so a serving environment needs no torch (and no Triton compiler):
`pip install --no-deps .` (a clone, or its wheel) and `pip install numpy onnxruntime nvidia-pytriton` (the `[serve]`
extra).

Which model to serve: with dynamic batching a request shares its ONNX Runtime call with whatever else is queued,
so an Algorithm 2 (per batch) model answers a request with experts chosen for the whole server batch. The full,
the compressed (static subset) and the Algorithm 1 (per input) models answer every request the same way whatever
it is batched with.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from dataclasses import dataclass
from pathlib import Path

from .errors import ServeError

LOG = logging.getLogger("moe_prune.serve")

# ONNX Runtime's type strings of the tensors a model can be served with, and their numpy names.
_ORT_DTYPES = {
    "tensor(float)": "float32", "tensor(float16)": "float16", "tensor(double)": "float64",
    "tensor(int64)": "int64", "tensor(int32)": "int32", "tensor(int8)": "int8", "tensor(uint8)": "uint8",
    "tensor(bool)": "bool",
}


@dataclass(frozen=True)
class ServeConfig:
    """How `serve` runs a model.

    Args:
        model: the .onnx file (its external data beside it, if any); the first axis of its inputs is the batch.
        name: the model's name on the server (default: the file name without .onnx).
        host: the address the HTTP, gRPC and metrics endpoints listen on ("0.0.0.0": every interface).
        http_port, grpc_port, metrics_port: the endpoints' ports.
        max_batch_size: the largest batch Triton forms from queued requests; larger requests are refused.
        queue_delay_us: how long a request may wait in the queue for others to batch with.
        threads: ONNX Runtime intra-op threads (None: ONNX Runtime's default, one per core).
        provider: "cpu" or "cuda" (onnxruntime-gpu and an NVIDIA GPU).
    """

    model: str
    name: str | None = None
    host: str = "127.0.0.1"
    http_port: int = 8000
    grpc_port: int = 8001
    metrics_port: int = 8002
    max_batch_size: int = 64
    queue_delay_us: int = 100
    threads: int | None = None
    provider: str = "cpu"

    def model_name(self) -> str:
        return self.name or Path(self.model).name.removesuffix(".onnx")


@dataclass(frozen=True)
class TensorSpec:
    """One input or output: its name, numpy dtype name and shape without the batch axis (-1: any size)."""

    name: str
    dtype: str
    shape: tuple[int, ...]


def _providers(provider: str) -> list[str]:
    import onnxruntime as ort

    names = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}
    if provider not in names:
        raise ServeError(f"provider {provider!r}: choose cpu or cuda")
    if names[provider] not in ort.get_available_providers():
        raise ServeError(f"ONNX Runtime has no {names[provider]} here (available: {ort.get_available_providers()}); "
                         "for cuda install onnxruntime-gpu instead of onnxruntime and run on an NVIDIA GPU")
    return [names[provider]] + (["CPUExecutionProvider"] if provider != "cpu" else [])


def _check_file(path: Path) -> None:
    if not path.exists():
        raise ServeError(f"{path}: no such file; give an .onnx file made by `moe-prune export`")
    if not path.is_file():
        raise ServeError(f"{path}: is not a file; give the .onnx file")


class OnnxModel:
    """An ONNX Runtime session as a PyTriton inference callable: a list of requests in, one answer per request.

    The requests of one call (Triton's dynamic batch) are concatenated on the batch axis and run in one session
    call, then split back. Outputs without a batch axis (an Algorithm 2 model's `experts.*`, one set of ids for
    the whole batch) cannot be split per request and are not served.

    Args:
        path: the .onnx file.
        threads: intra-op threads (None: ONNX Runtime's default).
        provider: "cpu" or "cuda".

    Raises:
        ServeError: the file is not an ONNX model ONNX Runtime can load, or its inputs have no batch axis.

    Example:
        >>> m = OnnxModel("compressed.onnx", threads=2)
        >>> m.inputs     # [TensorSpec(name='input', dtype='float32', shape=(1, 28, 28))]
        >>> m([{"input": x}])[0]["output"].shape   # x [N, 1, 28, 28] -> [N, 10]
    """

    def __init__(self, path: str | os.PathLike, threads: int | None = None, provider: str = "cpu"):
        import onnxruntime as ort

        self.path = Path(path)
        _check_file(self.path)
        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = threads
            opts.inter_op_num_threads = 1
        try:
            self.session = ort.InferenceSession(str(self.path), opts, providers=_providers(provider))
        except ServeError:
            raise
        except Exception as e:  # ONNX Runtime raises its own exception types, with multi-line messages
            # ONNX Runtime's messages run over lines; its own checks include external data that escapes the folder
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            what = "not an ONNX model" if "INVALID_PROTOBUF" in first else "ONNX Runtime cannot load it"
            raise ServeError(f"{self.path}: {what} ({first[:300]}); serve an .onnx file from `moe-prune export`") from None
        self.inputs = [self._spec(v, "input") for v in self.session.get_inputs()]
        batch_axis = self.session.get_inputs()[0].shape[0]
        outs = self.session.get_outputs()
        batched = [v for v in outs if v.shape and v.shape[0] == batch_axis]
        self.dropped = [v.name for v in outs if v not in batched]
        if not batched:
            raise ServeError(f"{self.path}: no output has the inputs' batch axis {batch_axis!r}; nothing to serve")
        self.outputs = [self._spec(v, "output") for v in batched]

    def _spec(self, value, kind: str) -> TensorSpec:
        dims = value.shape
        if not dims or isinstance(dims[0], int):
            raise ServeError(f"{self.path}: {kind} {value.name!r} has shape {dims}, no dynamic batch axis; "
                             "export with a dynamic batch (the default of `moe-prune export`)")
        dtype = _ORT_DTYPES.get(value.type)
        if dtype is None:
            raise ServeError(f"{self.path}: {kind} {value.name!r} is a {value.type}, which is not served here")
        return TensorSpec(value.name, dtype, tuple(d if isinstance(d, int) else -1 for d in dims[1:]))

    def run(self, feeds: dict) -> dict:
        """One session call: {input name: [B, ...]} -> {served output name: [B, ...]}."""
        import numpy as np

        out = {}
        for spec, value in zip(self.outputs, self.session.run([o.name for o in self.outputs], feeds)):
            dtype = np.dtype(spec.dtype)
            # ONNX Runtime's int64 arrays can be numpy's longlong ('q'), which numpy 1.x does not count as a
            # subtype of int64 ('l'), and PyTriton's output check refuses them: same bytes, the declared type.
            out[spec.name] = value.view(dtype) if value.dtype.char != dtype.char else value
        return out

    def __call__(self, requests: list) -> list[dict]:
        import numpy as np

        sizes = [len(r[self.inputs[0].name]) for r in requests]
        feeds = {t.name: np.concatenate([np.asarray(r[t.name], dtype=t.dtype) for r in requests])
                 if len(requests) > 1 else np.asarray(requests[0][t.name], dtype=t.dtype) for t in self.inputs}
        out = self.run(feeds)
        bounds = np.cumsum([0] + sizes)
        return [{k: v[a:b] for k, v in out.items()} for a, b in zip(bounds[:-1], bounds[1:])]


def _pytriton():
    try:
        from pytriton.model_config import DynamicBatcher, ModelConfig, Tensor
        from pytriton.triton import Triton, TritonConfig
    except ImportError as e:
        raise ServeError(f"serving needs PyTriton ({e}): pip install nvidia-pytriton (Linux, Python 3.13 works; "
                         "see README, Serving)") from None
    return DynamicBatcher, ModelConfig, Tensor, Triton, TritonConfig


def start(config: ServeConfig):
    """Load the model, start Triton with it bound, and return the running `pytriton.triton.Triton`.

    Call `.stop()` on the result to shut the server down. `serve` wraps this with signal handling.

    Raises:
        ServeError: the model cannot be served (see OnnxModel), PyTriton is missing, or the server did not start.

    Example:
        >>> triton = start(ServeConfig("compressed.onnx", http_port=8000))
        >>> ...  # POST http://127.0.0.1:8000/v2/models/compressed/infer
        >>> triton.stop()
    """
    import numpy as np

    if not 1 <= config.max_batch_size <= 1 << 16:
        raise ServeError(f"--max-batch-size {config.max_batch_size}: give a positive batch size")
    model = OnnxModel(config.model, config.threads, config.provider)  # fails on a bad file before Triton starts
    DynamicBatcher, ModelConfig, Tensor, Triton, TritonConfig = _pytriton()
    name = config.model_name()
    if model.dropped:
        LOG.info("not served (no batch axis, one value per server batch): %s", ", ".join(model.dropped))
    triton_config = TritonConfig(http_address=config.host, http_port=config.http_port, grpc_address=config.host,
                                 grpc_port=config.grpc_port, metrics_address=config.host,
                                 metrics_port=config.metrics_port, exit_on_error=True)
    spec = lambda t: Tensor(name=t.name, dtype=np.dtype(t.dtype), shape=t.shape)  # noqa: E731
    triton = Triton(config=triton_config)
    try:
        triton.bind(model_name=name, infer_func=model, inputs=[spec(t) for t in model.inputs],
                    outputs=[spec(t) for t in model.outputs], strict=True,
                    config=ModelConfig(max_batch_size=config.max_batch_size,
                                       batcher=DynamicBatcher(max_queue_delay_microseconds=config.queue_delay_us)))
        triton.run()
    except Exception as e:
        triton.stop()
        raise ServeError(f"Triton did not start for {config.model} ({type(e).__name__}: {str(e)[:300]}); "
                         f"are ports {config.http_port}/{config.grpc_port}/{config.metrics_port} free?") from None
    LOG.info("serving %s as %r: HTTP %s:%d, gRPC %s:%d, metrics %s:%d; inputs %s; outputs %s; max batch %d",
             config.model, name, config.host, config.http_port, config.host, config.grpc_port, config.host,
             config.metrics_port, _describe(model.inputs), _describe(model.outputs), config.max_batch_size)
    return triton


def _describe(specs: list[TensorSpec]) -> str:
    return ", ".join(f"{t.name} {t.dtype} [B, {', '.join(map(str, t.shape))}]" for t in specs)


def serve(config: ServeConfig, ready: threading.Event | None = None, stop: threading.Event | None = None) -> None:
    """Serve a model until SIGINT or SIGTERM (or `stop` is set), then shut Triton down and return.

    Args:
        config: see ServeConfig.
        ready: set once the server answers (for callers that run this in a thread).
        stop: set it to stop the server (default: a new event, set by the signal handlers).

    Raises:
        ServeError: see `start`; or the server died while serving.

    Example:
        >>> serve(ServeConfig("compressed.onnx"))   # blocks; Ctrl-C stops it
    """
    stop = stop or threading.Event()
    previous = {}
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            previous[sig] = signal.signal(sig, lambda signum, frame: stop.set())
    try:
        triton = start(config)
        try:
            if ready is not None:
                ready.set()
            LOG.info("ready; SIGINT (Ctrl-C) or SIGTERM stops the server")
            while not stop.wait(timeout=1.0):
                if not triton.is_alive():
                    raise ServeError(f"the Triton server for {config.model} stopped by itself; see the log above")
            LOG.info("stopping")
        finally:
            triton.stop()
        LOG.info("stopped")
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
