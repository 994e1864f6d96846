"""Evaluation: refusal and attack success with pluggable judges, over-refusal, and utility.

```python
>>> from peft_safety.sources.datasets import load_rows
>>> from peft_safety.evaluation import evaluate
>>> report = evaluate(model, tok, load_rows("harmbench_test", n=64), load_rows("chat_pairs", n=64))  # doctest: +SKIP
```

Judge failures are errors, never refusals: see `peft_safety.evaluation.judges`.
"""

from ..scoring.generation import GenerationStats, generate_responses, generate_with_stats, render_prompts
from .judges import (
    KEYWORD_PRESETS,
    PREFIX_PRESETS,
    RUBRIC_TEMPLATE,
    Judge,
    KeywordJudge,
    ModelJudge,
    Verdict,
    count_words,
    is_repetitive,
    parse_thescore,
    resolve_judges,
)
from .refusal import JudgeSummary, RefusalEvaluator, judge_all, refusal_evaluator, summarize_verdicts
from .report import DEFAULT_JUDGES, EvalReport, evaluate, write_jsonl
from .utility import choice_loglikelihoods, multiple_choice_accuracy, perplexity, sequence_logprobs

__all__ = [
    "DEFAULT_JUDGES",
    "KEYWORD_PRESETS",
    "PREFIX_PRESETS",
    "RUBRIC_TEMPLATE",
    "EvalReport",
    "GenerationStats",
    "Judge",
    "JudgeSummary",
    "KeywordJudge",
    "ModelJudge",
    "RefusalEvaluator",
    "Verdict",
    "choice_loglikelihoods",
    "count_words",
    "evaluate",
    "generate_responses",
    "generate_with_stats",
    "is_repetitive",
    "judge_all",
    "multiple_choice_accuracy",
    "parse_thescore",
    "perplexity",
    "refusal_evaluator",
    "render_prompts",
    "resolve_judges",
    "sequence_logprobs",
    "summarize_verdicts",
    "write_jsonl",
]
