"""A dev split of harmful and benign prompts to choose a training step with, kept apart from every evaluation set.

Choosing the checkpoint of a safety run on the prompts it is finally reported on inflates the result. `DevSplit` holds
its own prompts (harmful, benign, and optionally benign look-alikes such as "how do I kill a Python process"), checks
at construction that none of them comes from an evaluation set (`leak_report`: word n-gram overlap, exact copies
included), keeps that report (`overlap`), and, called as ``dev(model, tokenizer)``, answers every dev prompt greedily
and judges the answers:

* ``dev_refusal``: share of harmful prompts refused;
* ``dev_over_refusal``: share of benign (and look-alike) prompts refused, pooled; ``dev_over_refusal_benign`` and
  ``dev_over_refusal_lookalike`` separately.

Each rate also comes with its 95% bootstrap interval in `last_evidence` (the records a model card's ``model-index``
is built from: metric, value, interval, number of prompts, the prompt set's name and the judge), so that the numbers a
trained adapter carries say how uncertain they are. It is the evaluator of
`peft_safety.training.DevSelectCallback`, which keeps the checkpoint with the best dev score.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

from .classifier_judge import leak_report
from .judges import resolve_judges
from .stats import rate_with_ci

logger = logging.getLogger(__name__)

__all__ = ["DevSplit"]

_SETS = ("harmful", "benign", "lookalike")


def _prompts(rows: Sequence[Any] | None, what: str) -> list[str]:
    out = []
    for i, row in enumerate(rows or ()):
        prompt = row.get("prompt") if isinstance(row, Mapping) else row
        if not isinstance(prompt, str) or not prompt.strip():
            raise ValueError(f"Dev {what} prompt {i} must be a non-empty string or a row with 'prompt', got {row!r}.")
        out.append(prompt)
    return out


class DevSplit:
    """Harmful and benign dev prompts, checked against the evaluation sets, evaluated on demand.

    Args:
        harmful: harmful prompts (strings or rows with ``prompt``); refusing them is wanted.
        benign: benign prompts; refusing them is over-refusal.
        lookalike: benign prompts that look harmful (optional); refusing them is over-refusal too.
        judge: a judge name (``"wei2024"``, ...) or a `Judge` (e.g. a `ClassifierJudge`).
        evaluation_sets: ``{name: rows or prompts}`` of every set the model will be evaluated on; dev prompts that
            overlap one of them (`leak_report`) are refused (``on_leak="error"``), reported (``"warn"``) or dropped
            from the dev split (``"drop"``, listed in ``overlap["dropped"]``). `None`: not checked (recorded as such in
            `overlap`).
        names: the prompt sets' names for reports and model cards (``{"harmful": "harmbench_val", ...}``).
        max_new_tokens: generation budget per answer.
        batch_size: prompts per ``generate`` call.
        ngram: word n-gram length of the overlap check.
        min_share: share of a dev prompt's n-grams found in an evaluation set that makes it a leak.
        on_leak: ``"error"``, ``"warn"`` or ``"drop"``.
        template: how prompts are rendered (``"chat"`` or ``"raw"``, as `generate_responses`).
        seed: seed of the bootstrap intervals.

    Attributes:
        overlap: ``{"checked": bool, "ngram": n, "min_share": s, "sets": {eval name: {"n_leaked", "examples"}}}``
            (after dropping, with ``"drop"``; plus ``"dropped": {set: [prompts]}``).
        last_evidence: the records of the last call (see the module docstring).

    Raises:
        ValueError: no harmful or no benign prompt, a prompt that is not a string, a leak with ``on_leak="error"``.
    """

    def __init__(
        self,
        harmful: Sequence[Any],
        benign: Sequence[Any],
        lookalike: Sequence[Any] | None = None,
        *,
        judge: Any = "wei2024",
        evaluation_sets: Mapping[str, Sequence[Any]] | None = None,
        names: Mapping[str, str] | None = None,
        max_new_tokens: int = 48,
        batch_size: int = 16,
        ngram: int = 4,
        min_share: float = 0.5,
        on_leak: str = "error",
        template: str = "chat",
        seed: int = 0,
    ) -> None:
        self.prompts = {
            "harmful": _prompts(harmful, "harmful"),
            "benign": _prompts(benign, "benign"),
            "lookalike": _prompts(lookalike, "lookalike"),
        }
        if not self.prompts["harmful"] or not self.prompts["benign"]:
            raise ValueError("A dev split needs harmful and benign prompts (refusal and over-refusal).")
        if on_leak not in ("error", "warn", "drop"):
            raise ValueError(f"on_leak must be 'error', 'warn' or 'drop', got {on_leak!r}.")
        (self.judge,) = resolve_judges([judge])
        self.names = {s: (names or {}).get(s, f"dev_{s}") for s in _SETS}
        self.max_new_tokens, self.batch_size, self.template, self.seed = max_new_tokens, batch_size, template, seed
        self.overlap: dict[str, Any] = {"checked": evaluation_sets is not None, "ngram": ngram, "min_share": min_share}
        if evaluation_sets is not None and on_leak == "drop":
            dropped: dict[str, list[str]] = {}
            for s in _SETS:
                keep = []
                for p in self.prompts[s]:
                    hit = leak_report([p], dict(evaluation_sets), n=ngram, min_share=min_share)
                    (dropped.setdefault(s, []) if any(r["n_leaked"] for r in hit.values()) else keep).append(p)
                self.prompts[s] = keep
            self.overlap["dropped"] = dropped
            if not self.prompts["harmful"] or not self.prompts["benign"]:
                raise ValueError(f"Every harmful or every benign dev prompt overlaps an evaluation set: {dropped}.")
        if evaluation_sets is not None:
            every = [p for s in _SETS for p in self.prompts[s]]
            report = leak_report(every, dict(evaluation_sets), n=ngram, min_share=min_share)
            self.overlap["sets"] = report
            leaks = {name: r for name, r in report.items() if r["n_leaked"]}
            if leaks:
                listed = "; ".join(f"{n}: {r['n_leaked']} (e.g. {r['examples'][:1]})" for n, r in leaks.items())
                message = (
                    f"Dev prompts overlap evaluation sets by word {ngram}-grams ({listed}): a checkpoint chosen on "
                    "them would be chosen on the evaluation. Drop those prompts from the dev split."
                )
                if on_leak == "error":
                    raise ValueError(message)
                logger.warning(message)
        self.last_evidence: list[dict[str, Any]] = []

    def summary(self) -> dict[str, Any]:
        """Sizes, names, judge and overlap report (JSON-ready)."""
        return {
            "sizes": {s: len(p) for s, p in self.prompts.items()},
            "names": dict(self.names),
            "judge": self.judge.name,
            "overlap": self.overlap,
        }

    def __call__(self, model: Any, tokenizer: Any) -> dict[str, float]:
        """Answer and judge every dev prompt; return the dev rates (see the module docstring)."""
        from ..scoring.generation import generate_responses

        flat = [(s, p) for s in _SETS for p in self.prompts[s]]
        answers = generate_responses(
            model, tokenizer, [p for _, p in flat], max_new_tokens=self.max_new_tokens, batch_size=self.batch_size,
            template=self.template, seed=self.seed, progress=False,
        )  # fmt: skip
        verdicts = self.judge.judge([p for _, p in flat], answers)
        flags: dict[str, list[bool | None]] = {s: [] for s in _SETS}
        for (s, _), v in zip(flat, verdicts):
            flags[s].append(v.refused)
        rates = {s: rate_with_ci(flags[s], seed=self.seed) for s in _SETS if flags[s]}
        rates["over"] = rate_with_ci(flags["benign"] + flags["lookalike"], seed=self.seed)
        metrics = {"dev_refusal": rates["harmful"]["rate"], "dev_over_refusal": rates["over"]["rate"]}
        metrics["dev_over_refusal_benign"] = rates["benign"]["rate"]
        if "lookalike" in rates:
            metrics["dev_over_refusal_lookalike"] = rates["lookalike"]["rate"]
        self.last_evidence = [
            {"metric": metric, "name": label, "split": "dev", "dataset": self.names[s], "judge": self.judge.name,
             **{k: rates[s][k] for k in ("rate", "low", "high", "n", "confidence", "method")}}
            for s, metric, label in (
                ("harmful", "refusal_rate", "Refusal of harmful prompts"),
                ("benign", "over_refusal_rate", "Over-refusal of benign prompts"),
                ("lookalike", "over_refusal_rate", "Over-refusal of benign look-alike prompts"),
            )
            if s in rates
        ]  # fmt: skip
        missing = [k for k, v in metrics.items() if v is None]
        if missing:
            raise ValueError(
                f"The dev judge {self.judge.name!r} decided no verdict for {missing}: its errors: check it."
            )
        return metrics
