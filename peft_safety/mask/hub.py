"""Hugging Face Hub I/O for safety masks: upload with a model card, download by repository id.

Uploads go through ``huggingface_hub.HfApi``: ``create_repo(exist_ok=True)`` then one ``create_commit`` with two
``CommitOperationAdd`` (``safety_mask.safetensors`` and ``README.md``). Downloads use ``hf_hub_download``, so the usual
cache, ``HF_HUB_OFFLINE`` and ``HF_TOKEN`` behaviours apply.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from .serialization import MASK_FILENAME, mask_to_bytes, require_mask

if TYPE_CHECKING:  # pragma: no cover
    from .safety_mask import SafetyMask

__all__ = ["mask_model_card", "push_mask_to_hub"]

_PROVENANCE_ORDER = (
    "method",
    "aggregation",
    "sparsity",
    "seed",
    "score_sign",
    "data_hash",
    "base_model",
    "base_model_revision",
    "library_version",
)


def _yaml_str(value: str) -> str:
    # a JSON string literal is a valid YAML double-quoted scalar, so quoting through json escapes everything safely
    return json.dumps(value, ensure_ascii=False)


def _md_cell(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
    return text.replace("|", "\\|").replace("\n", " ")


def mask_model_card(
    mask: SafetyMask,
    *,
    repo_id: str | None = None,
    base_model: str | None = None,
    extra_tags: Sequence[str] = (),
) -> str:
    """The README.md model card of a mask repository.

    YAML front matter (``library_name: peft-safety``, ``base_model``, tags ``peft-safety``, ``safety``,
    ``safety-mask`` and the scoring method), then what the mask is, its provenance, its summary table and how to load
    it.

    Args:
        mask: the mask.
        repo_id: the repository id, used in the loading snippet (``"<repo_id>"`` if omitted).
        base_model: the base model id; defaults to ``mask.provenance["base_model"]``.
        extra_tags: more tags for the front matter.

    Returns:
        The card text (Markdown with YAML front matter).

    Raises:
        TypeError: if `mask` is not a `SafetyMask`.
    """
    require_mask(mask, "mask_model_card")
    prov = mask.provenance
    base = base_model if base_model is not None else prov.get("base_model")
    method = prov.get("method")
    tags = ["peft-safety", "safety", "safety-mask"]
    for tag in [method, *extra_tags]:
        if isinstance(tag, str) and tag and tag not in tags:
            tags.append(tag)

    front = ["---", "library_name: peft-safety"]
    if isinstance(base, str) and base:
        front.append(f"base_model: {_yaml_str(base)}")
    front.append("tags:")
    front += [f"- {_yaml_str(t)}" for t in tags]
    front.append("---")

    g = mask.granularity
    g_text = repr(g) if not isinstance(g, dict) else "mixed: " + ", ".join(sorted({repr(v) for v in g.values()}))
    target = repo_id or "<repo_id>"
    body = [
        "",
        f"# Safety mask{f' for {base}' if base else ''}",
        "",
        "A [peft-safety](https://github.com/peft-safety/peft-safety) `SafetyMask`: the parameters (weight entries, "
        "neurons, heads or whole parameters) that carry the safety behaviour of the base model, found by scoring the "
        f"model on a calibration set{f' with `{method}`' if method else ''}. Use it to train only these entries "
        '(SET, `mode="train_only"`) or to freeze them while fine-tuning on a task (SPA, `mode="freeze"`).',
        "",
        f"- selected units: {len(mask)} ({g_text})",
        f"- weight entries covered: {mask.numel()} of {mask.total_numel()} (density {mask.density:.4%})",
        f"- parameters with entries: {len(mask.names)} of {len(mask.shapes)}",
        "",
        "## Provenance",
        "",
        "| field | value |",
        "|---|---|",
    ]
    keys = [k for k in _PROVENANCE_ORDER if k in prov] + sorted(k for k in prov if k not in _PROVENANCE_ORDER)
    body += [f"| {_md_cell(k)} | {_md_cell(prov[k])} |" for k in keys]
    body += [
        "",
        "## Summary",
        "",
        "```text",
        str(mask.summary()),
        "```",
        "",
        "## Load it",
        "",
        "```python",
        "from peft_safety import SafetyMask",
        f"mask = SafetyMask.from_pretrained({target!r})",
        "mask.validate(model)  # checks names, shapes and weight fingerprints against your model",
        "```",
        "",
    ]
    return "\n".join(front + body)


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
) -> Any:
    """Upload ``safety_mask.safetensors`` and a generated README.md model card to a Hub model repository.

    Args:
        mask: the mask.
        repo_id: ``"org/name"``; created if missing.
        commit_message: the commit message.
        private: visibility of a newly created repository (`None`: the account default).
        token: Hub token (`None`: the cached login or ``HF_TOKEN``).
        revision: the branch to commit to (created from the default branch if missing).
        create_pr: open a pull request instead of committing directly.
        base_model: base model id for the card; defaults to ``mask.provenance["base_model"]``.

    Returns:
        The ``huggingface_hub.CommitInfo`` of the commit.

    Raises:
        TypeError: if `mask` is not a `SafetyMask`.
        ValueError: if `repo_id` is empty.

    Example:

    ```python
    >>> push_mask_to_hub(mask, "me/llama-3-8b-snip-mask", private=True)
    ```
    """
    require_mask(mask, "push_mask_to_hub")
    if not isinstance(repo_id, str) or not repo_id.strip():
        raise ValueError(f"repo_id must be a non-empty string such as 'me/my-safety-mask', got {repo_id!r}")
    # serialise first: an invalid mask must fail before anything is created on the Hub
    data = mask_to_bytes(mask)
    card = mask_model_card(mask, repo_id=repo_id, base_model=base_model)
    from huggingface_hub import CommitOperationAdd, HfApi  # lazy: importing peft_safety.mask stays light

    api = HfApi(token=token)
    repo_url = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
    # "name" without a namespace resolves to "<user>/name"; the created repo tells us which
    resolved = getattr(repo_url, "repo_id", None)
    repo_id = resolved if isinstance(resolved, str) and resolved else repo_id
    if revision is not None and not create_pr:
        api.create_branch(repo_id, branch=revision, exist_ok=True, repo_type="model")
    operations = [
        CommitOperationAdd(path_in_repo=MASK_FILENAME, path_or_fileobj=data),
        CommitOperationAdd(path_in_repo="README.md", path_or_fileobj=card.encode("utf-8")),
    ]
    return api.create_commit(
        repo_id,
        operations=operations,
        commit_message=commit_message,
        revision=revision,
        create_pr=create_pr,
        repo_type="model",
    )
