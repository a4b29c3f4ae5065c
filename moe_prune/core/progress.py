"""Progress on stderr for the long stages (calibration, healing, reading image folders), shown only on a terminal."""

from __future__ import annotations


def progress(iterable=None, *, enabled: bool = True, **kwargs):
    """A tqdm progress bar on stderr, shown only when stderr is a terminal (logs stay readable)."""
    import sys

    from tqdm.auto import tqdm

    return tqdm(iterable, disable=not (enabled and sys.stderr.isatty()), leave=False, **kwargs)
