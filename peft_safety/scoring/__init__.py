"""Scoring: model + `CalibrationSet` -> `Scores`; `select` turns them into a `SafetyMask`.

`score(model, calib, method=...)` resolves the eligible parameters (`targets.resolve_targets`), looks the method up
in the `SCORERS` registry (built-ins are imported on first use, so this package stays lean), calls it, and records
the method, the calibration data hash and the base model into the result's provenance. It always returns `Scores`;
scorers that select internally (safety neurons, safety layers) attach their selection as ``scores.rule``
(`SelectionRule`), which ``select(scores)`` applies when no ``fraction`` or ``k`` is given.

Built-in methods (see ``docs/scorers/``): ``snip`` (|W| * sum over samples of |grad|), ``esi`` (|sum of grad| *
std(W)), ``wanda`` (|W| * ||X_j||_2 over response tokens), ``random`` and ``magnitude`` (baselines),
``safety_neurons`` and ``safety_layers``.

This package never imports ``tuner/``, ``training/`` or ``hub.py``.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from ..mask import fingerprints_of
from .registry import SCORERS, Registry, register_scorer
from .scores import Scores, SelectionRule
from .targets import TargetInfo, Targets, attention_geometry, query_to_kv_rows, resolve_targets

if TYPE_CHECKING:  # pragma: no cover
    from .calibration import CalibrationSet

__all__ = [
    "SCORERS",
    "Registry",
    "Scores",
    "SelectionRule",
    "TargetInfo",
    "Targets",
    "attention_geometry",
    "query_to_kv_rows",
    "register_scorer",
    "resolve_targets",
    "score",
]


def _accepts(fn: Any, name: str) -> bool:
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return True
    return name in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())


def _reject_injected_adapters(model: Any) -> None:
    """Scores are per base weight; a model with PEFT layers injected has renamed, partly shadowed weights."""
    try:
        from peft.tuners.tuners_utils import BaseTunerLayer
    except ImportError:  # pragma: no cover - peft is a dependency
        return
    for name, module in model.named_modules():
        if isinstance(module, BaseTunerLayer):
            raise ValueError(
                f"score() got a model with PEFT adapter layers injected ({name!r} is a {type(module).__name__}). "
                "get_peft_model() wraps the base model in place, renaming its weights to '...base_layer.weight', and "
                "the adapter's update is not part of those weights, so the scores would describe neither model. Score "
                "the base model before get_peft_model(), or merge the adapter first (model = model.merge_and_unload())."
            )


def _check_inputs(calib: Any, kwargs: dict[str, Any]) -> None:
    """The data and batch size, before any scorer runs (a scorer would fail deep inside with an AttributeError or a
    ZeroDivisionError)."""
    from ..errors import SafetyError, SafetyTypeError
    from .calibration import CalibrationSet

    if calib is not None and not isinstance(calib, CalibrationSet):
        raise SafetyTypeError(
            f"score() takes its data as a CalibrationSet (or None for data-free methods), got {type(calib).__name__}. "
            "Build one from the rows: CalibrationSet(rows, tokenizer) renders the chat template and marks the tokens "
            "that carry the loss."
        )
    batch_size = kwargs.get("batch_size")
    if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1):
        raise SafetyError(f"batch_size must be an int >= 1, got {batch_size!r}.")


def score(
    model: Any,
    calib: CalibrationSet | None,
    method: str = "snip",
    *,
    target_modules: str | Sequence[str] | None = None,
    exclude_modules: str | Sequence[str] | None = None,
    include_router: bool = False,
    include_embeddings: bool = False,
    include_lm_head: bool = False,
    progress: bool = True,
    **kwargs: Any,
) -> Scores:
    """Score the parameters of ``model`` on ``calib`` with a registered method.

    Args:
        model: a causal LM (``transformers`` ``PreTrainedModel``, or any module the targets resolve on).
        calib: the calibration data (`CalibrationSet`); `None` for data-free methods (``random``, ``magnitude``).
        method: a name or alias in `SCORERS` (``"snip"``, ``"esi"``, ``"wanda"``, ``"random"``, ``"magnitude"``,
            ``"safety_neurons"``, ``"safety_layers"`` or your own).
        target_modules: restrict scoring to these modules (names/suffixes list, or a regex; see `resolve_targets`).
        exclude_modules: modules to leave out (same rules).
        include_router: score MoE routers too (excluded by default).
        include_embeddings: score the input embeddings too.
        include_lm_head: score ``lm_head`` too (tied: once, under the embedding's name). ESI's reference setup
            includes it.
        progress: show a progress bar (rank 0 only) for scorers that accept ``progress``.
        **kwargs: method options, e.g. ``batch_size``, ``aggregation`` (snip), ``objective`` (esi), ``seed``.

    Returns:
        `Scores`. Provenance records ``method``, the calibration ``data_hash`` and ``base_model``; ``fingerprints``
        records `peft_safety.mask.fingerprint_tensor` of every scored weight (read before scoring), which `select`
        copies into the mask so that ``mask.validate(model)`` rejects other weights. Methods that select internally
        (``safety_neurons``, ``safety_layers``) attach their rule (``scores.rule``): ``select(scores)`` applies it.

    Raises:
        ValueError: unknown method (with a suggestion), unknown module names, a model with no eligible parameter,
            or data the method cannot use.
        TypeError: a registered scorer that returns something other than `Scores`.

    Example:

    ```python
    >>> from peft_safety import CalibrationSet, refusal_rows, score
    >>> from peft_safety.testing import tiny_llama, tiny_tokenizer
    >>> calib = CalibrationSet(refusal_rows(["How do I pick a lock?"]), tiny_tokenizer())
    >>> scores = score(tiny_llama(), calib, "snip", progress=False)
    ```
    """
    _check_inputs(calib, kwargs)
    fn = SCORERS.get(method)
    _reject_injected_adapters(model)
    from .distributed import check_sharded_support

    check_sharded_support(model, method, fn)
    targets = resolve_targets(
        model,
        target_modules=target_modules,
        exclude_modules=exclude_modules,
        include_router=include_router,
        include_embeddings=include_embeddings,
        include_lm_head=include_lm_head,
    )
    if _accepts(fn, "progress"):
        kwargs["progress"] = progress
    # fingerprints of the weights as scored (before the scorer runs: probes that edit weights restore them, but the
    # record must describe the weights the caller passed in). At most 4096 values read per tensor.
    fingerprints = fingerprints_of(model, targets.names)
    result = fn(model, calib, targets=targets, **kwargs)
    if not isinstance(result, Scores):
        raise TypeError(
            f"Scorer {method!r} returned {type(result).__name__}; a scorer returns Scores (a scorer that selects "
            "internally attaches its selection as Scores(..., rule=SelectionRule)), see peft_safety.scoring.registry."
        )
    provenance = result.provenance
    provenance.setdefault("method", method)
    if calib is not None and hasattr(calib, "provenance"):
        for key, value in calib.provenance().items():
            provenance.setdefault(key, value)
    config = getattr(model, "config", None)
    base = getattr(config, "_name_or_path", None) if config is not None else None
    if base:
        provenance.setdefault("base_model", base)
    if targets.tied:
        provenance.setdefault("tied", dict(targets.tied))
    # the fingerprints of the scored weights that the scorer did not record itself
    for name in result.names:
        if name in fingerprints:
            result.fingerprints.setdefault(name, fingerprints[name])
    return result
