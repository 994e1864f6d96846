"""The evidence an artifact carries: measured refusal and over-refusal rates on its model card.

An adapter trained with an evaluation (`peft_safety.training.DevSelectCallback` with a
`peft_safety.evaluation.DevSplit`) has numbers worth shipping with it: the refusal rate on harmful prompts and the
over-refusal rates on benign ones, each with its interval, the judge that decided them and the prompt sets. They are
stored next to the weights in ``safety_evaluation.json`` (`write_evidence` / `read_evidence`) and put on the card by
`add_evidence` in two forms:

* Hub ``model-index`` results in the front matter (``huggingface_hub.EvalResult``: task ``text-generation``, the
  prompt set as the dataset, the rate as the metric value, the interval, the number of prompts, the judge and the
  step as metric ``args``; metric ``config: peft-safety`` marks them as ours), which the Hub shows as evaluation
  results;
* a Markdown table between ``<!-- peft-safety evaluation -->`` markers, replaced (never duplicated) on every write.

Results on the card from other sources are kept; earlier peft-safety results are replaced.

A record is a dict with ``metric`` (``refusal_rate``, ``over_refusal_rate``), ``name``, ``rate``, ``low``, ``high``,
``n``, ``dataset``, ``judge``, and optionally ``split``, ``confidence``, ``method``, ``step``, ``selected_by``.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Mapping, Sequence
from typing import Any

from .._io import atomic_write_text

__all__ = ["EVIDENCE_FILENAME", "add_evidence", "check_evidence", "read_evidence", "write_evidence"]

#: the file next to an adapter's weights that holds its evidence
EVIDENCE_FILENAME = "safety_evaluation.json"
SOURCE = "peft-safety"
_MAX_BYTES = 1 << 20
_BEGIN, _END = "<!-- peft-safety evaluation -->", "<!-- /peft-safety evaluation -->"
_REQUIRED = {"metric": str, "name": str, "dataset": str, "judge": str}


def check_evidence(records: Any) -> list[dict[str, Any]]:
    """``records`` as a list of checked dicts.

    Raises:
        ValueError: a record that is not a dict, a missing or mistyped field, a rate or bound outside [0, 1], a bound
            on the wrong side of the rate, a non-positive ``n``.
    """
    if not isinstance(records, Sequence) or isinstance(records, (str, bytes)):
        raise ValueError(f"Evidence must be a list of records, got {type(records).__name__}.")
    out = []
    for i, rec in enumerate(records):
        if not isinstance(rec, Mapping):
            raise ValueError(f"Evidence record {i} must be a dict, got {type(rec).__name__}.")
        for key, typ in _REQUIRED.items():
            if not isinstance(rec.get(key), typ) or not rec[key]:
                raise ValueError(
                    f"Evidence record {i} needs a non-empty {key!r} ({typ.__name__}), got {rec.get(key)!r}."
                )
        vals = {}
        for key in ("rate", "low", "high"):
            v = rec.get(key)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or not 0 <= v <= 1:
                raise ValueError(f"Evidence record {i}: {key} must be a number in [0, 1], got {v!r}.")
            vals[key] = float(v)
        if not vals["low"] <= vals["rate"] <= vals["high"]:
            raise ValueError(f"Evidence record {i}: need low <= rate <= high, got {vals}.")
        n = rec.get("n")
        if isinstance(n, bool) or not isinstance(n, int) or n <= 0:
            raise ValueError(f"Evidence record {i}: n must be a positive int, got {n!r}.")
        out.append(dict(rec))
    return out


def write_evidence(folder: str | os.PathLike, records: Sequence[Mapping[str, Any]]) -> str:
    """Write ``folder/safety_evaluation.json`` (atomically); returns its path."""
    path = os.path.join(os.fspath(folder), EVIDENCE_FILENAME)
    atomic_write_text(path, json.dumps({"results": check_evidence(records)}, indent=1) + "\n")
    return path


def read_evidence(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The records of a ``safety_evaluation.json`` (size and content checked).

    Raises:
        ValueError: a file over 1 MiB, not JSON, or with records that do not pass `check_evidence`.
    """
    path = os.fspath(path)
    if os.path.getsize(path) > _MAX_BYTES:
        raise ValueError(f"{path} is larger than {_MAX_BYTES} bytes: not an evidence file.")
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(
            f"{path} is not valid JSON ({err}); delete it or write it again with write_evidence."
        ) from err
    if not isinstance(data, Mapping) or "results" not in data:
        raise ValueError(f"{path} must hold {{'results': [...]}}.")
    return check_evidence(data["results"])


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def _table(records: list[dict[str, Any]]) -> str:
    lines = [
        _BEGIN,
        "## Safety evaluation",
        "",
        "| measure | prompt set | split | n | rate | 95% interval | judge | step |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in records:
        conf = r.get("confidence")
        interval = f"{_pct(r['low'])} - {_pct(r['high'])}"
        if isinstance(conf, (int, float)) and conf != 0.95:
            interval += f" ({100 * conf:.0f}%)"
        lines.append(
            f"| {r['name']} | {r['dataset']} | {r.get('split', '')} | {r['n']} | {_pct(r['rate'])} | {interval} "
            f"| {r['judge']} | {r.get('step', '')} |"
        )
    sel = {r.get("selected_by") for r in records} - {None}
    lines += [
        "",
        "Rates are shares of the prompts whose answers the judge calls a refusal (over-refusal: of benign prompts); "
        f"intervals are {records[0].get('method', 'bootstrap')} intervals."
        + (f" The checkpoint is the dev-split step chosen by `{', '.join(sorted(sel))}`." if sel else ""),
        _END,
    ]
    return "\n".join(lines)


def add_evidence(card_text: str, records: Sequence[Mapping[str, Any]], *, model_name: str | None = None) -> str:
    """``card_text`` (a README.md with front matter) with the records as ``model-index`` results and a table.

    Args:
        card_text: the card.
        records: the evidence records (checked by `check_evidence`).
        model_name: the ``model-index`` name (default: the card's, else ``"model"``).

    Returns:
        The new card text.
    """
    from huggingface_hub import EvalResult, ModelCard  # lazy: importing peft_safety.mask stays light

    records = check_evidence(records)
    card = ModelCard(card_text)
    data = card.data
    kept = [r for r in (data.eval_results or []) if getattr(r, "metric_config", None) != SOURCE]
    ours = []
    for r in records:
        split = r.get("split")
        args = {"low": r["low"], "high": r["high"], "n": r["n"], "judge": r["judge"]}
        for key in ("confidence", "method", "step", "selected_by"):
            if r.get(key) is not None:
                args[key] = r[key]
        ours.append(
            EvalResult(
                task_type="text-generation",
                task_name="Safety: refusal and over-refusal",
                dataset_type=r["dataset"],
                dataset_name=f"{r['dataset']}" + (f" ({split})" if split else ""),
                dataset_split=split,
                metric_type=r["metric"],
                metric_name=f"{r['name']} ({r['judge']})",
                metric_value=round(float(r["rate"]), 4),
                metric_args=args,
                metric_config=SOURCE,
                verified=False,
            )
        )
    data.eval_results = kept + ours
    if not data.model_name:
        data.model_name = model_name or "model"
    text = card.text
    table = _table(records)
    pattern = re.compile(re.escape(_BEGIN) + r".*?" + re.escape(_END), re.DOTALL)
    text = pattern.sub(lambda _: table, text) if pattern.search(text) else text.rstrip("\n") + "\n\n" + table + "\n"
    return f"---\n{data.to_yaml()}\n---\n{text if text.startswith(chr(10)) else chr(10) + text}"
