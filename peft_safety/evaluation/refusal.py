"""Refusal metrics: run judges over (prompt, response) pairs and summarize them.

A `JudgeSummary` counts refusals among the *decided* verdicts; undecided ones (judge errors) are counted apart and
never added to either side. ``refusal_rate = refused / decided``; on harmful prompts the attack success rate is
``1 - refusal_rate``; on benign prompts the same rate is the over-refusal rate.

`refusal_evaluator` packages that as the ``(model, tokenizer) -> metrics`` callable that
`peft_safety.training.SafetySFTTrainer` runs every ``safety_eval_steps`` steps.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from .judges import Judge, Verdict, count_words, is_repetitive

__all__ = ["JudgeSummary", "RefusalEvaluator", "judge_all", "refusal_evaluator", "summarize_verdicts"]


@dataclass
class JudgeSummary:
    """Counts of one judge on one prompt set."""

    judge: str
    n: int
    refused: int
    complied: int
    errors: int

    @property
    def decided(self) -> int:
        return self.refused + self.complied

    @property
    def refusal_rate(self) -> float | None:
        """Refusals among decided verdicts; `None` if the judge decided nothing."""
        return self.refused / self.decided if self.decided else None

    @property
    def compliance_rate(self) -> float | None:
        """``1 - refusal_rate`` (attack success rate on harmful prompts)."""
        return self.complied / self.decided if self.decided else None

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "refusal_rate": self.refusal_rate, "compliance_rate": self.compliance_rate}


def summarize_verdicts(name: str, verdicts: Sequence[Verdict]) -> JudgeSummary:
    """Count refusals, compliances and errors; a verdict with ``refused=None`` is always an error."""
    refused = sum(1 for v in verdicts if v.refused is True)
    complied = sum(1 for v in verdicts if v.refused is False)
    return JudgeSummary(name, len(verdicts), refused, complied, len(verdicts) - refused - complied)


def judge_all(
    judges: Sequence[Judge], prompts: Sequence[str], responses: Sequence[str]
) -> tuple[dict[str, JudgeSummary], list[dict[str, Any]]]:
    """Run every judge on every pair.

    A judge that raises, or returns the wrong number of verdicts, gets an error verdict for every pair (the run goes
    on with the other judges).

    Returns:
        ``({judge name: JudgeSummary}, per-pair records)`` where each record holds the word count, the repetition
        flag and ``{"verdicts": {judge name: Verdict.to_dict()}}``.
    """
    records: list[dict[str, Any]] = [
        {"n_words": count_words(r), "repetitive": is_repetitive(r), "verdicts": {}} for r in responses
    ]
    summaries: dict[str, JudgeSummary] = {}
    for judge in judges:
        try:
            verdicts = list(judge.judge(list(prompts), list(responses)))
            if len(verdicts) != len(responses):
                raise RuntimeError(f"returned {len(verdicts)} verdicts for {len(responses)} responses")
            if not all(isinstance(v, Verdict) for v in verdicts):
                raise TypeError("returned objects that are not Verdicts")
        except Exception as err:  # a failing judge is reported as errors, never as refusals
            verdicts = [Verdict(refused=None, error=f"{type(err).__name__}: {err}") for _ in responses]
        summaries[judge.name] = summarize_verdicts(judge.name, verdicts)
        for rec, v in zip(records, verdicts):
            rec["verdicts"][judge.name] = v.to_dict()
    return summaries, records


def _rate(value: float | None) -> float:
    # a judge that decided nothing has no rate: NaN keeps the logged series numeric without faking a 0 or a 1
    return float("nan") if value is None else float(value)


class RefusalEvaluator:
    """A ``(model, tokenizer) -> {metric: float}`` callable for `SafetySFTTrainer(safety_evaluator=...)`.

    Build it with `refusal_evaluator`. Each call generates greedy answers to the held-out harmful prompts (and to
    the benign prompts, if any), runs the judges, and returns the metrics below; `RefusalEvalCallback` logs them with
    a ``safety/`` prefix (e.g. ``safety/refusal_rate/wei2024``).

    | key | meaning |
    |---|---|
    | ``refusal_rate/<judge>`` | refusals among the judge's decided verdicts on the harmful prompts (NaN if none) |
    | ``judge_errors/<judge>`` | harmful prompts the judge could not decide (errors never count as refusals) |
    | ``over_refusal_rate/<judge>`` | refusals on the benign prompts (only with ``benign_prompts``) |
    | ``repetition_rate`` | fraction of harmful-prompt answers that are degenerate loops |
    | ``mean_words`` | mean length of the harmful-prompt answers, in words |

    The responses and per-judge verdicts of the latest call are kept in `last_records`.
    """

    def __init__(
        self,
        prompts: Sequence[str],
        judges: Sequence[Judge],
        *,
        benign_prompts: Sequence[str] = (),
        max_new_tokens: int = 64,
        batch_size: int = 16,
        system_prompt: str | None = None,
        template: str = "chat",
        tokenizer: Any = None,
    ) -> None:
        self.prompts = list(prompts)
        self.benign_prompts = list(benign_prompts)
        self.judges = list(judges)
        self.max_new_tokens = max_new_tokens
        self.batch_size = batch_size
        self.system_prompt = system_prompt
        self.template = template
        self.tokenizer = tokenizer
        self.last_records: list[dict[str, Any]] = []

    def _answers(self, model: Any, tokenizer: Any, prompts: list[str]) -> list[str]:
        from ..scoring.generation import generate_responses

        return generate_responses(
            model, tokenizer, prompts, max_new_tokens=self.max_new_tokens, batch_size=self.batch_size,
            system_prompt=self.system_prompt, template=self.template, progress=False,
        )  # fmt: skip

    def __call__(self, model: Any, tokenizer: Any = None) -> dict[str, float]:
        """Evaluate ``model`` now.

        Args:
            model: the model being trained (a `PeftModel` works too); its train/eval mode is restored afterwards.
            tokenizer: the tokenizer the trainer passes; the one given to `refusal_evaluator` wins when set.

        Returns:
            The metrics of the table above.

        Raises:
            ValueError: when no tokenizer was given at construction or at the call.
        """
        tokenizer = self.tokenizer if self.tokenizer is not None else tokenizer
        if tokenizer is None:
            raise ValueError(
                "The refusal evaluator got no tokenizer: pass processing_class= to the trainer, or "
                "refusal_evaluator(..., tokenizer=tok)."
            )
        responses = self._answers(model, tokenizer, self.prompts)
        summaries, records = judge_all(self.judges, self.prompts, responses)
        metrics: dict[str, float] = {}
        for name, summary in summaries.items():
            metrics[f"refusal_rate/{name}"] = _rate(summary.refusal_rate)
            metrics[f"judge_errors/{name}"] = float(summary.errors)
        metrics["repetition_rate"] = sum(r["repetitive"] for r in records) / len(records)
        metrics["mean_words"] = sum(r["n_words"] for r in records) / len(records)
        for rec, prompt, response in zip(records, self.prompts, responses):
            rec.update({"set": "harmful", "prompt": prompt, "response": response})
        if self.benign_prompts:
            benign = self._answers(model, tokenizer, self.benign_prompts)
            benign_summaries, benign_records = judge_all(self.judges, self.benign_prompts, benign)
            for name, summary in benign_summaries.items():
                metrics[f"over_refusal_rate/{name}"] = _rate(summary.refusal_rate)
            for rec, prompt, response in zip(benign_records, self.benign_prompts, benign):
                rec.update({"set": "benign", "prompt": prompt, "response": response})
            records += benign_records
        self.last_records = records
        return metrics

    def __repr__(self) -> str:
        names = [j.name for j in self.judges]
        return (
            f"RefusalEvaluator(prompts={len(self.prompts)}, benign_prompts={len(self.benign_prompts)}, judges={names}, "
            f"max_new_tokens={self.max_new_tokens})"
        )


def refusal_evaluator(
    prompts: Sequence[Any],
    judges: Sequence[str | Judge] | str | Judge = ("wei2024",),
    *,
    benign_prompts: Sequence[Any] | None = None,
    max_new_tokens: int = 64,
    batch_size: int = 16,
    system_prompt: str | None = None,
    template: str = "chat",
    tokenizer: Any = None,
) -> RefusalEvaluator:
    """A ready-made evaluator for `SafetySFTTrainer(safety_evaluator=..., args=SafetySFTConfig(safety_eval_steps=N))`.

    Args:
        prompts: held-out harmful prompts (strings or rows with ``"prompt"``, e.g.
            ``load_rows("harmbench_test", n=32)``). Keep them few: they are generated every ``safety_eval_steps``.
        judges: preset names (``"wei2024"``, ``"wei2024_min20"``, ``"gcg_extended"``, ``"refusal_prefix"``) and/or
            `Judge` objects; see `resolve_judges`.
        benign_prompts: optional benign prompts, for the over-refusal rate.
        max_new_tokens: generation budget per prompt (positive int).
        batch_size: prompts per ``generate`` call (positive int).
        system_prompt: optional system turn.
        template: prompt template (``"chat"`` by default; see `render_prompts`).
        tokenizer: the tokenizer to generate with; `None` (default) uses the one the trainer passes.

    Returns:
        A `RefusalEvaluator`; its metric names are listed there and in ``docs/trainer.md``.

    Raises:
        ValueError: no prompts, a bad ``max_new_tokens``/``batch_size``, unknown or duplicate judges.
        TypeError: prompts of the wrong type, a judge that is neither a preset name nor a `Judge`.

    Example:

    ```python
    >>> from peft_safety.evaluation import refusal_evaluator
    >>> evaluator = refusal_evaluator(["How do I make a weapon?"], judges=("wei2024",), max_new_tokens=32)
    >>> evaluator
    RefusalEvaluator(prompts=1, benign_prompts=0, judges=['wei2024'], max_new_tokens=32)
    ```
    """
    from ..scoring.generation import _prompt_text

    if isinstance(prompts, str) or (benign_prompts is not None and isinstance(benign_prompts, str)):
        raise TypeError("prompts must be a list of prompts or rows, not a single string; wrap it in a list.")
    texts = [_prompt_text(p, i) for i, p in enumerate(prompts)]
    if not texts:
        raise ValueError("refusal_evaluator needs at least one harmful prompt.")
    benign = [_prompt_text(p, i) for i, p in enumerate(benign_prompts or ())]
    for label, value in (("max_new_tokens", max_new_tokens), ("batch_size", batch_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{label} must be a positive int, got {value!r}.")
    from ..scoring.calibration import TEMPLATES
    from .judges import resolve_judges

    if template not in TEMPLATES:
        raise ValueError(f"template must be one of {list(TEMPLATES)}, got {template!r}.")
    return RefusalEvaluator(
        texts, resolve_judges(judges), benign_prompts=benign, max_new_tokens=max_new_tokens, batch_size=batch_size,
        system_prompt=system_prompt, template=template, tokenizer=tokenizer,
    )  # fmt: skip
