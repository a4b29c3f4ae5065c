"""Writing outputs safely: a temporary file in the destination folder, then one `os.replace`.

An interrupted or failed write leaves the old file (or none), never a truncated one, and never touches an input.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Iterator

from .errors import OutputError


def check_output(path: str | os.PathLike, inputs: tuple = ()) -> Path:
    """Check that `path` can be written without harming anything; return it as a Path.

    Raises:
        OutputError: the path is one of `inputs`, is a folder, or its folder is missing or not writable.

    Example:
        >>> check_output("out/model.safetensors", inputs=("model.safetensors",))
        PosixPath('out/model.safetensors')
    """
    out = Path(path)
    for src in (Path(s) for s in inputs if s is not None):
        same = src.resolve() == out.resolve() or (src.exists() and out.exists() and os.path.samefile(src, out))
        if same:
            raise OutputError(f"{out}: is the input file; choose another output path (inputs are never overwritten)")
    if out.is_dir():
        raise OutputError(f"{out}: is a folder; give a file path")
    folder = out.parent if str(out.parent) else Path(".")
    if not folder.is_dir():
        raise OutputError(f"{out}: the folder {folder} does not exist; create it first")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise OutputError(f"{out}: the folder {folder} is not writable")
    return out


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike, inputs: tuple = (), suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success it replaces `path` atomically, on failure it is removed.

    Args:
        path: the final output path.
        inputs: input paths the output must not be.
        suffix: suffix of the temporary file (some writers look at it).

    Raises:
        OutputError: see `check_output`; or the disk filled up while writing (the old output is left as it was).

    Example:
        >>> with atomic_output("report.json") as tmp:
        ...     tmp.write_text("{}")
    """
    out = check_output(path, inputs)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{out.name}.", suffix=suffix + ".tmp", dir=out.parent if str(out.parent) else ".")
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp (and some writers) make files private; use what open() would give
        with open(tmp, "rb+") as f:  # the data must be on disk before the rename makes it visible
            os.fsync(f.fileno())
        os.replace(tmp, out)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise OutputError(f"{out}: could not be written ({e.strerror or e}); nothing was changed") from e
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
