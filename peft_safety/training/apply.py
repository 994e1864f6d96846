"""``apply_mask_``: freeze (SPA) or train only (SET on full weights) a mask's entries, in place, for any training loop.

Like torchao's ``quantize_(model, config)``: one in-place verb for users of a plain ``transformers.Trainer`` or their
own loop, who never build a PEFT adapter or a ``SafetySFTTrainer``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from .freeze import Freezer, FreezeReport, Mode, _check_mode, canonical_name, dense_frozen_masks

__all__ = ["SafetyHandle", "apply_mask_"]


class SafetyHandle:
    """What `apply_mask_` returns: keeps the hooks alive and proves the guarantee.

    Methods:
        attach_optimizer(optimizer): restore frozen entries after each of its steps (required for exactness with
            weight decay, momentum or any stateful optimizer).
        verify(reference=None, strict=True): check every frozen entry is bit-identical (see `Freezer.verify`).
        mask_grads_() / restore_(): the two per-step actions, for loops that want to call them explicitly.
        remove(): remove the hooks and give back ``requires_grad`` to the tensors it switched off.

    Use it as a context manager to remove everything on exit.
    """

    def __init__(self, freezer: Freezer, switched_off: list[nn.Parameter]) -> None:
        self.freezer = freezer
        self._switched_off = switched_off

    @property
    def mode(self) -> str:
        return self.freezer.mode

    @property
    def num_frozen(self) -> int:
        """Number of frozen weight entries."""
        return self.freezer.num_frozen

    @property
    def memory_bytes(self) -> int:
        """Bytes held for the exact restore (O(mask))."""
        return self.freezer.memory_bytes

    def attach_optimizer(self, optimizer: torch.optim.Optimizer) -> SafetyHandle:
        """Restore the frozen entries after every ``optimizer.step()``; see `Freezer.attach_optimizer`."""
        self.freezer.attach_optimizer(optimizer)
        return self

    def verify(
        self, reference: nn.Module | Mapping[str, torch.Tensor] | None = None, *, strict: bool = True
    ) -> FreezeReport:
        """Check that every frozen entry is bit-identical to the value it had at `apply_mask_` (or in
        ``reference``); raises `FreezeViolationError` when ``strict`` and one moved."""
        return self.freezer.verify(reference, strict=strict)

    def mask_grads_(self) -> None:
        """Zero the frozen entries' gradients now (hooks already do it after each backward)."""
        self.freezer.mask_grads_()

    def restore_(self) -> None:
        """Write the saved values back into the frozen entries now (the attached optimizer's hook does it)."""
        self.freezer.restore_()

    def remove(self) -> None:
        """Remove the hooks and switch ``requires_grad`` back on where `apply_mask_` switched it off."""
        self.freezer.remove()
        for p in self._switched_off:
            p.requires_grad_(True)
        self._switched_off = []

    def __enter__(self) -> SafetyHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()

    def __repr__(self) -> str:
        return f"SafetyHandle({self.freezer!r})"


def apply_mask_(
    model: nn.Module,
    mask: Any,
    mode: Mode = "freeze",
    optimizer: torch.optim.Optimizer | None = None,
    *,
    fingerprint: str = "error",
    backend: str = "auto",
) -> SafetyHandle:
    """Freeze a mask's entries (``"freeze"``, SPA) or everything else in the masked tensors (``"train_only"``), in
    place, exactly, under any torch optimizer.

    What it does:

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
        optimizer: the optimizer, if already built; otherwise call ``handle.attach_optimizer(opt)`` once it exists.
            Without an attached optimizer only the gradients are masked, which is not exact under weight decay
            or momentum.
        fingerprint: how to treat a mask fingerprint that differs from the model's weights: ``"error"``, ``"warn"``
            or ``"ignore"`` (see `SafetyMask.validate`).
        backend: ``"auto"`` or a `Freezer` backend name.

    Returns:
        A `SafetyHandle`.

    Raises:
        ValueError: for an unknown mode, or a mask that does not fit the model.
        TypeError: if ``mask`` is not a `SafetyMask` or a mapping of bool tensors.

    Example (custom loop):

    ```python
    >>> from peft_safety import SafetyMask, apply_mask_
    >>> mask = SafetyMask.from_pretrained("my-mask")
    >>> handle = apply_mask_(model, mask, mode="freeze")
    >>> optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], weight_decay=0.1)
    >>> handle.attach_optimizer(optimizer)
    >>> for batch in loader:
    ...     model(**batch).loss.backward()
    ...     torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    ...     optimizer.step(); optimizer.zero_grad()
    >>> handle.verify()      # raises FreezeViolationError if any frozen entry moved
    >>> handle.remove()
    ```
    """
    _check_mode(mode)
    if not isinstance(model, nn.Module):
        raise TypeError(f"apply_mask_ expects a torch.nn.Module, got {type(model).__name__}.")
    params: dict[str, nn.Parameter] = {}
    for name, p in model.named_parameters():
        params.setdefault(canonical_name(name), p)
    if hasattr(mask, "validate"):
        mask.validate(params, fingerprint=fingerprint)
    switched_off: list[nn.Parameter] = []
    for name, frozen in dense_frozen_masks(mask, mode):
        p = params.get(name)
        if p is not None and p.requires_grad and tuple(p.shape) == tuple(frozen.shape) and bool(frozen.all()):
            p.requires_grad_(False)
            p.grad = None
            switched_off.append(p)
    freezer = Freezer(mask, mode, backend=backend)
    try:
        freezer.install(model, optimizer)
    except BaseException:
        for p in switched_off:
            p.requires_grad_(True)
        raise
    return SafetyHandle(freezer, switched_off)
