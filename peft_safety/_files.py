"""Where an argument points (a local path or a Hub repo id) and pre-checks of adapter folders, shared by every stage.

**One rule for "local path or Hub id".** `is_local_path` decides it for the command line, TRL's SFT script, the mask
loader and the model loaders alike. A value is a local path when it exists, or when it cannot be a Hub repo id: it is
absolute or starts with ``.``/``~``, holds a backslash or more than one ``/``, ends with a file extension peft-safety
reads (``.json``, ``.safetensors``, ...), or fails ``huggingface_hub.utils.validate_repo_id`` (the Hub's own rule:
``name`` or ``namespace/name``, letters, digits, ``-_.``, no ``--`` or ``..``, at most 96 characters). Everything
else is a Hub id. So a mistyped local folder (``./my-mask``, ``runs/a/mask``) gives "no such file or folder", never
a network request to a repository that does not exist.

**Adapter folders are checked before PEFT reads them.** A save killed half-way, a copy that stopped early or a file
planted under a known name otherwise reach PEFT's loader, which fails with ``JSONDecodeError``, ``KeyError:
'peft_type'``, ``RecursionError``, safetensors' ``header too small`` or an ``HFValidationError`` about repo ids,
none of which names the file. `read_adapter_config` and `check_adapter_weights` read only what they must (the config,
bounded; the safetensors header, bounded) and raise a `SafetyFileError` that names the file, what is wrong with it
and what to do. `check_adapter_folder` runs both on a local folder. peft-safety's loaders (``load_model``,
``peft-safety eval``) call it first; on PEFT's own path (``PeftModel.from_pretrained``) the
config of a ``SAFETY``/``SAFETY_LORA`` adapter runs `check_adapter_weights` when PEFT hands it the folder, while a
damaged ``adapter_config.json`` is read by PEFT before any peft-safety code runs (``docs/footguns.md``).

Only the standard library and huggingface_hub/peft (inside functions) are imported, so every stage may use it.
"""

from __future__ import annotations

import json
import os
import re
import stat
import struct
from typing import Any

from ._io import read_bytes_nofollow
from .errors import SafetyError, SafetyFileError, SafetyFileNotFoundError, SafetyTypeError

__all__ = [
    "ADAPTER_CONFIG",
    "ADAPTER_WEIGHTS",
    "FILE_EXTENSIONS",
    "check_adapter_folder",
    "check_adapter_weights",
    "check_hub_id",
    "check_safetensors_file",
    "is_local_path",
    "read_adapter_config",
    "read_json_file",
]

#: PEFT's adapter config file name (``peft.utils.CONFIG_NAME``)
ADAPTER_CONFIG = "adapter_config.json"
#: PEFT's adapter weight file names, in the order PEFT looks for them
ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
#: extensions of the files peft-safety reads: a value ending with one is a local path, never a Hub id
FILE_EXTENSIONS = (".json", ".jsonl", ".csv", ".parquet", ".safetensors", ".bin", ".txt", ".yaml", ".yml", ".gguf")
#: the largest adapter config read (a 70B model's config with fingerprints and layout is a few hundred KB)
MAX_CONFIG_BYTES = 64 * 2**20
#: the largest safetensors header accepted (safetensors' own limit)
MAX_HEADER_BYTES = 100 * 2**20

_SAVE_AGAIN = "save the adapter again (model.save_pretrained(folder)) or copy the complete folder"


# ------------------------------------------------------------------------------------------------ local or Hub
def is_local_path(value: str | os.PathLike) -> bool:
    """Whether ``value`` means a local file or folder (`True`) or a Hugging Face Hub repo id (`False`).

    See the module docstring for the rule. A path that does not exist can still be local (``./mask``,
    ``runs/a/b``, ``rows.jsonl``): callers then report "no such file or folder" instead of asking the Hub.

    Example:

    ```python
    >>> is_local_path("HuggingFaceTB/SmolLM2-135M-Instruct"), is_local_path("./my-mask"), is_local_path("a/b/c")
    (False, True, True)
    ```
    """
    if isinstance(value, os.PathLike):
        return True
    if not isinstance(value, str):
        raise SafetyTypeError(f"expected a local path or a Hub repo id (a str), got {type(value).__name__}")
    if not value or os.path.exists(os.path.expanduser(value)):
        return True
    if os.path.isabs(value) or value.startswith((".", "~")) or "\\" in value or value.count("/") > 1:
        return True
    if value.lower().endswith(FILE_EXTENSIONS):
        return True
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(value)
    except HFValidationError:
        return True
    return False


def check_hub_id(value: str, what: str = "repo_id") -> str:
    """``value`` if it is a valid Hub repo id (``name`` or ``namespace/name``, huggingface_hub's rule).

    Raises:
        SafetyError: naming the flag or argument and the rule.
    """
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    if not isinstance(value, str):
        raise SafetyTypeError(f"{what} must be a Hub repo id (a str such as 'me/my-mask'), got {type(value).__name__}")
    try:
        validate_repo_id(value)
    except HFValidationError as err:
        raise SafetyError(
            f"{what} {value!r} is not a Hub repo id ({err}); use 'namespace/name', e.g. 'me/my-mask'"
        ) from None
    return value


# ------------------------------------------------------------------------------------------------ files
def _read(path: str, what: str, max_bytes: int) -> bytes:
    """The bytes of a regular file (a symlink into the Hub cache is followed, a symlink to a device is not)."""
    try:
        st = os.stat(path)  # follows links: the Hub cache stores files as links to blobs
    except FileNotFoundError:
        raise SafetyFileNotFoundError(f"{path}: no such {what}") from None
    if not stat.S_ISREG(st.st_mode):
        target = f" (a link to {os.path.realpath(path)!r})" if os.path.islink(path) else ""
        raise SafetyFileError(
            f"{path}: the {what} is not a regular file{target}; it is a device, a pipe or a folder. Replace it with "
            "the real file"
        )
    try:
        return read_bytes_nofollow(os.path.realpath(path), max_bytes=max_bytes, what=what)
    except FileNotFoundError:  # pragma: no cover - removed between the stat and the read
        raise SafetyFileNotFoundError(f"{path}: no such {what}") from None
    except OSError as err:
        raise SafetyFileError(str(err).replace(os.path.realpath(path), path, 1)) from None


_JSON_STRING = re.compile(r'"(?:[^"\\]|\\.)*"', re.DOTALL)


def _ends_early(text: str) -> bool:
    """Whether a JSON text that failed to parse stops inside a string or an open ``[``/``{`` (a truncated file)."""
    stripped = _JSON_STRING.sub('""', text)
    if stripped.count('"') % 2:
        return True  # an unterminated string
    return stripped.count("{") + stripped.count("[") > stripped.count("}") + stripped.count("]")


def read_json_file(path: str | os.PathLike, what: str = "JSON file", *, max_bytes: int = MAX_CONFIG_BYTES) -> Any:
    """The JSON value in ``path``, read with a size limit and without unbounded recursion.

    Raises:
        SafetyFileNotFoundError: no such file.
        SafetyFileError: empty, too large, not UTF-8, not JSON (truncated or garbled), or nested too deeply; the
            message names the file.
    """
    path = os.fspath(path)
    data = _read(path, what, max_bytes)
    if not data.strip():
        raise SafetyFileError(
            f"{path}: the {what} is empty ({len(data)} bytes). A save interrupted while writing it leaves it so"
        )
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise SafetyFileError(f"{path}: the {what} is not UTF-8 text ({err.reason} at byte {err.start})") from None
    try:
        return json.loads(text)
    except RecursionError:
        raise SafetyFileError(
            f"{path}: the {what} is nested too deeply to be read; the file is damaged or hostile"
        ) from None
    except json.JSONDecodeError as err:
        cut = " (it ends in the middle of a value: the file is truncated)" if _ends_early(text) else ""
        raise SafetyFileError(
            f"{path}: the {what} is not valid JSON: {err.msg} at line {err.lineno}, column {err.colno}{cut}"
        ) from None


def _known_peft_types() -> set[str]:
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING

    return {getattr(k, "value", k) for k in PEFT_TYPE_TO_CONFIG_MAPPING}


def read_adapter_config(path: str | os.PathLike) -> dict[str, Any]:
    """The content of an ``adapter_config.json`` (a folder holding one, or the file), checked before PEFT reads it.

    Raises:
        SafetyFileNotFoundError: the folder has no ``adapter_config.json``.
        SafetyFileError: the config is empty, truncated, not JSON, not a JSON object, nested too deeply, or has a
            missing or unknown ``peft_type``; the message names the file.
    """
    path = os.fspath(path)
    file = os.path.join(path, ADAPTER_CONFIG) if os.path.isdir(path) else path
    if os.path.isdir(path) and not os.path.lexists(file):
        raise SafetyFileNotFoundError(
            f"{path}: not an adapter folder: it has no {ADAPTER_CONFIG} (PEFT's save_pretrained writes one next to "
            "the adapter weights). Pass the folder that save_pretrained wrote"
        )
    config = read_json_file(file, ADAPTER_CONFIG)
    if not isinstance(config, dict):
        raise SafetyFileError(
            f"{file}: {ADAPTER_CONFIG} must hold a JSON object (the config's fields), it holds a "
            f"{type(config).__name__}; the file is damaged: {_SAVE_AGAIN}"
        )
    peft_type = config.get("peft_type")
    if peft_type is None:
        raise SafetyFileError(
            f"{file}: {ADAPTER_CONFIG} has no 'peft_type', so no loader knows what kind of adapter it is; the file "
            f"is damaged or hand-written: {_SAVE_AGAIN}"
        )
    known = _known_peft_types()
    if not isinstance(peft_type, str) or peft_type not in known:
        from .vocab import did_you_mean

        hint = did_you_mean(str(peft_type), sorted(known), available=False)
        raise SafetyFileError(
            f"{file}: peft_type {peft_type!r} is not an adapter type PEFT knows.{hint} peft-safety's types are "
            "'SAFETY' and 'SAFETY_LORA' (registered by `import peft_safety`); another library's type needs that "
            "library imported first"
        )
    return config


def check_safetensors_file(path: str | os.PathLike, what: str = "safetensors file", remedy: str = "") -> str:
    """Check that ``path`` is a complete safetensors file, reading only its header.

    A regular file (a link into the Hub cache is fine, a link to a device is not) of at least the 8-byte header
    length, a header of sane size that is a JSON object whose entries have integer ``data_offsets``, and tensor data
    that exactly fills the rest of the file (a truncated copy does not).

    Args:
        path: the file.
        what: how to name it in messages (``"adapter weights file"``, ``"scores file"``).
        remedy: what to do about a damaged file, appended to the message.

    Returns:
        The path.

    Raises:
        SafetyFileNotFoundError: no such file (or a broken link).
        SafetyFileError: a folder or device, empty, truncated or not a safetensors file; the message names it.
    """
    path = os.fspath(path)
    fix = f"; {remedy}" if remedy else ""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        link = f" (a broken link to {os.readlink(path)!r})" if os.path.islink(path) else ""
        raise SafetyFileNotFoundError(f"{path}: no such {what}{link}") from None
    if not stat.S_ISREG(st.st_mode):
        target = f" (a link to {os.path.realpath(path)!r})" if os.path.islink(path) else ""
        raise SafetyFileError(f"{path}: the {what} is not a regular file{target}: a folder, device or pipe{fix}")
    size = st.st_size
    if size < 8:
        raise SafetyFileError(
            f"{path}: the {what} has {size} bytes, fewer than a safetensors header needs: it is empty or "
            f"truncated{fix}"
        )
    with open(path, "rb") as fh:
        (n,) = struct.unpack("<Q", fh.read(8))
        if n > MAX_HEADER_BYTES or 8 + n > size:
            raise SafetyFileError(
                f"{path}: the {what} declares a {n}-byte safetensors header but has {size - 8} bytes after the "
                f"length field: it is truncated or not a safetensors file{fix}"
            )
        raw = fh.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        raise SafetyFileError(
            f"{path}: the {what}'s safetensors header is not valid JSON: the file is damaged{fix}"
        ) from None
    if not isinstance(header, dict):
        raise SafetyFileError(
            f"{path}: the {what}'s safetensors header is not a JSON object: the file is damaged{fix}"
        )
    ends = []
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        offsets = entry.get("data_offsets") if isinstance(entry, dict) else None
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int for o in offsets)):
            raise SafetyFileError(
                f"{path}: tensor {name!r} of the {what} has no valid data_offsets: the file is damaged{fix}"
            )
        ends.append(offsets[1])
    data_len = size - 8 - n
    end = max(ends, default=0)
    if end != data_len:
        state = "truncated" if end > data_len else "followed by bytes no tensor uses"
        raise SafetyFileError(
            f"{path}: the {what}'s tensors end at byte {end} of a {data_len}-byte data section: the file is "
            f"{state}{fix}"
        )
    return path


def check_adapter_weights(folder: str | os.PathLike) -> str:
    """The path of the adapter weights in ``folder``, checked to be a complete file before anything loads it.

    ``adapter_model.safetensors``: see `check_safetensors_file` (reads the header only). ``adapter_model.bin``
    (PEFT's pickle fallback): a non-empty regular file.

    Raises:
        SafetyFileNotFoundError: neither weights file exists.
        SafetyFileError: the file is empty, truncated, a device or damaged; the message names it.
    """
    folder = os.fspath(folder)
    present = [name for name in ADAPTER_WEIGHTS if os.path.lexists(os.path.join(folder, name))]
    if not present:
        raise SafetyFileNotFoundError(
            f"{folder}: the adapter folder has {ADAPTER_CONFIG} but no weights file ({' or '.join(ADAPTER_WEIGHTS)}): "
            f"the save was interrupted or the file was removed; {_SAVE_AGAIN}"
        )
    path = os.path.join(folder, present[0])
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise SafetyFileNotFoundError(f"{path}: a broken link ({os.readlink(path)!r} does not exist)") from None
    if not stat.S_ISREG(st.st_mode):
        target = f" (a link to {os.path.realpath(path)!r})" if os.path.islink(path) else ""
        raise SafetyFileError(f"{path}: the adapter weights are not a regular file{target}; {_SAVE_AGAIN}")
    size = st.st_size
    if present[0].endswith(".bin"):
        if size == 0:
            raise SafetyFileError(f"{path}: the adapter weights file is empty (0 bytes); {_SAVE_AGAIN}")
        return path
    check_safetensors_file(path, "adapter weights file", _SAVE_AGAIN)
    return path


def check_adapter_folder(path: str | os.PathLike, subfolder: str | None = None) -> dict[str, Any] | None:
    """Check a local adapter folder (config and weights) before PEFT reads it; `None` for a Hub repo id.

    Args:
        path: a local folder or a Hub repo id.
        subfolder: the adapter's folder inside ``path``, if any.

    Returns:
        The parsed ``adapter_config.json`` of a local folder, `None` for a Hub id (PEFT downloads and reads it).

    Raises:
        SafetyFileNotFoundError: a local path that does not exist, or a folder without config or weights.
        SafetyFileError: see `read_adapter_config` and `check_adapter_weights`.
    """
    text = os.fspath(path)
    if not is_local_path(text):
        return None
    folder = os.path.join(os.path.expanduser(text), subfolder) if subfolder else os.path.expanduser(text)
    if not os.path.exists(folder):
        raise SafetyFileNotFoundError(f"{folder}: no such adapter folder")
    if not os.path.isdir(folder):
        raise SafetyFileError(
            f"{folder}: an adapter is a folder (with {ADAPTER_CONFIG} and {ADAPTER_WEIGHTS[0]}), not a file; pass "
            "the folder"
        )
    config = read_adapter_config(folder)
    check_adapter_weights(folder)
    return config
