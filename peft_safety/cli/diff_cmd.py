"""``peft-safety diff A B``: how much two masks overlap, globally, per module type and per layer.

IoU is counted in weight entries (``|A & B| / |A | B|``), so masks of different granularities compare fairly.

Examples:

```bash
peft-safety diff ./snip-mask ./wanda-mask
peft-safety diff ./seed0 ./seed1 --json
```
"""

from __future__ import annotations

import argparse
import json
from typing import Any

HELP = "compare two masks: IoU globally, per module type and per layer"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("a", metavar="A", help="first mask: folder, safety_mask.safetensors file or Hub repo id")
    parser.add_argument("b", metavar="B", help="second mask")
    parser.add_argument("--json", action="store_true", help="print the comparison as JSON")


def _groups(counts: dict[str, tuple[int, int]], key) -> dict[Any, dict[str, Any]]:
    out: dict[Any, dict[str, Any]] = {}
    for name, (inter, union) in counts.items():
        g = out.setdefault(key(name), {"intersection": 0, "union": 0})
        g["intersection"] += inter
        g["union"] += union
    for g in out.values():
        g["iou"] = g["intersection"] / g["union"] if g["union"] else 1.0
    return out


def compare(a, b) -> dict[str, Any]:
    """The comparison as a JSON-serialisable dict (also used by the text output)."""
    from peft_safety.mask import layer_index_of, module_type_of

    counts = a.overlap_counts(b)
    inter = sum(i for i, _ in counts.values())
    union = sum(u for _, u in counts.values())
    per_layer = _groups(counts, layer_index_of)
    layers = {str(k): v for k, v in sorted(per_layer.items(), key=lambda kv: (kv[0] is None, kv[0] or 0))}
    if "None" in layers:
        layers["outside_layers"] = layers.pop("None")
    return {
        "iou": inter / union if union else 1.0,
        "intersection": inter,
        "union": union,
        "numel_a": a.numel(),
        "numel_b": b.numel(),
        "per_module": dict(sorted(_groups(counts, module_type_of).items())),
        "per_layer": layers,
    }


def _table(title: str, rows: dict[str, dict[str, Any]]) -> list[str]:
    header = (title, "IoU", "A&B", "A|B")
    body = [(k, f"{v['iou']:.4f}", str(v["intersection"]), str(v["union"])) for k, v in rows.items()]
    widths = [max(len(r[i]) for r in [header, *body]) for i in range(4)]

    def fmt(r: tuple[str, ...]) -> str:
        return "  ".join(r[0].ljust(widths[0]) if i == 0 else r[i].rjust(widths[i]) for i in range(4))

    return [fmt(header), "  ".join("-" * w for w in widths), *(fmt(r) for r in body)]


def run(args: argparse.Namespace) -> int:
    from peft_safety.mask import SafetyMask

    a = SafetyMask.from_pretrained(args.a)
    b = SafetyMask.from_pretrained(args.b)
    result = compare(a, b)
    if args.json:
        print(json.dumps({"a": args.a, "b": args.b, **result}, indent=2))
        return 0
    print(f"A: {args.a}  {a!r}")
    print(f"B: {args.b}  {b!r}")
    print(
        f"IoU {result['iou']:.4f}  (|A&B| = {result['intersection']}, |A|B| = {result['union']} weight entries; "
        f"|A| = {result['numel_a']}, |B| = {result['numel_b']})"
    )
    print()
    print("\n".join(_table("module", result["per_module"])))
    print()
    print("\n".join(_table("layer", result["per_layer"])))
    return 0
