"""The mask file format v1: ``safety_mask.safetensors`` (byte-level spec in ``docs/mask_format.md``).

A safetensors file whose tensors are the index vectors (keys = parameter names, dtype int32, int64 only for
parameters with >= 2**31 entries) and whose ``__metadata__`` header (string values only) carries:

==================  ===========================================================================================
key                 value (a string)
==================  ===========================================================================================
format_version      ``"1"``
library             ``"peft-safety"``
library_version     the writer's version, e.g. ``"0.1.0"``
shapes              JSON object ``{name: [d0, d1, ...]}`` for every eligible parameter, in mask order
granularity         JSON object ``{"default": g, "per_parameter": {name: g}}`` (g = ``Granularity.to_dict()``)
fingerprints        JSON object ``{name: fingerprint}``
provenance          JSON object (method, sparsity, seed, base_model, ...)
==================  ===========================================================================================

No pickle, no ``eval``, no ``torch.save``: loading parses JSON and raw integer buffers only. Files are written to a
temporary name in the target folder and moved into place with ``os.replace``, so readers never see a partial file.
"""

from __future__ import annotations

import json
import math
import os
import re
import struct
from typing import TYPE_CHECKING, Any

import torch
from safetensors.torch import save as _st_save

from .._files import is_local_path
from .._io import atomic_write_bytes
from .._version import __version__
from ..errors import SafetyError, SafetyFileError, SafetyFileNotFoundError, SafetyTypeError
from .granularity import granularity_from_dict

if TYPE_CHECKING:  # pragma: no cover
    from .safety_mask import SafetyMask

__all__ = [
    "FORMAT_VERSION",
    "MASK_FILENAME",
    "decode_mask",
    "mask_to_bytes",
    "read_mask_file",
    "require_mask",
    "resolve_mask_file",
    "save_mask",
]

#: file name inside a mask folder (and a Hub repository)
MASK_FILENAME = "safety_mask.safetensors"
#: the format version this code writes, and the newest it reads
FORMAT_VERSION = 1
LIBRARY_NAME = "peft-safety"
_REQUIRED_KEYS = ("format_version", "library", "shapes", "granularity", "fingerprints", "provenance")
_INDEX_DTYPES = {"I32": torch.int32, "I64": torch.int64}
#: the largest safetensors header read (the limit of the safetensors library itself)
MAX_HEADER_BYTES = 100_000_000
#: the deepest JSON nesting read or written (headers, shapes, provenance); far above any mask, far below recursion
MAX_JSON_DEPTH = 256
#: the most dimensions a parameter shape may declare
MAX_NDIM = 8
#: the most entries a parameter shape may declare (2**48, ~2.8e14: a thousand times the largest weight in use)
MAX_PARAMETER_NUMEL = 2**48
_JSON_STRING_RE = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)


def require_mask(obj: Any, what: str) -> None:
    """Raise `TypeError` unless `obj` is a `SafetyMask` (checked by its interface: this module sits below the class)."""
    if not all(hasattr(obj, attr) for attr in ("shapes", "granularity_of", "items", "fingerprints", "provenance")):
        raise TypeError(f"{what} expects a SafetyMask, got {type(obj).__name__}")


def mask_to_bytes(mask: SafetyMask) -> bytes:
    """Serialise a mask to the bytes of a format-v1 ``safety_mask.safetensors`` file.

    Args:
        mask: the mask.

    Returns:
        The file content.

    Raises:
        TypeError: if `mask` is not a `SafetyMask`.
    """
    require_mask(mask, "mask_to_bytes")
    shapes = mask.shapes
    grans = {name: mask.granularity_of(name) for name in shapes}
    default = mask.granularity
    if isinstance(default, dict):
        # the most common granularity becomes the default, the others are listed per parameter
        values = list(grans.values())
        default = max(set(values), key=lambda g: (values.count(g), repr(g)))
    check_json_depth(mask.provenance, "the mask's provenance")
    meta = {
        "format_version": str(FORMAT_VERSION),
        "library": LIBRARY_NAME,
        "library_version": __version__,
        "shapes": json.dumps({n: list(s) for n, s in shapes.items()}),
        "granularity": json.dumps(
            {
                "default": default.to_dict(),
                "per_parameter": {n: g.to_dict() for n, g in grans.items() if g != default},
            }
        ),
        "fingerprints": json.dumps(mask.fingerprints),
        "provenance": json.dumps(mask.provenance, allow_nan=False),
    }
    tensors = {name: idx.contiguous() for name, idx in mask.items()}
    return _st_save(tensors, metadata=meta)


def save_mask(mask: SafetyMask, save_directory: str | os.PathLike) -> str:
    """Write ``save_directory/safety_mask.safetensors`` atomically (temporary file in the same folder, then
    ``os.replace``).

    Args:
        mask: the mask.
        save_directory: the folder (created if missing).

    Returns:
        The path of the written file.

    Raises:
        ValueError: if `save_directory` is an existing file, or names a ``.safetensors`` file rather than a folder.
    """
    directory = os.fspath(save_directory)
    if os.path.isfile(directory) or directory.endswith(".safetensors"):
        raise ValueError(
            f"save_pretrained expects a folder, got {directory!r}; the file is always named {MASK_FILENAME} inside it"
        )
    data = mask_to_bytes(mask)
    os.makedirs(directory, exist_ok=True)
    target = os.path.join(directory, MASK_FILENAME)
    return atomic_write_bytes(target, data, fsync=True)


def _json_depth(text: bytes) -> int:
    """The deepest nesting of ``[``/``{`` in a JSON text, counted without parsing it (strings are skipped): a C-speed
    regex and one cumulative sum, so a 100 MB header is checked in about a second and never recurses."""
    stripped = _JSON_STRING_RE.sub(b'""', text)
    if not stripped:
        return 0
    codes = torch.frombuffer(bytearray(stripped), dtype=torch.uint8)
    step = ((codes == 0x5B) | (codes == 0x7B)).to(torch.int32) - ((codes == 0x5D) | (codes == 0x7D)).to(torch.int32)
    return int(torch.cumsum(step, 0).max()) if step.numel() else 0


def _loads(text: bytes | str, where: str, what: str) -> Any:
    """``json.loads`` after a nesting-depth check, so that a hostile file raises a ValueError, not RecursionError."""
    raw = text.encode("utf-8") if isinstance(text, str) else text
    depth = _json_depth(raw)
    if depth > MAX_JSON_DEPTH:
        raise SafetyFileError(
            f"{where}: {what} is nested more than {MAX_JSON_DEPTH} levels deep ({depth}); a peft-safety mask never "
            "is. The file is corrupted or hostile"
        )
    try:
        return json.loads(raw.decode("utf-8"))
    except RecursionError:  # pragma: no cover - the depth check above comes first
        raise SafetyFileError(f"{where}: {what} is nested too deeply; the file is corrupted or hostile") from None
    except (UnicodeDecodeError, ValueError) as err:
        raise SafetyFileError(f"{where}: {what} is not valid JSON ({err}); the file is corrupted") from None


def check_json_depth(value: Any, what: str) -> None:
    """Raise `ValueError` if `value` serialises to JSON nested deeper than a reader accepts (`MAX_JSON_DEPTH`)."""
    try:
        text = json.dumps(value, allow_nan=False)
    except RecursionError:
        raise ValueError(f"{what} is nested more than {MAX_JSON_DEPTH} levels deep; flatten it") from None
    depth = _json_depth(text.encode("utf-8"))
    if depth > MAX_JSON_DEPTH:
        raise ValueError(
            f"{what} is nested more than {MAX_JSON_DEPTH} levels deep ({depth}); no reader would accept the file. "
            "Flatten it (e.g. keep the provenance of a few operands only)"
        )


def _json_field(meta: dict[str, Any], key: str, where: str) -> Any:
    raw = meta[key]
    if not isinstance(raw, str):
        raise SafetyFileError(
            f"{where}: metadata field {key!r} must be a JSON string, got {type(raw).__name__}; the file is corrupted"
        )
    value = _loads(raw, where, f"metadata field {key!r}")
    if not isinstance(value, dict):
        raise SafetyFileError(f"{where}: metadata field {key!r} must be a JSON object, got {type(value).__name__}")
    return value


def _check_shape(name: str, shape: Any, where: str) -> tuple[int, ...]:
    if not isinstance(shape, list):
        raise SafetyFileError(f"{where}: shapes[{name!r}] must be a JSON list of ints, got {shape!r}")
    if len(shape) > MAX_NDIM:
        raise SafetyFileError(
            f"{where}: shapes[{name!r}] has {len(shape)} dimensions; a weight has at most {MAX_NDIM}. File corrupted"
        )
    if not all(isinstance(d, int) and not isinstance(d, bool) for d in shape):
        raise SafetyFileError(f"{where}: shapes[{name!r}] = {shape!r} must contain ints only")
    if any(d < 0 for d in shape):
        raise SafetyFileError(f"{where}: shapes[{name!r}] = {shape!r} has a negative dimension")
    numel = math.prod(shape)
    if numel > MAX_PARAMETER_NUMEL:
        raise SafetyFileError(
            f"{where}: shapes[{name!r}] = {shape!r} declares {numel:.3g} entries, more than any model weight "
            f"(limit {MAX_PARAMETER_NUMEL:.3g}); the file is corrupted or hostile"
        )
    return tuple(shape)


def _parse_header(header_bytes: bytes, data_len: int, where: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """Check everything the header declares against itself and the data length; returns ``(constructor arguments
    without indices, {name: (dtype, count, begin)})``. Nothing sized by the file is allocated here."""
    header = _loads(header_bytes, where, "the safetensors header")
    if not isinstance(header, dict):
        raise SafetyFileError(f"{where}: corrupted file: the safetensors header is not a JSON object")
    meta = header.get("__metadata__")
    if not isinstance(meta, dict) or meta.get("library") != LIBRARY_NAME:
        found = "no metadata" if not isinstance(meta, dict) else f"library={meta.get('library')!r}"
        raise SafetyFileError(
            f"{where}: not a peft-safety mask file ({found}; expected library='peft-safety' in the safetensors "
            "metadata). Is this a model's or an adapter's weights? Masks are saved with SafetyMask.save_pretrained"
        )
    missing = [k for k in _REQUIRED_KEYS if k not in meta]
    if missing:
        raise SafetyFileError(f"{where}: mask file metadata lacks {missing}; the file is corrupted or hand-edited")
    raw_version = meta["format_version"]
    if not (isinstance(raw_version, str) and re.fullmatch(r"[0-9]{1,9}", raw_version)):
        # int() alone would read "1_0" as 10 and " 1" as 1: the field is written as plain ASCII digits
        raise SafetyFileError(
            f"{where}: format_version {raw_version!r} is not a version number (plain digits such as '1'); the file "
            "is corrupted or hand-edited"
        )
    version = int(raw_version)
    if version > FORMAT_VERSION:
        raise SafetyFileError(
            f"{where}: mask format_version {version} is newer than this peft-safety ({__version__}) reads "
            f"(<= {FORMAT_VERSION}); upgrade peft-safety: pip install -U peft-safety"
        )
    if version < 1:
        raise SafetyFileError(f"{where}: invalid format_version {version}; valid versions start at 1")

    shapes_field = _json_field(meta, "shapes", where)
    gran_field = _json_field(meta, "granularity", where)
    fingerprints = _json_field(meta, "fingerprints", where)
    provenance = _json_field(meta, "provenance", where)
    shapes = {n: _check_shape(n, s, where) for n, s in shapes_field.items()}

    # granularity: the default is required (a file without it is not a mask this library wrote: reading it as
    # Weight() would silently protect a few entries where the writer meant whole neurons)
    if "default" not in gran_field:
        raise SafetyFileError(
            f"{where}: metadata field 'granularity' has no 'default' entry (got keys {sorted(gran_field)}); every "
            'mask file states its default granularity, e.g. {"default": {"type": "neuron", "axis": 0}}. '
            "The file is corrupted or hand-edited"
        )
    per_param = gran_field.get("per_parameter", {})
    if not isinstance(per_param, dict):
        raise SafetyFileError(
            f"{where}: granularity 'per_parameter' must be a JSON object, got {type(per_param).__name__}"
        )
    unknown = sorted(set(per_param) - set(shapes))
    if unknown:
        raise SafetyFileError(
            f"{where}: granularity 'per_parameter' names {unknown[:3]}, which are not in 'shapes'; file corrupted"
        )
    extra = sorted(set(gran_field) - {"default", "per_parameter"})
    if extra:
        raise SafetyFileError(f"{where}: unexpected granularity field(s) {extra}; allowed: 'default', 'per_parameter'")
    try:
        default = granularity_from_dict(gran_field["default"])
        granularity = {n: granularity_from_dict(per_param[n]) if n in per_param else default for n in shapes}
        for n, g in granularity.items():
            g.check_shape(shapes[n], n)
    except (TypeError, ValueError) as err:
        raise SafetyFileError(f"{where}: invalid granularity 'default'/'per_parameter': {err}") from None

    # index tensors: dtype, 1-D shape, count <= units, offsets consistent with the shape and the data length
    layout: dict[str, tuple[torch.dtype, int, int]] = {}
    spans = []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if not isinstance(info, dict):
            raise SafetyFileError(f"{where}: header entry {name!r} must be a JSON object; the file is corrupted")
        dtype = info.get("dtype")
        if dtype not in _INDEX_DTYPES:
            raise SafetyFileError(
                f"{where}: tensor {name!r} has dtype {dtype}; mask indices must be integers (I32, or I64 for "
                "parameters with >= 2**31 entries)"
            )
        if name not in shapes:
            raise SafetyFileError(
                f"{where}: tensor {name!r} has no shape in the metadata field 'shapes'; file corrupted"
            )
        shape, offsets = info.get("shape"), info.get("data_offsets")
        if not (isinstance(shape, list) and len(shape) == 1 and isinstance(shape[0], int) and shape[0] >= 0):
            raise SafetyFileError(
                f"{where}: tensor {name!r} has shape {shape!r}; mask indices must be 1-D (a list of one length)"
            )
        ok = isinstance(offsets, list) and len(offsets) == 2
        ok = ok and all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
        if not ok or not 0 <= offsets[0] <= offsets[1]:
            raise SafetyFileError(f"{where}: tensor {name!r} has invalid data_offsets {offsets!r}; file corrupted")
        count, itemsize = shape[0], _INDEX_DTYPES[dtype].itemsize
        if offsets[1] - offsets[0] != count * itemsize:
            raise SafetyFileError(
                f"{where}: tensor {name!r} declares {count} indices ({count * itemsize} bytes) but its data_offsets "
                f"span {offsets[1] - offsets[0]} bytes; the file is corrupted"
            )
        if offsets[1] > data_len:
            raise SafetyFileError(
                f"{where}: tensor {name!r} ends at byte {offsets[1]} of the data, but the file holds {data_len} "
                "data bytes; the file is truncated or corrupted: download or save the mask again"
            )
        units = granularity[name].num_units(shapes[name])
        if count > units:
            raise SafetyFileError(
                f"{where}: tensor {name!r} holds {count} indices, more indices than the {units} units of "
                f"{granularity[name]!r} on shape {shapes[name]} (indices are unique); the file is corrupted"
            )
        layout[name] = (_INDEX_DTYPES[dtype], count, offsets[0])
        spans.append((offsets[0], offsets[1], name))
    position = 0
    for begin, stop, name in sorted(spans):
        if begin != position:
            raise SafetyFileError(
                f"{where}: tensor {name!r} starts at data byte {begin}, expected {position} (overlapping or "
                "missing bytes); the file is corrupted"
            )
        position = stop
    if position != data_len:
        raise SafetyFileError(
            f"{where}: the header describes {position} data bytes but the file holds {data_len}; the file is "
            "truncated, has trailing bytes, or is corrupted"
        )
    parts = {"shapes": shapes, "granularity": granularity, "fingerprints": fingerprints, "provenance": provenance}
    return parts, layout


def _header_length(first8: bytes, available: int, where: str) -> int:
    if len(first8) < 8:
        raise SafetyFileError(
            f"{where}: truncated file ({len(first8)} bytes; a safetensors file starts with 8 length bytes)"
        )
    (header_len,) = struct.unpack("<Q", first8)
    if header_len > MAX_HEADER_BYTES:
        raise SafetyFileError(
            f"{where}: the file declares a header of {header_len} bytes, more than the {MAX_HEADER_BYTES} bytes "
            "safetensors allows; the file is corrupted or hostile"
        )
    if header_len > available:
        raise SafetyFileError(
            f"{where}: truncated or corrupted file: the header claims {header_len} bytes but only {available} "
            "follow; download or save the mask again"
        )
    return header_len


def _indices(data: bytearray, layout: dict[str, tuple[torch.dtype, int, int]]) -> dict[str, torch.Tensor]:
    # safetensors stores little-endian integers, as every platform torch supports does in memory
    return {
        name: torch.frombuffer(data, dtype=dtype, count=count, offset=begin).clone()
        if count
        else torch.zeros(0, dtype=dtype)
        for name, (dtype, count, begin) in layout.items()
    }


def decode_mask(data: bytes, where: str = "<bytes>") -> dict[str, Any]:
    """Parse and check the bytes of a ``safety_mask.safetensors`` file (`peft_safety.mask.mask_from_bytes` builds the
    mask from them).

    Every check on what the file declares (header size and nesting, metadata fields, granularity with its
    ``default``, shapes, index dtypes, counts and byte ranges against the data length) runs before any tensor is
    built; only then are the index vectors copied out.

    Args:
        data: the file content.
        where: how to name the source in error messages (a path).

    Returns:
        The `SafetyMask` constructor arguments: ``indices``, ``shapes``, ``granularity``, ``fingerprints`` and
        ``provenance``.

    Raises:
        ValueError: if the content is truncated or corrupted, is not a peft-safety mask (for instance a model's
            weights), has a newer ``format_version`` than this version reads, lacks metadata fields, declares an
            absurd shape, nests JSON deeper than `MAX_JSON_DEPTH`, stores indices with a non-integer dtype, or
            stores invalid (e.g. unsorted) indices.
    """
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise TypeError(f"mask bytes must be bytes, got {type(data).__name__}")
    data = bytes(data) if isinstance(data, memoryview) else data
    header_len = _header_length(data[:8], len(data) - 8, where)
    parts, layout = _parse_header(data[8 : 8 + header_len], len(data) - 8 - header_len, where)
    parts["indices"] = _indices(bytearray(data[8 + header_len :]), layout)
    return parts


def read_mask_file(path: str | os.PathLike) -> dict[str, Any]:
    """Read and check a ``safety_mask.safetensors`` file; returns the `SafetyMask` constructor arguments.

    The header is read and checked first (see `decode_mask`); the data part is read only once the header's byte
    ranges match the file's size, so a hostile header never makes this read (or allocate) more than the file holds.

    Raises:
        FileNotFoundError: if the file does not exist.
        ValueError: see `decode_mask`.
    """
    path = os.fspath(path)
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        header_len = _header_length(f.read(8), max(size - 8, 0), path)
        header_bytes = f.read(header_len)
        if len(header_bytes) != header_len:
            raise SafetyFileError(f"{path}: the file changed while it was read; try again")
        data_len = size - 8 - header_len
        parts, layout = _parse_header(header_bytes, data_len, path)
        data = bytearray(data_len)
        if f.readinto(data) != data_len:
            raise SafetyFileError(f"{path}: the file changed while it was read; try again")
    parts["indices"] = _indices(data, layout)
    return parts


def resolve_mask_file(
    path_or_repo_id: str | os.PathLike,
    revision: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    token: str | bool | None = None,
    subfolder: str | None = None,
) -> str:
    """The local path of a mask file given a folder, a file, or a Hub repository id (downloaded).

    Raises:
        TypeError: if `path_or_repo_id` is not a string or path.
        ValueError: if it is empty.
        FileNotFoundError: if a local folder lacks the mask file, or a local-looking path does not exist.
    """
    if not isinstance(path_or_repo_id, (str, os.PathLike)):
        raise SafetyTypeError(f"expected a folder, a file or a Hub repo id, got {type(path_or_repo_id).__name__}")
    p = os.fspath(path_or_repo_id)
    if not p:
        raise SafetyError("empty path: pass a folder, a safety_mask.safetensors file or a Hub repo id")
    if os.path.isdir(p):
        target = os.path.join(p, subfolder, MASK_FILENAME) if subfolder else os.path.join(p, MASK_FILENAME)
        if os.path.lexists(target) and not os.path.isfile(target):
            link = f" (a link to {os.path.realpath(target)!r})" if os.path.islink(target) else ""
            raise SafetyFileError(
                f"{target}: the mask file is not a regular file{link}; it is a device, a pipe or a folder. Save the "
                "mask again with mask.save_pretrained(folder)"
            )
        if not os.path.isfile(target):
            raise SafetyFileNotFoundError(
                f"No {MASK_FILENAME} in {os.path.dirname(target)!r}; write one with mask.save_pretrained(folder)"
            )
        return target
    if os.path.isfile(p):
        return p
    if os.path.lexists(p):  # a device, a pipe, a broken link: never opened (reading /dev/zero would not end)
        link = f" (a link to {os.path.realpath(p)!r})" if os.path.islink(p) else ""
        raise SafetyFileError(f"{p}: not a regular file{link}; pass a mask folder or a safety_mask.safetensors file")
    if is_local_path(p):  # the package's one "local path or Hub id" rule: a missing local path never asks the Hub
        raise SafetyFileNotFoundError(f"No such mask file or folder: {p!r}")
    from huggingface_hub import hf_hub_download  # lazy: importing peft_safety.mask never imports huggingface_hub

    return hf_hub_download(
        p, MASK_FILENAME, subfolder=subfolder, revision=revision, cache_dir=cache_dir, token=token, repo_type="model"
    )
