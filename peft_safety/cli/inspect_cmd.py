"""``peft-safety inspect MASK``: a mask's provenance and its counts per layer and module.

Examples:

```bash
peft-safety inspect ./my-mask                      # a folder with safety_mask.safetensors
peft-safety inspect ./my-mask/safety_mask.safetensors --json
peft-safety inspect me/llama-snip-mask --revision main
```
"""

from __future__ import annotations

import argparse
import json

HELP = "show a mask's provenance and summary: counts per layer and module"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("mask", metavar="MASK", help="a mask folder, a safety_mask.safetensors file or a Hub repo id")
    parser.add_argument("--revision", default=None, help="Hub revision (branch, tag or commit) for a repo id")
    parser.add_argument("--json", action="store_true", help="print the provenance and summary as JSON")


def run(args: argparse.Namespace) -> int:
    from peft_safety.mask import SafetyMask

    mask = SafetyMask.from_pretrained(args.mask, revision=args.revision)
    summary = mask.summary()
    if args.json:
        out = {
            "mask": args.mask,
            "units": len(mask),
            "numel": mask.numel(),
            "total_numel": mask.total_numel(),
            "density": mask.density,
            "parameters": len(mask.shapes),
            "parameters_with_entries": len(mask.names),
            **summary.to_dict(),
        }
        print(json.dumps(out, indent=2))
        return 0
    print(repr(mask))
    print()
    prov = mask.provenance
    if prov:
        width = max(len(k) for k in prov)
        print("provenance")
        for key, value in prov.items():
            text = value if isinstance(value, str) else json.dumps(value)
            print(f"  {key.ljust(width)}  {text}")
        print()
    print(str(summary))
    return 0
