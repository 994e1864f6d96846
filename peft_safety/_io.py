"""Atomic file writes (standard library only, so every layer of the package may use it).

A file is written under a temporary name in the target folder and moved into place with `os.replace`, so readers
never see a half-written file. `tempfile.mkstemp` creates files readable by their owner only; the final file gets
the permissions an ordinary `open(path, "w")` would give (``0o666`` minus the umask), so saved masks, plots and
reports can be shared like any other file. Temporary names start with ``.`` (never ``_``: transformers'
``Trainer.push_to_hub`` skips names starting with ``_``).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager

__all__ = ["atomic_path", "atomic_write_bytes", "atomic_write_text"]


def _default_mode() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


@contextmanager
def atomic_path(path: str | os.PathLike, *, fsync: bool = False) -> Iterator[str]:
    """Yield a temporary path next to ``path``; on success it replaces ``path``, on error it is removed.

    Args:
        path: the final file.
        fsync: flush the temporary file to disk before the rename (for files that must survive a crash).

    Example:

    ```python
    >>> with atomic_path("out/plot.png") as tmp:  # doctest: +SKIP
    ...     fig.savefig(tmp, format="png")
    ```
    """
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=directory)
    os.close(fd)
    try:
        yield tmp
        if fsync:
            with open(tmp, "rb+") as fh:
                os.fsync(fh.fileno())
        os.chmod(tmp, _default_mode())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes, *, fsync: bool = False) -> str:
    """Write ``data`` to ``path`` atomically; returns the path."""
    with atomic_path(path, fsync=fsync) as tmp, open(tmp, "wb") as fh:
        fh.write(data)
    return os.fspath(path)


def atomic_write_text(path: str | os.PathLike, text: str) -> str:
    """Write ``text`` (UTF-8) to ``path`` atomically; returns the path."""
    return atomic_write_bytes(path, text.encode("utf-8"))
