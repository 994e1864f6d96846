"""``SafetyLoraConfig``: the PEFT config of a masked-LoRA (SPA) adapter, PEFT type ``SAFETY_LORA``.

A masked LoRA is a LoRA adapter whose update is exactly zero on a ``SafetyMask`` (see ``peft_safety.tuner.lora``).
Saved as plain ``LORA`` it would reload as an unmasked LoRA, so it has a PEFT type of its own: ``adapter_config.json``
says ``"peft_type": "SAFETY_LORA"`` and lists, per masked module, how its mask is stored (``mask_layout``); the indices
themselves are persistent buffers (``lora_safety_rows`` / ``lora_safety_cols`` / ``lora_safety_entries``) in
``adapter_model.safetensors``. The adapter folder alone therefore restores the masks, through every PEFT loading path
(``PeftModel.from_pretrained``, ``AutoPeftModelForCausalLM``, ``load_adapter``), once ``peft_safety`` is imported.
Without that import PEFT fails with ``KeyError: 'SAFETY_LORA'``: it cannot load the adapter as an unmasked LoRA.

This module is pure data: the layout is computed from the mask and validated (every field, before anything sized by
it is allocated); the layers live in ``lora.py`` and the tuner in ``spa_model.py``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import torch
from peft import LoraConfig

from .peft_type import SafetyPeftType
from .provenance import ProvenanceConfigMixin

__all__ = [
    "ENTRIES_METHODS",
    "MASK_KINDS",
    "SPARSE_MAX_DENSITY",
    "SafetyLoraConfig",
    "check_layout",
    "layout_limit",
]

#: How a masked module stores its mask: rows of the weight (``Neuron(axis=0)``, ``Head(axis=0)``), columns
#: (``axis=1``) or flat entries (``Weight()``).
MASK_KINDS = ("rows", "cols", "entries")

#: How a ``Weight()``-masked layer removes its masked entries in forward. ``"dense"`` (default) is bit-exact: the
#: effective update of every masked entry is exactly zero in every dtype. ``"sparse"`` (LoRA's factored path minus a
#: sparse correction) is faster at low density but only exact up to fp rounding (residues of ~1 ulp of the update on the
#: masked entries); ``"auto"`` picks ``"sparse"`` on CPU up to :data:`SPARSE_MAX_DENSITY` and ``"dense"`` above or
#: off the CPU (on an H200 the CSR correction was 14-80x slower than the dense masked delta). Merging is
#: bit-exact whatever the method.
ENTRIES_METHODS = ("dense", "sparse", "auto")

#: ``"auto"`` uses the sparse correction for entry masks covering at most this fraction of their weight (measured
#: crossover on CPU, docs/tuner.md).
SPARSE_MAX_DENSITY = 0.1

_ZERO_B_INITS = (True, "gaussian")
_LAYOUT_KEYS = {"kind", "n", "shape"}


def layout_limit(kind: str, shape: tuple[int, int]) -> int:
    """How many indices a mask of ``kind`` can hold on a ``(d_out, d_in)`` weight (exclusive upper bound of a value)."""
    out_features, in_features = shape
    return {"rows": out_features, "cols": in_features, "entries": out_features * in_features}[kind]


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_layout(layout: Any, where: str = "mask_layout") -> dict[str, dict[str, Any]]:
    """Validate a ``mask_layout`` (as read from an untrusted ``adapter_config.json``) and return it normalised.

    Every value is checked before anything sized by it exists: ``kind`` one of :data:`MASK_KINDS`, ``shape`` two
    positive ints, ``n`` an int with ``1 <= n <= `` the number of rows, columns or entries of ``shape``.

    Raises:
        TypeError: ``layout`` (or an entry) has the wrong type.
        ValueError: a value is out of range; the message names the module, the field and the fix.
    """
    if not isinstance(layout, dict):
        raise TypeError(f"{where} must be a dict of module name -> {{kind, n, shape}}, got {type(layout).__name__}.")
    fix = "The adapter_config.json is corrupt or was edited by hand: re-save the adapter from its training run."
    out: dict[str, dict[str, Any]] = {}
    for module, entry in layout.items():
        if not isinstance(module, str) or not module:
            raise TypeError(f"{where} keys must be non-empty module names, got {module!r}. {fix}")
        if not isinstance(entry, dict) or set(entry) != _LAYOUT_KEYS:
            raise ValueError(
                f"{where}[{module!r}] must be a dict with exactly the keys {sorted(_LAYOUT_KEYS)}, got {entry!r}. {fix}"
            )
        kind, n, shape = entry["kind"], entry["n"], entry["shape"]
        if kind not in MASK_KINDS:
            raise ValueError(f"{where}[{module!r}]['kind']={kind!r} is not one of {MASK_KINDS}. {fix}")
        if not isinstance(shape, (list, tuple)) or len(shape) != 2 or not all(_is_int(s) and s > 0 for s in shape):
            raise ValueError(f"{where}[{module!r}]['shape']={shape!r} must be two positive ints [d_out, d_in]. {fix}")
        limit = layout_limit(kind, (shape[0], shape[1]))
        if not _is_int(n) or not 1 <= n <= limit:
            raise ValueError(
                f"{where}[{module!r}]['n']={n!r} must be an int between 1 and {limit} (the number of {kind} of a "
                f"{shape[0]}x{shape[1]} weight). {fix}"
            )
        out[module] = {"kind": kind, "n": int(n), "shape": [int(shape[0]), int(shape[1])]}
    return out


def check_lora_options(config: LoraConfig) -> None:
    """Refuse the LoRA options that cannot keep masked entries frozen (DoRA, non-zero-B inits, LoRA biases).

    Raises:
        TypeError: not a ``LoraConfig``.
        ValueError: the offending option, with the fix.
    """
    if not isinstance(config, LoraConfig):
        raise TypeError(f"mask_lora_config expects a peft.LoraConfig, got {type(config).__name__}.")
    if config.use_dora:
        raise ValueError(
            "use_dora=True cannot keep masked entries frozen: DoRA rescales whole rows through its magnitude vector, "
            "so every protected entry moves. Use plain LoRA (use_dora=False) with a safety mask."
        )
    if config.init_lora_weights not in _ZERO_B_INITS:
        raise ValueError(
            f"init_lora_weights={config.init_lora_weights!r} starts LoRA with a non-zero update (or rewrites the base "
            "weights), which moves protected entries before training. Use init_lora_weights=True or 'gaussian'."
        )
    if config.lora_bias:
        raise ValueError("lora_bias=True adds a trainable bias to every output, masked rows included; use False.")


def check_entries_method(entries_method: Any) -> str:
    """Validate ``entries_method`` (one of :data:`ENTRIES_METHODS`)."""
    if not isinstance(entries_method, str):
        raise TypeError(f"entries_method must be a string, got {type(entries_method).__name__}.")
    if entries_method not in ENTRIES_METHODS:
        raise ValueError(
            f"entries_method={entries_method!r} is not one of {ENTRIES_METHODS}: use 'dense' (default, bit-exact on "
            f"the mask), or opt into 'sparse' / 'auto' (sparse correction up to {SPARSE_MAX_DENSITY:.0%} mask "
            "density: faster, exact only up to fp rounding in forward)."
        )
    return entries_method


def granularity_kind(granularity: Any, idx: torch.Tensor, name: str) -> tuple[str | None, torch.Tensor | None]:
    """``(kind, indices)`` a masked ``nn.Linear`` stores for a mask tensor; ``(None, None)`` for ``Layer()``."""
    from ..mask import Head, Layer, Neuron, Weight

    if isinstance(granularity, Layer):
        return None, None
    if isinstance(granularity, Weight):
        return "entries", idx
    if isinstance(granularity, Neuron):
        return ("rows" if granularity.axis == 0 else "cols"), idx
    if isinstance(granularity, Head):
        hd = int(granularity.head_dim)
        rows = (idx.to(torch.int64)[:, None] * hd + torch.arange(hd)[None, :]).reshape(-1)
        return ("rows" if granularity.axis == 0 else "cols"), rows
    raise TypeError(f"Unsupported granularity {granularity!r} for {name!r}.")


def exclude_modules(config: LoraConfig, keys: list[str]) -> None:
    """Add full module keys to ``config.exclude_modules`` (a list, or a regex string extended by alternation)."""
    if not keys:
        return
    current = config.exclude_modules
    if current is None:
        config.exclude_modules = sorted(keys)
    elif isinstance(current, str):
        config.exclude_modules = "|".join([f"(?:{current})", *(re.escape(k) for k in sorted(keys))])
    else:
        config.exclude_modules = sorted({*current, *keys})


def _targets_lm_head(config: LoraConfig, module_key: str) -> bool:
    from peft.tuners.tuners_utils import check_target_module_exists

    if config.target_modules in (None, "all-linear"):
        # PEFT's "all-linear" never includes the output layer; None defers to PEFT's per-model defaults (attention)
        return False
    result = check_target_module_exists(config, module_key)
    return bool(result) and type(result).__name__ != "_ExcludedModule"


@dataclass
class SafetyLoraConfig(ProvenanceConfigMixin, LoraConfig):
    """A ``LoraConfig`` whose update is exactly zero on a ``SafetyMask`` (SPA with LoRA; PEFT type ``SAFETY_LORA``).

    Every ``LoraConfig`` option keeps its meaning, except those that cannot keep masked entries frozen (refused:
    ``use_dora``, ``lora_bias``, ``init_lora_weights`` other than ``True``/``"gaussian"``). ``Layer()``-masked modules
    are added to ``exclude_modules``; every other masked ``nn.Linear`` gets a masked LoRA layer.

    Args:
        mask: the ``SafetyMask`` of entries to keep frozen (not written to ``adapter_config.json``; the indices are
            saved as buffers in ``adapter_model.safetensors``). `None` when loading a saved adapter.
        mask_layout: filled from the mask: per masked module ``{"kind", "n", "shape"}``. Do not set by hand.
        mask_source: where the mask came from (path or Hub id), when known; informational.
        entries_method: forward of ``Weight()`` masks: ``"dense"`` (default, bit-exact), ``"sparse"`` or ``"auto"``.
        base_fingerprints: fingerprints of the masked base weights, recorded when the adapter is created and
            checked when it is loaded (see ``base_fingerprint_check``). The base's Hub id goes into
            ``base_model_name_or_path`` (and ``revision``), its kind into ``base_model_source``.
        base_fingerprint_check: what loading does when the base weights differ from the recorded fingerprints:
            ``"error"`` (default), ``"warn"`` or ``"ignore"``; the loader's choice, not saved.
        weights_digest: digest of the saved weights, written by ``save_pretrained``; a mismatch on load (interrupted
            save) is an error.

    Example:

    ```python
    >>> from peft import get_peft_model
    >>> from peft_safety.tuner import SafetyLoraConfig
    >>> model = get_peft_model(base_model, SafetyLoraConfig(r=16, target_modules="all-linear", mask=mask))  # doctest: +SKIP
    >>> model.save_pretrained("spa-adapter")    # adapter_config.json: "peft_type": "SAFETY_LORA"    # doctest: +SKIP
    ```
    """

    mask: Any = field(
        default=None,
        metadata={
            "help": "The SafetyMask whose entries the LoRA update must leave unchanged. Not written to "
            "adapter_config.json (the indices are saved as lora_safety_* buffers in the adapter weights); None when "
            "loading a saved adapter."
        },
    )
    mask_layout: dict[str, dict[str, Any]] | None = field(
        default=None,
        metadata={
            "help": "Filled from the mask: for each masked module, {'kind': 'rows'|'cols'|'entries', 'n': number of "
            "indices, 'shape': [d_out, d_in]}. Lets from_pretrained rebuild the masked layers. Do not set by hand."
        },
    )
    mask_source: str | None = field(
        default=None,
        metadata={"help": "Where the mask came from (path or Hub id), from the mask's provenance; informational."},
    )
    entries_method: str = field(
        default="dense",
        metadata={
            "help": "Forward of Weight()-masked layers. 'dense' (default): the masked dense delta, bit-exact on the "
            "mask in every dtype. 'sparse': LoRA's factored path minus a sparse correction, faster at low density "
            "but exact only up to fp rounding in forward. 'auto': sparse up to 10% density. Merge is exact always.",
            "choices": list(ENTRIES_METHODS),
        },
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = SafetyPeftType.SAFETY_LORA
        check_lora_options(self)
        check_entries_method(self.entries_method)
        #: {module key: {kind: int32 indices}} when built from a mask (not serialised; read by the layers).
        self._safety_indices: dict[str, dict[str, torch.Tensor]] = {}
        if self.mask is not None:
            self._from_mask(self.mask)
        elif self.mask_layout is None:
            raise ValueError(
                "SafetyLoraConfig needs a mask: pass mask=SafetyMask(...) (or build it with mask_lora_config(lora_config, "
                "mask)). A saved adapter carries mask_layout instead; this one has neither."
            )
        else:
            self.mask_layout = check_layout(self.mask_layout)

    def _from_mask(self, mask: Any) -> None:
        from ..mask import SafetyMask

        if isinstance(mask, str):
            mask = SafetyMask.from_pretrained(mask)
            self.mask = mask
        if not isinstance(mask, SafetyMask):
            raise TypeError(
                f"SafetyLoraConfig(mask=...) takes a SafetyMask or a path / Hub id, got {type(mask).__name__}."
            )
        layer_keys: list[str] = []
        layout: dict[str, dict[str, Any]] = {}
        indices: dict[str, dict[str, torch.Tensor]] = {}
        for name in mask.names:
            module_key, _, attr = name.rpartition(".")
            if module_key.rsplit(".", 1)[-1] == "lm_head" and _targets_lm_head(self, module_key):
                raise ValueError(
                    f"The mask has entries on {name!r} and the LoRA config targets lm_head. TRL's SFTTrainer rejects "
                    "lm_head adapters, and a LoRA layer there cannot keep its entries frozen under TRL's fused loss. "
                    "Leave lm_head out of target_modules (it then stays frozen), or protect it with full fine-tuning "
                    "(SafetySFTTrainer with safety_mode='freeze' and peft_config=None, or apply_mask_(model, mask, "
                    "mode='freeze'))."
                )
            if attr != "weight":
                targeted = self.target_parameters and any(name.endswith(p) for p in self.target_parameters)
                if targeted:
                    raise ValueError(
                        f"The mask has entries on {name!r}, which the LoRA config adapts through target_parameters. "
                        "Masked LoRA supports nn.Linear modules only: drop it from target_parameters (it then stays "
                        "frozen) or protect it with full fine-tuning (safety_mode='freeze', peft_config=None)."
                    )
                continue  # not an nn.Linear weight and not targeted: LoRA never changes it
            shape = tuple(mask.shapes[name])
            kind, idx = granularity_kind(mask.granularity_of(name), mask[name], name)
            if kind is None:
                layer_keys.append(module_key)
                continue
            if len(shape) != 2:
                raise ValueError(
                    f"The mask's {name!r} has shape {shape}; masked LoRA supports 2-D nn.Linear weights only."
                )
            idx = torch.unique(idx.to(torch.int64))  # sorted, unique: the layers and the file rely on both
            layout[module_key] = {"kind": kind, "n": int(idx.numel()), "shape": [int(shape[0]), int(shape[1])]}
            indices[module_key] = {kind: idx.to(torch.int32)}
        exclude_modules(self, layer_keys)
        self.mask_layout = check_layout(layout)
        self._safety_indices = indices
        if self.mask_source is None:
            provenance = getattr(mask, "provenance", None) or {}
            source = provenance.get("source") if isinstance(provenance, dict) else None
            self.mask_source = source if isinstance(source, str) else None

    def to_dict(self) -> dict[str, Any]:
        """The config as a JSON-serialisable dict; ``mask`` is written as `None` (the indices live in the weights)
        and ``base_fingerprint_check`` is left out (the loader chooses it)."""
        mask, self.mask = self.mask, None
        try:
            out = super().to_dict()
        finally:
            self.mask = mask
        out["mask"] = None
        out.pop("base_fingerprint_check", None)
        if isinstance(out.get("peft_type"), SafetyPeftType):
            out["peft_type"] = out["peft_type"].value
        return out
