"""``peft-safety repair``: SET as a repair after fine-tuning (`peft_safety.training.repair`).

Trains the entries of a mask scored on the *aligned* model, on the *fine-tuned* (LoRA merged) weights, with refusal
rows and utility rows (by default the fine-tuned model's own answers to benign prompts), and saves a ``SAFETY``
adapter for the fine-tuned model. Examples:

```bash
peft-safety repair --model ./finetuned-merged --mask ./aligned-mask --aligned HuggingFaceTB/SmolLM2-135M-Instruct \
    --output_dir ./repair-adapter
peft-safety repair --model ./finetuned-merged --mask ./aligned-mask --max_steps 40 --utility_ratio 1 --kl_weight 0.5 \
    --output_dir ./repair-adapter
```

Checked before any model loads: the model, mask and aligned paths (or Hub ids), the data set names, the numbers.
"""

from __future__ import annotations

import argparse

from ..errors import SafetyError

HELP = "SET as a repair after fine-tuning: a SAFETY adapter for the fine-tuned model, on a mask of the aligned one"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model", required=True, help="the fine-tuned model, LoRA merged (folder, Hub id or embedded model name)"
    )
    parser.add_argument("--mask", required=True, help="mask scored on the aligned model (folder, file or Hub id)")
    parser.add_argument(
        "--aligned", default=None, help="the aligned model the mask was scored on (checked against the mask)"
    )
    parser.add_argument("--output_dir", required=True, help="where the SAFETY adapter is saved")
    parser.add_argument(
        "--refusal_data", default="uncensorbench_refusal", help="refusal rows: a named data set or a file"
    )
    parser.add_argument("--n_rows", type=int, default=128, help="refusal rows used (seeded sample)")
    parser.add_argument(
        "--utility_dataset",
        default="self",
        help="utility rows: 'self' (the model's own answers), 'self:NAME[,NAME]', or rows (a named set or a file)",
    )
    parser.add_argument("--utility_ratio", type=float, default=1.0, help="utility rows per refusal row (0: plain SET)")
    parser.add_argument("--kl_weight", type=float, default=0.0, help="weight of KL(fine-tuned || repaired) on utility")
    parser.add_argument("--max_steps", type=int, default=60, help="optimizer steps")
    parser.add_argument("--learning_rate", type=float, default=1e-3, help="learning rate")
    parser.add_argument("--batch_size", type=int, default=4, help="per-device batch size")
    parser.add_argument("--max_length", type=int, default=256, help="training sequence length")
    parser.add_argument("--seed", type=int, default=0, help="seed")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, ...")


def check(args: argparse.Namespace) -> None:
    from ..sources.models import MODEL_SOURCES
    from ._common import check_data_source, check_local_or_hub

    for flag, value in (("--model", args.model), ("--aligned", args.aligned)):
        if value and value.strip().lower() not in (*MODEL_SOURCES, "default"):  # embedded names need no check
            check_local_or_hub(flag, value, "config.json")
    check_local_or_hub("--mask", args.mask, "safety_mask.safetensors")
    check_data_source("--refusal_data", args.refusal_data)
    if not (args.utility_dataset == "self" or args.utility_dataset.startswith("self:")):
        check_data_source("--utility_dataset", args.utility_dataset)
    for flag, value, low in (
        ("--n_rows", args.n_rows, 1),
        ("--max_steps", args.max_steps, 1),
        ("--batch_size", args.batch_size, 1),
        ("--max_length", args.max_length, 8),
    ):
        if value < low:
            raise SafetyError(f"{flag} must be >= {low}, got {value}.")
    for flag, value in (("--utility_ratio", args.utility_ratio), ("--kl_weight", args.kl_weight)):
        if not value >= 0:
            raise SafetyError(f"{flag} must be >= 0, got {value}.")
    if args.learning_rate <= 0:
        raise SafetyError(f"--learning_rate must be > 0, got {args.learning_rate}.")


def _load(path: str, device: str):
    from ..sources.models import load_model
    from ._common import resolve_device

    return load_model(path, device=resolve_device(device))


def run(args: argparse.Namespace) -> int:
    from ..training.repair import repair

    model, tok = _load(args.model, args.device)
    aligned = None
    if args.aligned:  # only its weights are read (the fingerprints the mask must match)
        from transformers import AutoModelForCausalLM

        from ..sources.models import resolve_model

        aligned = AutoModelForCausalLM.from_pretrained(resolve_model(args.aligned), dtype="float32")
    trainer = repair(
        model,
        tok,
        args.mask,
        output_dir=args.output_dir,
        aligned_model=aligned,
        refusal_rows=args.refusal_data,
        n_rows=args.n_rows,
        utility_dataset=args.utility_dataset if args.utility_ratio else None,
        utility_ratio=args.utility_ratio,
        kl_weight=args.kl_weight,
        max_steps=args.max_steps,
        learning_rate=args.learning_rate,
        batch_size=args.batch_size,
        max_length=args.max_length,
        seed=args.seed,
        use_cpu=str(model.device) == "cpu",
    )
    utility = next((c.state() for c in trainer.protections if c.name == "utility"), None)
    print(
        f"peft-safety repair: SAFETY adapter saved to {args.output_dir} ({args.max_steps} steps; utility: {utility})"
    )
    return 0
