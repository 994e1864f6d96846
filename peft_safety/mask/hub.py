"""Model cards and Hugging Face Hub uploads of masks: one card for a repository that holds a mask, an adapter or both.

Every card is built with ``huggingface_hub``'s `ModelCard` / `ModelCardData`. A card is never overwritten blindly: an
existing README (PEFT's adapter card, TRL's training card, a card written by hand) keeps its front matter and text;
peft-safety adds its tags and fields to the front matter and adds, or replaces, one section between the markers
``<!-- peft-safety:begin -->`` and ``<!-- peft-safety:end -->``. That section states

* the ``import peft_safety`` line (without it, ``PeftModel.from_pretrained`` fails with a bare ``KeyError: 'SAFETY'``
  on a peft-safety adapter, because PEFT only knows the adapter types it ships);
* the mode: SET (``train_only``, only the mask's entries trained) or SPA (``freeze``, the mask's entries kept);
* the mask's provenance: method, sparsity, data hash, base model (and every other recorded field);
* how to load the adapter and the mask (with its ``subfolder``).

The front matter gets ``library_name`` (kept if the card has one, e.g. ``peft`` for an adapter, else
``peft-safety``), ``base_model`` (if missing), the tags ``peft-safety``, ``safety`` (+ ``safety-mask``, the scoring
method, ``set``/``spa``) and a ``peft_safety`` mapping (``mode``, ``mask_path``) from which later updates learn what
the repository holds.

`peft_safety.mask.cards.write_card` applies the same merge to a local folder's README.md (a saved adapter).

Uploads go through ``huggingface_hub.HfApi``: ``create_repo(exist_ok=True)``, the existing ``README.md`` and
``adapter_config.json`` read with ``hf_hub_download`` (a missing file is fine, any other error stops the push before
anything is written), then one ``create_commit`` with the mask file (at ``<subfolder>/safety_mask.safetensors``) and
the merged ``README.md``.
"""

from __future__ import annotations

import json
import os
import posixpath
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from ..errors import HubUnreachableError, SafetyError, SafetyFileError, SafetyTypeError, is_network_error
from ..vocab import MODES, check_choice
from .serialization import MASK_FILENAME, mask_to_bytes, require_mask

if TYPE_CHECKING:  # pragma: no cover
    from huggingface_hub import ModelCard

    from .safety_mask import SafetyMask

__all__ = ["build_card", "mask_model_card", "normalize_mode", "push_mask_to_hub"]

BEGIN = "<!-- peft-safety:begin -->"
END = "<!-- peft-safety:end -->"
_LEGACY_MARKER = "<!-- peft-safety -->"  # sections appended by peft-safety <= 0.1 (trainer cards)
_ESSENTIAL = ("method", "sparsity", "data_hash", "base_model")
_PROVENANCE_ORDER = (
    *_ESSENTIAL,
    "aggregation",
    "seed",
    "score_sign",
    "base_model_revision",
    "library_version",
)
#: the card label of each mode (`peft_safety.vocab.MODES`), and the labels themselves accepted as aliases
_MODE_LABELS = {"train_only": "SET", "freeze": "SPA"}
_MODE_ALIASES = {"set": "train_only", "spa": "freeze"}
_MODE_TEXT = {
    "SET": "SET (`train_only`): only the mask's entries were trained; every other weight is the base model's",
    "SPA": "SPA (`freeze`): the mask's entries were kept exactly at the base model's values while fine-tuning",
}


def normalize_mode(mode: str | None) -> str | None:
    """``"SET"``, ``"SPA"`` or `None` from a mode name (``"SET"``/``"train_only"``, ``"SPA"``/``"freeze"``).

    Raises:
        ValueError: for another name.
    """
    if mode is None:
        return None
    key = mode.strip().lower() if isinstance(mode, str) else mode
    key = check_choice(_MODE_ALIASES.get(key, key), MODES, where="mode", help="'SET' (train_only) or 'SPA' (freeze)")
    return _MODE_LABELS[key]


def _check_subfolder(subfolder: str | None) -> str | None:
    if subfolder is None or subfolder in ("", "."):
        return None
    if not isinstance(subfolder, str):
        raise SafetyTypeError(f"subfolder must be a str such as 'mask', got {type(subfolder).__name__}")
    norm = posixpath.normpath(subfolder.replace("\\", "/"))
    if norm.startswith(("/", "../")) or norm == ".." or ":" in norm:
        raise SafetyError(f"subfolder={subfolder!r} must be a relative folder inside the repository, e.g. 'mask'")
    return norm


def _md_cell(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
    return text.replace("|", "\\|").replace("\n", " ")


def _adapter_facts(adapter_config: Mapping[str, Any] | None) -> dict[str, Any]:
    if not adapter_config:
        return {}
    cfg = dict(adapter_config)
    peft_type = cfg.get("peft_type")
    peft_type = getattr(peft_type, "value", peft_type)
    layout = cfg.get("mask_layout") if peft_type == "SAFETY_LORA" else None
    return {
        "peft_type": peft_type,
        "base": cfg.get("base_model_name_or_path"),
        "mode": cfg.get("mode"),
        "masked_modules": set(layout) if isinstance(layout, Mapping) else None,
    }


def _infer_mode(mode: str | None, adapter: dict[str, Any], previous: Mapping[str, Any]) -> str | None:
    if mode is not None:
        return normalize_mode(mode)
    if adapter.get("mode") in ("train_only", "freeze"):
        return normalize_mode(adapter["mode"])
    if adapter.get("peft_type") == "SAFETY":
        return "SET"
    if adapter.get("peft_type") == "SAFETY_LORA":  # masked LoRA exists only to keep the mask's entries: SPA
        return "SPA"
    old = previous.get("mode") if isinstance(previous, Mapping) else None
    return old if old in ("SET", "SPA") else None


def _section(
    mask: SafetyMask | None,
    *,
    mode: str | None,
    adapter: dict[str, Any],
    repo_id: str | None,
    mask_path: str | None,
    base: str | None,
) -> str:
    target = repo_id or "<repo_id>"
    has_adapter = bool(adapter.get("peft_type"))
    what = []
    if has_adapter:
        what.append(f"a{'n' if mode is None else ''} {mode + ' ' if mode else ''}adapter (`{adapter['peft_type']}`)")
    if mask is not None:
        what.append("a safety mask (`SafetyMask`)")
    lines = [
        BEGIN,
        "## Safety mask (peft-safety)" if mask is not None or mask_path else "## Safety (peft-safety)",
        "",
        f"This repository holds {' and '.join(what) or 'peft-safety files'} made with "
        "[peft-safety](https://github.com/peft-safety/peft-safety), which finds the weights that carry a model's "
        "safety behaviour and trains only them (SET) or keeps them unchanged while fine-tuning (SPA).",
        "",
        f"- mode: {_MODE_TEXT[mode] if mode else 'not recorded'}",
    ]
    if base:
        lines.append(f"- base model: `{base}`")
    if mask is not None:
        lines.append(f"- mask file: `{mask_path}`")
    peft_type = adapter.get("peft_type")
    ours = peft_type if peft_type in ("SAFETY", "SAFETY_LORA") else None
    if ours:
        why = (
            f"`import peft_safety` must come first: it registers peft-safety's adapter types with PEFT. Without it "
            f"`PeftModel.from_pretrained` fails with `KeyError: '{ours}'`."
        )
    else:
        why = "`import peft_safety` gives the `SafetyMask` class and registers peft-safety's adapter types with PEFT."
    lines += [
        "",
        "### Load it",
        "",
        why,
        "",
        "```python",
        "import peft_safety  # registers peft-safety's adapter types with PEFT",
        "from transformers import AutoModelForCausalLM",
    ]
    if has_adapter:
        lines.append("from peft import PeftModel")
    lines += ["", f"base = AutoModelForCausalLM.from_pretrained({base or '<base model>'!r})"]
    if mask is not None:
        sub = posixpath.dirname(mask_path or MASK_FILENAME)
        sub_arg = f", subfolder={sub!r}" if sub else ""
        lines += [
            f"mask = peft_safety.SafetyMask.from_pretrained({target!r}{sub_arg})",
            "mask.validate(base)  # names, shapes and weight fingerprints must match the base model",
        ]
    if has_adapter:  # after the mask check: PeftModel adds its layers to `base` in place
        lines.append(f"model = PeftModel.from_pretrained(base, {target!r})")
    lines += ["```", ""]
    if mask is not None:
        prov = mask.provenance
        g = mask.granularity
        g_text = repr(g) if not isinstance(g, dict) else "mixed: " + ", ".join(sorted({repr(v) for v in g.values()}))
        lines += [
            "### Safety mask",
            "",
            f"- selected units: {len(mask)} ({g_text})",
            f"- weight entries covered: {mask.numel()} of {mask.total_numel()} (density {mask.density:.4%})",
            f"- parameters with entries: {len(mask.names)} of {len(mask.shapes)}",
            f"- weight fingerprints recorded: {len(mask.fingerprints)} of {len(mask.shapes)} parameters",
        ]
        masked_modules = adapter.get("masked_modules")
        outside = sorted(n for n in mask.names if n.rpartition(".")[0] not in (masked_modules or ()))
        if masked_modules is not None and outside:
            lines.append(
                f"- parameters with entries that this LoRA does not adapt: {len(outside)} (e.g. `{outside[0]}`). LoRA "
                "cannot change a module it does not adapt (not in its target modules, or left out for a `Layer()` "
                "mask), so those entries keep their base values exactly and the adapter stores no mask for them."
            )
        lines += [
            "",
            "| provenance | value |",
            "|---|---|",
        ]
        keys = [k for k in _PROVENANCE_ORDER if k in prov or k in _ESSENTIAL]
        keys += sorted(k for k in prov if k not in _PROVENANCE_ORDER)
        lines += [f"| {_md_cell(k)} | {_md_cell(prov[k]) if k in prov else 'not recorded'} |" for k in keys]
        lines += ["", "<details><summary>Counts per layer and module</summary>", "", "```text"]
        lines += [str(mask.summary()), "```", "", "</details>", ""]
    lines.append(END)
    return "\n".join(lines)


def _replace_section(text: str, section: str) -> str:
    start, stop = text.find(BEGIN), text.find(END)
    if start != -1 and stop > start:
        return text[:start] + section + text[stop + len(END) :]
    legacy = text.find(_LEGACY_MARKER)
    if legacy != -1:  # an older trainer section runs to the end of the card
        text = text[:legacy]
    return text.rstrip() + "\n\n" + section + "\n"


def build_card(
    existing: str | None = None,
    *,
    mask: SafetyMask | None = None,
    mode: str | None = None,
    adapter_config: Mapping[str, Any] | None = None,
    repo_id: str | None = None,
    base_model: str | None = None,
    mask_path: str | None = None,
    extra_tags: Sequence[str] = (),
) -> ModelCard:
    """The model card of a repository or folder holding a mask, an adapter or both, merged into `existing`.

    Args:
        existing: the current README.md text (kept; its peft-safety section, if any, is replaced), or `None`.
        mask: the mask, if the repository holds one.
        mode: ``"SET"``/``"train_only"`` or ``"SPA"``/``"freeze"``; inferred from `adapter_config` (``SAFETY`` ->
            SET) or the existing card's ``peft_safety.mode`` when omitted.
        adapter_config: the adapter's ``adapter_config.json`` content, if the repository holds an adapter.
        repo_id: the repository id, for the loading snippet.
        base_model: the base model's Hub id (default: the existing card's, the mask's provenance or the adapter's
            ``base_model_name_or_path``, in that order).
        mask_path: path of the mask file inside the repository (default ``safety_mask.safetensors``).
        extra_tags: more tags.

    Returns:
        A ``huggingface_hub.ModelCard``.

    Raises:
        TypeError: if `mask` is not a `SafetyMask`.
        ValueError: for an unknown `mode`.
    """
    from huggingface_hub import ModelCard, ModelCardData  # lazy: importing peft_safety.mask stays light

    if mask is not None:
        require_mask(mask, "build_card")
    if existing is not None and not isinstance(existing, str):
        raise SafetyTypeError(f"existing must be the README text (str) or None, got {type(existing).__name__}")
    card = ModelCard(existing) if existing and existing.strip() else None
    data = card.data if card is not None else ModelCardData()
    previous = data.get("peft_safety") or {}
    adapter = _adapter_facts(adapter_config)
    resolved_mode = _infer_mode(mode, adapter, previous)
    prov = mask.provenance if mask is not None else {}
    if mask is not None and mask_path is None:
        mask_path = MASK_FILENAME
    if mask is None and isinstance(previous, Mapping) and isinstance(previous.get("mask_path"), str):
        mask_path = previous["mask_path"]  # the mask stays described by the front matter; its numbers are not
    candidates = [base_model, data.get("base_model"), prov.get("base_model"), adapter.get("base")]
    base = next((b for b in candidates if isinstance(b, str) and b), None)

    if base and (base_model or not data.get("base_model")):
        data.base_model = base
    if not data.get("library_name"):
        data.library_name = "peft-safety"
    tags = list(data.get("tags") or [])
    wanted = ["peft-safety", "safety"]
    if mask is not None or mask_path:
        wanted.append("safety-mask")
    if isinstance(prov.get("method"), str):
        wanted.append(prov["method"])
    if resolved_mode:
        wanted.append(resolved_mode.lower())
    for tag in [*wanted, *extra_tags]:
        if isinstance(tag, str) and tag and tag not in tags:
            tags.append(tag)
    data.tags = tags
    meta = {"mode": resolved_mode} if resolved_mode else {}
    if mask_path:
        meta["mask_path"] = mask_path
    data.peft_safety = meta

    section = _section(mask, mode=resolved_mode, adapter=adapter, repo_id=repo_id, mask_path=mask_path, base=base)
    if card is None:
        kind = f"{resolved_mode} adapter" if adapter.get("peft_type") and resolved_mode else "Safety mask"
        body = f"\n# {kind}{f' for {base}' if base else ''}\n\n{section}\n"
    else:
        body = _replace_section(card.text, section)
    return ModelCard(f"---\n{data.to_yaml()}\n---\n{body if body.startswith(chr(10)) else chr(10) + body}")


def mask_model_card(
    mask: SafetyMask,
    *,
    repo_id: str | None = None,
    base_model: str | None = None,
    extra_tags: Sequence[str] = (),
    existing: str | None = None,
    mode: str | None = None,
    adapter_config: Mapping[str, Any] | None = None,
    mask_path: str | None = None,
) -> str:
    """The README.md text for a mask (see `build_card`; `mask` is required here).

    Raises:
        TypeError: if `mask` is not a `SafetyMask`.
    """
    require_mask(mask, "mask_model_card")
    card = build_card(
        existing,
        mask=mask,
        mode=mode,
        adapter_config=adapter_config,
        repo_id=repo_id,
        base_model=base_model,
        mask_path=mask_path,
        extra_tags=extra_tags,
    )
    return str(card)


def _read_json(path: str) -> dict[str, Any]:
    """An adapter config (bounded read, no unbounded recursion); errors name the file."""
    from .._files import read_json_file

    value = read_json_file(path, os.path.basename(path))
    if not isinstance(value, dict):
        raise SafetyFileError(f"{path}: expected a JSON object, got {type(value).__name__}; the file is corrupted")
    return value


def _download_optional(repo_id: str, filename: str, *, revision: str | None, token: Any) -> str | None:
    """The local path of a repository file, or `None` if the Hub says the repository, revision or file does not
    exist. Not being able to ask (offline, network, permissions) is an error: the card must not be replaced blindly."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import (
        LocalEntryNotFoundError,
        RemoteEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    try:
        return hf_hub_download(repo_id, filename, revision=revision, token=token, repo_type="model")
    except (RemoteEntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError):
        return None
    except LocalEntryNotFoundError as err:  # offline, or the Hub could not be reached (an EntryNotFoundError too)
        raise HubUnreachableError(
            f"push_mask_to_hub: cannot read {filename} of {repo_id!r} ({err}); the repository's card is merged, not "
            "overwritten, so nothing was uploaded. Check the connection (and HF_HUB_OFFLINE) and push again"
        ) from err


def push_mask_to_hub(
    mask: SafetyMask,
    repo_id: str,
    *,
    commit_message: str = "Upload safety mask",
    private: bool | None = None,
    token: str | bool | None = None,
    revision: str | None = None,
    create_pr: bool = False,
    base_model: str | None = None,
    subfolder: str | None = None,
    mode: str | None = None,
) -> Any:
    """Upload ``safety_mask.safetensors`` to a Hub model repository and create or update its one README.md card.

    A repository that already holds an adapter (or anything with a card) keeps its card: the existing README.md and
    ``adapter_config.json`` are read first and the card is updated to describe both (see `build_card`). If they
    cannot be read for another reason than "not there" (network, permissions), nothing is uploaded.

    Args:
        mask: the mask.
        repo_id: ``"org/name"``; created if missing.
        commit_message: the commit message.
        private: visibility of a newly created repository (`None`: the account default).
        token: Hub token (`None`: the cached login or ``HF_TOKEN``).
        revision: the branch to commit to (created from the default branch if missing).
        create_pr: open a pull request instead of committing directly.
        base_model: base model id for the card; defaults to the card's, then ``mask.provenance["base_model"]``.
        subfolder: folder inside the repository for the mask (e.g. ``"mask"`` next to an adapter); load it back with
            ``SafetyMask.from_pretrained(repo_id, subfolder="mask")``.
        mode: ``"SET"`` or ``"SPA"`` for the card, when the adapter's files do not say it.

    Returns:
        The ``huggingface_hub.CommitInfo`` of the commit.

    Raises:
        TypeError: if `mask` is not a `SafetyMask`.
        ValueError: if `repo_id` is empty or `subfolder` leaves the repository.

    Example:

    ```python
    >>> push_mask_to_hub(mask, "me/llama-3-8b-spa-lora", subfolder="mask")
    ```
    """
    require_mask(mask, "push_mask_to_hub")
    if not isinstance(repo_id, str) or not repo_id.strip():
        raise SafetyError(f"repo_id must be a non-empty string such as 'me/my-safety-mask', got {repo_id!r}")
    sub = _check_subfolder(subfolder)
    normalize_mode(mode)
    # serialise first: an invalid mask must fail before anything is created on the Hub
    data = mask_to_bytes(mask)
    from huggingface_hub import CommitOperationAdd, HfApi  # lazy: importing peft_safety.mask stays light

    try:
        api = HfApi(token=token)
        repo_url = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        # "name" without a namespace resolves to "<user>/name"; the created repo tells us which
        resolved = getattr(repo_url, "repo_id", None)
        repo_id = resolved if isinstance(resolved, str) and resolved else repo_id
        if revision is not None and not create_pr:
            api.create_branch(repo_id, branch=revision, exist_ok=True, repo_type="model")
        read_rev = None if create_pr else revision
        readme_path = _download_optional(repo_id, "README.md", revision=read_rev, token=token)
        config_path = _download_optional(repo_id, "adapter_config.json", revision=read_rev, token=token)
        existing = None
        if readme_path is not None:
            with open(readme_path, encoding="utf-8") as f:
                existing = f.read()
        adapter_config = _read_json(config_path) if config_path is not None else None
        mask_path = f"{sub}/{MASK_FILENAME}" if sub else MASK_FILENAME
        card = build_card(
            existing,
            mask=mask,
            mode=mode,
            adapter_config=adapter_config,
            repo_id=repo_id,
            base_model=base_model,
            mask_path=mask_path,
        )
        operations = [
            CommitOperationAdd(path_in_repo=mask_path, path_or_fileobj=data),
            CommitOperationAdd(path_in_repo="README.md", path_or_fileobj=str(card).encode("utf-8")),
        ]
        return api.create_commit(
            repo_id,
            operations=operations,
            commit_message=commit_message,
            revision=revision,
            create_pr=create_pr,
            repo_type="model",
        )
    except Exception as err:
        if isinstance(err, SafetyError) or not is_network_error(err):
            raise
        from huggingface_hub import constants

        raise HubUnreachableError(
            f"push_mask_to_hub: could not reach the Hugging Face Hub ({constants.ENDPOINT}) to push to {repo_id!r} "
            f"({type(err).__name__}: {' '.join(str(err).split())}). No file was uploaded (the commit holding the mask "
            "and the card is made last, in one piece). Check the network connection, HF_ENDPOINT and HF_HUB_OFFLINE, "
            "or keep the mask local (mask.save_pretrained(folder)) and push later."
        ) from err
