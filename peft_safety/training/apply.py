"""``apply_mask_``: freeze (SPA) or train only (SET on full weights) a mask's entries, in place, for any training loop.

Like torchao's ``quantize_(model, config)``: one in-place verb for users of a plain ``transformers.Trainer`` or their
own loop, who never build a PEFT adapter or a ``SafetySFTTrainer``. It returns the `Freezer` it installed: the same
protection (``peft_safety.training.protection``) the trainer uses for full fine-tuning.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..vocab import Mode, check_fingerprint_policy
from .freeze import Freezer, _check_mode, _named_params

__all__ = ["apply_mask_"]


def apply_mask_(
    model: nn.Module,
    mask: Any,
    mode: Mode = "freeze",
    optimizer: torch.optim.Optimizer | None = None,
    *,
    fingerprint_check: str = "error",
    backend: str = "auto",
) -> Freezer:
    """Freeze a mask's entries (``"freeze"``, SPA) or everything else in the masked tensors (``"train_only"``), in
    place, exactly, under any torch optimizer.

    What it does (`Freezer.prepare_model`, then `Freezer.install`):

    * tensors whose every entry is frozen get ``requires_grad=False`` (zero cost; so call this *before* building the
      optimizer and before wrapping the model in DDP);
    * other tensors with frozen entries get a gradient mask (post-accumulate hook, so clipping sees masked
      gradients) and an O(mask) copy of the frozen values, written back after each step of the attached optimizer;
    * parameters the mask does not cover (``mask.shapes``) are untouched and keep their ``requires_grad``.

    In ``"train_only"`` mode a covered parameter without entries is frozen whole. For a small mask, the SET adapter
    (``get_peft_model(model, SafetyConfig(mask=mask))``) is far cheaper: it holds optimizer state only for the mask's
    entries, while ``train_only`` on full weights keeps dense gradients and state for every tensor it touches.

    Args:
        model: the model to train (plain, or a PEFT model whose base weights the mask names).
        mask: a `SafetyMask` (or ``{name: bool tensor}``) in the plain model's parameter names.
        mode: ``"freeze"`` or ``"train_only"``.
        optimizer: the optimizer, if already built; otherwise call ``freezer.attach_optimizer(opt)`` once it exists.
            Without an attached optimizer only the gradients are masked, which is not exact under weight decay
            or momentum.
        fingerprint_check: how to treat a mask fingerprint that differs from the model's weights: ``"error"``,
            ``"warn"`` or ``"ignore"`` (see `SafetyMask.validate`).
        backend: ``"auto"`` or a `Freezer` backend name.

    Returns:
        The installed `Freezer`: ``attach_optimizer``, ``verify``, ``mask_grads_``, ``restore_``, ``metrics`` and
        ``remove`` (hooks removed, ``requires_grad`` given back); a context manager that removes it on exit.

    Raises:
        ValueError: for an unknown mode or fingerprint policy, a mask that does not fit the model, or a mask that
            leaves nothing to train.
        TypeError: if ``mask`` is not a `SafetyMask` or a mapping of bool tensors.

    Example (custom loop):

    ```python
    >>> from peft_safety import SafetyMask, apply_mask_
    >>> mask = SafetyMask.from_pretrained("my-mask")
    >>> freezer = apply_mask_(model, mask, mode="freeze")
    >>> optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], weight_decay=0.1)
    >>> freezer.attach_optimizer(optimizer)
    >>> for batch in loader:
    ...     model(**batch).loss.backward()
    ...     torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    ...     optimizer.step(); optimizer.zero_grad()
    >>> freezer.verify()      # raises FreezeViolationError if any frozen entry moved
    >>> freezer.remove()
    ```
    """
    _check_mode(mode)
    check_fingerprint_policy(fingerprint_check)
    if not isinstance(model, nn.Module):
        raise TypeError(f"apply_mask_ expects a torch.nn.Module, got {type(model).__name__}.")
    if hasattr(mask, "validate"):
        mask.validate(_named_params(model), fingerprint_check=fingerprint_check)
    # the fingerprints were validated above, by the caller's policy
    freezer = Freezer(mask, mode, backend=backend, fingerprint_check="ignore")
    freezer.prepare_model(model)
    try:
        freezer.install(model, optimizer)
    except BaseException:
        freezer.remove()
        raise
    return freezer
