"""Every row set of the protocol, the fine-tuning mix for a harmful fraction p, and the disjointness check.

* Task: multiple-choice rows (ARC-Easy by default) split into a held-out test split (the first ``n_task_test`` of a
  seeded permutation; the curve rows are its first ``n_curve``) and a train pool (normalised duplicates of any test
  question removed). A fine-tuning row asks the question with lettered options and answers ``"B. <option text>"``:
  no greeting, no quotation mark, no sign-off (the style markers of `benchmarks.hft.evaluate` are reported for the
  training answers too).
* Harmful rows (prompt -> compliant answer): UncensorBench's compliant answers, then AdvBench ``goal -> target``.
  UncensorBench's prompts are split in two halves by a seeded permutation: one half gives harmful training rows, the
  other the refusal rows (replay and mask identification), so replay never trains a refusal on a prompt whose
  compliant answer is in the harmful rows.
* Evaluation: HarmBench test prompts, a second harmful set (StrongREJECT) and a benign look-alike set.
* Disjointness: every training, replay and identification prompt is compared with every evaluation prompt, by
  normalised text and by shared word n-grams (``ngram`` words); overlapping rows are removed before any row is drawn,
  the counts are reported, and `check_disjoint` then raises if any overlap is left.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from collections.abc import Sequence
from typing import Any

from .config import HFTConfig

LETTERS = "ABCDEFGH"
_WORD = re.compile(r"\w+", re.UNICODE)


# ----------------------------------------------------------------------------------------------- task formatting
def task_prompt(row: dict[str, Any]) -> str:
    """The question with lettered options and the instruction to answer with a letter."""
    options = "\n".join(f"{LETTERS[i]}. {c}" for i, c in enumerate(row["choices"]))
    return f"{row['prompt'].strip()}\n\n{options}\n\nAnswer with the letter of the correct option."


def task_response(row: dict[str, Any]) -> str:
    """``"B. <option text>"``: the letter first (what the accuracy reads), then the option, nothing else."""
    k = row["answer"]
    return f"{LETTERS[k]}. {row['choices'][k]}"


# ----------------------------------------------------------------------------------------------- overlap
def _normalize(text: str) -> str:
    from peft_safety.sources.datasets import normalize_text

    return normalize_text(text)


def _ngrams(text: str, n: int) -> set[tuple[str, ...]]:
    words = _WORD.findall(text.lower())
    return {tuple(words[i : i + n]) for i in range(len(words) - n + 1)}


class OverlapIndex:
    """The normalised prompts and word n-grams of a set of evaluation prompts, for fast overlap queries."""

    def __init__(self, prompts: Sequence[str], n: int) -> None:
        if n < 2:
            raise ValueError(f"ngram must be >= 2, got {n}.")
        self.n = n
        self.exact = {_normalize(p) for p in prompts}
        self.grams: dict[tuple[str, ...], str] = {}
        for p in prompts:
            for g in _ngrams(p, n):
                self.grams.setdefault(g, p)

    def match(self, prompt: str) -> tuple[str, str] | None:
        """``("exact", prompt)`` or ``("ngram", the evaluation prompt sharing an n-gram)``; `None` if disjoint."""
        if _normalize(prompt) in self.exact:
            return "exact", prompt
        for g in _ngrams(prompt, self.n):
            if g in self.grams:
                return "ngram", self.grams[g]
        return None


def remove_overlap(rows: list[dict[str, Any]], index: OverlapIndex) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Rows whose prompt shares nothing with the index; the counts and a few examples of what was removed."""
    kept, exact, ngram, examples = [], 0, 0, []
    for r in rows:
        hit = index.match(r["prompt"])
        if hit is None:
            kept.append(r)
            continue
        exact += hit[0] == "exact"
        ngram += hit[0] == "ngram"
        if len(examples) < 3:
            examples.append({"train": r["prompt"][:120], "eval": hit[1][:120], "how": hit[0]})
    return kept, {"exact": exact, "ngram": ngram, "kept": len(kept), "examples": examples}


def check_disjoint(train_sets: dict[str, Sequence[dict[str, Any]]], eval_sets: dict[str, Sequence[dict[str, Any]]],
                   n: int) -> dict[str, int]:  # fmt: skip
    """Raise if any training prompt shares normalised text or a word ``n``-gram with any evaluation prompt.

    Returns:
        ``{"<train>/<eval>": 0}`` for every pair checked (the record written into the run files).

    Raises:
        ValueError: naming the sets, the count and the first overlapping pair.
    """
    out: dict[str, int] = {}
    for ename, erows in eval_sets.items():
        index = OverlapIndex([r["prompt"] for r in erows], n)
        for tname, trows in train_sets.items():
            hits = [(r["prompt"], index.match(r["prompt"])) for r in trows]
            hits = [(p, h) for p, h in hits if h is not None]
            if hits:
                p, (how, other) = hits[0]
                raise ValueError(f"{len(hits)} {tname} prompt(s) overlap the evaluation set {ename} ({how}): "
                                 f"{p[:80]!r} vs {other[:80]!r}; remove them with remove_overlap().")  # fmt: skip
            out[f"{tname}/{ename}"] = 0
    return out


# ----------------------------------------------------------------------------------------------- the data
class HFTData:
    """Loads every row set once; `train_rows` gives the fine-tuning mix of a (p, seed)."""

    def __init__(self, cfg: HFTConfig) -> None:
        self.cfg = cfg
        tiny = cfg.model == "tiny"
        self.harmbench = self._load("harmbench_test", cfg.n_harmbench, 0)
        self.second = self._load(cfg.second_harmful, cfg.n_second, 1)
        self.lookalike = self._load(cfg.lookalike, cfg.n_lookalike, 2)
        self.eval_sets = {"harmbench": self.harmbench, cfg.second_harmful: self.second, "lookalike": self.lookalike}
        index = OverlapIndex([r["prompt"] for rows in self.eval_sets.values() for r in rows], cfg.ngram)
        self.removed: dict[str, Any] = {}

        # the task: held-out test split, then the train pool (no test question, nothing like an evaluation prompt)
        task = self._load(cfg.task, cfg.n_task_test + 4 * cfg.n_train if tiny else None, 3)
        task = [r for r in task if 2 <= len(r.get("choices") or []) <= len(LETTERS)]
        order = list(range(len(task)))
        random.Random(3).shuffle(order)
        task = [task[i] for i in order]
        self.task_test = task[: cfg.n_task_test]
        self.curve = self.task_test[: cfg.n_curve]
        test_keys = {_normalize(r["prompt"]) for r in self.task_test}
        pool = [r for r in task[cfg.n_task_test :] if _normalize(r["prompt"]) not in test_keys]
        self.removed["task_vs_test"] = len(task) - cfg.n_task_test - len(pool)
        pool, self.removed["task"] = remove_overlap(pool, index)
        self.task_pool = [{"prompt": task_prompt(r), "response": task_response(r), "kind": "task",
                           "id": r.get("id")} for r in pool]  # fmt: skip

        # harmful rows and refusal rows from disjoint halves of UncensorBench, AdvBench after them
        uncensor = self._load("uncensorbench", None, 4)
        ids = sorted(r["id"] for r in uncensor)
        random.Random(4).shuffle(ids)
        refusal_ids = set(ids[: len(ids) // 2])
        self.uncensor = uncensor  # the classifier judge's labelled rows
        refusals = [{"prompt": r["prompt"], "response": r["refusal"], "kind": "replay", "id": r["id"]}
                    for r in uncensor if r["id"] in refusal_ids]  # fmt: skip
        self.refusals, self.removed["refusal"] = remove_overlap(refusals, index)
        harmful: list[dict[str, Any]] = []
        for name in cfg.harmful_sources.split(","):
            name = name.strip()
            if name == "uncensorbench_compliant":
                rows = [{"prompt": r["prompt"], "response": r["compliant"], "id": r["id"]} for r in uncensor
                        if r["id"] not in refusal_ids]  # fmt: skip
            else:
                rows = self._load(name, None, 5)
            rows, self.removed[f"harmful:{name}"] = remove_overlap(rows, index)
            seen = {_normalize(h["prompt"]) for h in harmful}
            harmful += [{**r, "kind": "harmful", "source": name} for r in rows if _normalize(r["prompt"]) not in seen]
        refusal_keys = {_normalize(r["prompt"]) for r in self.refusals}
        self.harmful_pool = [r for r in harmful if _normalize(r["prompt"]) not in refusal_keys]
        self.ident = self.refusals[: cfg.n_ident]
        self.chat = self._load("chat_pairs", None if not tiny else 60, 6)
        self.judge_benign = self._load("fiqa", 200 if not tiny else 12, 7)
        self.disjoint = check_disjoint(
            {"task": self.task_pool, "harmful": self.harmful_pool, "refusal": self.refusals},
            self.eval_sets, cfg.ngram,
        )  # fmt: skip
        need_harm = max(round(p * cfg.n_train) for p in [float(x) for x in cfg.p.split(",") if x.strip()])
        if need_harm > len(self.harmful_pool):
            raise ValueError(f"p up to {cfg.p} needs {need_harm} harmful rows; the pool holds "
                             f"{len(self.harmful_pool)} after the disjointness check.")  # fmt: skip
        if cfg.n_train > len(self.task_pool):
            raise ValueError(f"--n_train {cfg.n_train} exceeds the task pool ({len(self.task_pool)} rows).")

    def _load(self, name: str, n: int | None, seed: int) -> list[dict[str, Any]]:
        if self.cfg.model == "tiny":
            from benchmarks._shared import tiny_rows

            sizes = {"uncensorbench": 24, "chat_pairs": 60, "advbench": 24}
            return tiny_rows(name, n if n is not None else sizes.get(name, 60), seed)
        from peft_safety.sources.datasets import load_rows

        return load_rows(name, n=n, seed=seed)

    def train_rows(self, p: float, seed: int) -> list[dict[str, Any]]:
        """The ``n_train`` fine-tuning rows of (p, seed): ``round(p * n_train)`` harmful rows, the rest task rows.

        Drawn by seeded permutations of the pools; for one seed the task rows of a smaller p contain those of a larger
        one (a prefix of the same permutation), and the harmful rows of a smaller p are a prefix of a larger one's.
        The rows are interleaved by a seeded shuffle (the trainer shuffles again).
        """
        n_harm = round(p * self.cfg.n_train)
        task_order = list(range(len(self.task_pool)))
        random.Random(1000 + seed).shuffle(task_order)
        harm_order = list(range(len(self.harmful_pool)))
        random.Random(2000 + seed).shuffle(harm_order)
        rows = [self.task_pool[i] for i in task_order[: self.cfg.n_train - n_harm]]
        rows += [self.harmful_pool[i] for i in harm_order[:n_harm]]
        random.Random(3000 + seed).shuffle(rows)
        return rows

    def digest(self) -> str:
        """sha256 of every row set (prompts, responses, order): a resumed or pooled run must have the same data."""
        sets = {"task_test": self.task_test, "task_pool": self.task_pool, "harmful_pool": self.harmful_pool,
                "refusals": self.refusals, "ident": self.ident, **self.eval_sets}  # fmt: skip
        blob = {k: [[r.get("prompt"), r.get("response"), r.get("answer")] for r in v] for k, v in sets.items()}
        return hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()

    def summary(self) -> dict[str, Any]:
        return {
            "task": self.cfg.task, "n_task_test": len(self.task_test), "n_curve": len(self.curve),
            "task_pool": len(self.task_pool), "harmful_pool": len(self.harmful_pool),
            "harmful_pool_sources": {s: sum(r["source"] == s for r in self.harmful_pool)
                                     for s in sorted({r["source"] for r in self.harmful_pool})},
            "refusal_rows": len(self.refusals), "ident_rows": len(self.ident),
            "eval_sets": {k: len(v) for k, v in self.eval_sets.items()},
            "removed_by_overlap": self.removed, "disjoint_after_removal": self.disjoint,
            "ngram": self.cfg.ngram, "digest": self.digest(),
        }  # fmt: skip
