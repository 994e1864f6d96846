"""Choose the classifier judge's feature set and example shapes without looking at the validation labels.

Candidates: ``features`` in {1, 2} (`peft_safety.evaluation.classifier_judge.FEATURE_SETS`: set 2 adds sentence
features) times ``shapes`` in {1, 2} (`build_judge_examples`: shapes 2 adds the shapes real generations take). Two
choices are made, both from the labelled TRAIN split of the pool only (``agreement.split_pool``; the validation split's
labels are never read):

* the shipped classifier (trained on non-evaluation sources only, no pool item): each candidate is trained on the
  default examples and scored on the TRAIN split, which it never trains on (a development set);
* ``classifier_real`` (the default examples plus the TRAIN split): each candidate is scored by grouped
  cross-validation inside the TRAIN split (folds by prompt, every source model's answer to a prompt in one fold; each
  fold's items are predicted by a judge trained on the other folds).

Rule: the highest three-label Cohen's kappa; a tie (within 0.005) goes to the simpler candidate (lower feature set,
then fewer shapes). Writes ``benchmarks/results/judge/selection.json``; `train_judges.py` (shipped classifier) and
`agreement.py` (``classifier_real``) read it.

Usage::

    PYTHONPATH=$PWD nice python benchmarks/judge/select_classifier.py [--folds 3] [--threads 1]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import random
import sys
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "benchmarks" / "results" / "judge"
CANDIDATES = ((1, 1), (1, 2), (2, 1), (2, 2))  # (features, shapes), simplest first
TIE = 0.005


def _agreement_module() -> Any:
    spec = importlib.util.spec_from_file_location("_judge_agreement", Path(__file__).with_name("agreement.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def choose(scores: dict[str, float], tie: float = TIE) -> str:
    """The candidate key (``"f<features>_s<shapes>"``) with the highest score; within ``tie`` of the best, the first
    in `CANDIDATES` order (the simplest)."""
    if not scores:
        raise ValueError("choose needs at least one scored candidate.")
    best = max(scores.values())
    for f, s in CANDIDATES:
        key = f"f{f}_s{s}"
        if key in scores and scores[key] >= best - tie:
            return key
    raise ValueError(f"no candidate of {list(scores)} is one of {CANDIDATES}.")


def prompt_folds(items: list[dict[str, Any]], k: int, seed: int = 0) -> dict[str, int]:
    """``id -> fold``: prompts shuffled (seeded) and dealt to ``k`` folds; every answer to a prompt in one fold."""
    prompts = sorted({g["prompt"] for g in items})
    if len(prompts) < k:
        raise ValueError(f"{len(prompts)} prompts cannot make {k} folds; use --folds {max(2, len(prompts))} or fewer.")
    random.Random(seed).shuffle(prompts)
    fold = {p: i % k for i, p in enumerate(prompts)}
    return {g["id"]: fold[g["prompt"]] for g in items}


def _score(gold: list[str], pred: list[str]) -> dict[str, float]:
    from peft_safety.evaluation.stats import cohen_kappa

    binary = cohen_kappa([x == "refusal" for x in gold], [x == "refusal" for x in pred])
    return {"kappa": round(cohen_kappa(gold, pred), 4), "refusal_vs_not_kappa": round(binary, 4),
            "accuracy": round(sum(a == b for a, b in zip(gold, pred)) / len(gold), 4)}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--results", default=str(RESULTS))
    ap.add_argument("--folds", type=int, default=3)
    ap.add_argument("--weight", type=int, default=5, help="Repeats of each real TRAIN item (classifier_real).")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    ag = _agreement_module()
    from peft_safety._io import atomic_write_text
    from peft_safety.evaluation.classifier_judge import train_classifier_judge
    from peft_safety.recipes.judges import _CLASSIFIER_SETTINGS, judge_training_examples

    t0 = time.perf_counter()
    results = Path(args.results)
    generations = ag.read_jsonl(results / "generations.jsonl")
    split = ag.split_pool(generations)
    labels = ag.load_labels(results / "labels.jsonl", {g["id"] for g in generations})
    train_items = [g for g in generations if split[g["id"]] == "train" and g["id"] in labels]
    # only TRAIN labels from here on
    labels = {g["id"]: labels[g["id"]] for g in train_items}
    gold = [labels[g["id"]]["label"] for g in train_items]
    folds = prompt_folds(train_items, args.folds)
    pool_prompts = [{"prompt": g["prompt"]} for g in generations]
    s = _CLASSIFIER_SETTINGS
    base = {sh: judge_training_examples(shapes=sh, extra_evaluation={"pool_prompts": pool_prompts})[0]
            for sh in sorted({sh for _, sh in CANDIDATES})}  # fmt: skip

    def fit(examples: list[Any], features: int) -> Any:
        return train_classifier_judge(examples, hash_bits=s["hash_bits"], max_iter=s["max_iter"], seed=s["seed"],
                                      features=features)  # fmt: skip

    prompts = [g["prompt"] for g in train_items]
    responses = [g["response"] for g in train_items]
    record: dict[str, Any] = {
        "n_train_items": len(train_items), "n_train_prompts": len(set(prompts)), "folds": args.folds,
        "real_weight": args.weight, "train_label_counts": {lab: gold.count(lab) for lab in ag.LABELS},
        "candidates": {}, "rule": f"highest three-label kappa; within {TIE} of the best, the simpler candidate "
        "(lower feature set, then fewer shapes)", "validation_labels_read": False,
    }  # fmt: skip
    for f, sh in CANDIDATES:
        key, t = f"f{f}_s{sh}", time.perf_counter()
        shipped_pred = fit(base[sh], f).predict(prompts, responses)
        cv_pred = [""] * len(train_items)
        for k in range(args.folds):
            ids = {g["id"] for g in train_items if folds[g["id"]] != k}
            judge = fit([*base[sh], *ag.real_examples(train_items, labels, ids) * args.weight], f)
            held = [i for i, g in enumerate(train_items) if folds[g["id"]] == k]
            for i, label in zip(held, judge.predict([prompts[i] for i in held], [responses[i] for i in held])):
                cv_pred[i] = label
        record["candidates"][key] = {"features": f, "shapes": sh, "n_base_examples": len(base[sh]),
                                     "shipped_on_train_split": _score(gold, shipped_pred),
                                     "real_cross_validated": _score(gold, cv_pred),
                                     "seconds": round(time.perf_counter() - t, 1)}  # fmt: skip
        print(key, json.dumps(record["candidates"][key]), flush=True)
    cands = record["candidates"]
    shipped = choose({k: v["shipped_on_train_split"]["kappa"] for k, v in cands.items()})
    real = choose({k: v["real_cross_validated"]["kappa"] for k, v in cands.items()})
    record["chosen"] = {
        "classifier": {"features": cands[shipped]["features"], "shapes": cands[shipped]["shapes"]},
        "classifier_real": {"features": cands[real]["features"], "shapes": cands[real]["shapes"],
                            "weight": args.weight},
    }  # fmt: skip
    record["seconds_total"] = round(time.perf_counter() - t0, 1)
    record["threads"] = args.threads
    atomic_write_text(results / "selection.json", json.dumps(record, indent=1) + "\n")
    print(json.dumps(record["chosen"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
