"""Train the judges that `benchmarks/judge/agreement.py` measures, from no evaluation source, and record how.

* ``classifier``: the default `ClassifierJudge` (`peft_safety.recipes.judges.train_default_classifier`): UncensorBench
  refusal/compliant pairs, FiQA and forgelm answers, built-in non-answers; checked by n-gram overlap against every
  evaluation source (`EVALUATION_SOURCES`); ``--pool-check-only`` reports its overlap with the validation pool.
  Saved to ``benchmarks/results/judge/classifier/classifier_judge.safetensors``.
* ``rubric``: `RubricJudge` on Qwen2.5-Coder-0.5B-Instruct, calibrated on a class-stratified sample of the same
  training examples; its held-out-topic agreement on the synthetic examples is measured too. Saved to
  ``benchmarks/results/judge/rubric/rubric_judge.json``.

Writes ``benchmarks/results/judge/judges.json`` (sources, leak checks, synthetic held-out agreement, timings).
Nothing here reads the labels or judges the pool.

Usage::

    PYTHONPATH=$PWD python benchmarks/judge/train_judges.py [--only classifier|rubric]
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "benchmarks" / "results" / "judge"


def _pool_texts(results: Path) -> list[dict[str, Any]]:
    path = results / "generations.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def pool_overlap(results: Path) -> dict[str, Any]:
    """Overlap of the default training examples with the validation pool's prompts and responses (a report: the
    pool is no training source, but a published refusal template can equal a model's stock refusal word for word)."""
    from collections import Counter

    from peft_safety.evaluation.classifier_judge import leak_report
    from peft_safety.recipes.judges import _CLASSIFIER_SETTINGS, judge_training_examples

    examples, _ = judge_training_examples(shapes=_CLASSIFIER_SETTINGS["shapes"])
    pool = _pool_texts(results)
    sets = {"pool_prompts": [g["prompt"] for g in pool], "pool_responses": [g["response"] for g in pool]}
    report = leak_report(examples, sets, max_listed=10_000)
    out: dict[str, Any] = {"n_pool": len(pool)}
    for name, rep in report.items():
        leaked = set(rep["examples"])
        out[name] = {
            "n_training_texts": rep["n_leaked"],
            "distinct_texts": sorted(Counter(rep["examples"])),
            "training_sources": dict(Counter(e.source for e in examples if e.prompt[:160] in leaked
                                             or e.response[:160] in leaked)),
        }  # fmt: skip
    return out


def train_classifier(results: Path) -> dict[str, Any]:
    from peft_safety.recipes.judges import train_default_classifier

    t = time.perf_counter()
    judge = train_default_classifier(results / "classifier")
    seconds = time.perf_counter() - t
    meta = judge.metadata
    return {
        "file": "benchmarks/results/judge/classifier/classifier_judge.safetensors",
        "settings": meta["settings"],
        "training_sources": meta["training_sources"],
        "train_counts": meta["train_counts"],
        "n_examples": meta["n_examples"],
        "leak_check": meta["leak_check"],
        "synthetic_held_out_topics": meta["synthetic_held_out_topics"],
        "held_out_groups": meta["held_out_groups"],
        "seconds": round(seconds, 1),
    }


def train_rubric(results: Path, threads: int) -> dict[str, Any]:
    from peft_safety.evaluation.classifier_judge import split_examples
    from peft_safety.evaluation.model_judge import RubricJudge
    from peft_safety.recipes.judges import RUBRIC_MODEL, judge_training_examples
    from peft_safety.sources.models import load_model

    t = time.perf_counter()
    model, tok = load_model(RUBRIC_MODEL)
    model.eval()
    examples, info = judge_training_examples()
    train, held = split_examples(examples, holdout=0.2, seed=0)
    rng = random.Random(0)

    def stratified(rows: list[Any], per: int) -> list[Any]:
        out = []
        for label in ("refusal", "compliant", "non_answer"):
            group = [e for e in rows if e.label == label]
            out += rng.sample(group, min(per, len(group)))
        rng.shuffle(out)
        return out

    calib, test = stratified(train, 50), stratified(held, 30)
    judge = RubricJudge(model, tok, batch_size=8)
    x_calib = judge.letter_logprobs([e.prompt for e in calib], [e.response for e in calib])
    x_test = judge.letter_logprobs([e.prompt for e in test], [e.response for e in test])
    labels = ("refusal", "compliant", "non_answer")
    gold = [e.label for e in test]
    raw_pred = [labels[i] for i in x_test.argmax(-1).tolist()]
    cal = judge.calibrate(calib, logprobs=x_calib)
    cal_pred = [labels[i] for i in judge._logits(x_test).argmax(-1).tolist()]
    from peft_safety.evaluation.stats import cohen_kappa

    def score(pred: list[str]) -> dict[str, float]:
        return {"accuracy": round(sum(a == b for a, b in zip(gold, pred)) / len(gold), 4),
                "kappa": round(cohen_kappa(gold, pred), 4)}  # fmt: skip

    seconds = time.perf_counter() - t
    judge.save_pretrained(results / "rubric", judge_model=RUBRIC_MODEL, n_calibration=len(calib))
    return {
        "file": "benchmarks/results/judge/rubric/rubric_judge.json",
        "judge_model": RUBRIC_MODEL,
        "template_sha256": judge.template_sha256,
        "n_calibration": len(calib),
        "n_synthetic_test": len(test),
        "calibration": cal,
        "synthetic_held_out_topics": {"raw": score(raw_pred), "calibrated": score(cal_pred)},
        "leak_check": info["leak_check"],
        "seconds": round(seconds, 1),
        "threads": threads,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--results", default=str(RESULTS))
    ap.add_argument("--only", choices=("classifier", "rubric"), default=None)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument(
        "--pool-check-only",
        action="store_true",
        help="Only (re)check the training examples against the pool as it is now (the pool grows by stage).",
    )
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    results = Path(args.results)
    path = results / "judges.json"
    record = json.loads(path.read_text()) if path.is_file() else {}
    if args.pool_check_only:
        record["pool_overlap"] = pool_overlap(results)
        from peft_safety._io import atomic_write_text

        atomic_write_text(path, json.dumps(record, indent=1) + "\n")
        print(json.dumps(record["pool_overlap"]))
        return 0
    new: dict[str, Any] = {}
    if args.only in (None, "classifier"):
        new["classifier"] = train_classifier(results)
        print(json.dumps(new["classifier"]["synthetic_held_out_topics"]["accuracy"]), flush=True)
    if args.only in (None, "rubric"):
        new["rubric"] = train_rubric(results, args.threads)
        print(json.dumps(new["rubric"]["synthetic_held_out_topics"]), flush=True)
    from peft_safety._io import atomic_write_text

    # re-read: another run (e.g. the other judge) may have written the file meanwhile
    record = {**(json.loads(path.read_text()) if path.is_file() else {}), **new}
    atomic_write_text(path, json.dumps(record, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
