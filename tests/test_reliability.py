"""Reliability: fuzzed and lying checkpoints, runs killed mid-write, resumed training, determinism.

What test_checkpoint.py already covers (a fixed table of bad files, config/tensor contradictions) is not repeated;
here the bad files are generated, and the commands are killed with SIGKILL at many points.

The fuzz tests run a few dozen examples each so that the suite stays fast. A longer run:

    MOE_PRUNE_FUZZ_EXAMPLES=5000 .venv/bin/python -m pytest tests/test_reliability.py -k fuzz

Oracles:
- any bytes: `read_header`, `summary` and `load` return, or raise CheckpointError naming the file; nothing else.
- a valid checkpoint with bytes of its data region overwritten: `load` gives exactly the tensors a plain
  decoder reads from those bytes (bit for bit), or CheckpointError if and only if one of them is NaN or Inf.
- bytes of its header overwritten: CheckpointError, or a model whose tensors are what the (changed) header
  says they are, that runs and gives finite outputs.
- truncated or extended: always CheckpointError.
- a killed `moe-prune compress` / `export`: the output is absent, the old output byte for byte, or the complete
  new output byte for byte equal to an uninterrupted run's; only hidden temporary files may be left over.
- training stopped after epoch 1 and resumed: bit-identical weights to training in one go.
- compressing or exporting twice: identical bytes (and identical ONNX Runtime outputs).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import moe_prune
from moe_prune import CheckpointError, MnistConfig, MnistSoftMoE, SoftMoE, SoftMoEConfig
from moe_prune.core.checkpoint import read_header
from moe_prune.core.summary import summary
from moe_prune.compression.compress import compress_checkpoint, compress_file
from moe_prune.onnx.export import example_input, export_onnx
from moe_prune.onnx.export_file import export_checkpoint

FUZZ = settings(
    max_examples=int(os.environ.get("MOE_PRUNE_FUZZ_EXAMPLES", "40")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
MOE_PRUNE = Path(sys.executable).parent / "moe-prune"
ONE_THREAD = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
# safetensors dtype names -> torch, for the independent decoder (a model loads only with floating weights).
DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models on a shared CPU
    yield
    torch.set_num_threads(threads)


# -- a valid checkpoint, and an independent reader of its format ---------------------------------------------


@dataclass(repr=False)  # a failing example prints the fixture: keep it short
class Valid:
    data: bytes  # the whole file
    body: int  # where the data region starts (8 + header length)
    tensors: dict[str, torch.Tensor]
    folder: Path


@pytest.fixture(scope="module")
def valid(tmp_path_factory) -> Valid:
    folder = tmp_path_factory.mktemp("fuzz")
    torch.manual_seed(0)
    path = moe_prune.save(MnistSoftMoE(MnistConfig(num_experts=4)), folder / "valid.safetensors")
    data = path.read_bytes()
    _, _, tensors = decode(data)
    return Valid(data, 8 + struct.unpack("<Q", data[:8])[0], tensors, folder)


def decode(data: bytes) -> tuple[dict, dict, dict[str, torch.Tensor]]:
    """(metadata, header, tensors) of safetensors bytes, read with json and torch.frombuffer only."""
    n = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8:8 + n])
    metadata = header.pop("__metadata__", {})
    body = data[8 + n:]
    tensors = {}
    for name, info in header.items():
        begin, end = info["data_offsets"]
        dtype = DTYPES[info["dtype"]]
        flat = torch.frombuffer(bytearray(body[begin:end]), dtype=dtype) if end > begin else torch.empty(0, dtype=dtype)
        tensors[name] = flat.reshape(info["shape"])
    return metadata, header, tensors


def opens_or_refuses(path: Path):
    """Every reader returns or raises CheckpointError naming the file (anything else fails the test).

    Returns:
        The loaded model, or None when `load` refused the file.
    """
    for reader in (read_header, summary):
        try:
            reader(path)
        except CheckpointError as e:
            assert str(path) in str(e), e
    try:
        return moe_prune.load(path)
    except CheckpointError as e:
        assert str(path) in str(e), e
        return None


def runs_finite(model) -> None:
    x = example_input(model, 2, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        y = model(x)
    assert bool(torch.isfinite(y).all())


# -- 1a. arbitrary bytes ---------------------------------------------------------------------------------------

_INTS = st.one_of(st.integers(-2, 80), st.sampled_from([2**31, 2**32, 2**62, 2**63 - 1, 2**64 - 1, 2**64, 10**30]))
_ENTRY = st.fixed_dictionaries({
    "dtype": st.sampled_from(["F32", "F16", "BF16", "F64", "I64", "I32", "U8", "BOOL", "F8_E4M3", "F33", ""]),
    "shape": st.lists(_INTS, max_size=3),
    "data_offsets": st.lists(_INTS, min_size=0, max_size=3),
})
_HEADERS = st.dictionaries(st.sampled_from(["__metadata__", "head.weight", "a", "b", ""]) | st.text(max_size=6),
                           _ENTRY | st.dictionaries(st.text(max_size=4), st.text(max_size=4), max_size=2), max_size=3)


@st.composite
def safetensors_like(draw) -> bytes:
    """Bytes shaped like safetensors (a length, then a JSON header), with lying lengths, shapes, offsets, dtypes."""
    header = json.dumps(draw(_HEADERS)).encode()
    length = draw(st.one_of(st.just(len(header)), st.integers(0, len(header) + 64), st.integers(0, 2**64 - 1)))
    return struct.pack("<Q", length) + header + draw(st.binary(max_size=96))


@FUZZ
@given(data=st.one_of(st.binary(max_size=300), st.binary(max_size=300).map(lambda b: b[:8] + b"{" + b[8:]),
                      safetensors_like()))
def test_fuzz_arbitrary_bytes(valid, data):
    path = valid.folder / "arbitrary.safetensors"
    path.write_bytes(data)
    assert opens_or_refuses(path) is None  # no native metadata: never a model


# -- 1b. a valid checkpoint, damaged ---------------------------------------------------------------------------

NONFINITE = [struct.pack("<f", v) for v in (float("nan"), float("inf"), float("-inf"))]


@FUZZ
@given(draw=st.data())
def test_fuzz_data_region_overwrites(valid, draw):
    data = bytearray(valid.data)
    for _ in range(draw.draw(st.integers(1, 4), label="writes")):
        pos = draw.draw(st.integers(valid.body, len(data) - 1), label="position")
        patch = draw.draw(st.binary(min_size=1, max_size=8) | st.sampled_from(NONFINITE), label="bytes")
        if patch in NONFINITE:
            pos -= (pos - valid.body) % 4  # one whole float32
        data[pos:pos + len(patch)] = patch[: len(data) - pos]
    assert len(data) == len(valid.data)
    path = valid.folder / "data.safetensors"
    path.write_bytes(data)
    _, _, expected = decode(bytes(data))  # the header is untouched: the layout is the original one
    finite = all(bool(torch.isfinite(t).all()) for t in expected.values())
    model = opens_or_refuses(path)
    if not finite:
        assert model is None  # NaN/Inf weights are a CheckpointError, never a model
        with pytest.raises(CheckpointError, match="NaN or Inf"):
            moe_prune.load(path)
        return
    assert model is not None
    state = model.state_dict()
    assert sorted(state) == sorted(expected)
    for name, t in expected.items():  # exactly the bytes in the file, bit for bit
        assert torch.equal(state[name], t), name


@FUZZ
@given(draw=st.data())
def test_fuzz_header_overwrites(valid, draw):
    data = bytearray(valid.data)
    for _ in range(draw.draw(st.integers(1, 4), label="writes")):
        pos = draw.draw(st.integers(0, valid.body - 1), label="position")
        patch = draw.draw(st.binary(min_size=1, max_size=3), label="bytes")
        data[pos:pos + len(patch)] = patch[: valid.body - pos]
    path = valid.folder / "header.safetensors"
    path.write_bytes(data)
    model = opens_or_refuses(path)
    if model is None:
        return
    # It loaded: the change kept a consistent file (a flipped meta character, a tensor renamed to another
    # of the same shape, ...). Then the model holds what the changed header says, and works.
    metadata, _, expected = decode(bytes(data))
    state = model.state_dict()
    assert sorted(state) == sorted(expected)
    for name, t in expected.items():
        assert state[name].dtype == t.dtype and torch.equal(state[name], t), name
    assert model.checkpoint_meta == json.loads(metadata["moe_prune"]).get("meta", {})
    runs_finite(model)


@FUZZ
@given(draw=st.data())
def test_fuzz_truncated_or_extended(valid, draw):
    if draw.draw(st.booleans(), label="truncate"):
        data = valid.data[: draw.draw(st.integers(0, len(valid.data) - 1), label="length")]
    else:
        data = valid.data + draw.draw(st.binary(min_size=1, max_size=16), label="tail")
    path = valid.folder / "cut.safetensors"
    path.write_bytes(data)
    assert opens_or_refuses(path) is None
    with pytest.raises(CheckpointError):
        moe_prune.load(path)


# -- 1c. headers that lie ----------------------------------------------------------------------------------------


def _file(header: dict, data: bytes = b"", length: int | None = None) -> bytes:
    h = json.dumps(header).encode()
    return struct.pack("<Q", len(h) if length is None else length) + h + data


def _f32(shape, begin, end):
    return {"dtype": "F32", "shape": shape, "data_offsets": [begin, end]}


# Not repeated from test_checkpoint.BAD (offsets past the end, a 2**62 header length, bad JSON, not native).
LYING = {
    "dtype_vs_bytes": _file({"a": _f32([4], 0, 8)}, bytes(8)),  # 4 float32 need 16 bytes
    "overlapping": _file({"a": _f32([4], 0, 16), "b": _f32([4], 8, 24)}, bytes(24)),
    "same_bytes_twice": _file({"a": _f32([4], 0, 16), "b": _f32([4], 0, 16)}, bytes(16)),
    "gap_between": _file({"a": _f32([2], 0, 8), "b": _f32([2], 16, 24)}, bytes(24)),
    "bytes_after_last": _file({"a": _f32([2], 0, 8)}, bytes(16)),
    "reversed_offsets": _file({"a": _f32([0], 8, 0)}, bytes(8)),
    "negative_shape": _file({"a": _f32([-1], 0, 4)}, bytes(4)),
    "shape_overflows": _file({"a": _f32([2**40, 2**40], 0, 4)}, bytes(4)),
    "shape_wraps_to_zero": _file({"a": {"dtype": "U8", "shape": [2**32, 2**32], "data_offsets": [0, 0]}}),
    "unknown_dtype": _file({"a": {"dtype": "F33", "shape": [1], "data_offsets": [0, 4]}}, bytes(4)),
    "header_length_past_end": _file({"a": _f32([1], 0, 4)}, bytes(4), length=10_000),
    "header_length_short": _file({"a": _f32([1], 0, 4)}, bytes(4), length=20),
    "metadata_not_strings": _file({"__metadata__": {"moe_prune": 5}}),
}


@pytest.mark.parametrize("case", sorted(LYING))
def test_lying_header_is_refused(tmp_path, case):
    path = tmp_path / f"{case}.safetensors"
    path.write_bytes(LYING[case])
    for reader in (read_header, summary, moe_prune.load):
        with pytest.raises(CheckpointError) as e:
            reader(path)
        assert str(path) in str(e.value)


def _native_with(tmp_path, valid, *, header=None, record=None) -> Path:
    """The valid checkpoint with its safetensors header or its moe-prune record changed in place."""
    metadata, head, _ = decode(valid.data)
    rec = json.loads(metadata["moe_prune"])
    if record:
        record(rec)
    head = {**head, "__metadata__": {**metadata, "moe_prune": json.dumps(rec)}}
    if header:
        header(head)
    path = tmp_path / "lies.safetensors"
    path.write_bytes(_file(head, valid.data[valid.body:]))
    return path


NATIVE_LIES = {
    # the same byte count as float32, another kind of number (`summary` reads no tensor: only `load` can tell)
    "int_weights": ({"header": lambda h: h["head.weight"].update(dtype="I32")}, "floating"),
    "family_not_a_name": ({"record": lambda r: r["spec"].update(family=["mnist"])}, "invalid"),
    "spec_not_object": ({"record": lambda r: r.update(spec=5)}, "invalid"),
    "moe_not_object": ({"record": lambda r: r["spec"].update(moe=[1])}, "invalid"),
    "held_not_ids": ({"record": lambda r: r["spec"]["moe"]["moe"].update(held=["x"])}, "invalid"),
    "eps_nan": ({"record": lambda r: r["spec"]["moe"]["moe"].update(eps=float("nan"))}, "eps"),
    "eps_text": ({"record": lambda r: r["spec"]["moe"]["moe"].update(eps="1e-6")}, "eps"),
    "meta_not_object": ({"record": lambda r: r.update(meta=[1])}, "meta"),
    # a ViT of 10**9 blocks: refused at once, not built block by block
    "vit_depth_huge": ({"record": lambda r: r.update(spec={"family": "vit", "config": {"depth": 10**9}})}, "depth"),
}


@pytest.mark.parametrize("case", sorted(NATIVE_LIES))
def test_native_record_that_lies_is_refused(tmp_path, valid, case):
    change, match = NATIVE_LIES[case]
    path = _native_with(tmp_path, valid, **change)
    for reader in (moe_prune.load,) if case == "int_weights" else (summary, moe_prune.load):
        with pytest.raises(CheckpointError, match=match) as e:
            reader(path)
        assert str(path) in str(e.value)


def _containers(inner):
    return st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3)


_JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=6), _containers,
                     max_leaves=6)


@FUZZ
@given(draw=st.data())
def test_fuzz_native_record(valid, draw):
    """The moe-prune record (architecture spec and meta) with one value replaced, deleted or added."""
    metadata, header, _ = decode(valid.data)
    holder = {"record": json.loads(metadata["moe_prune"])}
    parent, key = holder, "record"
    while isinstance(parent[key], (dict, list)) and parent[key] and draw.draw(st.booleans(), label="descend"):
        node = parent[key]
        parent, key = node, draw.draw(st.sampled_from(sorted(node) if isinstance(node, dict) else range(len(node))),
                                      label="key")
    action = draw.draw(st.sampled_from(["replace", "delete", "add"]), label="action")
    if action == "delete" and isinstance(parent, dict) and parent is not holder:
        del parent[key]
    elif action == "add" and isinstance(parent[key], dict):
        parent[key][draw.draw(st.text(max_size=6), label="new key")] = draw.draw(_JSON, label="value")
    else:
        parent[key] = draw.draw(_JSON, label="value")
    metadata = {**metadata, "moe_prune": json.dumps(holder["record"])}
    path = valid.folder / "record.safetensors"
    path.write_bytes(_file({**header, "__metadata__": metadata}, valid.data[valid.body:]))
    model = opens_or_refuses(path)
    if model is not None:
        runs_finite(model)


# -- 2. runs killed mid-write ------------------------------------------------------------------------------------

needs_cli = pytest.mark.skipif(not MOE_PRUNE.is_file(), reason=f"the moe-prune console script is not at {MOE_PRUNE}")


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _run_and_kill(args: list[str], folder: Path, when) -> bool:
    """Start `moe-prune ARGS`, SIGKILL it as soon as `when(seconds since start, folder)` holds.

    Returns:
        True if it was killed, False if it finished first.
    """
    proc = subprocess.Popen([str(MOE_PRUNE), *args], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env=ONE_THREAD)
    t0 = time.monotonic()
    try:
        while proc.poll() is None:
            if when(time.monotonic() - t0, folder):
                proc.send_signal(signal.SIGKILL)
                break
            time.sleep(0.002)
    finally:
        proc.wait()
    return proc.returncode == -signal.SIGKILL


def _temps(folder: Path) -> list[Path]:
    return [p for p in folder.iterdir() if p.name.startswith(".")]


def _after(seconds):
    return lambda t, folder: t >= seconds


def _temp_appears(t, folder):
    return bool(_temps(folder))


def _temp_larger_than(size):
    def when(t, folder):
        return any(p.is_file() and p.stat().st_size > size for p in _temps(folder))
    return when


def _check_after_kill(folder: Path, keep: set[str], out: Path, allowed: set[bytes | None]) -> int:
    """The output is one of the allowed contents (None: absent); only hidden files besides. Returns their count."""
    got = out.read_bytes() if out.exists() else None
    assert got in allowed, f"{out}: {None if got is None else len(got)} bytes, neither absent, old nor complete"
    leftovers = [p for p in folder.iterdir() if p.name not in keep | {out.name}]
    assert all(p.name.startswith(".") for p in leftovers), leftovers  # SIGKILL may leave hidden temporaries
    for p in leftovers:
        shutil.rmtree(p) if p.is_dir() else p.unlink()
    return len(leftovers)


@pytest.fixture(scope="module")
def big_layer(tmp_path_factory):
    """A bare Soft MoE layer of 34 MB, and float32 calibration tokens [16, 8, 256] for it."""
    folder = tmp_path_factory.mktemp("killed")
    torch.manual_seed(0)
    ckpt = moe_prune.save(SoftMoE(SoftMoEConfig(dim=256, num_experts=64, slots_per_expert=1, hidden=256)),
                          folder / "layer.safetensors")
    calib = folder / "tokens.npy"
    np.save(calib, np.random.default_rng(0).standard_normal((16, 8, 256)).astype(np.float32))
    return folder, ckpt, calib


@needs_cli
@pytest.mark.slow
def test_killed_compress_leaves_old_or_complete_output(big_layer):
    folder, ckpt, calib = big_layer
    src_sha = _sha(ckpt)
    out = folder / "small.safetensors"
    args = ["compress", str(ckpt), "--keep", "1/2", "--calib", str(calib), "--out", str(out)]
    t0 = time.monotonic()
    assert not _run_and_kill(args, folder, lambda t, f: False)
    seconds = time.monotonic() - t0
    complete = out.read_bytes()  # the reference: an uninterrupted run
    ref = moe_prune.load(out)
    assert ref.config.num_held == 32 and len(complete) > 15e6
    old = compress_file(ckpt, {"": [0, 1]}, folder / "old.safetensors").read_bytes()  # a previous, other output
    (folder / "old.safetensors").unlink()
    keep = {ckpt.name, calib.name}
    trials = [_after(0.05), _after(0.5 * seconds), _after(0.85 * seconds), _after(0.95 * seconds),
              _temp_appears, _temp_larger_than(len(complete) // 2)]
    killed, hidden = 0, 0
    for i, when in enumerate(trials):
        previous = old if i % 2 else None
        if previous is None:
            out.unlink(missing_ok=True)
        else:
            out.write_bytes(previous)
        killed += _run_and_kill(args, folder, when)
        hidden += _check_after_kill(folder, keep, out, {previous, complete})
    assert killed >= 3  # most trials really killed it (the size trigger can miss a fast write)
    assert _sha(ckpt) == src_sha
    assert out.read_bytes() in (old, complete)


@needs_cli
@pytest.mark.slow
def test_killed_export_leaves_old_or_complete_output(big_layer):
    folder, ckpt, _ = big_layer
    out = folder / "layer.onnx"
    complete = export_onnx(moe_prune.load(ckpt), out).read_bytes()  # the CLI exports the same bytes
    old = export_onnx(SoftMoE(SoftMoEConfig(dim=8, num_experts=2, slots_per_expert=1, hidden=4)), out).read_bytes()
    keep = {p.name for p in folder.iterdir()} - {out.name}
    args = ["export", str(ckpt), "--out", str(out)]
    for when in (_temp_appears, _temp_larger_than(len(complete) // 2)):
        out.write_bytes(old)
        _run_and_kill(args, folder, when)
        _check_after_kill(folder, keep, out, {old, complete})
    assert not _run_and_kill(args + ["--no-validate"], folder, lambda t, f: False)
    assert out.read_bytes() == complete


# -- 3. training resumes where it stopped ------------------------------------------------------------------------


def test_resumed_training_is_bit_identical(tmp_path, monkeypatch):
    from moe_prune.data import mnist as data
    from moe_prune.flows.train import TrainConfig, train

    images, labels = data.load_images("sample", split="test")
    train_set, test_set = (images[:320], labels[:320]), (images[320:400], labels[320:400])
    config = TrainConfig(epochs=2, batch_size=64, seed=3)

    def fresh():
        torch.manual_seed(0)
        return MnistSoftMoE(MnistConfig(num_experts=4))

    whole = fresh()
    train(whole, train_set, test_set, config, out=tmp_path / "whole.safetensors", progress=False)

    real = data.iterate_batches

    def stop_at_epoch_2(*args, seed=0, **kwargs):  # the run is interrupted as the second epoch starts
        if seed == config.seed * 1000 + 1:
            raise KeyboardInterrupt
        return real(*args, seed=seed, **kwargs)

    out = tmp_path / "resumed.safetensors"
    monkeypatch.setattr(data, "iterate_batches", stop_at_epoch_2)
    with pytest.raises(KeyboardInterrupt):
        train(fresh(), train_set, test_set, config, out=out, progress=False)
    monkeypatch.setattr(data, "iterate_batches", real)
    assert not out.exists() and Path(f"{out}.resume").exists()

    torch.manual_seed(1234)  # neither the global RNG state nor the new model's initial weights may matter
    resumed = MnistSoftMoE(MnistConfig(num_experts=4))
    result = train(resumed, train_set, test_set, config, out=out, progress=False)
    assert not Path(f"{out}.resume").exists()
    assert [h["epoch"] for h in result["history"]] == [1, 2]
    a, b = whole.state_dict(), resumed.state_dict()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    assert moe_prune.load(out).state_dict().keys() == a.keys()
    for name, t in moe_prune.load(out).state_dict().items():
        assert torch.equal(t, a[name]), name


# -- 4. determinism ----------------------------------------------------------------------------------------------


def test_compress_twice_gives_identical_files(tmp_path):
    from moe_prune.data.sources import calibration_batches

    torch.manual_seed(0)
    src = moe_prune.save(MnistSoftMoE(MnistConfig(num_experts=16)), tmp_path / "m.safetensors")
    paths, subsets = [], []
    for i in range(2):
        batches = calibration_batches("sample", limit=200, batch_size=64)
        path, chosen = compress_checkpoint(src, tmp_path / f"c{i}.safetensors", "1/4", batches, progress=False)
        paths.append(path)
        subsets.append(chosen)
    assert subsets[0].keys() == subsets[1].keys()
    assert all(torch.equal(subsets[0][k], subsets[1][k]) for k in subsets[0])
    assert paths[0].read_bytes() == paths[1].read_bytes()


def test_export_of_a_compressed_checkpoint_twice_runs_identically(tmp_path):
    import onnxruntime as ort

    torch.manual_seed(0)
    src = moe_prune.save(MnistSoftMoE(MnistConfig(num_experts=16)), tmp_path / "m.safetensors")
    small = compress_file(src, {"moe": [1, 4, 6, 11]}, tmp_path / "small.safetensors")
    x = example_input(moe_prune.load(small), 5, generator=torch.Generator().manual_seed(0)).numpy()
    files, outputs = [], []
    for i in range(2):
        path, report = export_checkpoint(small, tmp_path / f"s{i}.onnx")
        assert report.passed
        files.append(path.read_bytes())
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        outputs.append(session.run(None, {"input": x})[0])
    assert files[0] == files[1]
    assert np.array_equal(outputs[0], outputs[1])


# -- 5. user mistakes: one line, exit status 2, no traceback, nothing left behind, inputs unchanged ---------------
#
# Each row is a command a user can get wrong. The oracle is the same for all of them: exactly one line on stderr,
# "moe-prune: error: ..." with the words the row expects, exit status 2, no traceback, and the workspace byte
# for byte as it was (every input unchanged, no output file or folder, no temporary file). Rows marked "late"
# fail after outputs were written (a patched step raises), so they check that a run takes back what it made.


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """Inputs for the table: checkpoints (a model, a bare layer, a compressed one of another model, damaged
    headers) and calibration arrays of every wrong kind."""
    from moe_prune.compression.compress import compress_model

    ws = tmp_path_factory.mktemp("mistakes")
    torch.manual_seed(0)
    moe_prune.save(MnistSoftMoE(MnistConfig(num_experts=8)), ws / "m.safetensors")
    moe_prune.save(SoftMoE(SoftMoEConfig(dim=16, num_experts=4, slots_per_expert=1, hidden=8)), ws / "layer.safetensors")
    other = MnistSoftMoE(MnistConfig(num_experts=8))  # same architecture, other weights
    moe_prune.save(compress_model(other, {"moe": torch.tensor([0, 3])}), ws / "other_small.safetensors")
    moe_prune.save(MnistSoftMoE(MnistConfig(num_experts=4)), ws / "m4.safetensors")
    rng = np.random.default_rng(0)
    arrays = {
        "c5.npy": (rng.random((12, 5, 7, 7)) * 255).astype(np.uint8),  # uint8 with no channel axis of 1, 3 or 4
        "c3.npy": rng.random((12, 3, 28, 28)).astype(np.float32),  # [N, 3, 28, 28]
        "c784.npy": rng.random((12, 784)).astype(np.float32),  # [N, 784]
        "cfloat.npy": rng.random((12, 28, 28)).astype(np.float32),  # float [N, 28, 28]: no channel axis
        "c1d.npy": rng.random(12).astype(np.float32),  # 1-D
        "c255.npy": (rng.random((12, 1, 28, 28)) * 255).astype(np.float32),  # float pixels in 0-255
        "tokens.npy": rng.standard_normal((12, 5, 16)).astype(np.float32),  # right for the layer
    }
    for name, a in arrays.items():
        np.save(ws / name, a)
    metadata, head, _ = decode((ws / "m.safetensors").read_bytes())
    data = (ws / "m.safetensors").read_bytes()
    body = data[8 + struct.unpack("<Q", data[:8])[0]:]
    from safetensors.torch import save_file

    state = moe_prune.load(ws / "m.safetensors").state_dict()
    del state["head.weight"]  # a tensor the spec needs is not there; the file is otherwise well formed
    save_file(state, str(ws / "missing_tensor.safetensors"), metadata=metadata)
    rec = json.loads(metadata["moe_prune"])
    rec["spec"]["moe"]["moe"].update(held=[0, 1, 2])  # 3 held experts, the stacks hold 8
    (ws / "held_lies.safetensors").write_bytes(_file({**head, "__metadata__": {**metadata, "moe_prune": json.dumps(rec)}}, body))
    return ws


def _fail_late(where: str, error):
    """A patch: `where` (module.attr) raises `error` when called, after the run has written outputs."""
    def patch(monkeypatch):
        def boom(*args, **kwargs):
            raise error
        monkeypatch.setattr(where, boom)
    return patch


def _fail_validation(monkeypatch):
    from moe_prune.onnx import validate

    real = validate.compare_batch

    def compare(check, *args):
        real(check, *args)
        check.passed = False  # as if ONNX Runtime had differed from PyTorch
    monkeypatch.setattr(validate, "compare_batch", compare)


_C = ["compress", "m.safetensors", "--calib-limit", "12", "--out", "OUT/"]
_E = ["eval", "m.safetensors", "--data", "sample", "--keep", "1/2", "--modes", "drop", "--batch-sizes", "32",
      "--random-seeds", "1", "--calib-limit", "12", "--out-dir", "OUT"]
_T = ["export", "m.safetensors", "--format", "triton-repo", "--out", "OUT"]
_B = ["bench", "m.safetensors", "--batch-sizes", "1", "--min-seconds", "0", "--no-layer", "--out-dir", "OUT"]
SHAPE = "takes images [N, 1, 28, 28]"
MISTAKES = {  # name: (argv, words the one line must hold, patch or None)
    **{f"compress_calib_{c}": ([*_C, "--calib", f"{c}.npy"], [f"{c}.npy", found, SHAPE], None)
       for c, found in (("c5", "[12, 5, 7, 7]"), ("c3", "[12, 3, 28, 28]"), ("c784", "[12, 784]"),
                        ("cfloat", "float32 [12, 28, 28]"), ("c1d", "[12]"))},
    **{f"eval_calib_{c}": ([*_E, "--calib", f"{c}.npy"], [f"{c}.npy", found, SHAPE], None)
       for c, found in (("c5", "[12, 5, 7, 7]"), ("c3", "[12, 3, 28, 28]"), ("c784", "[12, 784]"),
                        ("cfloat", "float32 [12, 28, 28]"), ("c1d", "[12]"))},
    "compress_calib_0_255_floats": ([*_C, "--calib", "c255.npy"], ["c255.npy", "[0, 1]", "255"], None),
    "eval_calib_0_255_floats": ([*_E, "--calib", "c255.npy"], ["c255.npy", "[0, 1]"], None),
    "compress_layer_on_images": (["compress", "layer.safetensors", "--calib", "sample", "--out", "OUT/"],
                                 ["sample", "tokens [N, M, 16]"], None),
    "eval_layer_on_images": (["eval", "layer.safetensors", "--data", "sample", "--out-dir", "OUT"],
                             ["sample", "tokens [N, M, 16]"], None),
    "demo_layer": (["demo", "--checkpoint", "layer.safetensors", "--out-dir", "OUT"], ["tokens [N, M, 16]", "bench"], None),
    "triton_repo_onto_a_file": (["export", "m.safetensors", "--format", "triton-repo", "--out", "c1d.npy"],
                                ["c1d.npy", "not a folder"], None),
    "eval_random_seeds_0": ([*_E[:-6], "--random-seeds", "0", "--out-dir", "OUT"], ["--random-seeds 0", "at least 1"], None),
    "eval_random_seeds_negative": ([*_E[:-6], "--random-seeds", "-1", "--out-dir", "OUT"], ["--random-seeds -1"], None),
    "triton_max_batch_0": ([*_T, "--max-batch-size", "0"], ["--max-batch-size 0"], None),
    "triton_max_batch_negative": ([*_T, "--max-batch-size", "-4"], ["--max-batch-size -4"], None),
    "bench_min_seconds_negative": (["bench", "m.safetensors", "--min-seconds", "-1", "--out-dir", "OUT"],
                                   ["--min-seconds -1"], None),
    "export_atol_negative": (["export", "m.safetensors", "--out", "OUT.onnx", "--atol", "-1"], ["--atol -1"], None),
    "bench_compressed_from_another_model": ([*_B, "--compressed", "other_small.safetensors"],
                                            ["other_small.safetensors", "not compressed from m.safetensors", "weights"], None),
    "bench_compressed_of_another_size": ([*_B, "--compressed", "m4.safetensors"], ["m4.safetensors", "num_experts"], None),
    "bench_compressed_not_compressed": ([*_B, "--compressed", "m.safetensors"], ["no kept experts"], None),
    "info_missing_tensor": (["info", "missing_tensor.safetensors"], ["missing_tensor.safetensors", "head.weight"], None),
    "info_held_contradicts_shapes": (["info", "held_lies.safetensors"], ["held_lies.safetensors", "shape"], None),
    "compress_out_without_suffix": ([*_C[:-1], "OUT", "--calib", "sample"], ["OUT", ".safetensors file or a folder"], None),
    "export_out_without_suffix": (["export", "m.safetensors", "--out", "OUT"], ["OUT", ".onnx file or a folder"], None),
    "usage_error_is_one_line": (["compress", "m.safetensors", "--out", "OUT/"], ["--calib", "--help"], None),
    # late: outputs were written when the run failed
    "late_export_validation_fails": (["export", "m.safetensors", "--out", "OUT/"], ["not written", "--keep-invalid"],
                                     _fail_validation),
    "late_triton_repo_validation_fails": (_T, ["OUT", "differs"], _fail_validation),
    "late_compress_fails_writing": ([*_C, "--calib", "sample"], ["disk full"],
                                    _fail_late("moe_prune.core.checkpoint._sort_metadata", moe_prune.errors.OutputError("disk full"))),
    "late_demo_fails_in_export": (["demo", "--checkpoint", "m.safetensors", "--keep", "2", "--out-dir", "OUT/deeper",
                                   "--heal-steps", "10"],
                                  ["exporter broke"],
                                  _fail_late("moe_prune.flows.demo.benchmark", moe_prune.errors.ExportError("exporter broke"))),
    "late_eval_fails_writing": ([*_E, "--calib", "sample"], ["disk full"],
                                _fail_late("moe_prune.measurement.reports.study_markdown", moe_prune.errors.OutputError("disk full"))),
    "late_bench_fails_timing": (_B, ["timer broke"],
                                _fail_late("moe_prune.measurement.bench.bench_models", moe_prune.errors.ConfigError("timer broke"))),
}


def _tree(folder: Path) -> dict:
    return {str(p.relative_to(folder)): (_sha(p) if p.is_file() else "dir") for p in sorted(folder.rglob("*"))}


@pytest.mark.parametrize("case", sorted(MISTAKES))
def test_user_mistake_is_one_line_and_leaves_nothing(workspace, case, tmp_path, monkeypatch, capfd):
    from moe_prune.cli import main

    argv, words, patch = MISTAKES[case]
    workspace = Path(shutil.copytree(workspace, tmp_path / "ws"))  # each row on its own copy: rows cannot mask each other
    monkeypatch.chdir(workspace)
    if patch is not None:
        patch(monkeypatch)
    before = _tree(workspace)
    capfd.readouterr()
    try:
        code = main(list(argv))
    except SystemExit as e:  # argparse
        code = e.code
    err = capfd.readouterr().err.strip().splitlines()
    assert code == 2, (code, err)
    if case.startswith("late_"):  # the run's progress lines came first; the error is the last line, alone
        assert sum(line.startswith("moe-prune: error: ") for line in err) == 1, err
    else:  # refused before any work: the error is all there is
        assert len(err) == 1, err
    assert err[-1].startswith("moe-prune: error: "), err
    assert not any("Traceback" in line for line in err), err
    for word in words:
        assert word in err[-1], (word, err[-1])
    assert _tree(workspace) == before  # inputs byte-identical; no output, folder or temporary left


def test_export_keep_invalid_keeps_the_failed_model_and_says_where(workspace, tmp_path, monkeypatch, capfd):
    from moe_prune.cli import main

    _fail_validation(monkeypatch)
    out = tmp_path / "new" / "bad.onnx"
    out.parent.mkdir()
    assert main(["export", str(workspace / "m.safetensors"), "--out", str(out), "--keep-invalid"]) == 2
    err = capfd.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"kept at {out}" in err[0], err
    assert out.is_file() and sorted(p.name for p in out.parent.iterdir()) == ["bad.onnx"]


def test_export_that_fails_validation_keeps_the_old_file(workspace, tmp_path, monkeypatch):
    from moe_prune.cli import main

    out = tmp_path / "m.onnx"
    out.write_bytes(b"the previous model")
    _fail_validation(monkeypatch)
    assert main(["export", str(workspace / "m.safetensors"), "--out", str(out)]) == 2
    assert out.read_bytes() == b"the previous model" and sorted(os.listdir(tmp_path)) == ["m.onnx"]


def test_the_console_script_prints_one_line(workspace):
    """The real process (not main() in this one): stderr holds the one line and nothing else."""
    if not MOE_PRUNE.is_file():
        pytest.skip(f"the moe-prune console script is not at {MOE_PRUNE}")
    proc = subprocess.run([str(MOE_PRUNE), "eval", "m.safetensors", "--random-seeds", "0"], cwd=workspace,
                          capture_output=True, text=True, env=ONE_THREAD)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "--random-seeds 0" in proc.stderr, proc.stderr


def test_training_watches_validation_and_reads_the_test_set_once(monkeypatch):
    """With a validation split every epoch is measured there; the test set is evaluated once, at the end."""
    import moe_prune.flows.train as train_module
    from moe_prune.core.models import MnistConfig, MnistSoftMoE
    from moe_prune.flows.train import TrainConfig, train

    g = torch.Generator().manual_seed(0)
    images = (torch.rand(96, 28, 28, generator=g) * 255).to(torch.uint8).numpy()
    labels = torch.randint(0, 10, (96,), generator=g).numpy()
    train_set, val_set, test_set = (images[:64], labels[:64]), (images[64:80], labels[64:80]), (images[80:], labels[80:])
    seen = []
    real = train_module.accuracy

    def counting(model, x, y, *args, **kwargs):
        seen.append(len(x))
        return real(model, x, y, *args, **kwargs)

    monkeypatch.setattr(train_module, "accuracy", counting)
    torch.manual_seed(0)
    result = train(MnistSoftMoE(MnistConfig(num_experts=4)), train_set, test_set, TrainConfig(epochs=3, batch_size=32),
                   progress=False, val_set=val_set)
    assert seen == [16, 16, 16, 16]  # three epochs on the 16 validation images, then the 16 test images once
    assert all("val_accuracy" in h and "test_accuracy" not in h for h in result["history"])
    assert 0 <= result["test_accuracy"] <= 1
