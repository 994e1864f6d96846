"""``peft-safety select SCORES.safetensors``: turn saved scores into a mask.

The scores file is one the user wrote explicitly with ``Scores.to_safetensors(path)`` (dense fp32, as large as the
scored parameters), or any safetensors file of floating tensors (read as ``Weight()`` scores).

Examples:

```bash
peft-safety select snip_scores.safetensors --fraction 0.01 --scope global --out ./snip-mask
peft-safety select safety.safetensors --fraction 0.1 --scope per_tensor --exclude ./utility-mask --out ./isolated
peft-safety select wanda.safetensors --fraction 0.05 --scope per_row --out ./wanda-mask
```
"""

from __future__ import annotations

import argparse

HELP = "turn saved scores into a mask"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("scores", metavar="SCORES", help="scores file written by Scores.to_safetensors (.safetensors)")
    count = parser.add_mutually_exclusive_group(required=True)
    count.add_argument("--fraction", type=float, help="share of units to select, in (0, 1]")
    count.add_argument("--k", type=int, help="number of units to select (per tensor/row for those scopes)")
    parser.add_argument(
        "--scope",
        default="global",
        help="global (top over all tensors), per_tensor, or per_row (2-D weight scores; Wanda's group)",
    )
    parser.add_argument("--smallest", action="store_true", help="select the lowest scores instead of the highest")
    parser.add_argument(
        "--exclude", default=None, metavar="MASK", help="mask whose units are removed (set difference)"
    )
    parser.add_argument("--out", required=True, help="output folder for safety_mask.safetensors")


def run(args: argparse.Namespace) -> int:
    from peft_safety.mask import SafetyMask
    from peft_safety.scoring.scores import Scores
    from peft_safety.scoring.selection import select

    scores = Scores.from_safetensors(args.scores)
    exclude = SafetyMask.from_pretrained(args.exclude) if args.exclude else None
    mask = select(
        scores,
        fraction=args.fraction,
        k=args.k,
        scope=args.scope,
        exclude=exclude,
        largest=not args.smallest,
    )
    path = mask.save_pretrained(args.out)
    print(f"{scores!r}")
    print(f"selected {len(mask):,} units ({mask.numel():,} weight entries, density {mask.density:.4%}) -> {path}")
    return 0
