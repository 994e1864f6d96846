"""Write tests/data/golden_v1/safety_mask.safetensors, the golden file of mask format v1.

Run once from the repository root (``python tests/data/make_golden_v1.py``) and commit the output. Never regenerate it
to make a failing test pass: the golden file pins what format-v1 readers must accept, forever. Everything in it is
deterministic (no randomness), and tests/mask/test_mask_format.py checks every field against the literals below.
"""

from __future__ import annotations

import os

import torch

from peft_safety.mask import Head, Layer, Neuron, SafetyMask, Weight, fingerprint_tensor

SHAPES = {
    "model.layers.0.self_attn.q_proj.weight": (8, 4),  # Head(head_dim=2, axis=0): 4 heads
    "model.layers.0.mlp.up_proj.weight": (6, 4),  # Neuron(axis=0): rows
    "model.layers.0.mlp.down_proj.weight": (4, 6),  # Neuron(axis=1): columns
    "model.layers.1.mlp.experts.down_proj": (2, 4, 3),  # Weight on a 3-D expert tensor
    "model.layers.1.input_layernorm.weight": (4,),  # Layer(): the whole parameter
    "lm_head.weight": (5, 4),  # eligible, no entry
}
GRANULARITY = {
    "model.layers.0.self_attn.q_proj.weight": Head(head_dim=2, axis=0),
    "model.layers.0.mlp.up_proj.weight": Neuron(axis=0),
    "model.layers.0.mlp.down_proj.weight": Neuron(axis=1),
    "model.layers.1.mlp.experts.down_proj": Weight(),
    "model.layers.1.input_layernorm.weight": Layer(),
    "lm_head.weight": Weight(),
}
INDICES = {
    "model.layers.0.self_attn.q_proj.weight": [1, 3],
    "model.layers.0.mlp.up_proj.weight": [0, 2, 5],
    "model.layers.0.mlp.down_proj.weight": [4],
    "model.layers.1.mlp.experts.down_proj": [0, 7, 13, 23],
    "model.layers.1.input_layernorm.weight": [0],
}
PROVENANCE = {
    "method": "snip",
    "aggregation": "sum",
    "sparsity": 0.25,
    "seed": 0,
    "score_sign": "abs",
    "data_hash": "sha256:" + "ab" * 32,
    "base_model": "peft-safety/tiny-llama",
    "base_model_revision": "0123456789abcdef0123456789abcdef01234567",
    "library_version": "0.1.0.dev0",
}


def weight_for(shape):
    """The deterministic weight whose fingerprint is recorded: arange / 7 in the parameter's shape."""
    n = 1
    for d in shape:
        n *= d
    return (torch.arange(n, dtype=torch.float32) / 7).reshape(shape)


def build() -> SafetyMask:
    return SafetyMask(
        {k: torch.tensor(v, dtype=torch.int32) for k, v in INDICES.items()},
        SHAPES,
        granularity=GRANULARITY,
        fingerprints={n: fingerprint_tensor(weight_for(s)) for n, s in SHAPES.items()},
        provenance=PROVENANCE,
    )


if __name__ == "__main__":
    out = os.path.join(os.path.dirname(os.path.abspath(__file__)), "golden_v1")
    path = build().save_pretrained(out)
    print(path, os.path.getsize(path), "bytes")
