"""`moe-prune serve`: an ONNX model on NVIDIA Triton Inference Server, through PyTriton, without torch.

    client --HTTP/gRPC--> tritonserver (dynamic batching, shape/dtype checks) --> Python backend stub
           --> this process: OnnxModel(requests) = one ONNX Runtime call on the requests concatenated [B, ...]

PyTriton ships the `tritonserver` binary and runs the bound function in the calling process, so the ONNX Runtime
session lives here. This module imports only the standard library at import time; numpy, onnxruntime and
pytriton are imported when a server is made, so a serving environment needs no torch (and no Triton compiler):
`pip install --no-deps .` (a clone, or its wheel) and `pip install numpy onnxruntime nvidia-pytriton` (the `[serve]`
extra).

Ready means the model answers. PyTriton's default starts tritonserver on an empty repository (its
/v2/health/ready says 200 at once: zero models, all ready) and loads the model afterwards, so a client that trusted
the endpoint got 404s for a second or two. Here the model is written into the repository before tritonserver
starts, which loads it before it opens its endpoints (PyTriton's local model store, the one its Vertex AI mode
uses), with strict readiness; and `start` returns, `serve` sets its `ready` event and logs "ready" only after one
inference request through the server's own HTTP endpoint was answered.

Which model to serve: with dynamic batching a request shares its ONNX Runtime call with whatever else is queued,
so an Algorithm 2 (per batch) model answers a request with experts chosen for the whole server batch. The full,
the compressed (static subset) and the Algorithm 1 (per input) models answer every request the same way whatever
it is batched with.
"""

from __future__ import annotations

import json
import logging
import math
import os
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from ..errors import MoePruneError, ServeError

LOG = logging.getLogger("moe_prune.serve")

# How long `start` waits for the first answer through HTTP after PyTriton says the model is loaded (it is loaded
# by then; the margin is for a slow machine's first ONNX Runtime call), and how often it asks.
FIRST_ANSWER_TIMEOUT_S = 60.0
FIRST_ANSWER_POLL_S = 0.1

# ONNX Runtime's type strings of the tensors a model can be served with, and their numpy names.
_ORT_DTYPES = {
    "tensor(float)": "float32", "tensor(float16)": "float16", "tensor(double)": "float64",
    "tensor(int64)": "int64", "tensor(int32)": "int32", "tensor(int8)": "int8", "tensor(uint8)": "uint8",
    "tensor(bool)": "bool",
}
# numpy dtype names -> the KServe v2 protocol's datatypes (the first-answer request is built with them).
_V2_DATATYPES = {"float32": "FP32", "float16": "FP16", "float64": "FP64", "int64": "INT64", "int32": "INT32",
                 "int8": "INT8", "uint8": "UINT8", "bool": "BOOL"}


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
        # e.g. {"moe_prune.preprocess": "{...}"}: what the model expects (onnx_files.read_preprocess reads it)
        self.metadata = dict(self.session.get_modelmeta().custom_metadata_map)

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
        from pytriton.triton import Triton, TritonConfig, TritonLifecyclePolicy
    except ImportError as e:
        raise ServeError(f"serving needs PyTriton ({e}): pip install nvidia-pytriton (Linux, Python 3.13 works; "
                         "see README, Serving)") from None
    return DynamicBatcher, ModelConfig, Tensor, Triton, TritonConfig, TritonLifecyclePolicy


def start(config: ServeConfig):
    """Load the model, start Triton with it bound, and return the running `pytriton.triton.Triton` once the model
    has answered a first inference request through the server's HTTP endpoint.

    tritonserver loads the model before it opens its endpoints, with strict readiness, so its /v2/health/ready
    says 200 only when the model is loaded (see the module docstring). Call `.stop()` on the result to shut the
    server down. `serve` wraps this with signal handling.

    Raises:
        ServeError: the model cannot be served (see OnnxModel), PyTriton is missing, the server did not start, or
            the model did not answer within FIRST_ANSWER_TIMEOUT_S.

    Example:
        >>> triton = start(ServeConfig("compressed.onnx", http_port=8000))
        >>> ...  # POST http://127.0.0.1:8000/v2/models/compressed/infer
        >>> triton.stop()
    """
    import numpy as np

    if not 1 <= config.max_batch_size <= 1 << 16:
        raise ServeError(f"--max-batch-size {config.max_batch_size}: give a positive batch size")
    model = OnnxModel(config.model, config.threads, config.provider)  # fails on a bad file before Triton starts
    DynamicBatcher, ModelConfig, Tensor, Triton, TritonConfig, TritonLifecyclePolicy = _pytriton()
    name = config.model_name()
    if model.dropped:
        LOG.info("not served (no batch axis, one value per server batch): %s", ", ".join(model.dropped))
    LOG.info("preprocessing: %s", _describe_preprocess(model))
    # strict_readiness: /v2/health/ready waits for every model (tritonserver's default; said here because the
    # readiness promise rests on it).
    triton_config = TritonConfig(http_address=config.host, http_port=config.http_port, grpc_address=config.host,
                                 grpc_port=config.grpc_port, metrics_address=config.host,
                                 metrics_port=config.metrics_port, exit_on_error=True, strict_readiness=True)
    spec = lambda t: Tensor(name=t.name, dtype=np.dtype(t.dtype), shape=t.shape)  # noqa: E731
    # local_model_store: bind() writes the model into the repository, and tritonserver loads it at startup, before
    # its endpoints open; PyTriton's default loads it through the API after the server already says ready.
    policy = TritonLifecyclePolicy(launch_triton_on_startup=True, local_model_store=True)
    triton = Triton(config=triton_config, triton_lifecycle_policy=policy)
    try:
        triton.bind(model_name=name, infer_func=model, inputs=[spec(t) for t in model.inputs],
                    outputs=[spec(t) for t in model.outputs], strict=True,
                    config=ModelConfig(max_batch_size=config.max_batch_size,
                                       batcher=DynamicBatcher(max_queue_delay_microseconds=config.queue_delay_us)))
        triton.run()
    except Exception as e:
        triton.stop()
        # tritonserver's own log (above, on stderr) has the cause: a port in use, or "failed to load all models"
        # when PyTriton's Python backend stub cannot start. Either way PyTriton notices only when its wait for the
        # server times out (120 s): it does not watch the process while it waits.
        raise ServeError(f"Triton did not start for {config.model} ({type(e).__name__}: {str(e)[:300]}); "
                         f"are ports {config.http_port}/{config.grpc_port}/{config.metrics_port} free? If tritonserver "
                         "said 'failed to load all models', its Python backend stub cannot run here (see README, "
                         "Serving); the tritonserver log above says why") from None
    try:
        waited = _first_answer(config, name, model, triton)
    except BaseException:
        triton.stop()
        raise
    LOG.info("serving %s as %r: HTTP %s:%d, gRPC %s:%d, metrics %s:%d; inputs %s; outputs %s; max batch %d; "
             "the first request through HTTP was answered after %.2f s",
             config.model, name, config.host, config.http_port, config.host, config.grpc_port, config.host,
             config.metrics_port, _describe(model.inputs), _describe(model.outputs), config.max_batch_size, waited)
    return triton


def _describe_preprocess(model: OnnxModel) -> str:
    """What the file records about its input preprocessing, for the start-up log (a broken record is logged)."""
    from ..onnx.files import read_preprocess

    try:
        pre, in_graph = read_preprocess(model.metadata, model.path)
    except MoePruneError as e:
        return f"unknown ({e})"
    if pre is None:
        return "none recorded (the client sends the model's own input)"
    if in_graph:
        return f"inside the graph; clients send uint8 pixels at the input size ({pre.describe()})"
    return f"the client's: send float input normalized as {pre.describe()}"


def _local_url(config: ServeConfig) -> str:
    """The HTTP endpoint as this process reaches it (a wildcard address is not one to connect to)."""
    host = {"0.0.0.0": "127.0.0.1", "": "127.0.0.1", "::": "::1"}.get(config.host, config.host)
    return f"http://{f'[{host}]' if ':' in host else host}:{config.http_port}"


def _first_answer(config: ServeConfig, name: str, model: OnnxModel, triton) -> float:
    """Send one all-zeros request of batch size 1 through the server's own HTTP endpoint until it is answered;
    return the seconds it took. Raises ServeError if the server dies or no answer comes within the timeout."""
    import urllib.error
    import urllib.request

    inputs = [{"name": t.name, "shape": [1, *(d if d > 0 else 1 for d in t.shape)], "datatype": _V2_DATATYPES[t.dtype]}
              for t in model.inputs]
    for t in inputs:
        n = math.prod(t["shape"])
        t["data"] = [False] * n if t["datatype"] == "BOOL" else [0] * n
    body = json.dumps({"inputs": inputs}).encode()
    url = f"{_local_url(config)}/v2/models/{name}/infer"
    t0 = time.monotonic()
    last = "no answer yet"
    while time.monotonic() - t0 < FIRST_ANSWER_TIMEOUT_S:
        if not triton.is_alive():
            raise ServeError(f"the Triton server for {config.model} stopped while loading the model; see the log above")
        request = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=FIRST_ANSWER_TIMEOUT_S) as r:
                json.loads(r.read())
                return time.monotonic() - t0
        except urllib.error.HTTPError as e:
            last = f"HTTP {e.code}: {e.read()[:200].decode(errors='replace')}"
        except (OSError, ValueError) as e:  # refused, reset, timed out; a reply that is not JSON
            last = f"{type(e).__name__}: {e}"
        time.sleep(FIRST_ANSWER_POLL_S)
    raise ServeError(f"{config.model}: the server did not answer a first request at {url} within "
                     f"{FIRST_ANSWER_TIMEOUT_S:g} s ({last}); see the log above")


def _describe(specs: list[TensorSpec]) -> str:
    return ", ".join(f"{t.name} {t.dtype} [B, {', '.join(map(str, t.shape))}]" for t in specs)


def serve(config: ServeConfig, ready: threading.Event | None = None, stop: threading.Event | None = None) -> None:
    """Serve a model until SIGINT or SIGTERM (or `stop` is set), then shut Triton down and return.

    Args:
        config: see ServeConfig.
        ready: set once the model has answered a first request through the server's HTTP endpoint (for callers
            that run this in a thread); the log line "ready" says the same.
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
            LOG.info("ready: the model answers; SIGINT (Ctrl-C) or SIGTERM stops the server")
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
