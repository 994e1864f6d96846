"""Safety masks: which entries of a model carry its safety behaviour (the first stage; it imports no other stage).

* `peft_safety.mask.granularity` -- `Weight`, `Neuron`, `Head`, `Layer`;
* `peft_safety.mask.serialization` -- the file format v1 (``safety_mask.safetensors``), checked before it is believed;
* `peft_safety.mask.safety_mask` -- `SafetyMask`: validation, algebra, fingerprints, summaries, files;
* `peft_safety.mask.hub` -- model cards (`build_card`, `mask_model_card`) and uploads (`push_mask_to_hub`); not
  imported by this package, ``huggingface_hub`` only when used;
* `peft_safety.mask.cards` -- `write_card`: the README.md of a saved folder (adapter and/or mask).

Imports only torch, safetensors, huggingface_hub (lazily) and the standard library.
"""

from __future__ import annotations

from .cards import write_card
from .granularity import Granularity, Head, Layer, Neuron, Weight, granularity_from_dict
from .safety_mask import (
    MaskSummary,
    SafetyMask,
    fingerprint_tensor,
    fingerprints_of,
    layer_index_of,
    load_mask,
    mask_from_bytes,
    module_type_of,
)

__all__ = [
    "Granularity",
    "Head",
    "Layer",
    "MaskSummary",
    "Neuron",
    "SafetyMask",
    "Weight",
    "fingerprint_tensor",
    "fingerprints_of",
    "granularity_from_dict",
    "layer_index_of",
    "load_mask",
    "mask_from_bytes",
    "module_type_of",
    "write_card",
]
