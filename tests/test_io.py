"""Atomic writes: all or nothing, normal permissions, no temporary file left behind."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from peft_safety._io import atomic_path, atomic_write_bytes, atomic_write_text


def test_atomic_write_gives_umask_permissions_and_leaves_no_temporary(tmp_path):
    umask = os.umask(0o022)
    try:
        path = atomic_write_text(tmp_path / "sub" / "report.md", "hello")
    finally:
        os.umask(umask)
    assert Path(path).read_text(encoding="utf-8") == "hello"
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o644  # mkstemp alone would give 0o600
    assert sorted(os.listdir(tmp_path / "sub")) == ["report.md"]


def test_failed_write_keeps_the_old_file_and_removes_the_temporary(tmp_path):
    target = tmp_path / "mask.bin"
    atomic_write_bytes(target, b"old", fsync=True)
    with pytest.raises(RuntimeError, match="boom"), atomic_path(target) as tmp:
        with open(tmp, "wb") as fh:
            fh.write(b"half")
        raise RuntimeError("boom")
    assert target.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["mask.bin"]


def test_saved_mask_and_plot_are_readable_by_others(tmp_path):
    import torch

    from peft_safety.mask import SafetyMask

    mask = SafetyMask(indices={"w": torch.tensor([1, 3], dtype=torch.int32)}, shapes={"w": (2, 4)})
    umask = os.umask(0o022)
    try:
        path = mask.save_pretrained(tmp_path / "m")
    finally:
        os.umask(umask)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o644


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_writes_never_touch_the_process_umask(tmp_path, monkeypatch, umask):
    """``os.umask`` sets the mask for every thread: reading it that way lets a file another thread creates at that
    moment get mode 0o666. The writer leaves the umask to the kernel (``os.open(..., 0o666)``)."""
    from safetensors.torch import save_file

    old = os.umask(umask)
    try:
        monkeypatch.setattr(os, "umask", lambda *a: pytest.fail("os.umask called by an atomic write"))
        text = atomic_write_text(tmp_path / "a.txt", "x")
        with atomic_path(tmp_path / "w.safetensors") as tmp:  # a writer that opens the file itself
            import torch

            save_file({"t": torch.zeros(2)}, tmp)
        monkeypatch.undo()
    finally:
        os.umask(old)
    for path in (text, tmp_path / "w.safetensors"):
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o666 & ~umask, oct(os.stat(path).st_mode)


def test_threads_writing_at_once_all_get_the_umask_mode(tmp_path):
    """Many threads writing while others create plain files: every file keeps the umask's mode."""
    import threading

    old = os.umask(0o022)
    try:
        errors: list[str] = []

        def writer(i: int) -> None:
            for j in range(30):
                atomic_write_text(tmp_path / f"atomic-{i}-{j}.txt", "x")

        def plain(i: int) -> None:
            for j in range(30):
                with open(tmp_path / f"plain-{i}-{j}.txt", "w") as fh:
                    fh.write("y")

        threads = [threading.Thread(target=f, args=(i,)) for i in range(4) for f in (writer, plain)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        for path in tmp_path.iterdir():
            mode = stat.S_IMODE(os.stat(path).st_mode)
            if mode != 0o644:
                errors.append(f"{path.name}: {oct(mode)}")
    finally:
        os.umask(old)
    assert not errors, errors
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".")]


def test_a_planted_symlink_is_replaced_not_followed(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    link = tmp_path / "out" / "README.md"
    link.parent.mkdir()
    link.symlink_to(victim)
    atomic_write_text(link, "card")
    assert victim.read_text() == "keep me"
    assert not link.is_symlink() and link.read_text() == "card"


def test_json_that_cannot_be_serialised_leaves_the_old_file(tmp_path):
    from peft_safety._io import atomic_write_json

    path = tmp_path / "adapter_config.json"
    atomic_write_json(path, {"a": 1})
    with pytest.raises(TypeError):
        atomic_write_json(path, {"a": object()})
    assert path.read_text() == '{\n  "a": 1\n}'
    assert os.listdir(tmp_path) == ["adapter_config.json"]


def test_bounded_reads_refuse_links_devices_and_oversized_files(tmp_path):
    from peft_safety._io import read_bytes_nofollow

    good = tmp_path / "config.json"
    good.write_bytes(b"{}")
    assert read_bytes_nofollow(good, max_bytes=10) == b"{}"
    link = tmp_path / "zero.json"
    link.symlink_to("/dev/zero")
    with pytest.raises(OSError, match="symbolic link"):
        read_bytes_nofollow(link, max_bytes=10)
    with pytest.raises(OSError, match="not a regular file"):
        read_bytes_nofollow("/dev/zero", max_bytes=10)
    with pytest.raises(OSError, match="3 bytes, more than the 2"):
        read_bytes_nofollow(_write(tmp_path / "big", b"abc"), max_bytes=2)
    with pytest.raises(FileNotFoundError, match="no such config"):
        read_bytes_nofollow(tmp_path / "missing", max_bytes=2, what="config")


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path
