"""Plot the preservation protocol's result: safety retained against task improvement, one point per arm and seed.

Reads a committed ``preserve.json`` of ``benchmarks/preserve.py`` (by default the pooled one that ``--combine``
writes: every seed of every arm; nothing is recomputed) and writes one PNG with
two panels: benign fine-tuning and the harmful fine-tuning attack. x: task improvement (the drop of held-out task
loss from the aligned model's, nats per answer token); y: refusal of held-out harmful prompts by the classifier judge,
with its 95% bootstrap interval. The aligned model sits at x = 0; the shaded band is the default-recipe criterion
(refusal within 5 points of the aligned model).

```bash
python benchmarks/plot_preserve.py    # benchmarks/results/preserve_combined/preserve.json -> .../preserve.png
```
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT = os.path.join(ROOT, "benchmarks", "results", "preserve_combined", "preserve.json")
MARKERS = {"lora": "o", "spa_esi": "s", "spa_random": "X", "spa_consensus": "D", "sppft": "^", "rsn_tune": "v",
           "replay": "P", "realign": "*", "full": "h", "spa_full": "H"}  # fmt: skip


def plot(payload: dict[str, Any], path: str) -> str:
    """Draw the two panels of ``payload`` (a ``preserve.json``) into the PNG ``path`` (written atomically)."""
    from peft_safety.analysis.plots import _figure, _save_png

    aligned = payload["aligned"]
    base_rate, base_loss = aligned["refusal/classifier"]["rate"], aligned["task_loss"]
    sections = [s for s in ("benign", "attack") if payload.get(s)]
    fig = _figure(6.0 * len(sections), 4.8)
    axes = fig.subplots(1, len(sections), squeeze=False)[0]
    for ax, section in zip(axes, sections):
        ax.axhspan(100 * (base_rate - 0.05), 100 * base_rate, color="tab:green", alpha=0.12, lw=0)
        ax.errorbar([0.0], [100 * base_rate], yerr=[[100 * (base_rate - aligned["refusal/classifier"]["low"])],
                    [100 * (aligned["refusal/classifier"]["high"] - base_rate)]], fmt="k*", ms=11, capsize=3,
                    label="aligned model")  # fmt: skip
        arms: dict[str, list[dict[str, Any]]] = {}
        for row in payload[section]:
            arms.setdefault(row["arm"], []).append(row)
        for i, (arm, rows) in enumerate(arms.items()):
            color = f"C{i % 10}"
            xs = [base_loss - r["task_loss"] for r in rows]
            ys = [100 * r["refusal/classifier"]["rate"] for r in rows]
            lo = [100 * (r["refusal/classifier"]["rate"] - r["refusal/classifier"]["low"]) for r in rows]
            hi = [100 * (r["refusal/classifier"]["high"] - r["refusal/classifier"]["rate"]) for r in rows]
            ax.errorbar(xs, ys, yerr=[lo, hi], fmt=MARKERS.get(arm, "o"), color=color, ms=7, capsize=2, alpha=0.85,
                        label=f"{arm} ({len(rows)} seed{'s' if len(rows) > 1 else ''})")  # fmt: skip
        ax.set_xlabel("task improvement (aligned task loss - arm task loss, nats/token)")
        ax.set_ylabel("refusal of held-out harmful prompts, classifier judge (%)")
        ax.set_title("benign fine-tuning" if section == "benign" else "harmful fine-tuning attack")
        ax.set_ylim(-2, 102)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="best")
    return _save_png(fig, path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--json", default=DEFAULT, help="the preserve.json to plot")
    parser.add_argument("--out", default=None, help="PNG path (default: preserve.png next to the JSON)")
    args = parser.parse_args(argv)
    with open(args.json, encoding="utf-8") as fh:
        payload = json.load(fh)
    out = args.out or os.path.join(os.path.dirname(args.json), "preserve.png")
    print(f"Wrote {plot(payload, out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
