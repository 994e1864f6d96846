"""Atomic file writes and bounded, no-follow reads (standard library only, so every layer of the package may use it).

A file is written under a temporary name in the target folder and moved into place with `os.replace`, so readers
never see a half-written file, and a process killed during a save leaves the previous file (or none), never an empty
or truncated one. The rename replaces whatever sits at the final name, a symlink included: a link planted at
``adapter_config.json`` or ``README.md`` is replaced by the new file and its target is never written.

The temporary file is created with ``os.open(..., 0o666)`` and ``O_EXCL | O_NOFOLLOW``, so the kernel applies the
process umask itself; the permissions it chose are read back from the new file and given to the final one, which
thus gets the permissions an ordinary ``open(path, "w")`` would give. The umask is never read by setting it (``os.umask`` changes it for every thread of the process, so reading it that way races
with any thread creating a file at the same moment). Temporary names start with ``.`` (never ``_``: transformers'
``Trainer.push_to_hub`` skips names starting with ``_``).

`read_bytes_nofollow` reads a file that must be a regular file (not a symlink, a device or a FIFO) up to a size
limit, so that a file planted under a known name cannot make peft-safety read ``/dev/zero`` forever or copy another
file's content into a card.
"""

from __future__ import annotations

import json
import os
import secrets
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

__all__ = ["atomic_path", "atomic_write_bytes", "atomic_write_json", "atomic_write_text", "read_bytes_nofollow"]

_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
_BINARY = getattr(os, "O_BINARY", 0)  # Windows: no newline translation


def _create_temp(directory: str, name: str) -> tuple[str, int]:
    """Create an empty file ``directory/.name.<random>.tmp`` and return its path and its permission bits, which the
    kernel set to ``0o666`` minus the umask."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | _NOFOLLOW | _CLOEXEC | _BINARY
    for _ in range(100):
        tmp = os.path.join(directory, f".{name}.{secrets.token_hex(6)}.tmp")
        try:
            fd = os.open(tmp, flags, 0o666)
        except FileExistsError:
            continue
        try:
            mode = stat.S_IMODE(os.fstat(fd).st_mode)
        finally:
            os.close(fd)
        return tmp, mode
    raise FileExistsError(f"could not create a temporary file for {name!r} in {directory!r}")  # pragma: no cover


def _fsync_dir(directory: str) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY | _CLOEXEC)
    except OSError:  # pragma: no cover - Windows cannot open folders
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover - some file systems refuse fsync on folders
        pass
    finally:
        os.close(fd)


@contextmanager
def atomic_path(path: str | os.PathLike, *, fsync: bool = False) -> Iterator[str]:
    """Yield a temporary path next to ``path``; on success it replaces ``path``, on error it is removed.

    The temporary file already exists (empty, with the permissions of a new file); write into it by opening it for
    writing (``open(tmp, "wb")``, ``save_file(..., tmp)``, ``fig.savefig(tmp)``), never by deleting and recreating it.

    Args:
        path: the final file. A symlink there is replaced, not followed.
        fsync: flush the temporary file, and after the rename its folder, to disk (for files that must survive a
            crash).

    Example:

    ```python
    >>> with atomic_path("out/plot.png") as tmp:  # doctest: +SKIP
    ...     fig.savefig(tmp, format="png")
    ```
    """
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    tmp, mode = _create_temp(directory, os.path.basename(path))
    try:
        yield tmp
        if fsync:
            with open(tmp, "rb+") as fh:
                os.fsync(fh.fileno())
        os.chmod(tmp, mode)  # a writer that recreated the file (safetensors does) gets the mode of a new file back
        os.replace(tmp, path)
    except BaseException:
        if os.path.lexists(tmp):
            os.unlink(tmp)
        raise
    if fsync:
        _fsync_dir(directory)


def atomic_write_bytes(path: str | os.PathLike, data: bytes, *, fsync: bool = False) -> str:
    """Write ``data`` to ``path`` atomically (a symlink at ``path`` is replaced, not followed); returns the path."""
    with atomic_path(path, fsync=fsync) as tmp, open(tmp, "wb") as fh:
        fh.write(data)
    return os.fspath(path)


def atomic_write_text(path: str | os.PathLike, text: str, *, fsync: bool = False) -> str:
    """Write ``text`` (UTF-8) to ``path`` atomically; returns the path."""
    return atomic_write_bytes(path, text.encode("utf-8"), fsync=fsync)


def atomic_write_json(
    path: str | os.PathLike, value: Any, *, indent: int | None = 2, sort_keys: bool = True, fsync: bool = False
) -> str:
    """Write ``value`` as JSON (UTF-8) to ``path`` atomically; returns the path.

    The value is serialised before anything is created, so a value that is not JSON leaves ``path`` untouched.
    """
    text = json.dumps(value, indent=indent, sort_keys=sort_keys)
    return atomic_write_text(path, text, fsync=fsync)


def read_bytes_nofollow(path: str | os.PathLike, *, max_bytes: int, what: str = "file") -> bytes:
    """The content of ``path``, which must be a regular file of at most ``max_bytes`` bytes (a symlink is refused).

    Args:
        path: the file.
        max_bytes: the largest size accepted.
        what: how the file is named in error messages.

    Raises:
        FileNotFoundError: no such file.
        OSError: ``path`` is a symlink, a device, a FIFO or a folder, or larger than ``max_bytes``; the message names
            the file (the callers turn it into their own error class).
    """
    path = os.fspath(path)
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such {what}") from None
    if stat.S_ISLNK(st.st_mode):
        raise OSError(f"{path}: the {what} is a symbolic link ({os.readlink(path)!r}); it is not read")
    if not stat.S_ISREG(st.st_mode):
        raise OSError(f"{path}: the {what} is not a regular file (a folder, device or pipe)")
    if st.st_size > max_bytes:
        raise OSError(f"{path}: the {what} has {st.st_size} bytes, more than the {max_bytes} accepted")
    fd = os.open(path, os.O_RDONLY | _NOFOLLOW | _CLOEXEC | _BINARY)
    with os.fdopen(fd, "rb") as fh:
        data = fh.read(max_bytes + 1)
    if len(data) > max_bytes:  # the file grew after the lstat
        raise OSError(f"{path}: the {what} has more than the {max_bytes} bytes accepted")
    return data
