"""Safety masks: which entries of a model carry its safety behaviour.

Imports only torch, safetensors and the standard library.
"""

from __future__ import annotations

from .granularity import Granularity, Head, Layer, Neuron, Weight, granularity_from_dict
from .safety_mask import MaskSummary, SafetyMask, fingerprint_tensor, layer_index_of, module_type_of

__all__ = [
    "Granularity",
    "Head",
    "Layer",
    "MaskSummary",
    "Neuron",
    "SafetyMask",
    "Weight",
    "fingerprint_tensor",
    "granularity_from_dict",
    "layer_index_of",
    "module_type_of",
]
