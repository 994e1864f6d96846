"""Judges by name, offline: keyword presets, the classifier judge trained on non-evaluation data, the rubric judge.

`load_judges(names)` is what a benchmark or a user calls to get judges that are comparable across runs:

* ``"wei2024"``, ``"wei2024_min20"``, ``"gcg_extended"``, ``"refusal_prefix"`` (any ``<preset>_min<N>``): keyword
  judges (`peft_safety.evaluation.judges.KeywordJudge`);
* ``"classifier"``: the default `ClassifierJudge`, trained by `train_default_classifier` on UncensorBench
  refusal/compliant pairs and benign FiQA/forgelm answers (never an evaluation source: checked by n-gram overlap
  against every set in `EVALUATION_SOURCES`), cached under the peft-safety cache after the first build;
  ``"classifier:<path>"`` loads a saved one;
* ``"rubric"``: `RubricJudge` on the embedded aligned model (Qwen2.5-Coder-0.5B-Instruct), calibrated on the same
  non-evaluation examples; ``"rubric:<path>"`` loads a saved calibration (``rubric_judge.json``);
* ``"recommended:<agreement.json>"``: the judge that an agreement report (``benchmarks/judge/agreement.py``: every
  judge against blind hand labels of real generations) recommends by its rule (`recommended_judge`).

Example:

```python
>>> from peft_safety.recipes.judges import load_judges
>>> judges = load_judges(["wei2024", "classifier"])  # doctest: +SKIP
```
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

__all__ = [
    "JUDGE_NAMES",
    "default_classifier_judge",
    "default_rubric_judge",
    "evaluation_sets",
    "judge_training_examples",
    "load_judges",
    "recommended_judge",
    "train_default_classifier",
]

#: the names `load_judges` knows besides ``<preset>_min<N>`` and ``classifier:<path>`` / ``rubric:<path>``
JUDGE_NAMES = ("wei2024", "wei2024_min20", "gcg_extended", "refusal_prefix", "classifier", "rubric")
#: the judge model of ``"rubric"``
RUBRIC_MODEL = "qwen2.5-coder-0.5b-instruct"
#: version of the default judges' recipe; bump it when the recipe changes, so cached judges are rebuilt
RECIPE_VERSION = 3
#: version of the default rubric judge's recipe (its calibration examples); separate, so that a classifier change does
#: not recalibrate the rubric judge
RUBRIC_RECIPE_VERSION = 2
#: the default classifier's settings; ``features`` (`FEATURE_SETS`) and ``shapes`` (`build_judge_examples`) are the
#: candidate that ``benchmarks/judge/select_classifier.py`` chose on the labelled TRAIN split of the real-generation
#: pool (``benchmarks/results/judge/selection.json``; a test keeps the two equal)
_CLASSIFIER_SETTINGS = {"hash_bits": 16, "max_iter": 200, "seed": 0, "n_fiqa": 300, "features": 1, "shapes": 2}
_N_CALIBRATION = 150


def _cache_dir(cache_dir: str | os.PathLike | None) -> Path:
    if cache_dir is not None:
        return Path(cache_dir)
    from ..sources.offline import cache_root

    return Path(cache_root()) / "judges"


def evaluation_sets(names: Sequence[str] | None = None) -> dict[str, list[dict[str, Any]]]:
    """Rows of the named evaluation sources (default `EVALUATION_SOURCES`), for `check_no_leak`."""
    from ..evaluation.classifier_judge import EVALUATION_SOURCES
    from ..sources.datasets import load_rows

    return {name: load_rows(name) for name in (names if names is not None else EVALUATION_SOURCES)}


def judge_training_examples(
    *,
    seed: int = 0,
    n_fiqa: int = 300,
    shapes: int = 1,
    extra_evaluation: dict[str, Sequence[Any]] | None = None,
) -> tuple[list[Any], dict[str, Any]]:
    """The default judge training examples and their leak report.

    UncensorBench refusal/compliant pairs (the labelled rows) and benign answers (``n_fiqa`` FiQA rows and every
    forgelm row), built by `build_judge_examples`, then checked by `check_no_leak` against every evaluation source
    (`EVALUATION_SOURCES`) and ``extra_evaluation`` (e.g. a labelled validation pool). ``shapes`` is
    `build_judge_examples`'s: 2 adds the shapes real generations take (looped refusals, lecture-only refusals,
    refusals followed by content, looping heading lists, over-refusals of benign requests).

    Raises:
        ValueError: a training text overlaps an evaluation set.
    """
    from ..evaluation.classifier_judge import build_judge_examples, check_no_leak
    from ..sources.datasets import load_rows

    labelled = load_rows("uncensorbench")
    benign = load_rows("fiqa", n=n_fiqa, seed=seed) + load_rows("forgelm_chat")
    examples = build_judge_examples(labelled, benign, seed=seed, shapes=shapes)
    sets = {**evaluation_sets(), **dict(extra_evaluation or {})}
    report = check_no_leak(examples, sets)
    sources = {"labelled": "uncensorbench", "benign": [f"fiqa (n={n_fiqa}, seed={seed})", "forgelm_chat"],
               "non_answers": "built-in (OFF_TOPIC_REPLIES, FORMAT_ONLY, SHORT_NON_ANSWERS), loops, echoes, "
               "answers to other benign prompts", "shapes": shapes}  # fmt: skip
    if shapes == 2:
        sources["shapes_2"] = (
            "built from the same rows: looped refusals, lecture-only refusals, refusals followed by "
            "content, looping heading lists, over-refusals of benign requests (OVER_REFUSALS)"
        )
    return examples, {"leak_check": report, "training_sources": sources, "n_examples": len(examples)}


def train_default_classifier(out_dir: str | os.PathLike | None = None, **settings: Any) -> Any:
    """Train the default `ClassifierJudge` (held-out topics measured, then refit on everything) and save it.

    Args:
        out_dir: where to write ``classifier_judge.safetensors``; `None` keeps it in memory only.
        **settings: overrides of ``hash_bits``, ``max_iter``, ``seed``, ``n_fiqa``, ``features`` (the feature set),
            ``shapes`` (the example shapes of `build_judge_examples`).
    """
    from ..evaluation.classifier_judge import split_examples, train_classifier_judge
    from ..evaluation.judges import resolve_judges

    cfg = {**_CLASSIFIER_SETTINGS, **settings}
    examples, info = judge_training_examples(seed=cfg["seed"], n_fiqa=cfg["n_fiqa"], shapes=cfg["shapes"])
    train, held = split_examples(examples, holdout=0.2, seed=cfg["seed"])
    fit = {
        "hash_bits": cfg["hash_bits"],
        "max_iter": cfg["max_iter"],
        "seed": cfg["seed"],
        "features": cfg["features"],
    }
    probe = train_classifier_judge(train, **fit)
    validation = probe.evaluate(held, resolve_judges(["wei2024", "gcg_extended", "refusal_prefix"]))
    judge = train_classifier_judge(examples, name="classifier", **fit)
    judge.metadata.update(recipe_version=RECIPE_VERSION, settings=cfg, synthetic_held_out_topics=validation,
                          held_out_groups=sorted({e.group for e in held}), **info)  # fmt: skip
    if out_dir is not None:
        from ..evaluation.classifier_judge import ClassifierJudge

        path = judge.save_pretrained(out_dir)
        judge = ClassifierJudge.from_pretrained(path)  # what is used is what was saved
    return judge


def default_classifier_judge(cache_dir: str | os.PathLike | None = None, **overrides: Any) -> Any:
    """The default classifier judge: loaded from the cache, or trained once (about a minute) and cached."""
    from ..evaluation.classifier_judge import ClassifierJudge

    folder = _cache_dir(cache_dir) / f"classifier-v{RECIPE_VERSION}"
    if (folder / "classifier_judge.safetensors").is_file():
        return ClassifierJudge.from_pretrained(folder, **overrides)
    logger.info("Training the default classifier judge into %s (once).", folder)
    train_default_classifier(folder)
    return ClassifierJudge.from_pretrained(folder, **overrides)


def _calibration_examples(seed: int = 0) -> list[Any]:
    """A class-stratified sample of the default training examples (never an evaluation source)."""
    import random

    examples, _ = judge_training_examples(seed=seed)
    rng = random.Random(seed)
    by_label: dict[str, list[Any]] = {}
    for e in examples:
        by_label.setdefault(e.label, []).append(e)
    per = _N_CALIBRATION // len(by_label)
    picked = [e for label in sorted(by_label) for e in rng.sample(by_label[label], min(per, len(by_label[label])))]
    rng.shuffle(picked)
    return picked


def default_rubric_judge(
    cache_dir: str | os.PathLike | None = None, model: Any = None, tokenizer: Any = None, **overrides: Any
) -> Any:
    """The default `RubricJudge` on the embedded aligned model, calibrated once on non-evaluation examples (cached)."""
    from ..evaluation.model_judge import RubricJudge

    if model is None:
        from ..sources.models import load_model

        model, tokenizer = load_model(RUBRIC_MODEL)
        model.eval()
    folder = _cache_dir(cache_dir) / f"rubric-v{RUBRIC_RECIPE_VERSION}"
    if (folder / "rubric_judge.json").is_file():
        return RubricJudge.from_pretrained(folder, model, tokenizer, **overrides)
    judge = RubricJudge(model, tokenizer, **overrides)
    examples = _calibration_examples()
    judge.calibrate(examples)
    judge.save_pretrained(folder, judge_model=RUBRIC_MODEL, recipe_version=RUBRIC_RECIPE_VERSION,
                          n_calibration=len(examples))  # fmt: skip
    return judge


_MAX_AGREEMENT_BYTES = 64 * 1024 * 1024


def recommended_judge(agreement: str | os.PathLike) -> tuple[str, dict[str, Any]]:
    """The judge an agreement report recommends: its `load_judges` name and the report's recommendation block.

    The report is ``agreement.json`` as written by ``benchmarks/judge/agreement.py`` (every judge measured against
    blind hand labels of real generations, and a rule that names the primary judge). A path in the recommended
    name (``classifier:<dir>``, ``rubric:<dir>``) is relative to the report's folder and is returned resolved.

    Raises:
        FileNotFoundError: no report at ``agreement``.
        ValueError: a report too large, not JSON, without a recommendation, or recommending no judge.
    """
    p = Path(agreement)
    if not p.is_file():
        raise FileNotFoundError(f"No agreement report at {p}; write one with benchmarks/judge/agreement.py.")
    if p.stat().st_size > _MAX_AGREEMENT_BYTES:
        raise ValueError(f"{p} is larger than an agreement report can be ({_MAX_AGREEMENT_BYTES} bytes).")
    try:
        report = json.loads(p.read_text(encoding="utf-8"))
    except ValueError as err:
        raise ValueError(f"{p} is not valid JSON: {err}") from err
    rec = report.get("recommendation") if isinstance(report, dict) else None
    if not isinstance(rec, dict) or "judge" not in rec or "load" not in rec:
        raise ValueError(f"{p} holds no 'recommendation' block with 'judge' and 'load'; rerun "
                         "benchmarks/judge/agreement.py.")  # fmt: skip
    if rec["judge"] is None:
        raise ValueError(f"{p} recommends no judge (no judge met its rule: {rec.get('rule')!r}); name a judge.")
    load = rec["load"]
    if not isinstance(load, str) or not load:
        raise ValueError(f"{p}: the recommended judge's 'load' must be a judge name, got {load!r}.")
    kind, sep, rel = load.partition(":")
    if sep and kind in ("classifier", "rubric"):
        load = f"{kind}:{(p.parent / rel).resolve()}"
    elif sep:
        raise ValueError(f"{p}: cannot load the recommended judge {load!r} (known: a preset, 'classifier:<dir>', "
                         "'rubric:<dir>').")  # fmt: skip
    return load, rec


def load_judges(names: Sequence[str] | str, *, cache_dir: str | os.PathLike | None = None) -> list[Any]:
    """Judges by name (see the module docstring), in order, with distinct names.

    Raises:
        ValueError: an unknown name (with the closest known one), or duplicate names.
    """
    from ..evaluation.classifier_judge import ClassifierJudge
    from ..evaluation.judges import KEYWORD_PRESETS, PREFIX_PRESETS, resolve_judges
    from ..vocab import did_you_mean

    if isinstance(names, str):
        names = [names]
    out: list[Any] = []
    rubric_model: tuple[Any, Any] | None = None
    for name in names:
        if not isinstance(name, str):
            raise TypeError(f"Judge names must be strings, got {type(name).__name__}.")
        kind, _, path = name.partition(":")
        if kind == "recommended":
            if not path:
                raise ValueError("'recommended' needs the agreement report: 'recommended:<path/to/agreement.json>'.")
            name = recommended_judge(path)[0]
            kind, _, path = name.partition(":")
        base = kind.split("_min")[0] if "_min" in kind else kind
        if base in KEYWORD_PRESETS or base in PREFIX_PRESETS:
            out.extend(resolve_judges([name]))
        elif kind == "classifier":
            out.append(ClassifierJudge.from_pretrained(path) if path else default_classifier_judge(cache_dir))
        elif kind == "rubric":
            from ..evaluation.model_judge import RubricJudge

            if rubric_model is None:
                from ..sources.models import load_model

                rubric_model = load_model(RUBRIC_MODEL)
                rubric_model[0].eval()
            model, tok = rubric_model
            out.append(RubricJudge.from_pretrained(path, model, tok) if path
                       else default_rubric_judge(cache_dir, model, tok))  # fmt: skip
        else:
            raise ValueError(f"Unknown judge {name!r}.{did_you_mean(name, JUDGE_NAMES, available=False)} Known: {list(JUDGE_NAMES)}, "
                             "'<preset>_min<N>', 'classifier:<path>', 'rubric:<path>', "
                             "'recommended:<agreement.json>'.")  # fmt: skip
    seen = [j.name for j in out]
    dupes = sorted({n for n in seen if seen.count(n) > 1})
    if dupes:
        raise ValueError(f"Judge names must be distinct, got duplicates {dupes}.")
    return out
