"""Scores on disk: `Scores.save_pretrained` writes them as safetensors files, `ScoreFiles` selects from them out of core.

Layout of a scores folder (format version 1):

* ``scores-00001-of-00003.safetensors``, ...: whole fp32 score tensors (keys = parameter names), grouped in scores
  order into files of at most ``max_file_bytes`` (a larger tensor gets a file of its own);
* ``scores_index.json``: ``{"format": "peft_safety.scores", "format_version": 1, "names": [...], "shapes": {name:
  full parameter shape}, "granularity": {name: Granularity.to_dict()}, "provenance": {...}, "fingerprints": {...},
  "files": {name: file name}}``. It is written last, so a folder whose index exists is complete; files not named by
  the index are ignored (and removed by the next save into the folder).

Every file is written under a temporary name and moved into place (`peft_safety._io.atomic_path`). A file written by
`Scores.to_safetensors` (one file, metadata in the header) is read the same way.

`ScoreFiles` opens such a folder (or file) without loading it: it checks the index and every header (sizes, dtypes,
shapes, byte ranges; the files are untrusted) and reads chunks on demand. `select` on a `ScoreFiles` runs the
selection engine of `peft_safety.scoring.distributed` over the files, one process: one histogram pass over the
files, one pass that keeps the sure winners plus the few undecided entries, the rest in memory. Peak memory: a read
buffer, the histograms, the undecided entries (at most a third of the largest tensor's entries, 12 bytes each) and
the selected indices; so scores larger than RAM can be selected.
"""

from __future__ import annotations

import json
import math
import os
import re
import struct
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch

from ..mask.granularity import Granularity, Weight, granularity_from_dict

__all__ = ["INDEX_FILENAME", "ScoreFiles", "save_scores"]

#: the index file of a scores folder
INDEX_FILENAME = "scores_index.json"
FORMAT = "peft_safety.scores"
FORMAT_VERSION = 1
_FILE_RE = re.compile(r"scores-\d{5}-of-\d{5}\.safetensors")
_MAX_HEADER = 100_000_000
_MAX_INDEX = 100_000_000


# ------------------------------------------------------------------------------------------------------------ write
def _plan_files(names: Sequence[str], nbytes: Mapping[str, int], max_file_bytes: int) -> list[list[str]]:
    groups: list[list[str]] = []
    size = 0
    for n in names:
        if not groups or (size + nbytes[n] > max_file_bytes and groups[-1]):
            groups.append([])
            size = 0
        groups[-1].append(n)
        size += nbytes[n]
    return groups or [[]]


def save_scores(scores: Any, save_directory: str | os.PathLike, *, max_file_bytes: int = 2**31) -> str:
    """Write ``scores`` to ``save_directory`` (see the module docstring); `Scores.save_pretrained` calls it.

    Sharded scores: a collective call. Each tensor's parts travel to rank 0 one tensor at a time (rank 0 holds at
    most one full score tensor) and rank 0 writes the files; every rank returns the folder once it is complete.

    Returns:
        The folder.
    """
    from .._io import atomic_write_text
    from .distributed import write_safetensors
    from .units import expected_score_shape

    if isinstance(max_file_bytes, bool) or not isinstance(max_file_bytes, int) or max_file_bytes < 1:
        raise ValueError(f"max_file_bytes={max_file_bytes!r} must be a positive int (bytes per file).")
    directory = os.fspath(save_directory)
    if os.path.isfile(directory):
        raise ValueError(f"save_directory {directory!r} is a file; scores are saved into a folder.")
    comm = scores.selection_comm()
    names = list(scores.names)
    shapes = {n: expected_score_shape(scores.shapes[n], scores.granularity_of(n), n) for n in names}
    nbytes = {n: math.prod(shapes[n]) * 4 for n in names}
    groups = _plan_files(names, nbytes, max_file_bytes)
    files = {}
    total = len(groups)
    if comm.rank == 0:
        os.makedirs(directory, exist_ok=True)
    for i, group in enumerate(groups):
        fname = f"scores-{i + 1:05d}-of-{total:05d}.safetensors"
        for n in group:
            files[n] = fname
        tensors = _full_tensors(scores, group, comm)
        entries = [(n, "F32", shapes[n]) for n in group]
        if comm.rank == 0:
            write_safetensors(os.path.join(directory, fname), entries, {"format": FORMAT}, tensors)
        else:
            for _ in tensors:
                pass
    if comm.rank == 0:
        index = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "names": names,
            "shapes": {n: list(scores.shapes[n]) for n in names},
            "granularity": {n: scores.granularity_of(n).to_dict() for n in names},
            "provenance": scores.provenance,
            "fingerprints": dict(scores.fingerprints),
            "files": files,
        }
        atomic_write_text(os.path.join(directory, INDEX_FILENAME), json.dumps(index, indent=1, default=str))
        keep = set(files.values())
        for f in os.listdir(directory):
            if _FILE_RE.fullmatch(f) and f not in keep:
                os.unlink(os.path.join(directory, f))
    comm.barrier()
    return directory


def _full_tensors(scores: Any, names: Sequence[str], comm: Any) -> Iterator[tuple[str, torch.Tensor]]:
    """``(name, full fp32 tensor)`` on rank 0 (the parts of sharded scores gathered one tensor at a time); other
    ranks send their parts and get ``(name, empty)``."""
    from .distributed import Shard

    shards = scores.shards if scores.is_sharded else {}
    layouts = comm.all_gather_object({n: shards[n].to_json() for n in names if n in shards})
    for n in names:
        local = scores[n]
        if n not in shards:
            yield n, local
            continue
        boxes = [Shard.from_json(lay[n]) for lay in layouts]
        counts = [b.numel if b.counted else 0 for b in boxes]
        mine = local.reshape(-1) if shards[n].counted else local.reshape(-1)[:0]
        parts = comm.gather_to_root(mine.float(), counts)
        if parts is None:
            yield n, torch.empty(0)
            continue
        full = torch.empty(boxes[0].full_numel, dtype=torch.float32)
        filled = 0
        for box, part in zip((b for b in boxes if b.counted), parts):
            full[box.to_global(torch.arange(box.numel))] = part.cpu()
            filled += box.numel
        if filled != full.numel():
            raise RuntimeError(f"{n!r}: the ranks' shards cover {filled} of {full.numel()} entries.")
        yield n, full.reshape(scores.shapes[n])


# ------------------------------------------------------------------------------------------------------------- read
def _read_header(path: str) -> tuple[dict[str, Any], int, int]:
    """(header dict, data start, data length) of a safetensors file, with size checks before any allocation."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        first = f.read(8)
        if len(first) < 8:
            raise ValueError(f"{path}: truncated file ({size} bytes); not a safetensors file.")
        (n,) = struct.unpack("<Q", first)
        if n > _MAX_HEADER or n > size - 8:
            raise ValueError(f"{path}: declares a header of {n} bytes in a file of {size}; corrupted or not scores.")
        raw = f.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as err:
        raise ValueError(f"{path}: the safetensors header is not valid JSON ({err}); the file is corrupted.") from None
    if not isinstance(header, dict):
        raise ValueError(f"{path}: the safetensors header is not a JSON object; the file is corrupted.")
    return header, 8 + n, size - 8 - n


class _Location:
    """Where one score tensor's bytes are: file, absolute byte offset, entries, stored shape."""

    __slots__ = ("begin", "numel", "path", "shape")

    def __init__(self, path: str, begin: int, shape: tuple[int, ...]) -> None:
        self.path, self.begin, self.shape, self.numel = path, begin, shape, math.prod(shape)


class ScoreFiles:
    """Scores in files, read on demand: the input of out-of-core `select`.

    Args:
        path: a folder written by `Scores.save_pretrained`, or a file written by `Scores.to_safetensors`.

    Raises:
        FileNotFoundError: no such folder/file, or a folder without ``scores_index.json``.
        ValueError: a malformed index or header (names, shapes, dtypes, byte ranges), a newer format version, or a
            file name in the index that is not a plain file name inside the folder.

    Example:

    ```python
    >>> scores.save_pretrained("scores/")                      # doctest: +SKIP
    >>> mask = select(ScoreFiles("scores/"), fraction=0.01)    # doctest: +SKIP
    ```
    """

    #: entries read at once (a read buffer of 16 MiB)
    selection_chunk = 1 << 22

    def __init__(self, path: str | os.PathLike, *, drop_cache: bool = False) -> None:
        path = os.fspath(path)
        self.path = path
        #: evict every range from the page cache once read (``posix_fadvise(DONTNEED)``): each pass then reads the
        #: disk, as it must for scores larger than RAM (for measurements; the result is the same)
        self.drop_cache = bool(drop_cache)
        self._handles: dict[str, Any] = {}
        if os.path.isdir(path):
            self._open_folder(path)
        elif os.path.isfile(path):
            self._open_file(path)
        else:
            raise FileNotFoundError(f"no scores folder or file at {path!r}.")

    # --- opening -------------------------------------------------------------------------------------------------
    def _open_folder(self, folder: str) -> None:
        index_path = os.path.join(folder, INDEX_FILENAME)
        if not os.path.isfile(index_path):
            raise FileNotFoundError(f"{folder!r} has no {INDEX_FILENAME}; write scores with scores.save_pretrained().")
        if os.path.getsize(index_path) > _MAX_INDEX:
            raise ValueError(f"{index_path}: larger than {_MAX_INDEX} bytes; not a scores index.")
        with open(index_path, encoding="utf-8") as f:
            try:
                index = json.load(f)
            except (ValueError, RecursionError) as err:
                raise ValueError(f"{index_path}: not valid JSON ({err}).") from None
        where = index_path
        if not isinstance(index, dict) or index.get("format") != FORMAT:
            raise ValueError(f"{where}: not a peft-safety scores index (format must be {FORMAT!r}).")
        version = index.get("format_version")
        if not isinstance(version, int) or version < 1:
            raise ValueError(f"{where}: invalid format_version {version!r}.")
        if version > FORMAT_VERSION:
            raise ValueError(
                f"{where}: format_version {version} is newer than this library reads; upgrade peft-safety."
            )
        names = index.get("names")
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names) or len(set(names)) != len(names):
            raise ValueError(f"{where}: 'names' must be a list of distinct strings.")
        files = self._field(index, "files", where)
        locations: dict[str, _Location] = {}
        headers: dict[str, tuple[dict[str, Any], int, int]] = {}
        for n in names:
            fname = files.get(n)
            if not isinstance(fname, str) or os.path.basename(fname) != fname or not _FILE_RE.fullmatch(fname):
                raise ValueError(
                    f"{where}: files[{n!r}] = {fname!r} must name a scores-NNNNN-of-NNNNN.safetensors file."
                )
            fpath = os.path.join(folder, fname)
            if fname not in headers:
                if not os.path.isfile(fpath):
                    raise FileNotFoundError(f"{where}: names {fname}, which is missing from the folder.")
                headers[fname] = _read_header(fpath)
            locations[n] = self._locate(fpath, headers[fname], n)
        self._init(
            names,
            self._field(index, "shapes", where),
            self._field(index, "granularity", where),
            self._field(index, "provenance", where),
            self._field(index, "fingerprints", where),
            locations,
            where,
        )

    def _open_file(self, path: str) -> None:
        header, begin, length = _read_header(path)
        meta = header.get("__metadata__") or {}
        if not isinstance(meta, dict):
            raise ValueError(f"{path}: '__metadata__' must be a JSON object.")
        keys = [k for k in header if k != "__metadata__"]
        if meta.get("format") == "peft_safety.scoring.scores":

            def load(key: str, default: str) -> Any:
                try:
                    return json.loads(meta.get(key, default))
                except (TypeError, ValueError) as err:
                    raise ValueError(f"{path}: metadata {key!r} is not valid JSON ({err}).") from None

            names = load("names", json.dumps(keys))
            shapes, gran = load("shapes", "{}"), load("granularity", "{}")
            provenance, fingerprints = load("provenance", "{}"), load("fingerprints", "{}")
        else:
            names, shapes, gran, provenance, fingerprints = keys, {}, {}, {}, {}
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise ValueError(f"{path}: metadata 'names' must be a list of strings.")
        for k in keys:
            info = header[k]
            if isinstance(info, dict) and k not in shapes:
                shapes[k] = info.get("shape")
        locations = {n: self._locate(path, (header, begin, length), n) for n in names}
        self._init(names, shapes, gran, provenance, fingerprints, locations, path)

    @staticmethod
    def _field(index: Mapping[str, Any], key: str, where: str) -> dict[str, Any]:
        value = index.get(key, {})
        if not isinstance(value, dict):
            raise ValueError(f"{where}: {key!r} must be a JSON object.")
        return value

    @staticmethod
    def _locate(path: str, parsed: tuple[dict[str, Any], int, int], name: str) -> _Location:
        header, begin, length = parsed
        info = header.get(name)
        if not isinstance(info, dict):
            raise ValueError(f"{path}: has no tensor {name!r}; the folder is incomplete or corrupted.")
        if info.get("dtype") != "F32":
            raise ValueError(f"{path}: tensor {name!r} has dtype {info.get('dtype')}; scores are F32.")
        shape, offsets = info.get("shape"), info.get("data_offsets")
        ok = isinstance(shape, list) and all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in shape)
        ok = ok and isinstance(offsets, list) and len(offsets) == 2
        ok = ok and all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
        if not ok:
            raise ValueError(f"{path}: tensor {name!r} has an invalid shape or data_offsets; the file is corrupted.")
        numel = math.prod(shape)
        if not 0 <= offsets[0] <= offsets[1] <= length or offsets[1] - offsets[0] != numel * 4:
            raise ValueError(
                f"{path}: tensor {name!r} ({numel} entries) has data_offsets {offsets} outside the file's "
                f"{length} data bytes or of the wrong size; the file is truncated or corrupted."
            )
        return _Location(path, begin + offsets[0], tuple(shape))

    def _init(self, names, shapes, gran, provenance, fingerprints, locations, where) -> None:
        from .units import expected_score_shape

        self._names = tuple(names)
        self._shapes: dict[str, tuple[int, ...]] = {}
        self._granularity: dict[str, Granularity] = {}
        for n in names:
            shape = shapes.get(n)
            if not isinstance(shape, list) or not all(isinstance(s, int) and not isinstance(s, bool) for s in shape):
                raise ValueError(f"{where}: shapes[{n!r}] must be a list of ints, got {shape!r}.")
            try:
                g = granularity_from_dict(gran[n]) if n in gran else Weight()
                want = expected_score_shape(tuple(shape), g, n)
            except (TypeError, ValueError, KeyError) as err:
                raise ValueError(f"{where}: invalid granularity or shape for {n!r}: {err}") from None
            if tuple(want) != locations[n].shape:
                raise ValueError(
                    f"{where}: the stored scores of {n!r} have shape {locations[n].shape} but a parameter of shape "
                    f"{tuple(shape)} with {g} needs {tuple(want)}; the file is corrupted."
                )
            self._shapes[n], self._granularity[n] = tuple(shape), g
        if not isinstance(provenance, dict) or not isinstance(fingerprints, dict):
            raise ValueError(f"{where}: provenance and fingerprints must be JSON objects.")
        self.provenance: dict[str, Any] = dict(provenance)
        self.fingerprints: dict[str, str] = {n: fp for n, fp in fingerprints.items() if n in self._shapes}
        self._locations = locations

    # --- the scores interface select() reads ---------------------------------------------------------------------
    @property
    def names(self) -> tuple[str, ...]:
        """Scored names, in order."""
        return self._names

    @property
    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Full parameter shape per name."""
        return dict(self._shapes)

    def granularity_of(self, name: str) -> Granularity:
        """The granularity of one parameter's scores."""
        return self._granularity[name]

    @property
    def granularity(self) -> dict[str, Granularity]:
        return dict(self._granularity)

    def numel(self) -> int:
        """Total number of units stored."""
        return sum(loc.numel for loc in self._locations.values())

    def __len__(self) -> int:
        return len(self._names)

    def __repr__(self) -> str:
        return f"ScoreFiles({self.path!r}, {len(self)} tensors, {self.numel():,} units)"

    def with_granularity(self, granularity: Any) -> ScoreFiles:
        """The same files read with another granularity (validated against the stored shapes)."""
        from .units import expected_score_shape, granularity_map

        new = granularity_map(self._names, granularity)
        for n, g in new.items():
            want = expected_score_shape(self._shapes[n], g, n)
            if tuple(want) != self._locations[n].shape:
                raise ValueError(f"{n!r}: stored scores of shape {self._locations[n].shape} do not fit {g}.")
        out = object.__new__(ScoreFiles)
        out.__dict__.update(self.__dict__)
        out._granularity = new
        out._handles = {}
        return out

    def selection_comm(self) -> Any:
        from .distributed import Comm

        return Comm.local()

    def selection_pieces(self) -> dict[str, list[Any]]:
        from .distributed import Piece, Shard

        return {
            n: [Piece(tid, Shard.whole(self._locations[n].shape), self._reader(n), chunks=self._chunker(n))]
            for tid, n in enumerate(self._names)
        }

    # --- reading -------------------------------------------------------------------------------------------------
    def _handle(self, path: str) -> int:
        fd = self._handles.get(path)
        if fd is None:
            fd = self._handles[path] = os.open(path, os.O_RDONLY)
        return fd

    def _reader(self, name: str):
        loc = self._locations[name]

        def read(start: int, count: int) -> torch.Tensor:
            if start < 0 or count < 0 or start + count > loc.numel:
                raise IndexError(f"{name!r}: read of [{start}, {start + count}) outside {loc.numel} entries.")
            out = torch.empty(count, dtype=torch.float32)
            fd = self._handle(loc.path)
            view = memoryview(out.numpy()).cast("B")
            offset, done = loc.begin + 4 * start, 0
            while done < len(view):  # pread: no shared file position, so a read-ahead thread may read meanwhile
                got = os.preadv(fd, [view[done:]], offset + done)
                if got <= 0:
                    raise ValueError(f"{loc.path}: short read of {name!r}; the file changed or is truncated.")
                done += got
            if self.drop_cache and hasattr(os, "posix_fadvise"):
                os.posix_fadvise(fd, offset, len(view), os.POSIX_FADV_DONTNEED)
            return out

        return read

    def _chunker(self, name: str):
        """Consecutive chunks of one tensor, the next one read by a helper thread while the caller works on the
        current one (file reads and torch kernels release the GIL)."""
        from concurrent.futures import ThreadPoolExecutor

        read = self._reader(name)
        numel = self._locations[name].numel

        def chunks(chunk: int) -> Iterator[tuple[int, torch.Tensor]]:
            starts = list(range(0, numel, chunk))
            if not starts:
                return
            with ThreadPoolExecutor(max_workers=1) as pool:
                ahead = pool.submit(read, 0, min(chunk, numel))
                for i, s in enumerate(starts):
                    values = ahead.result()
                    if i + 1 < len(starts):
                        nxt = starts[i + 1]
                        ahead = pool.submit(read, nxt, min(chunk, numel - nxt))
                    yield s, values

        return chunks

    def read(self, name: str) -> torch.Tensor:
        """One whole score tensor (fp32, its score shape)."""
        loc = self._locations[name]
        return self._reader(name)(0, loc.numel).reshape(loc.shape)

    def close(self) -> None:
        """Close the open files."""
        for fd in self._handles.values():
            os.close(fd)
        self._handles.clear()

    def __enter__(self) -> ScoreFiles:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __del__(self) -> None:
        # at interpreter shutdown module globals (os, contextlib) may already be gone: nothing left to close then
        try:  # noqa: SIM105
            self.close()
        except Exception:
            pass
