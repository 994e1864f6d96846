"""Evaluation: refusal and attack success with pluggable judges, over-refusal, and utility.

```python
>>> from peft_safety.sources.datasets import load_rows
>>> from peft_safety.evaluation import evaluate
>>> report = evaluate(model, tok, load_rows("harmbench_test", n=64), load_rows("chat_pairs", n=64))  # doctest: +SKIP
```

Judge failures are errors, never refusals: see `peft_safety.evaluation.judges`. `ClassifierJudge` is an offline
model-based judge (refusal / compliant / non-answer); `peft_safety.evaluation.stats` gives every rate a bootstrap
interval and every comparison of two arms a paired test.
"""

from ..scoring.generation import GenerationStats, generate_responses, generate_with_stats, render_prompts
from .classifier_judge import (
    EVALUATION_SOURCES,
    JUDGE_LABELS,
    ClassifierJudge,
    JudgeExample,
    build_judge_examples,
    check_no_leak,
    leak_report,
    split_examples,
    train_classifier_judge,
)
from .dev_split import DevSplit
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
from .model_judge import RUBRIC_JUDGE_TEMPLATE, RubricJudge
from .refusal import JudgeSummary, RefusalEvaluator, judge_all, refusal_evaluator, summarize_verdicts
from .report import DEFAULT_JUDGES, EvalReport, evaluate, write_jsonl
from .stats import (
    Interval,
    PairedTest,
    bootstrap_ci,
    cohen_kappa,
    mcnemar_exact,
    paired_bootstrap,
    proportion_ci,
    rate_with_ci,
)
from .utility import choice_loglikelihoods, multiple_choice_accuracy, perplexity, sequence_logprobs

__all__ = [
    "DEFAULT_JUDGES",
    "EVALUATION_SOURCES",
    "JUDGE_LABELS",
    "KEYWORD_PRESETS",
    "PREFIX_PRESETS",
    "RUBRIC_JUDGE_TEMPLATE",
    "RUBRIC_TEMPLATE",
    "ClassifierJudge",
    "DevSplit",
    "EvalReport",
    "GenerationStats",
    "Interval",
    "Judge",
    "JudgeExample",
    "JudgeSummary",
    "KeywordJudge",
    "ModelJudge",
    "PairedTest",
    "RefusalEvaluator",
    "RubricJudge",
    "Verdict",
    "bootstrap_ci",
    "build_judge_examples",
    "check_no_leak",
    "choice_loglikelihoods",
    "cohen_kappa",
    "count_words",
    "evaluate",
    "generate_responses",
    "generate_with_stats",
    "is_repetitive",
    "judge_all",
    "leak_report",
    "mcnemar_exact",
    "multiple_choice_accuracy",
    "paired_bootstrap",
    "parse_thescore",
    "perplexity",
    "proportion_ci",
    "rate_with_ci",
    "refusal_evaluator",
    "render_prompts",
    "resolve_judges",
    "sequence_logprobs",
    "split_examples",
    "summarize_verdicts",
    "train_classifier_judge",
    "write_jsonl",
]
