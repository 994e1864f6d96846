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
import os
import struct
from typing import TYPE_CHECKING, Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as _st_load
from safetensors.torch import save as _st_save

from .._io import atomic_write_bytes
from .._version import __version__
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


def _json_field(meta: dict[str, str], key: str, where: str) -> Any:
    try:
        value = json.loads(meta[key])
    except (TypeError, ValueError) as err:
        raise ValueError(f"{where}: metadata field {key!r} is not valid JSON ({err}); the file is corrupted") from None
    if not isinstance(value, dict):
        raise ValueError(f"{where}: metadata field {key!r} must be a JSON object, got {type(value).__name__}")
    return value


def decode_mask(data: bytes, where: str = "<bytes>") -> dict[str, Any]:
    """Parse and check the bytes of a ``safety_mask.safetensors`` file (`peft_safety.mask.mask_from_bytes` builds the
    mask from them).

    Args:
        data: the file content.
        where: how to name the source in error messages (a path).

    Returns:
        The `SafetyMask` constructor arguments: ``indices``, ``shapes``, ``granularity``, ``fingerprints`` and
        ``provenance``.

    Raises:
        ValueError: if the content is truncated or corrupted, is not a peft-safety mask (for instance a model's
            weights), has a newer ``format_version`` than this version reads, lacks metadata fields, stores indices
            with a non-integer dtype, or stores invalid (e.g. unsorted) indices.
    """
    if len(data) < 8:
        raise ValueError(f"{where}: truncated file ({len(data)} bytes; a safetensors file starts with 8 length bytes)")
    (header_len,) = struct.unpack("<Q", data[:8])
    if header_len > len(data) - 8:
        raise ValueError(
            f"{where}: truncated or corrupted file: the header claims {header_len} bytes but only {len(data) - 8} "
            "follow; download or save the mask again"
        )
    try:
        header = json.loads(data[8 : 8 + header_len].decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise ValueError(f"{where}: corrupted file: the safetensors header is not valid JSON") from None
    if not isinstance(header, dict):
        raise ValueError(f"{where}: corrupted file: the safetensors header is not a JSON object")
    meta = header.get("__metadata__")
    if not isinstance(meta, dict) or meta.get("library") != LIBRARY_NAME:
        found = "no metadata" if not isinstance(meta, dict) else f"library={meta.get('library')!r}"
        raise ValueError(
            f"{where}: not a peft-safety mask file ({found}; expected library='peft-safety' in the safetensors "
            "metadata). Is this a model's or an adapter's weights? Masks are saved with SafetyMask.save_pretrained"
        )
    missing = [k for k in _REQUIRED_KEYS if k not in meta]
    if missing:
        raise ValueError(f"{where}: mask file metadata lacks {missing}; the file is corrupted or hand-edited")
    try:
        version = int(meta["format_version"])
    except (TypeError, ValueError):
        raise ValueError(f"{where}: format_version {meta['format_version']!r} is not an integer") from None
    if version > FORMAT_VERSION:
        raise ValueError(
            f"{where}: mask format_version {version} is newer than this peft-safety ({__version__}) reads "
            f"(<= {FORMAT_VERSION}); upgrade peft-safety: pip install -U peft-safety"
        )
    if version < 1:
        raise ValueError(f"{where}: invalid format_version {version}; valid versions start at 1")

    shapes = _json_field(meta, "shapes", where)
    gran_field = _json_field(meta, "granularity", where)
    fingerprints = _json_field(meta, "fingerprints", where)
    provenance = _json_field(meta, "provenance", where)

    for name, info in header.items():
        if name == "__metadata__":
            continue
        dtype = info.get("dtype") if isinstance(info, dict) else None
        if dtype not in _INDEX_DTYPES:
            raise ValueError(
                f"{where}: tensor {name!r} has dtype {dtype}; mask indices must be integers (I32, or I64 for "
                "parameters with >= 2**31 entries)"
            )
        if name not in shapes:
            raise ValueError(f"{where}: tensor {name!r} has no shape in the metadata field 'shapes'; file corrupted")
    try:
        tensors = _st_load(bytes(data))
    except (SafetensorError, RuntimeError, ValueError) as err:
        raise ValueError(f"{where}: corrupted or truncated safetensors data ({err})") from None

    try:
        default = granularity_from_dict(gran_field.get("default", {"type": "weight"}))
        per_param = gran_field.get("per_parameter", {})
        if not isinstance(per_param, dict):
            raise ValueError("'per_parameter' must be an object")
        granularity = {n: granularity_from_dict(per_param[n]) if n in per_param else default for n in shapes}
        shape_tuples = {}
        for n, s in shapes.items():
            if not isinstance(s, list):
                raise ValueError(f"shape of {n!r} must be a JSON list of ints, got {s!r}")
            shape_tuples[n] = tuple(s)
        return {
            "indices": tensors,
            "shapes": shape_tuples,
            "granularity": granularity,
            "fingerprints": fingerprints,
            "provenance": provenance,
        }
    except (TypeError, ValueError) as err:
        raise ValueError(f"{where}: invalid mask file: {err}") from None


def read_mask_file(path: str | os.PathLike) -> dict[str, Any]:
    """Read and check a ``safety_mask.safetensors`` file; returns the `SafetyMask` constructor arguments.

    Raises:
        FileNotFoundError: if the file does not exist.
        ValueError: see `decode_mask`.
    """
    path = os.fspath(path)
    with open(path, "rb") as f:
        data = f.read()
    return decode_mask(data, where=path)


def _looks_local(p: str) -> bool:
    # a Hub repo id is "name" or "org/name": anything else (absolute, relative with ./, several slashes, a file
    # name) is meant as a local path, and a missing local path must not turn into a Hub request
    return (
        p.endswith(".safetensors")
        or p.startswith((".", "/", "~"))
        or p.count("/") > 1
        or (os.sep != "/" and os.sep in p)
    )


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
        raise TypeError(f"expected a folder, a file or a Hub repo id, got {type(path_or_repo_id).__name__}")
    p = os.fspath(path_or_repo_id)
    if not p:
        raise ValueError("empty path: pass a folder, a safety_mask.safetensors file or a Hub repo id")
    if os.path.isdir(p):
        target = os.path.join(p, subfolder, MASK_FILENAME) if subfolder else os.path.join(p, MASK_FILENAME)
        if not os.path.isfile(target):
            raise FileNotFoundError(
                f"No {MASK_FILENAME} in {os.path.dirname(target)!r}; write one with mask.save_pretrained(folder)"
            )
        return target
    if os.path.isfile(p):
        return p
    if _looks_local(p):
        raise FileNotFoundError(f"No such mask file or folder: {p!r}")
    from huggingface_hub import hf_hub_download  # lazy: importing peft_safety.mask never imports huggingface_hub

    return hf_hub_download(
        p, MASK_FILENAME, subfolder=subfolder, revision=revision, cache_dir=cache_dir, token=token, repo_type="model"
    )
