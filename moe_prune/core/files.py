"""Writing outputs safely: a temporary file in the destination folder, then one `os.replace`.

An interrupted or failed write leaves the old file (or none), never a truncated one, and never touches an input.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Iterator

from ..errors import OutputError


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


def resolve_out(out: str | os.PathLike, suffix: str, default_name: str) -> Path:
    """The one `--out` rule of every command that writes one file (compress, convert, export).

    A path ending in `suffix` is the file, written exactly there. An existing folder, or a path ending in "/",
    is a folder: the file is `default_name` inside it (the folder is created by `output_folder`). Anything else
    is refused, so a typo never becomes a file or a folder nobody asked for.

    Raises:
        OutputError: the path has another suffix (or none) and is not a folder.

    Example:
        >>> resolve_out("out/", ".safetensors", "m.keep1of8.drop.safetensors")
        PosixPath('out/m.keep1of8.drop.safetensors')
    """
    text = os.fspath(out)
    path = Path(text)
    if text.endswith(("/", os.sep)) or path.is_dir():
        return path / default_name
    if path.suffix == suffix:
        return path
    raise OutputError(
        f"{text}: --out must be a {suffix} file or a folder (an existing one, or a path ending in '/', then the "
        f"file is named {default_name}); add the suffix or a trailing '/'"
    )


@contextlib.contextmanager
def output_folder(path: str | os.PathLike) -> Iterator[Path]:
    """Create the output folder `path` (and missing parents) for one run; on failure take back what the run made.

    Everything new inside the folder when the block raises (files, folders) is removed, and so are the folders
    this call created, so a failed run leaves the folder as it found it, or absent. Files that were there
    before are never touched.

    Raises:
        OutputError: `path` is a file, or the nearest existing folder above it is not writable.

    Example:
        >>> with output_folder("demo-output") as out:
        ...     (out / "summary.json").write_text("{}")
    """
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise OutputError(f"{out}: exists and is not a folder; give a folder path, or move the file away")
    missing, p = [], out
    while not p.exists():
        missing.append(p)
        p = p.parent
    if not p.is_dir():
        raise OutputError(f"{out}: {p} is not a folder; give a folder path")
    if not os.access(p, os.W_OK | os.X_OK):
        raise OutputError(f"{out}: the folder {p} is not writable")
    before = set(out.rglob("*")) if out.exists() else set()
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputError(f"{out}: could not be created ({e.strerror or e})") from e
    try:
        yield out
    except BaseException:
        new = set(out.rglob("*")) - before
        for q in sorted(new, key=lambda q: len(q.parts), reverse=True):  # files and subfolders, deepest first
            with contextlib.suppress(OSError):
                q.rmdir() if q.is_dir() and not q.is_symlink() else q.unlink()
        for d in missing:  # innermost first; only if empty (another process may have written there meanwhile)
            with contextlib.suppress(OSError):
                d.rmdir()
        raise
