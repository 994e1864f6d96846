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
