"""SFT with a safety mask: SET (train only the mask) or SPA (freeze the mask) with TRL, in one script.

This is TRL's ``trl/scripts/sft.py`` with `SafetySFTTrainer`: every flag of ``trl sft`` works (``--load_in_4bit``,
``--use_peft``, ``--lora_*``, ``--attn_implementation``, ``--packing``, ``--config recipe.yaml``, ...), plus
``--safety_mask DIR --safety_mode freeze|train_only``. Runnable examples (all offline; the tiny model, data and mask are
built first with ``--make_tiny DIR``):

```bash
# build a tiny Llama, a tiny prompt/completion jsonl data set and a mask in /tmp/tiny
python examples/sft_safety.py --make_tiny /tmp/tiny

# SPA with LoRA: the LoRA update is exactly zero on the mask's entries
python examples/sft_safety.py --model_name_or_path /tmp/tiny/model --dataset_name /tmp/tiny/data.jsonl \
    --safety_mask /tmp/tiny/mask --safety_mode freeze --use_peft --lora_target_modules q_proj v_proj \
    --output_dir /tmp/tiny/spa-lora --max_steps 5 --max_length 64

# SPA with QLoRA (bitsandbytes 4-bit base, also on CPU)
python examples/sft_safety.py --model_name_or_path /tmp/tiny/model --dataset_name /tmp/tiny/data.jsonl \
    --safety_mask /tmp/tiny/mask --safety_mode freeze --use_peft --lora_target_modules q_proj v_proj \
    --load_in_4bit --output_dir /tmp/tiny/spa-qlora --max_steps 5 --max_length 64

# SPA with full fine-tuning: the mask's entries stay bit-identical under AdamW with weight decay
python examples/sft_safety.py --model_name_or_path /tmp/tiny/model --dataset_name /tmp/tiny/data.jsonl \
    --safety_mask /tmp/tiny/mask --safety_mode freeze --output_dir /tmp/tiny/spa-full --max_steps 5 --max_length 64

# SET: a sparse adapter holding deltas only at the mask's entries
python examples/sft_safety.py --model_name_or_path /tmp/tiny/model --dataset_name /tmp/tiny/data.jsonl \
    --safety_mask /tmp/tiny/mask --safety_mode train_only --output_dir /tmp/tiny/set --max_steps 5 --max_length 64

# the same run from a YAML recipe (command-line flags override it)
python examples/sft_safety.py --config examples/sft_safety.yaml --model_name_or_path /tmp/tiny/model \
    --dataset_name /tmp/tiny/data.jsonl --safety_mask /tmp/tiny/mask

# two processes (DDP) on CPU through accelerate; see docs/multiprocess.md for FSDP2 and GPUs
accelerate launch --config_file examples/accelerate/ddp_cpu.yaml examples/sft_safety.py \
    --config examples/sft_safety.yaml --model_name_or_path /tmp/tiny/model --dataset_name /tmp/tiny/data.jsonl \
    --safety_mask /tmp/tiny/mask --output_dir /tmp/tiny/spa-ddp --use_cpu true
```

Several processes on a machine without a GPU need ``--use_cpu true`` to form one (gloo) process group; without it
each process would train alone into the same output folder. When ``WORLD_SIZE > 1`` and there is no GPU, the script
adds it if the command line does not set ``--use_cpu``, and refuses ``--use_cpu false``.

``bf16`` follows the hardware when not given (on for a bf16-capable GPU, off on CPU). ``--dataset_name`` is a Hub id
or a local ``.json``/``.jsonl``/``.csv``/``.parquet`` file. ``peft-safety train ...`` takes identical arguments.
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
    from peft_safety.recipes.sft import parse_sft_args, run_sft

    argv = sys.argv[1:] if argv is None else argv
    if "--make_tiny" in argv:
        make_tiny(argv[argv.index("--make_tiny") + 1])
        return 0
    script_args, training_args, model_args, dataset_args = parse_sft_args(argv)
    trainer = run_sft(script_args, training_args, model_args, dataset_args)
    if trainer.is_world_process_zero():
        print(f"saved to {training_args.output_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
