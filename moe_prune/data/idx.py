"""The IDX file format (LeCun's MNIST files), gzipped or not: one reader, hardened against hostile headers.

    IDX file (gzipped or not) -> read_idx -> np.ndarray of the declared shape, native byte order

The header is checked before any payload is read, memory follows the bytes that really exist (not the size a
header claims), and a short or long payload is an error, never a silent truncation. data.py reads data sets with it.
"""

from __future__ import annotations

import gzip
import math
import os
import zlib
from pathlib import Path

import numpy as np

from ..errors import DataError

# IDX type codes (LeCun's MNIST page): the payload is big-endian.
_IDX_DTYPES = {
    0x08: np.dtype(">u1"),  # unsigned byte
    0x09: np.dtype(">i1"),  # signed byte
    0x0B: np.dtype(">i2"),  # short
    0x0C: np.dtype(">i4"),  # int
    0x0D: np.dtype(">f4"),  # float
    0x0E: np.dtype(">f8"),  # double
}
# Real IDX files have 1 to 4 dimensions; 32 is numpy 1.x's limit and keeps a hostile header's dims list short.
_IDX_MAX_NDIM = 32
# The largest payload read_idx will read unless told otherwise. Fashion-MNIST's largest file is 47 MB; the cap
# keeps a hostile header from making us decompress or allocate gigabytes.
MAX_IDX_BYTES = 1 << 31
# Decompress in pieces so that memory follows the bytes that really exist, not the size a header claims.
_GZIP_CHUNK = 1 << 20
_GZIP_MAGIC = b"\x1f\x8b"


def read_idx(path: str | os.PathLike, *, max_bytes: int = MAX_IDX_BYTES) -> np.ndarray:
    """Read one IDX file (the MNIST format), gzipped or not.

    Gzip is detected by its magic bytes, not by the file name. The header is checked before any payload is read:
    magic 0x00 0x00, a known type code (0x08 uint8, 0x09 int8, 0x0B int16, 0x0C int32, 0x0D float32,
    0x0E float64), 1 to 32 dimensions, and a declared size at most `max_bytes`. The payload must then be
    exactly the declared size: a short or a long file is an error, never a silent truncation.

    Args:
        path: the file.
        max_bytes: the largest payload accepted; raise it for a real file bigger than 2 GiB.

    Returns:
        an array of the declared shape, in native byte order (uint8 for image and label files).

    Raises:
        DataError: the file is missing or unreadable, is a corrupt gzip stream, or its header or payload
            length is wrong. The message names the file.

    Example:
        >>> x = read_idx("/usr/share/datasets/fashion-mnist/t10k-labels-idx1-ubyte.gz")
        >>> x.shape, x.dtype
        ((10000,), dtype('uint8'))
    """
    path = Path(path)
    try:
        raw = open(path, "rb")
    except OSError as e:
        raise DataError(f"{path}: cannot open IDX file ({e.strerror or e}); check the path") from e
    with raw:
        try:
            is_gzip = raw.read(2) == _GZIP_MAGIC
            raw.seek(0)
            if is_gzip:
                with gzip.GzipFile(fileobj=raw, mode="rb") as f:
                    return _read_idx_stream(f, path, None, max_bytes)
            return _read_idx_stream(raw, path, os.fstat(raw.fileno()).st_size, max_bytes)
        except (EOFError, zlib.error, gzip.BadGzipFile) as e:
            raise DataError(f"{path}: corrupt gzip stream ({e}); re-download or re-extract the file") from e
        except OSError as e:
            raise DataError(f"{path}: cannot read IDX file ({e.strerror or e}); check the file") from e


def _read_idx_stream(f, path: Path, file_size: int | None, max_bytes: int) -> np.ndarray:
    # file_size: the size on disk for a plain file (so the payload length is checked before reading it);
    # None for a gzip stream, whose real length is known only by decompressing it.
    fix = "the file is not an IDX file or is damaged; re-download or re-extract it"
    head = _read_exact(f, 4)
    if len(head) < 4:
        raise DataError(f"{path}: {len(head)} bytes, too short for an IDX header (4-byte magic); {fix}")
    if head[0] != 0 or head[1] != 0:
        raise DataError(f"{path}: bad IDX magic {head.hex()} (must start with 0000); {fix}")
    code, ndim = head[2], head[3]
    if code not in _IDX_DTYPES:
        known = ", ".join(f"0x{c:02X}" for c in _IDX_DTYPES)
        raise DataError(f"{path}: unknown IDX type code 0x{code:02X} (known: {known}); {fix}")
    if not 1 <= ndim <= _IDX_MAX_NDIM:
        raise DataError(f"{path}: IDX header declares {ndim} dimensions (must be 1 to {_IDX_MAX_NDIM}); {fix}")
    dims_raw = _read_exact(f, 4 * ndim)
    if len(dims_raw) < 4 * ndim:
        raise DataError(
            f"{path}: header truncated: {ndim} dimensions need {4 * ndim} bytes, got {len(dims_raw)}; {fix}"
        )
    shape = tuple(int(d) for d in np.frombuffer(dims_raw, dtype=">u4"))
    dtype = _IDX_DTYPES[code]
    # Python ints: the product cannot overflow, so a hostile header is caught here, before any allocation.
    expected = math.prod(shape) * dtype.itemsize
    if expected > max_bytes:
        raise DataError(
            f"{path}: IDX header declares shape {shape} of {dtype.name}, {expected} bytes, more than the "
            f"{max_bytes}-byte limit; {fix} (if it is real, pass a larger max_bytes)"
        )
    header_len = 4 + 4 * ndim
    if file_size is not None:
        actual = file_size - header_len
        if actual != expected:
            raise DataError(_length_message(path, shape, dtype, expected, actual, fix))
        buf = bytearray(expected)
        got = f.readinto(buf) if expected else 0
        if got != expected:  # the file changed under us
            raise DataError(_length_message(path, shape, dtype, expected, got, fix))
    else:
        buf = _read_gzip_payload(f, expected)
        if len(buf) != expected:
            raise DataError(_length_message(path, shape, dtype, expected, len(buf), fix, more=len(buf) > expected))
    try:
        array = np.frombuffer(buf, dtype=dtype).reshape(shape)
    except ValueError:  # an empty array whose other dims numpy cannot represent
        raise DataError(f"{path}: IDX header declares an impossible shape {shape}; {fix}") from None
    return array.astype(dtype.newbyteorder("="), copy=dtype.itemsize > 1)


def _read_exact(f, n: int) -> bytes:
    # A stream's read() may return fewer bytes than asked before the end; loop until n or EOF.
    out = b""
    while len(out) < n:
        chunk = f.read(n - len(out))
        if not chunk:
            break
        out += chunk
    return out


def _read_gzip_payload(f, expected: int) -> bytearray:
    # Read up to expected + 1 bytes: one byte past the payload tells "too long" apart from "exact", and reading
    # to the end makes gzip check its CRC. The buffer grows with the data actually decompressed.
    buf = bytearray()
    while len(buf) <= expected:
        chunk = f.read(min(_GZIP_CHUNK, expected + 1 - len(buf)))
        if not chunk:
            break
        buf += chunk
    return buf


def _length_message(path, shape, dtype, expected, actual, fix, more=None) -> str:
    more = actual > expected if more is None else more
    what = "has extra bytes" if more else "is truncated"
    actual_s = f"at least {actual}" if more and actual == expected + 1 else str(actual)
    return (
        f"{path}: payload {what}: header declares shape {shape} of {dtype.name} = {expected} bytes, "
        f"file has {actual_s}; {fix}"
    )
