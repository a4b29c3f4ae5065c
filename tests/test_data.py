"""moe_prune.data: IDX reading against files written here byte by byte, every malformed input a DataError, the
bundled sample checked against the original Fashion-MNIST test file when Debian's package is installed.

No test downloads anything; tests that need /usr/share/datasets/fashion-mnist skip with a reason without it.
"""

from __future__ import annotations

import gzip
import os
import pickle
import struct
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from moe_prune.data import mnist as data
from moe_prune.data.mnist import iterate_batches, load_images, make_sample, to_tensor
from moe_prune.data.arrays import load_inputs
from moe_prune.errors import DataError
from moe_prune.data.idx import read_idx

DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")
needs_debian = pytest.mark.skipif(
    not (DEBIAN_DIR / "t10k-images-idx3-ubyte.gz").is_file(),
    reason="needs Debian's dataset-fashion-mnist (apt-get install -y dataset-fashion-mnist); not installed here",
)

# The IDX spec's type codes, written out here independently of moe_prune.data.
CODES = {np.uint8: 0x08, np.int8: 0x09, np.int16: 0x0B, np.int32: 0x0C, np.float32: 0x0D, np.float64: 0x0E}


def idx_bytes(arr: np.ndarray, code: int | None = None, dims=None) -> bytes:
    """An IDX file's bytes: 00 00 code ndim, big-endian uint32 dims, big-endian payload."""
    code = CODES[arr.dtype.type] if code is None else code
    dims = arr.shape if dims is None else dims
    head = bytes([0, 0, code, len(dims)]) + struct.pack(f">{len(dims)}I", *dims)
    return head + arr.astype(arr.dtype.newbyteorder(">")).tobytes()


def write(path: Path, payload: bytes, gz: bool = False) -> Path:
    path.write_bytes(gzip.compress(payload, mtime=0) if gz else payload)
    return path


def write_set(directory: Path, images: np.ndarray, labels: np.ndarray, prefix: str = "train", gz: bool = True,
              img_code: int | None = None, lbl_code: int | None = None) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    sfx = ".gz" if gz else ""
    write(directory / f"{prefix}-images-idx3-ubyte{sfx}", idx_bytes(images, img_code), gz)
    write(directory / f"{prefix}-labels-idx1-ubyte{sfx}", idx_bytes(labels, lbl_code), gz)
    return directory


def rand_images(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(n, 28, 28), dtype=np.uint8)


# ---------------------------------------------------------------------------------------------------------------
# read_idx: round trips


@pytest.mark.parametrize("gz", [False, True], ids=["plain", "gzip"])
@pytest.mark.parametrize("dtype", [np.uint8, np.int8, np.int16, np.int32, np.float32, np.float64])
@pytest.mark.parametrize("shape", [(7,), (3, 5, 7), (0, 4), (2, 1, 3, 1)])
def test_read_idx_round_trip(tmp_path, gz, dtype, shape):
    rng = np.random.default_rng(1)
    if np.dtype(dtype).kind == "f":
        arr = rng.standard_normal(shape).astype(dtype)
    else:
        info = np.iinfo(dtype)
        arr = rng.integers(info.min, info.max, size=shape, endpoint=True, dtype=dtype)
    out = read_idx(write(tmp_path / "a.idx", idx_bytes(arr), gz))
    assert out.dtype == np.dtype(dtype)  # native byte order, not '>'
    assert out.dtype.isnative
    np.testing.assert_array_equal(out, arr)
    assert out.flags.writeable


def test_gzip_detected_by_magic_not_by_name(tmp_path):
    arr = np.arange(12, dtype=np.uint8).reshape(3, 4)
    np.testing.assert_array_equal(read_idx(write(tmp_path / "plain.gz", idx_bytes(arr), gz=False)), arr)
    np.testing.assert_array_equal(read_idx(write(tmp_path / "packed.idx", idx_bytes(arr), gz=True)), arr)


def test_read_idx_large_gzip_payload_crosses_chunks(tmp_path):
    # bigger than one decompression chunk, so the chunked reader's seams are exercised
    arr = np.random.default_rng(2).integers(0, 256, size=(3000, 28, 28), dtype=np.uint8)  # 2.35 MB
    np.testing.assert_array_equal(read_idx(write(tmp_path / "big.gz", idx_bytes(arr), gz=True)), arr)


# ---------------------------------------------------------------------------------------------------------------
# read_idx: every bad input is a DataError naming the file


GOOD = idx_bytes(np.arange(24, dtype=np.uint8).reshape(2, 3, 4))


@pytest.mark.parametrize("gz", [False, True], ids=["plain", "gzip"])
@pytest.mark.parametrize(
    "payload, match",
    [
        (b"", "too short"),
        (b"\x00\x00", "too short"),
        (b"\x01\x00\x08\x01" + GOOD[4:], "magic"),
        (b"\x00\x07\x08\x03" + GOOD[4:], "magic"),
        (b"\x00\x00\x0a\x03" + GOOD[4:], "type code 0x0A"),
        (b"\x00\x00\x07\x03" + GOOD[4:], "type code 0x07"),
        (b"\x00\x00\x08\x00", "dimensions"),
        (b"\x00\x00\x08\x21" + b"\x00" * 200, "dimensions"),  # 33 dims
        (GOOD[:10], "header truncated"),
        (GOOD[:-1], "truncated"),
        (GOOD[:16], "truncated"),
        (GOOD + b"\x00", "extra bytes"),
        (GOOD + b"\x00" * 1000, "extra bytes"),
    ],
)
def test_read_idx_bad_input(tmp_path, gz, payload, match):
    path = write(tmp_path / "bad-idx", payload, gz)
    with pytest.raises(DataError, match=match) as exc:
        read_idx(path)
    assert str(path) in str(exc.value)


def test_read_idx_hostile_16_bytes_declaring_huge_size(tmp_path):
    # 16 bytes claiming 2**32-1 ** 3 float64s: refused from the header, before anything is allocated
    path = write(tmp_path / "hostile", bytes([0, 0, 0x0E, 3]) + b"\xff" * 12)
    with pytest.raises(DataError, match="limit") as exc:
        read_idx(path)
    assert str(path) in str(exc.value)


@pytest.mark.parametrize("gz", [False, True], ids=["plain", "gzip"])
def test_read_idx_declared_size_under_limit_but_absent_allocates_nothing(tmp_path, gz):
    # declares 1 GiB (under the 2 GiB limit) with 10 bytes of payload: must fail without allocating the GiB
    path = write(tmp_path / "liar", bytes([0, 0, 0x08, 1]) + struct.pack(">I", 1 << 30) + b"x" * 10, gz)
    tracemalloc.start()
    try:
        with pytest.raises(DataError, match="truncated"):
            read_idx(path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 16 << 20, f"peak {peak} bytes"


def test_read_idx_max_bytes_is_honoured(tmp_path):
    path = write(tmp_path / "a", GOOD)
    assert read_idx(path, max_bytes=24).shape == (2, 3, 4)
    with pytest.raises(DataError, match="limit"):
        read_idx(path, max_bytes=23)


def test_read_idx_corrupt_gzip(tmp_path):
    packed = gzip.compress(idx_bytes(rand_images(20)), mtime=0)
    cut = write(tmp_path / "cut.gz", packed[: len(packed) // 2])
    with pytest.raises(DataError, match="cut.gz"):
        read_idx(cut)
    flipped = bytearray(packed)
    flipped[-6] ^= 0xFF  # inside the CRC32 / size trailer
    with pytest.raises(DataError, match="gzip"):
        read_idx(write(tmp_path / "crc.gz", bytes(flipped)))


def test_read_idx_missing_file_and_directory(tmp_path):
    with pytest.raises(DataError, match="nope.gz"):
        read_idx(tmp_path / "nope.gz")
    with pytest.raises(DataError, match=str(tmp_path)):
        read_idx(tmp_path)


# property: arbitrary bytes either give an array or a DataError, nothing else


@st.composite
def idx_like(draw):
    code = draw(st.sampled_from([0x08, 0x09, 0x0B, 0x0C, 0x0D, 0x0E, 0x00, 0x0A, 0xFF]))
    ndim = draw(st.integers(0, 5))
    dims = draw(st.lists(st.integers(0, 4) | st.integers(0, 2**32 - 1), min_size=ndim, max_size=ndim))
    body = bytes([0, 0, code, ndim]) + struct.pack(f">{ndim}I", *dims) + draw(st.binary(max_size=120))
    if draw(st.booleans()):
        body = body[: draw(st.integers(0, len(body)))]
    if draw(st.booleans()):
        body = gzip.compress(body, mtime=0)
        if draw(st.booleans()):  # damage the gzip stream too
            i = draw(st.integers(0, len(body) - 1))
            body = body[:i] + bytes([body[i] ^ draw(st.integers(1, 255))]) + body[i + 1 :]
    return body[:200]


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(payload=st.binary(max_size=200) | idx_like())
def test_read_idx_arbitrary_bytes_array_or_data_error(tmp_path, payload):
    path = tmp_path / "fuzz"
    path.write_bytes(payload)
    try:
        out = read_idx(path)
    except DataError:
        return
    assert isinstance(out, np.ndarray)


# ---------------------------------------------------------------------------------------------------------------
# load_images


@pytest.mark.parametrize("gz", [False, True], ids=["plain", "gzip"])
@pytest.mark.parametrize("split, prefix", [("train", "train"), ("test", "t10k")])
def test_load_images_directory(tmp_path, gz, split, prefix):
    imgs, lbls = rand_images(9), np.arange(9, dtype=np.uint8) % 10
    write_set(tmp_path, imgs, lbls, prefix=prefix, gz=gz)
    images, labels = load_images(tmp_path, split=split)
    np.testing.assert_array_equal(images, imgs)
    np.testing.assert_array_equal(labels, lbls)
    assert images.dtype == np.uint8 and labels.dtype == np.int64
    assert load_images(str(tmp_path), split=split)[0].shape == (9, 28, 28)  # str paths too


def test_load_images_count_mismatch(tmp_path):
    write_set(tmp_path, rand_images(5), np.zeros(4, dtype=np.uint8))
    with pytest.raises(DataError, match="5 images but .* 4 labels"):
        load_images(tmp_path)


def test_load_images_label_out_of_range(tmp_path):
    write_set(tmp_path, rand_images(5), np.array([0, 9, 10, 3, 255], dtype=np.uint8))
    with pytest.raises(DataError, match=r"2 labels outside 0..9 \(first: label 10 at index 2\)"):
        load_images(tmp_path)


@pytest.mark.parametrize("shape", [(5, 28, 27), (5, 784), (5, 1, 28, 28)])
def test_load_images_wrong_dims(tmp_path, shape):
    write_set(tmp_path, np.zeros(shape, dtype=np.uint8), np.zeros(5, dtype=np.uint8))
    with pytest.raises(DataError, match=r"expected uint8 \[N, 28, 28\]"):
        load_images(tmp_path)


def test_load_images_wrong_image_dtype(tmp_path):
    write_set(tmp_path, np.zeros((5, 28, 28), dtype=np.int16), np.zeros(5, dtype=np.uint8))
    with pytest.raises(DataError, match="int16"):
        load_images(tmp_path)


def assert_tells_how_to_get_it(msg: str, tv: str = "FashionMNIST"):
    assert "pass (as --data or --calib) a folder" in msg
    assert f"torchvision.datasets.{tv}(root, download=True)" in msg
    assert "never downloads" in msg
    assert "\n" not in msg  # the CLI prints it on one line


def test_missing_directory_message(tmp_path):
    with pytest.raises(DataError) as exc:
        load_images(tmp_path / "absent")
    msg = str(exc.value)
    assert str(tmp_path / "absent") in msg
    assert "apt-get install -y dataset-fashion-mnist" in msg
    assert_tells_how_to_get_it(msg)


def test_directory_without_the_files_names_the_missing_one(tmp_path):
    write_set(tmp_path, rand_images(3), np.zeros(3, dtype=np.uint8), prefix="train")
    with pytest.raises(DataError, match="t10k-images-idx3-ubyte") as exc:
        load_images(tmp_path, split="test")
    assert_tells_how_to_get_it(str(exc.value))


def test_fashion_mnist_missing_message(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "FASHION_MNIST_DIR", tmp_path / "not-installed")
    with pytest.raises(DataError) as exc:
        load_images("fashion-mnist")
    msg = str(exc.value)
    assert "apt-get install -y dataset-fashion-mnist" in msg and "not-installed" in msg
    assert_tells_how_to_get_it(msg)


def test_mnist_has_no_default_location():
    with pytest.raises(DataError) as exc:
        load_images("mnist")
    msg = str(exc.value)
    assert "no default location" in msg and "apt-get" not in msg
    assert_tells_how_to_get_it(msg, tv="MNIST")


def test_unknown_split(tmp_path):
    with pytest.raises(DataError, match="'val'"):
        load_images(tmp_path, split="val")


# ---------------------------------------------------------------------------------------------------------------
# the bundled sample


def test_sample_loads_without_debian_package():
    images, labels = load_images("sample", split="test")
    assert images.shape == (1000, 28, 28) and images.dtype == np.uint8
    assert labels.shape == (1000,) and labels.dtype == np.int64
    assert set(np.unique(labels)) == set(range(10))
    assert images.max() == 255 and images.min() == 0


def test_sample_has_only_the_test_split():
    with pytest.raises(DataError, match="split='test'"):
        load_images("sample", split="train")


def test_sample_license_is_bundled():
    import importlib.resources

    text = (importlib.resources.files("moe_prune") / "assets" / "FASHION_MNIST_LICENSE.txt").read_text("utf-8")
    for needle in ("Zalando SE", "MIT", "arXiv:1708.07747", "first 1,000", "make_sample"):
        assert needle in text


@needs_debian
def test_sample_matches_original_test_file():
    # independent of read_idx: the upstream reader's way (skip the 16/8-byte header, read bytes)
    with gzip.open(DEBIAN_DIR / "t10k-images-idx3-ubyte.gz") as f:
        ref_images = np.frombuffer(f.read(), dtype=np.uint8, offset=16).reshape(-1, 28, 28)
    with gzip.open(DEBIAN_DIR / "t10k-labels-idx1-ubyte.gz") as f:
        ref_labels = np.frombuffer(f.read(), dtype=np.uint8, offset=8)
    images, labels = load_images("sample", split="test")
    np.testing.assert_array_equal(images, ref_images[:1000])
    np.testing.assert_array_equal(labels, ref_labels[:1000])


@needs_debian
@pytest.mark.parametrize("split, n", [("train", 60000), ("test", 10000)])
def test_fashion_mnist_full(split, n):
    images, labels = load_images("fashion-mnist", split=split)
    assert images.shape == (n, 28, 28)
    assert np.bincount(labels, minlength=10).tolist() == [n // 10] * 10


def test_make_sample(tmp_path):
    src = write_set(tmp_path / "src", rand_images(6), np.array([3, 1, 4, 1, 5, 9], dtype=np.uint8), prefix="t10k")
    out = make_sample(src, tmp_path / "s.npz", n=4)
    assert out == tmp_path / "s.npz"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.npz", "src"]  # no temporary left behind
    assert (out.stat().st_mode & 0o777) == 0o644
    with np.load(out, allow_pickle=False) as z:
        np.testing.assert_array_equal(z["images"], rand_images(6)[:4])
        np.testing.assert_array_equal(z["labels"], [3, 1, 4, 1])
    with pytest.raises(DataError, match="cannot take 7 images"):
        make_sample(src, tmp_path / "t.npz", n=7)


# ---------------------------------------------------------------------------------------------------------------
# to_tensor, iterate_batches


def test_to_tensor_scales_to_unit_interval():
    imgs = rand_images(3)
    imgs[0, 0, 0], imgs[0, 0, 1] = 0, 255
    x = to_tensor(imgs)
    assert x.shape == (3, 1, 28, 28) and x.dtype == torch.float32
    torch.testing.assert_close(x, torch.from_numpy(imgs).float().unsqueeze(1) / 255)
    assert x[0, 0, 0, 0] == 0.0 and x[0, 0, 0, 1] == 1.0
    torch.testing.assert_close(to_tensor(imgs[:, None]), x)  # [N, 1, H, W] accepted too
    torch.testing.assert_close(to_tensor(torch.from_numpy(imgs)), x)


@pytest.mark.parametrize("bad", [np.zeros((2, 28, 28), np.float32), np.zeros((2, 3, 28, 28), np.uint8),
                                 np.zeros((28, 28, 1, 1, 1), np.uint8), np.zeros(784, np.uint8)])
def test_to_tensor_rejects(bad):
    with pytest.raises(DataError):
        to_tensor(bad)


@pytest.mark.parametrize("n, bs", [(10, 4), (10, 10), (10, 11), (1, 1), (33, 8)])
@pytest.mark.parametrize("shuffle", [False, True])
def test_iterate_batches(n, bs, shuffle):
    # image i is filled with the value i, and its label is i % 10: each batch's pairs must stay aligned
    imgs = np.repeat(np.arange(n, dtype=np.uint8), 28 * 28).reshape(n, 28, 28)
    labels = np.arange(n) % 10
    batches = list(iterate_batches(imgs, labels, bs, shuffle=shuffle, seed=3))
    assert [len(x) for x, _ in batches] == [min(bs, n - s) for s in range(0, n, bs)]
    seen = []
    for x, y in batches:
        assert x.dtype == torch.float32 and x.shape[1:] == (1, 28, 28) and y.dtype == torch.int64
        idx = torch.round(x[:, 0, 0, 0] * 255).long()
        assert torch.equal(idx % 10, y)
        seen += idx.tolist()
    assert sorted(seen) == list(range(n))
    if not shuffle:
        assert seen == list(range(n))
    again = [y for _, y in iterate_batches(imgs, labels, bs, shuffle=shuffle, seed=3)]
    assert all(torch.equal(a, b) for a, b in zip(again, [y for _, y in batches]))


def test_iterate_batches_shuffle_depends_on_seed():
    labels = np.arange(100)
    imgs = np.zeros((100, 28, 28), dtype=np.uint8)
    order = lambda seed: torch.cat([y for _, y in iterate_batches(imgs, labels, 7, shuffle=True, seed=seed)])
    assert not torch.equal(order(0), order(1))
    assert not torch.equal(order(0), torch.arange(100))


def test_iterate_batches_floats_tensors_and_no_labels():
    x = torch.randn(9, 1, 28, 28)
    batches = list(iterate_batches(x, None, 4))
    assert [b.shape[0] for b, _ in batches] == [4, 4, 1] and all(y is None for _, y in batches)
    torch.testing.assert_close(torch.cat([b for b, _ in batches]), x)
    ys = [y for _, y in iterate_batches(x, torch.arange(9), 4, shuffle=True)]
    assert sorted(torch.cat(ys).tolist()) == list(range(9))


def test_iterate_batches_rejects():
    with pytest.raises(DataError, match="batch size 0"):
        next(iterate_batches(rand_images(2), np.zeros(2), 0))
    with pytest.raises(DataError, match="2 inputs but 3 labels"):
        next(iterate_batches(rand_images(2), np.zeros(3), 1))


# ---------------------------------------------------------------------------------------------------------------
# load_inputs


def test_load_inputs_npy_float(tmp_path):
    arr = np.random.default_rng(0).random((5, 1, 28, 28)).astype(np.float64)
    np.save(tmp_path / "c.npy", arr)
    x = load_inputs(tmp_path / "c.npy")
    assert x.dtype == torch.float32
    torch.testing.assert_close(x, torch.from_numpy(arr).float())


def test_load_inputs_npy_uint8_goes_through_to_tensor(tmp_path):
    imgs = rand_images(4)
    np.save(tmp_path / "c.npy", imgs)
    torch.testing.assert_close(load_inputs(tmp_path / "c.npy"), to_tensor(imgs))


@pytest.mark.parametrize("key", ["x", "inputs", "images", "whatever_single"])
def test_load_inputs_npz_keys(tmp_path, key):
    arr = np.random.default_rng(0).random((3, 1, 28, 28)).astype(np.float32)
    extra = {} if key == "whatever_single" else {"labels": np.arange(3)}
    np.savez(tmp_path / "c.npz", **{key: arr}, **extra)
    torch.testing.assert_close(load_inputs(tmp_path / "c.npz"), torch.from_numpy(arr))


def test_load_inputs_npz_prefers_x(tmp_path):
    np.savez(tmp_path / "c.npz", images=np.zeros((2, 4), np.float32), x=np.ones((2, 4), np.float32))
    assert load_inputs(tmp_path / "c.npz").sum() == 8


def test_load_inputs_npz_ambiguous(tmp_path):
    np.savez(tmp_path / "c.npz", a=np.zeros((2, 4), np.float32), b=np.zeros((2, 4), np.float32))
    with pytest.raises(DataError, match=r"\['a', 'b'\]"):
        load_inputs(tmp_path / "c.npz")


def test_load_inputs_rejects_pickles(tmp_path):
    obj = np.empty(2, dtype=object)
    obj[:] = [{"a": 1}, [2]]
    np.save(tmp_path / "obj.npy", obj, allow_pickle=True)
    with pytest.raises(DataError, match="obj.npy.*pickle"):
        load_inputs(tmp_path / "obj.npy")
    np.savez(tmp_path / "obj.npz", x=obj)
    with pytest.raises(DataError, match="obj.npz.*pickle"):
        load_inputs(tmp_path / "obj.npz")
    with open(tmp_path / "raw.npy", "wb") as f:  # a bare pickle with a .npy name
        pickle.dump(np.zeros(3), f)
    with pytest.raises(DataError, match="raw.npy"):
        load_inputs(tmp_path / "raw.npy")


@pytest.mark.parametrize(
    "arr, match",
    [
        (np.zeros((3, 4), np.int64), "int64"),
        (np.zeros((0, 4), np.float32), "no inputs"),
        (np.float32(1.0), "no inputs"),
        (np.array([[1.0, np.nan]], np.float32), "NaN"),
        (np.array([[1.0, np.inf]], np.float64), "NaN or infinite"),
    ],
)
def test_load_inputs_rejects_bad_arrays(tmp_path, arr, match):
    np.save(tmp_path / "c.npy", arr)
    with pytest.raises(DataError, match=match):
        load_inputs(tmp_path / "c.npy")


def test_load_inputs_missing_or_garbage(tmp_path):
    with pytest.raises(DataError, match="not found"):
        load_inputs(tmp_path / "absent.npy")
    (tmp_path / "junk.npz").write_bytes(os.urandom(64))
    with pytest.raises(DataError, match="junk.npz"):
        load_inputs(tmp_path / "junk.npz")


# check_inputs: the model's input range decides between refusing and warning


def test_float_pixels_in_0_255_refused_for_a_model_trained_on_0_1_warned_for_a_converted_one(capsys):
    from moe_prune.data.inputs import check_inputs
    from moe_prune.errors import DataError
    from moe_prune.core.models import MnistConfig, MnistSoftMoE

    x = np.random.default_rng(0).random((4, 1, 28, 28)).astype(np.float32)
    model = MnistSoftMoE(MnistConfig(num_experts=4))
    check_inputs(model, x, "ok.npy")  # [0, 1]: taken
    with pytest.raises(DataError, match=r"pixels\.npy: float pixels span .*the model takes \[0, 1\]"):
        check_inputs(model, x * 255, "pixels.npy")
    assert capsys.readouterr().err == ""
    model.checkpoint_meta = {"converted_from": "soft-moe (bwconrad) SoftMoEVisionTransformer"}  # its own normalization
    check_inputs(model, x * 2 - 1, "normalized.npy")  # negative values are that model's business: no word
    assert capsys.readouterr().err == ""
    check_inputs(model, x * 255, "pixels.npy")
    assert "warning: pixels.npy: float pixels go up to" in capsys.readouterr().err
