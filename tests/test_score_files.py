"""Scores on disk: `Scores.save_pretrained` / `from_pretrained`, and out-of-core selection from `ScoreFiles`.

Out-of-core selection must equal in-memory selection (every scope, both directions, exclude, the streamed mask file)
and read the files twice when the threshold bucket fits in memory; files read from disk are untrusted.
"""

from __future__ import annotations

import json
import os
import struct

import pytest
import torch

from peft_safety.mask import Neuron, SafetyMask, Weight
from peft_safety.scoring import distributed as D
from peft_safety.scoring.score_files import INDEX_FILENAME, ScoreFiles
from peft_safety.scoring.scores import Scores
from peft_safety.scoring.selection import select, select_and_save


def make_scores(seed: int = 0) -> Scores:
    g = torch.Generator().manual_seed(seed)
    tensors = {f"model.layers.{i}.mlp.w{i}.weight": torch.randint(0, 50, (r, 13), generator=g).float() / 7
               for i, r in enumerate([40, 3, 77, 1, 25])}  # fmt: skip
    tensors["model.layers.9.x.weight"] = torch.rand(6, generator=g)  # Neuron scores of a (6, 4) weight
    return Scores(
        tensors,
        granularity={**dict.fromkeys(list(tensors)[:-1], Weight()), "model.layers.9.x.weight": Neuron(0)},
        shapes={"model.layers.9.x.weight": (6, 4)},
        provenance={"method": "test", "seed": seed},
        fingerprints={"model.layers.0.mlp.w0.weight": "bf16s4096b2b:00"},
    )


def _file_parts(data: bytes):
    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8 : 8 + n]), data[8 + n :]


def test_save_pretrained_round_trip_and_file_groups(tmp_path):
    scores = make_scores()
    folder = scores.save_pretrained(tmp_path / "s", max_file_bytes=2500)
    files = sorted(f for f in os.listdir(folder) if f.endswith(".safetensors"))
    assert len(files) > 2 and all(f.endswith(f"-of-{len(files):05d}.safetensors") for f in files)
    index = json.loads((tmp_path / "s" / INDEX_FILENAME).read_text())
    assert index["names"] == list(scores.names) and set(index["files"].values()) == set(files)
    loaded = Scores.from_pretrained(folder)
    assert loaded == scores and loaded.fingerprints == scores.fingerprints
    assert loaded.granularity_of("model.layers.9.x.weight") == Neuron(0)
    # saving again with fewer files removes the stale ones
    scores.save_pretrained(folder)
    assert sorted(f for f in os.listdir(folder) if f.endswith(".safetensors")) == ["scores-00001-of-00001.safetensors"]
    # the one-file format of to_safetensors opens as files too
    scores.to_safetensors(tmp_path / "one.safetensors")
    assert Scores.from_pretrained(tmp_path / "one.safetensors") == scores


SELECTIONS = [
    {"fraction": 0.03},
    {"k": 500, "largest": False},
    {"fraction": 0.1, "scope": "per_tensor"},
    {"k": 4, "scope": "per_tensor", "largest": False},
]


@pytest.mark.parametrize("kwargs", SELECTIONS, ids=lambda kw: "-".join(f"{k}={v}" for k, v in kw.items()))
def test_out_of_core_selection_equals_in_memory(kwargs, tmp_path):
    scores = make_scores(1)
    scores.save_pretrained(tmp_path / "s", max_file_bytes=3000)
    exclude = select(scores, fraction=0.02)
    with ScoreFiles(tmp_path / "s") as files:
        for extra in ({}, {"exclude": exclude}):
            want = select(scores, **kwargs, **extra)
            got = select(files, **kwargs, **extra)
            assert got == want and got.provenance == want.provenance and got.fingerprints == want.fingerprints
        path = select_and_save(files, tmp_path / "mask", **kwargs)
    with open(path, "rb") as fh:
        assert _file_parts(fh.read()) == _file_parts(select(scores, **kwargs).to_bytes())


def test_out_of_core_per_row(tmp_path):
    scores = make_scores(2).restrict([n for n in make_scores(2).names if "x.weight" not in n])
    scores.save_pretrained(tmp_path / "s")
    files = ScoreFiles(tmp_path / "s")
    files.selection_chunk = 20  # blocks of one row: the row loop crosses many reads
    for kwargs in ({"k": 3}, {"fraction": 0.5, "largest": False}):
        assert select(files, scope="per_row", **kwargs) == select(scores, scope="per_row", **kwargs)
    with pytest.raises(ValueError, match="per_row' needs Weight"):
        select(ScoreFiles(_saved(make_scores(2), tmp_path / "t")), k=1, scope="per_row")


def _saved(scores, folder):
    scores.save_pretrained(folder)
    return folder


class CountingFiles(ScoreFiles):
    """Counts the bytes read (to check the number of passes) and the largest single read."""

    def _reader(self, name):
        inner = super()._reader(name)

        def read(start, count):
            self.bytes_read += 4 * count
            self.largest_read = max(self.largest_read, count)
            return inner(start, count)

        return read


@pytest.mark.parametrize(("budget", "passes"), [(None, 1), (1 << 30, 2), (0, 3)])
def test_out_of_core_read_passes(budget, passes, tmp_path, monkeypatch):
    """Uniform scores, 1% selected: the one-pass buffer reads every byte once; the histogram engine (chosen when the
    buffer would not fit; forced here with a budget) reads twice (a histogram pass, a collecting pass that keeps the
    undecided entries), three times when nothing undecided may be kept (``budget=0``); always in chunks of
    ``selection_chunk`` entries."""
    g = torch.Generator().manual_seed(4)
    scores = Scores({f"t{i}": torch.rand(300, 100, generator=g) for i in range(5)})
    scores.save_pretrained(tmp_path / "s", max_file_bytes=130_000)
    files = CountingFiles(tmp_path / "s")
    files.bytes_read, files.largest_read, files.selection_chunk = 0, 0, 4096
    if budget is not None:
        real = D.select_pieces
        monkeypatch.setattr(D, "select_pieces", lambda *a, **kw: real(*a, **{**kw, "budget": budget}))
    got = select(files, fraction=0.01)
    assert got == select(scores, fraction=0.01)
    assert files.bytes_read / (4 * scores.numel()) == passes
    assert files.largest_read == 4096


@pytest.mark.parametrize("seed", range(30))
def test_one_pass_buffer_equals_stable_sort(seed):
    """The one-process buffer of `select_pieces` on tie-heavy tensors (small chunks: many prunes) against a stable
    sort of the concatenation."""
    g = torch.Generator().manual_seed(seed)
    tensors = [torch.randint(-2, 3, (int(n),), generator=g).float() for n in torch.randint(0, 40, (4,), generator=g)]
    total = sum(t.numel() for t in tensors)
    if total == 0:
        return
    k = int(torch.randint(1, total + 1, (1,), generator=g))
    largest = seed % 2 == 0
    pieces = [D.Piece.of_tensor(i, t) for i, t in enumerate(tensors)]
    assert D._streamable(pieces)
    found = D.select_pieces(pieces, k, largest=largest, comm=D.Comm.local(),
                            tensor_numel={i: t.numel() for i, t in enumerate(tensors)}, n_tensors=4, chunk=3)  # fmt: skip
    cat = torch.cat(tensors)
    order = torch.sort(cat, descending=largest, stable=True).indices[:k].sort().values
    offsets = torch.tensor([0] + [t.numel() for t in tensors]).cumsum(0)
    for i in range(4):
        want = order[(order >= offsets[i]) & (order < offsets[i + 1])] - offsets[i]
        assert found[i][0].tolist() == want.tolist(), (seed, i)


def test_score_files_reject_bad_files(tmp_path):
    folder = _saved(make_scores(), tmp_path / "s")
    index_path = os.path.join(folder, INDEX_FILENAME)
    with open(index_path) as fh:
        index = json.load(fh)
    name = index["names"][0]

    def write(path, data):
        with open(path, "wb") as fh:
            fh.write(data)

    def write_index(**change):
        write(index_path, json.dumps({**index, **change}).encode())

    write_index(files={**index["files"], name: "../../etc/passwd"})
    with pytest.raises(ValueError, match=r"must name a scores-NNNNN-of-NNNNN\.safetensors file"):
        ScoreFiles(folder)
    write_index(format_version=99)
    with pytest.raises(ValueError, match="newer than this library reads"):
        ScoreFiles(folder)
    write_index(shapes={**index["shapes"], name: [3, 3]})
    with pytest.raises(ValueError, match=r"stored scores of .* have shape"):
        ScoreFiles(folder)
    write_index(format="something else")
    with pytest.raises(ValueError, match="not a peft-safety scores index"):
        ScoreFiles(folder)
    write_index()
    data_file = os.path.join(folder, index["files"][name])
    with open(data_file, "rb") as fh:
        blob = fh.read()
    write(data_file, blob[:-8])  # truncated data
    with pytest.raises(ValueError, match="outside the file's"):
        ScoreFiles(folder)
    write(data_file, struct.pack("<Q", 10**12) + blob[8:])  # absurd header length
    with pytest.raises(ValueError, match="declares a header of"):
        ScoreFiles(folder)
    header, data = _file_parts(blob)
    header[name]["dtype"] = "I32"
    head = json.dumps(header).encode()
    write(data_file, struct.pack("<Q", len(head)) + head + data)
    with pytest.raises(ValueError, match="scores are F32"):
        ScoreFiles(folder)
    os.unlink(index_path)
    with pytest.raises(FileNotFoundError, match=r"has no scores_index\.json"):
        ScoreFiles(folder)
    with pytest.raises(FileNotFoundError, match="no scores folder or file"):
        ScoreFiles(tmp_path / "missing")


def test_select_and_save_in_memory_is_select_then_save(tmp_path):
    scores = make_scores(5)
    path = select_and_save(scores, tmp_path / "m", fraction=0.05)
    assert SafetyMask.from_pretrained(path) == select(scores, fraction=0.05)
