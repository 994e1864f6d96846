"""Post-hoc defenses: edits of a fine-tuned model (or adapter) that restore safety after training.

| function | paper | what it edits |
|---|---|---|
| `antidote` | Huang et al., ICML 2025 | prunes the entries Wanda scores highest on harmful rows (LoRA factors or q/k/v weights), returns the `SafetyMask` of what it pruned |
| `safe_lora_project` | Hsu et al., NeurIPS 2024 | replaces the LoRA update ``B A`` of the least aligned layers by ``C B A`` (``C = V V^T / ||V||_F``) |
| `add_safety_vector` | Bhardwaj et al., ACL 2024 (RESTA) | adds ``scale * (W_aligned - W_base)`` to a merged model |

`AlignmentDelta` is the alignment direction ``V = W_aligned - W_base`` the last two take: from a (base, aligned) model
pair, any dict of deltas, or an adapter (a SET adapter's sparse delta). This stage comes after ``training/`` and may
use ``scoring/`` (Antidote is built on the Wanda scorer); see ``docs/defenses.md``.
"""

from __future__ import annotations

from .alignment import AlignmentDelta
from .antidote import ANTIDOTE_FULL_TARGETS, antidote, antidote_row_count
from .resta import add_safety_vector
from .safe_lora import SafeLoraLayer, SafeLoraReport, safe_lora_project

__all__ = [
    "ANTIDOTE_FULL_TARGETS",
    "AlignmentDelta",
    "SafeLoraLayer",
    "SafeLoraReport",
    "add_safety_vector",
    "antidote",
    "antidote_row_count",
    "safe_lora_project",
]
