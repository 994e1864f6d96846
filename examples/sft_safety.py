"""SFT with a safety mask: SET (train only the mask) or SPA (freeze the mask) with TRL, in one script.

Runnable examples (all offline; the tiny model and data are built first with ``--make_tiny DIR``):

```bash
# build a tiny Llama, a tiny prompt/completion jsonl data set and a mask in /tmp/tiny
python examples/sft_safety.py --make_tiny /tmp/tiny

# SPA with LoRA: the LoRA update is exactly zero on the mask's entries
python examples/sft_safety.py --model_name_or_path /tmp/tiny/model --dataset_name /tmp/tiny/data.jsonl \
    --safety_mask /tmp/tiny/mask --safety_mode freeze --use_peft --lora_target_modules q_proj v_proj \
    --output_dir /tmp/tiny/spa-lora --max_steps 5 --bf16 false --activation_checkpointing false --max_length 64

# SPA with full fine-tuning: the mask's entries stay bit-identical under AdamW with weight decay
python examples/sft_safety.py --model_name_or_path /tmp/tiny/model --dataset_name /tmp/tiny/data.jsonl \
    --safety_mask /tmp/tiny/mask --safety_mode freeze --output_dir /tmp/tiny/spa-full --max_steps 5 \
    --bf16 false --activation_checkpointing false --max_length 64

# SET: a sparse adapter holding deltas only at the mask's entries
python examples/sft_safety.py --model_name_or_path /tmp/tiny/model --dataset_name /tmp/tiny/data.jsonl \
    --safety_mask /tmp/tiny/mask --safety_mode train_only --output_dir /tmp/tiny/set --max_steps 5 \
    --bf16 false --activation_checkpointing false --max_length 64
```

``--dataset_name`` is a Hub id or a local ``.json``/``.jsonl``/``.csv``/``.parquet`` file. The same runs through
``peft-safety train ...`` (identical arguments).
"""

from __future__ import annotations

import os
import sys


def make_tiny(folder: str) -> None:
    """A tiny Llama + tokenizer, 32 prompt/completion rows and a 1% SNIP-free (fixed) mask over q/v projections."""
    import json

    import torch

    from peft_safety.mask import SafetyMask, fingerprint_tensor
    from peft_safety.testing import tiny_llama, tiny_tokenizer

    model, tok = tiny_llama(seed=0), tiny_tokenizer()
    model.save_pretrained(os.path.join(folder, "model"))
    tok.save_pretrained(os.path.join(folder, "model"))
    with open(os.path.join(folder, "data.jsonl"), "w") as f:
        for i in range(32):
            f.write(json.dumps({"prompt": f"What is {i} plus {i}?", "completion": f" {2 * i}."}) + "\n")
    params = dict(model.named_parameters())
    names = [n for n in params if n.endswith(("q_proj.weight", "v_proj.weight"))]
    g = torch.Generator().manual_seed(0)
    indices = {
        n: torch.randperm(params[n].numel(), generator=g)[: params[n].numel() // 100].sort().values for n in names
    }
    mask = SafetyMask(
        indices={n: i.to(torch.int32) for n, i in indices.items()},
        shapes={n: tuple(params[n].shape) for n in names},
        fingerprints={n: fingerprint_tensor(params[n]) for n in names},
        provenance={"method": "random", "sparsity": 0.01, "seed": 0},
    )
    mask.save_pretrained(os.path.join(folder, "mask"))
    print(f"tiny model, data and mask written to {folder}")


def main(argv: list[str] | None = None) -> int:
    from transformers import HfArgumentParser

    from peft_safety.recipes.sft import run_sft, sft_dataclasses

    argv = sys.argv[1:] if argv is None else argv
    if "--make_tiny" in argv:
        make_tiny(argv[argv.index("--make_tiny") + 1])
        return 0
    parser = HfArgumentParser(sft_dataclasses())
    script_args, training_args, model_args = parser.parse_args_into_dataclasses(argv)
    run_sft(script_args, training_args, model_args)
    print(f"saved to {training_args.output_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
