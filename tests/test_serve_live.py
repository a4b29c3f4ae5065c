"""A real Triton Inference Server: `moe-prune serve` run by the serving environment's Python, over HTTP and gRPC.

The server runs in a Python without torch (PyTriton's Python backend stub needs one it works with: 3.13 here,
see README); this test (with torch, to export the models) is its client. The serving Python is
$MOE_PRUNE_SERVE_PYTHON, or .venv-serve/bin/python in the repository (.ci/run makes it). Without one the tests
skip with that reason; with MOE_PRUNE_REQUIRE_SERVER=1 (.ci/run) they fail instead.

Traffic goes to 127.0.0.1 only; every wait is bounded in count and time.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch

from moe_prune.compression.compress import compress_model
from moe_prune.onnx.export import export_onnx
from moe_prune.core.models import MnistConfig, MnistSoftMoE, SoftMoEViT, ViTConfig
from moe_prune.core.preprocess import IMAGENET_MEAN, IMAGENET_STD, Preprocess
from moe_prune.selection.scores import with_selection

ROOT = Path(__file__).resolve().parents[1]
HOST = "127.0.0.1"
START_TIMEOUT_S = 180  # a cold PyTriton import plus tritonserver start takes 10-30 s on 2 busy cores
STOP_TIMEOUT_S = 60


def serving_python() -> str:
    configured = os.environ.get("MOE_PRUNE_SERVE_PYTHON")
    path = Path(configured) if configured else ROOT / ".venv-serve" / "bin" / "python"
    reason = None
    if configured == "":
        reason = "MOE_PRUNE_SERVE_PYTHON is empty: the live server test is switched off (.ci/run runs it apart)"
    elif not path.exists():
        reason = (f"no serving environment at {path}: make one as .ci/run does (Python 3.13 venv with numpy, "
                  "onnxruntime, nvidia-pytriton, tritonclient[http], moe-prune --no-deps) or set MOE_PRUNE_SERVE_PYTHON")
    if reason:
        if os.environ.get("MOE_PRUNE_REQUIRE_SERVER") == "1":
            pytest.fail(reason)
        pytest.skip(reason)
    return str(path)


httpclient = pytest.importorskip("tritonclient.http", reason="tritonclient[http] (the [dev] extra) is the client")
grpcclient = pytest.importorskip("tritonclient.grpc", reason="tritonclient[grpc] (the [dev] extra) is the client")
from tritonclient.utils import InferenceServerException  # noqa: E402


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind((HOST, 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


class Server:
    """`moe-prune serve MODEL` in its own process group, with its stderr in a file."""

    def __init__(self, python: str, model: Path, log: Path, max_batch_size: int = 16):
        self.http, self.grpc, self.metrics = free_ports(3)
        self.name = model.stem
        self.log = log
        self.proc = subprocess.Popen(
            [python, "-m", "moe_prune.cli", "serve", str(model), "--host", HOST, "--http-port", str(self.http),
             "--grpc-port", str(self.grpc), "--metrics-port", str(self.metrics), "--threads", "1",
             "--max-batch-size", str(max_batch_size)],
            stdout=subprocess.DEVNULL, stderr=open(log, "wb"), start_new_session=True, cwd=ROOT)

    def stderr(self) -> str:
        return self.log.read_text(errors="replace")[-4000:]

    def wait_ready(self) -> None:
        url = f"http://{HOST}:{self.http}/v2/models/{self.name}/ready"
        deadline = time.monotonic() + START_TIMEOUT_S
        for _ in range(START_TIMEOUT_S * 4):  # bounded: at most one probe per 0.25 s until the deadline
            if self.proc.poll() is not None:
                pytest.fail(f"moe-prune serve exited with {self.proc.returncode} before it answered:\n{self.stderr()}")
            try:
                with urllib.request.urlopen(url, timeout=2) as r:
                    if r.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            if time.monotonic() > deadline:
                break
            time.sleep(0.25)
        self.kill()
        pytest.fail(f"moe-prune serve did not answer within {START_TIMEOUT_S} s:\n{self.stderr()}")

    def stop(self, sig: int) -> int:
        """Send `sig` to the server and wait for it; return its exit status."""
        self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.kill()
            pytest.fail(f"moe-prune serve did not stop within {STOP_TIMEOUT_S} s of signal {sig}:\n{self.stderr()}")

    def group_alive(self) -> bool:
        try:
            os.killpg(self.proc.pid, 0)
        except ProcessLookupError:
            return False
        return True

    def kill(self) -> None:
        if self.group_alive():
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=30)


@pytest.fixture(scope="module")
def env():
    python = serving_python()
    probe = subprocess.run([python, "-c", "import torch"], capture_output=True, text=True, timeout=60)
    assert probe.returncode != 0, f"{python} has torch; the serving environment is meant to run without it"
    return python


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    torch.manual_seed(0)
    tmp = tmp_path_factory.mktemp("live")
    full = MnistSoftMoE(MnistConfig(num_experts=16)).eval()
    return {
        "full": export_onnx(full, tmp / "full.onnx"),
        "compressed": export_onnx(compress_model(full, {"moe": torch.tensor([0, 3, 8, 13])}), tmp / "compressed.onnx"),
        "alg2": export_onnx(with_selection(full, "1/4", per="batch"), tmp / "alg2.onnx", with_choice=True),
        "alg1": export_onnx(with_selection(full, "1/4", per="input"), tmp / "alg1.onnx", with_choice=True),
    }


@pytest.fixture(scope="module")
def server(env, models, tmp_path_factory):
    s = Server(env, models["compressed"], tmp_path_factory.mktemp("log") / "serve.log")
    try:
        s.wait_ready()
        yield s
    finally:
        if s.proc.poll() is None:
            s.kill()


def images(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).random((n, 1, 28, 28), dtype=np.float32)


def reference(path: Path, x: np.ndarray) -> np.ndarray:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(["output"], {"input": x})[0]


def infer(client_module, client, name: str, x: np.ndarray, dtype: str = "FP32", input_name: str = "input"):
    inp = client_module.InferInput(input_name, list(x.shape), dtype)
    inp.set_data_from_numpy(x)
    return client.infer(name, [inp]).as_numpy("output")


@pytest.mark.slow
@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_answers_equal_onnx_runtime_in_process(server, models, protocol):
    mod, port = (httpclient, server.http) if protocol == "http" else (grpcclient, server.grpc)
    client = mod.InferenceServerClient(f"{HOST}:{port}")
    for seed, n in enumerate([1, 3, 16]):
        x = images(n, seed)
        got = infer(mod, client, server.name, x)
        assert got.shape == (n, 10)
        assert np.abs(got - reference(models["compressed"], x)).max() <= 1e-5


@pytest.mark.slow
def test_concurrent_requests_batched_by_the_server_get_their_own_answers(server, models):
    """Dynamic batching puts concurrent requests in one ONNX Runtime call; each must get back its own rows."""
    xs = [images(n, 100 + i) for i, n in enumerate([1, 2, 5, 1, 3, 7, 1, 4] * 3)]

    def one(x):  # a client per thread, closed in the thread that made it (gevent inside refuses other threads)
        client = httpclient.InferenceServerClient(f"{HOST}:{server.http}")
        try:
            return infer(httpclient, client, server.name, x)
        finally:
            client.close()

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(one, xs, timeout=120))
    for x, got in zip(xs, answers):
        assert np.abs(got - reference(models["compressed"], x)).max() <= 1e-5


@pytest.mark.slow
def test_metadata_shows_the_graph_names_and_shapes(server):
    meta = httpclient.InferenceServerClient(f"{HOST}:{server.http}").get_model_metadata(server.name)
    assert [(t["name"], t["datatype"], t["shape"]) for t in meta["inputs"]] == [("input", "FP32", [-1, 1, 28, 28])]
    assert [(t["name"], t["datatype"], t["shape"]) for t in meta["outputs"]] == [("output", "FP32", [-1, 10])]


@pytest.mark.slow
@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_malformed_requests_get_errors_and_the_server_keeps_answering(server, models, protocol):
    mod, port = (httpclient, server.http) if protocol == "http" else (grpcclient, server.grpc)
    client = mod.InferenceServerClient(f"{HOST}:{port}")
    bad = [
        (np.zeros((2, 1, 28, 27), np.float32), "FP32", "input", "shape"),
        (np.zeros((2, 1, 28, 28), np.float64), "FP64", "input", "data-type"),
        (np.zeros((17, 1, 28, 28), np.float32), "FP32", "input", "batch-size"),  # max batch is 16
        (np.zeros((2, 1, 28, 28), np.float32), "FP32", "pixels", "input"),
    ]
    for x, dtype, name, word in bad:
        with pytest.raises(InferenceServerException, match=word):
            infer(mod, client, server.name, x, dtype=dtype, input_name=name)
    x = images(2, 7)
    assert np.abs(infer(mod, client, server.name, x) - reference(models["compressed"], x)).max() <= 1e-5


@pytest.mark.slow
def test_garbage_http_bodies_get_errors_and_the_server_keeps_answering(server, models):
    url = f"http://{HOST}:{server.http}/v2/models/{server.name}/infer"
    bodies = [b"garbage", b'{"inputs": [{"name": "input", "shape": [1, 3], "datatype": "FP32", "data": [1, 2]}]}',
              json.dumps({"inputs": [{"name": "input", "shape": [1, 1, 28, 28], "datatype": "FP32",
                                      "data": ["x"] * 784}]}).encode()]
    for body in bodies:
        req = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(req, timeout=30)
        assert e.value.code in (400, 500)  # Triton answers 500 for a non-number in "data", 400 for the others
        assert "error" in json.loads(e.value.read())
    x = images(1, 8)
    client = httpclient.InferenceServerClient(f"{HOST}:{server.http}")
    assert np.abs(infer(httpclient, client, server.name, x) - reference(models["compressed"], x)).max() <= 1e-5


@pytest.mark.slow
def test_sigterm_stops_the_server_and_its_children(server):
    t = time.monotonic()
    rc = server.stop(signal.SIGTERM)
    assert rc == 0, server.stderr()
    for _ in range(100):  # tritonserver and the backend stub go with it
        if not server.group_alive():
            break
        time.sleep(0.1)
    assert not server.group_alive(), "processes of the server's group outlived it"
    log = server.stderr()
    assert "stopping" in log and "stopped" in log
    assert time.monotonic() - t < STOP_TIMEOUT_S


@pytest.mark.slow
def test_algorithm2_model_serves_its_output_and_stops_on_sigint(env, models, tmp_path):
    s = Server(env, models["alg2"], tmp_path / "alg2.log")
    try:
        s.wait_ready()
        client = grpcclient.InferenceServerClient(f"{HOST}:{s.grpc}")
        x = images(5, 3)  # one request alone is one batch: the in-process answer for the same batch
        assert np.abs(infer(grpcclient, client, s.name, x) - reference(models["alg2"], x)).max() <= 1e-5
        assert "not served (no batch axis" in s.stderr() and "experts.moe" in s.stderr()
        assert s.stop(signal.SIGINT) == 0, s.stderr()
    finally:
        if s.proc.poll() is None:
            s.kill()


def test_not_an_onnx_file_fails_at_start_with_one_line(env, tmp_path):
    bad = tmp_path / "bad.onnx"
    bad.write_text("this is not an ONNX graph\n")
    r = subprocess.run([env, "-m", "moe_prune.cli", "serve", str(bad)], capture_output=True, text=True, timeout=120,
                       cwd=ROOT)
    assert r.returncode == 2
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("moe-prune: error: ") and "not an ONNX model" in r.stderr


@pytest.mark.slow
def test_algorithm1_answers_do_not_depend_on_what_the_server_batches_them_with(env, models, tmp_path):
    """The model to serve under dynamic batching: each input's own experts, whatever else shares its call."""
    s = Server(env, models["alg1"], tmp_path / "alg1.log")
    try:
        s.wait_ready()
        xs = [images(n, 200 + i) for i, n in enumerate([1, 3, 2, 1, 4, 1, 2, 5] * 2)]

        def one(x):
            client = httpclient.InferenceServerClient(f"{HOST}:{s.http}")
            try:
                inp = httpclient.InferInput("input", list(x.shape), "FP32")
                inp.set_data_from_numpy(x)
                r = client.infer(s.name, [inp])
                return r.as_numpy("output"), r.as_numpy("experts.moe")
            finally:
                client.close()

        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(one, xs, timeout=120))
        sess = ort.InferenceSession(str(models["alg1"]), providers=["CPUExecutionProvider"])
        for x, (out, experts) in zip(xs, answers):
            ref_out, ref_experts = sess.run(["output", "experts.moe"], {"input": x})  # the request alone
            assert np.abs(out - ref_out).max() <= 1e-5
            assert experts.shape == (len(x), 4) and (experts == ref_experts).all()
        assert s.stop(signal.SIGTERM) == 0, s.stderr()
    finally:
        if s.proc.poll() is None:
            s.kill()


@pytest.fixture(scope="module")
def pixel_models(tmp_path_factory):
    """A tiny RGB ViT with ImageNet normalization: with it inside the graph (uint8 [B, 16, 16, 3] in), and without."""
    torch.manual_seed(0)
    tmp = tmp_path_factory.mktemp("pixels")
    vit = SoftMoEViT(ViTConfig(num_experts=4, moe_layer_index=1, img_size=16, patch_size=4, in_chans=3, num_classes=5,
                               embed_dim=32, depth=2, num_heads=2)).eval()
    pre = Preprocess(size=16, channels=3, mean=IMAGENET_MEAN, std=IMAGENET_STD, crop_pct=0.875)
    return {"pixels": export_onnx(vit, tmp / "vit_pixels.onnx", preprocess=pre),
            "float": export_onnx(vit, tmp / "vit_float.onnx", preprocess=pre, in_graph=False), "pre": pre}


def http_status(url: str):
    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code
    except (urllib.error.URLError, ConnectionError, TimeoutError) as e:
        return type(e).__name__


@pytest.mark.slow
def test_ready_means_the_model_answers_and_uint8_pixels_are_served(env, pixel_models, tmp_path):
    """Readiness polled from the moment the process starts: the first 200 of /v2/health/ready (or of the model's
    ready endpoint) must come with answers. Then uint8 HWC requests, over HTTP and gRPC, equal ONNX Runtime in
    this process on the same bytes, and the float graph on the same pixels through Preprocess.normalize."""
    s = Server(env, pixel_models["pixels"], tmp_path / "pixels.log")
    try:
        health = f"http://{HOST}:{s.http}/v2/health/ready"
        model_ready = f"http://{HOST}:{s.http}/v2/models/{s.name}/ready"
        http = httpclient.InferenceServerClient(f"{HOST}:{s.http}")
        x = np.random.default_rng(0).integers(0, 256, (3, 16, 16, 3), dtype=np.uint8)
        deadline = time.monotonic() + START_TIMEOUT_S
        seen = []
        for _ in range(START_TIMEOUT_S * 50):  # bounded: one probe per 20 ms until the deadline
            if s.proc.poll() is not None:
                pytest.fail(f"moe-prune serve exited with {s.proc.returncode} before it answered:\n{s.stderr()}")
            states = (http_status(health), http_status(model_ready))
            if not seen or seen[-1] != states:
                seen.append(states)
            if 200 in states:
                try:  # the promise: ready says 200 only when an inference is answered
                    got = infer(httpclient, http, s.name, x, dtype="UINT8")
                except InferenceServerException as e:
                    pytest.fail(f"readiness said {states} but the request failed: {e}; states seen {seen}")
                break
            if time.monotonic() > deadline:
                pytest.fail(f"moe-prune serve did not get ready within {START_TIMEOUT_S} s:\n{s.stderr()}")
            time.sleep(0.02)
        # the log's "ready" comes after the server's own first answer through HTTP
        for _ in range(100):
            if "ready: the model answers" in s.stderr():
                break
            time.sleep(0.1)
        log = s.stderr()
        assert log.index("first request through HTTP was answered") < log.index("ready: the model answers"), log
        assert "preprocessing: inside the graph" in log

        same = reference(pixel_models["pixels"], x)
        assert got.shape == (3, 5) and np.abs(got - same).max() <= 1e-5
        floats = reference(pixel_models["float"], pixel_models["pre"].normalize(x))
        assert np.abs(got - floats).max() <= 1e-5
        grpc = grpcclient.InferenceServerClient(f"{HOST}:{s.grpc}")
        for seed, n in enumerate([1, 4]):
            y = np.random.default_rng(10 + seed).integers(0, 256, (n, 16, 16, 3), dtype=np.uint8)
            got = infer(grpcclient, grpc, s.name, y, dtype="UINT8")
            assert np.abs(got - reference(pixel_models["pixels"], y)).max() <= 1e-5
        meta = http.get_model_metadata(s.name)
        assert [(t["name"], t["datatype"], t["shape"]) for t in meta["inputs"]] == [("input", "UINT8", [-1, 16, 16, 3])]
        with pytest.raises(InferenceServerException, match="data-type"):  # float pixels are refused
            infer(httpclient, http, s.name, x.astype(np.float32), dtype="FP32")
        assert s.stop(signal.SIGTERM) == 0, s.stderr()
    finally:
        if s.proc.poll() is None:
            s.kill()
