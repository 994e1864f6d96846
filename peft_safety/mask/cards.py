"""``write_card``: create or update the README.md of a local folder (a saved adapter, a mask folder) so that it
describes its peft-safety content, with the merge rules of `peft_safety.mask.hub.build_card`.

It sits above `peft_safety.mask.safety_mask` (it loads the folder's mask) while `peft_safety.mask.hub` sits below it
(``SafetyMask.push_to_hub`` calls the hub module), so the two never form an import cycle.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping
from typing import Any

from .._io import atomic_write_bytes, read_bytes_nofollow
from ..errors import SafetyFileError, SafetyFileNotFoundError
from .adapter_files import check_adapter_type
from .safety_mask import SafetyMask, load_mask
from .serialization import MASK_FILENAME

__all__ = ["write_card"]

#: the largest README.md merged (cards are a few KB; a larger file is not a card)
MAX_CARD_BYTES = 16 * 2**20


def _existing_card(readme: str) -> str | None:
    """The text of ``readme``, `None` if there is none. A symlink planted at the name is not followed: its target is
    neither read into the card nor written (the atomic write replaces the link with the card)."""
    if not os.path.lexists(readme):
        return None
    if os.path.islink(readme):
        warnings.warn(
            f"{readme} is a symbolic link (to {os.readlink(readme)!r}); peft-safety replaces it by the card and "
            "neither reads nor writes its target (PEFT's save_pretrained writes its own card through such a link "
            "before that: check the target)",
            UserWarning,
            stacklevel=3,
        )
        return None
    try:
        data = read_bytes_nofollow(readme, max_bytes=MAX_CARD_BYTES, what="model card")
    except OSError as err:
        raise SafetyFileError(f"{err}; remove it or replace it with a text file") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise SafetyFileError(
            f"{readme}: the model card is not UTF-8 text ({err.reason} at byte {err.start})"
        ) from None


def write_card(
    folder: str | os.PathLike,
    *,
    mask: SafetyMask | None = None,
    adapter_config: Mapping[str, Any] | None = None,
    mode: str | None = None,
    repo_id: str | None = None,
    base_model: str | None = None,
    mask_subfolder: str | None = None,
    evidence: Any = None,
) -> str:
    """Create or update ``folder/README.md`` so that it describes the peft-safety content of the folder.

    Use it after ``PeftModel.save_pretrained`` (whose card never mentions peft-safety or the ``import peft_safety``
    a SAFETY adapter needs) or after ``SafetyMask.save_pretrained`` into an adapter folder. The existing card's text
    and front matter are kept (see `build_card`); the file is replaced atomically.

    Args:
        folder: the folder.
        mask: the mask; default: ``folder[/mask_subfolder]/safety_mask.safetensors`` if present (loaded and checked).
        adapter_config: default: ``folder/adapter_config.json`` if present.
        mode: ``"SET"``/``"train_only"`` or ``"SPA"``/``"freeze"`` (inferred when omitted, see `build_card`).
        repo_id: the repository id for the loading snippets.
        base_model: the base model's Hub id, if the files do not record it.
        mask_subfolder: where the mask lies inside `folder`.
        evidence: measured refusal / over-refusal records for the card's ``model-index`` and table
            (`peft_safety.mask.evidence`); default: ``folder/safety_evaluation.json`` if present.

    Returns:
        The path of the README.md.

    Raises:
        FileNotFoundError: if `folder` is not a folder.
        ValueError: if a file in it is corrupted, or ``adapter_config.json`` says another PEFT type than the weights
            file holds (`peft_safety.mask.adapter_files.check_adapter_type`).
    """
    from .hub import _check_subfolder, _read_json, build_card  # lazy: huggingface_hub only when a card is built

    folder = os.fspath(folder)
    if not os.path.isdir(folder):
        raise SafetyFileNotFoundError(f"write_card: {folder!r} is not a folder; save the adapter or mask there first")
    sub = _check_subfolder(mask_subfolder)
    mask_file = os.path.join(folder, *(sub.split("/") if sub else []), MASK_FILENAME)
    if mask is None and os.path.isfile(mask_file):
        mask = load_mask(mask_file)
    config_path = os.path.join(folder, "adapter_config.json")
    if adapter_config is None and os.path.isfile(config_path):
        check_adapter_type(folder)  # a relabelled peft_type must not be described as what it claims
        adapter_config = _read_json(config_path)
    readme = os.path.join(folder, "README.md")
    existing = _existing_card(readme)
    card = build_card(
        existing,
        mask=mask,
        mode=mode,
        adapter_config=adapter_config,
        repo_id=repo_id,
        base_model=base_model,
        mask_path=f"{sub}/{MASK_FILENAME}" if sub else None,
    )
    text = str(card)
    from .evidence import EVIDENCE_FILENAME, add_evidence, read_evidence

    if evidence is None and os.path.isfile(os.path.join(folder, EVIDENCE_FILENAME)):
        evidence = read_evidence(os.path.join(folder, EVIDENCE_FILENAME))
    if evidence:
        text = add_evidence(text, evidence, model_name=repo_id or os.path.basename(os.path.abspath(folder)))
    return atomic_write_bytes(readme, text.encode("utf-8"))
