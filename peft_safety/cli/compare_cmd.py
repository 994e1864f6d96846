"""``peft-safety compare MASK [MASK ...]``: IoU matrix and stability report of several masks.

IoU is counted in weight entries, globally over tensors. The stability report gives the mean and minimum pairwise IoU,
the core (entries in every mask) and the union, per decoder layer and module type.

Examples:

```bash
peft-safety compare ./mask-advbench ./mask-harmbench ./mask-uncensor
peft-safety compare ./seed0 ./seed1 ./seed2 --json --plot overlap.png
```
"""

from __future__ import annotations

import argparse
import json
import os

from ..errors import SafetyError

HELP = "overlap and stability report of several masks"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("masks", metavar="MASK", nargs="+", help="mask folders, .safetensors files or Hub repo ids")
    parser.add_argument("--labels", nargs="+", default=None, help="labels for the masks (default: their paths)")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.add_argument(
        "--plot", default=None, metavar="PATH", help="also write the IoU matrix as a PNG (needs [plot])"
    )


def _labels(paths: list[str], labels: list[str] | None) -> list[str]:
    if labels is not None:
        if len(labels) != len(paths):
            raise SafetyError(f"--labels has {len(labels)} entries for {len(paths)} masks; give one label per mask.")
        if len(set(labels)) != len(labels):
            raise SafetyError(f"--labels must be unique, got {labels}.")
        return labels
    out = [os.path.basename(os.path.normpath(p)) or p for p in paths]
    return out if len(set(out)) == len(out) else list(paths)


def run(args: argparse.Namespace) -> int:
    from peft_safety.analysis import overlap_report, plot_iou_matrix
    from peft_safety.mask import SafetyMask

    labels = _labels(list(args.masks), args.labels)
    masks = {label: SafetyMask.from_pretrained(path) for label, path in zip(labels, args.masks)}
    if args.json:
        print(json.dumps(overlap_report(masks, as_dict=True), indent=2))
    else:
        print(overlap_report(masks))
    if args.plot:
        plot_iou_matrix(masks, args.plot)
        if not args.json:
            print(f"\nIoU plot -> {args.plot}")
    return 0
