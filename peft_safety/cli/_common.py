"""Checks shared by the subcommands, run before any model loads (standard library only at import time).

* `check_local_or_hub`: a path must exist (an adapter folder must hold an intact config and weights file); a Hub id
  is recorded (so that a later network error names the repo and the file) and, offline (``HF_HUB_OFFLINE=1``), must
  already be in the local Hub cache. Whether a value is a path or a Hub id is decided by the package's one rule,
  `peft_safety._files.is_local_path`.
* `check_data_source`: a named data set of ``peft_safety.sources`` or an existing file.
* `resolve_device`, `resolve_dtype`: ``"auto"`` becomes the best device and dtype of this machine.
"""

from __future__ import annotations

import os
from typing import Any

from .._files import ADAPTER_CONFIG, check_adapter_folder
from ..errors import SafetyError, SafetyFileNotFoundError

__all__ = [
    "add_hub_context",
    "check_data_source",
    "check_local_or_hub",
    "hub_context",
    "looks_like_path",
    "reset_hub_context",
    "resolve_device",
    "resolve_dtype",
]

_CONTEXT: list[tuple[str, str, str]] = []  # (what, repo id, file) of the Hub files this command will fetch


def reset_hub_context() -> None:
    _CONTEXT.clear()


def hub_context() -> str:
    """`` while fetching 'file' of Hub repo 'id' (the model)`` for the Hub files this command needs, or ``""``."""
    if not _CONTEXT:
        return ""
    parts = [f"{what} {repo!r}, file {file!r}" for what, repo, file in _CONTEXT]
    return " for " + "; ".join(parts)


def add_hub_context(what: str, repo_id: str, filename: str) -> None:
    """Record a Hub file this command reads or writes, so that a network error names it."""
    _CONTEXT.append((what, repo_id, filename))


def looks_like_path(value: str) -> bool:
    """A local path rather than a Hub id (``name`` or ``owner/name``): `peft_safety._files.is_local_path`."""
    from .._files import is_local_path

    return is_local_path(value)


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def check_local_or_hub(what: str, value: str | None, filename: str, revision: str | None = None) -> None:
    """Check a model, adapter or mask argument before anything loads.

    Args:
        what: the flag or role, for the message (``"MODEL"``, ``"--adapter"``, ``"MASK"``).
        value: the argument (a local path or a Hub id); ``None`` is skipped.
        filename: the file a Hub repo of this kind must hold (``"config.json"``, ``"safety_mask.safetensors"``).
        revision: the Hub revision, if any.

    Raises:
        SafetyFileNotFoundError: a local path that does not exist, or (offline) a Hub id whose file is not in the cache;
            the message names the repo, the file and the cache folder.
        SafetyFileError: an adapter folder (``filename="adapter_config.json"``) whose config or weights file is
            damaged.
    """
    if value is None:
        return
    if looks_like_path(value):
        if not os.path.exists(os.path.expanduser(value)):
            raise SafetyFileNotFoundError(f"{what} {value!r}: no such file or folder.")
        if filename == ADAPTER_CONFIG:
            check_adapter_folder(value)
        return
    add_hub_context(what, value, filename)
    if not _offline():
        return  # loading will download it; a failure then names this repo and file
    from huggingface_hub import constants, try_to_load_from_cache

    found = try_to_load_from_cache(value, filename, revision=revision)
    if not isinstance(found, str):
        raise SafetyFileNotFoundError(
            f"{what} {value!r}: file {filename!r} of Hub repo {value!r} is not in the local Hub cache "
            f"({constants.HF_HUB_CACHE}) and HF_HUB_OFFLINE=1 forbids downloading it. Download it once with network "
            "access (unset HF_HUB_OFFLINE), point HF_HUB_CACHE at a cache that has it, or pass a local folder."
        )


def check_data_source(what: str, value: str | None) -> None:
    """A named data set (``peft_safety.sources.DATA_SOURCES``) or an existing file.

    Raises:
        SafetyError: an unknown name (with the closest known one and the list).
        SafetyFileNotFoundError: a path that does not exist.
    """
    if value is None:
        return
    from ..sources.datasets import DATA_SOURCES

    if value in DATA_SOURCES:
        return
    if looks_like_path(value) or os.path.splitext(value)[1]:
        if not os.path.isfile(os.path.expanduser(value)):
            raise SafetyFileNotFoundError(f"{what} {value!r}: no such file.")
        return
    from ..vocab import did_you_mean

    raise SafetyError(
        f"Unknown data source {value!r} for {what}.{did_you_mean(value, sorted(DATA_SOURCES))} Or give a "
        ".csv/.json/.jsonl/.parquet file."
    )


def resolve_device(device: str) -> str:
    """``"auto"``: ``"cuda"`` if a CUDA device is available, else ``"mps"`` if available, else ``"cpu"``; any other value
    is returned unchanged."""
    if device != "auto":
        return device
    import torch

    if torch.cuda.is_available():
        return "cuda"
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        return "mps"
    return "cpu"


def resolve_dtype(dtype: str, device: str) -> Any:
    """``"auto"``: bfloat16 on a CUDA device that supports it, float32 elsewhere (CPU generation in bf16 is slower on
    most CPUs and changes the numbers); any other name is the torch dtype of that name."""
    import torch

    if dtype == "auto":
        if device.startswith("cuda") and torch.cuda.is_available() and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    return getattr(torch, dtype)
