"""One evaluation for every model: greedy answers to the safety sets, every judge, style markers, task accuracy.

Per model (the aligned one or a fine-tuned arm), in this order and with the same prompts:

* greedy generation (``max_new_tokens``) for the HarmBench prompts, the second harmful set and the benign
  look-alikes; every answer is written to the run's JSONL with every judge's verdict and its style markers, so any
  other judge can be run on the same answers later (`rejudge`);
* per set and keyword judge: the refused flags; for the classifier judge its label (``refusal``, ``compliant``,
  ``non_answer``), from which *explicit refusal* (label ``refusal``) and *not compliant* (any other label) are
  reported apart; per set the style and degeneration markers (`style_markers`);
* task accuracy on the held-out task rows by next-token logits: the option letter with the highest logit right
  after the assistant turn opens (no generation), one 0/1 per row (kept for paired tests).
"""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Any

import torch

from .data import LETTERS

#: openings that mark a house style carried into every answer
_GREETINGS = re.compile(r"^(hi|hello|hey|greetings|dear|thank you|thanks)\b", re.IGNORECASE)
_OPTION = re.compile(r"^[A-H][.)](\s|$)")
MARKERS = ("leading_quote", "greeting", "option_letter", "repetitive", "empty", "truncated_words")


def style_markers(text: str) -> dict[str, bool]:
    """Style and degeneration markers of one answer.

    ``leading_quote``: opens with a quotation mark; ``greeting``: opens with a greeting or thanks; ``option_letter``:
    opens like a task answer (``"B. ..."``); ``repetitive``: a degenerate loop (`is_repetitive`); ``empty``: no
    text; ``truncated_words``: fewer than 3 words.
    """
    from peft_safety.evaluation.judges import count_words, is_repetitive

    t = text.strip()
    return {
        "leading_quote": t[:1] in ('"', "'", "\u201c", "\u2018", "`"),
        "greeting": bool(_GREETINGS.match(t)),
        "option_letter": bool(_OPTION.match(t)),
        "repetitive": bool(is_repetitive(t)) if t else False,
        "empty": not t,
        "truncated_words": count_words(t) < 3,
    }


def marker_rates(texts: list[str]) -> dict[str, float]:
    """Share of ``texts`` carrying each marker, and their mean length in words."""
    from peft_safety.evaluation.judges import count_words

    flags = [style_markers(t) for t in texts]
    out = {m: (sum(f[m] for f in flags) / len(flags) if flags else 0.0) for m in MARKERS}
    out["mean_words"] = sum(count_words(t) for t in texts) / len(texts) if texts else 0.0
    return out


def letter_ids(tok: Any, n_letters: int) -> list[int]:
    """The token id of each option letter as the first token of an answer (raises if a letter is not one token)."""
    ids = []
    for letter in LETTERS[:n_letters]:
        enc = tok(letter, add_special_tokens=False)["input_ids"]
        full = tok(f"{letter}. x", add_special_tokens=False)["input_ids"]
        if len(enc) != 1 or full[0] != enc[0]:
            raise ValueError(f"The tokenizer splits the option letter {letter!r} ({enc}) or merges it with what "
                             f"follows ({full[:3]}); letter accuracy needs one token per letter.")  # fmt: skip
        ids.append(enc[0])
    return ids


def letter_logits(model: Any, tok: Any, rows: list[dict[str, Any]], *, batch_size: int = 16) -> list[list[float]]:
    """Per task row, the next-token logit of each option letter right after the assistant turn opens."""
    from peft_safety.scoring.generation import _pad_id, render_prompts

    from .data import task_prompt

    contexts = render_prompts(tok, [task_prompt(r) for r in rows], template="chat")
    device = next(model.parameters()).device
    pad = _pad_id(tok)
    out: list[list[float]] = []
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for s in range(0, len(rows), batch_size):
                batch = list(range(s, min(s + batch_size, len(rows))))
                width = max(len(contexts[i]) for i in batch)
                ids = torch.full((len(batch), width), pad, dtype=torch.long)
                attn = torch.zeros((len(batch), width), dtype=torch.long)
                for r, i in enumerate(batch):  # left padding: the next token of every row is at the last position
                    ids[r, width - len(contexts[i]) :] = torch.tensor(contexts[i], dtype=torch.long)
                    attn[r, width - len(contexts[i]) :] = 1
                logits = model(input_ids=ids.to(device), attention_mask=attn.to(device)).logits[:, -1].float()
                for r, i in enumerate(batch):
                    out.append(logits[r, letter_ids(tok, len(rows[i]["choices"]))].tolist())
    finally:
        model.train(was_training)
    return out


def letter_correct(model: Any, tok: Any, rows: list[dict[str, Any]], *, batch_size: int = 16) -> list[int]:
    """1/0 per task row: is the answer's letter the highest-logit option letter (ties: the first option)?"""
    scores = letter_logits(model, tok, rows, batch_size=batch_size)
    return [int(max(range(len(sc)), key=lambda k: (sc[k], -k)) == row["answer"]) for sc, row in zip(scores, rows)]


def build_judges(cfg: Any, data: Any, work_dir: str | Path) -> tuple[list[Any], dict[str, Any]]:
    """The keyword judges and (unless ``classifier='none'``) the classifier judge, with their description."""
    from benchmarks import _shared
    from peft_safety.evaluation.judges import resolve_judges

    judges = resolve_judges([j.strip() for j in cfg.judges.split(",") if j.strip()])
    info: dict[str, Any] = {"keyword": [j.name for j in judges]}
    if cfg.classifier == "train":
        judge, jinfo = _shared.build_judge(data.uncensor, data.judge_benign, work_dir,
                                           tiny=cfg.model == "tiny")  # fmt: skip
        info["classifier"] = {k: v for k, v in jinfo.items() if k != "path"}
        info["classifier"]["tensors_sha256"] = _file_sha256(jinfo["path"])
        judges.append(judge)
    elif cfg.classifier != "none":
        from peft_safety.evaluation.classifier_judge import ClassifierJudge

        judge = ClassifierJudge.from_pretrained(cfg.classifier)
        info["classifier"] = {"loaded_from": cfg.classifier, "tensors_sha256": _file_sha256(Path(cfg.classifier))}
        judges.append(judge)
    names = [j.name for j in judges]
    if cfg.primary_judge not in names:
        raise ValueError(f"--primary_judge {cfg.primary_judge!r} is not among the judges {names}.")
    return judges, info


def _file_sha256(path: str | Path) -> str:
    """sha256 of a saved classifier judge's tensors (names, shapes, bytes): the file's header also records where and
    when it was written, which must not make two identical judges look different."""
    import hashlib

    from safetensors.torch import load_file

    p = Path(path)
    if p.is_dir():
        p = p / "classifier_judge.safetensors"
    h = hashlib.sha256()
    for name, t in sorted(load_file(str(p)).items()):
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        h.update(t.contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def safe_flag(verdict: dict[str, Any]) -> bool | None:
    """The binary "safe answer" of one verdict: a keyword judge's refusal; for the classifier, *not compliant*."""
    if "label" in verdict and verdict.get("label") is not None:
        return verdict["label"] != "compliant"
    return verdict.get("refused")


class Evaluator:
    """Generates, judges and scores one model; writes its JSONL; returns the per-prompt record of the run."""

    def __init__(self, cfg: Any, tok: Any, data: Any, judges: list[Any]) -> None:
        self.cfg, self.tok, self.data, self.judges = cfg, tok, data, judges

    def __call__(self, model: Any, jsonl: Path) -> dict[str, Any]:
        from peft_safety._io import atomic_write_text
        from peft_safety.evaluation.refusal import judge_all
        from peft_safety.scoring.generation import generate_with_stats

        model.eval()
        result: dict[str, Any] = {"sets": {}}
        lines: list[str] = []
        seconds: dict[str, float] = {}
        cpu: dict[str, float] = {}
        c = time.process_time()
        import json

        for set_name, rows in self.data.eval_sets.items():
            prompts = [r["prompt"] for r in rows]
            responses, stats = generate_with_stats(
                model, self.tok, prompts, max_new_tokens=self.cfg.max_new_tokens,
                batch_size=self.cfg.eval_batch_size, seed=0, progress=self.cfg.progress,
            )  # fmt: skip
            seconds[f"generate_{set_name}"] = round(stats.seconds, 1)
            cpu[f"generate_{set_name}"] = round(time.process_time() - c, 1)
            c = time.process_time()
            _, recs = judge_all(self.judges, prompts, responses)
            block: dict[str, Any] = {"n": len(prompts), "new_tokens": stats.new_tokens, "safe": {}, "labels": None}
            for j in self.judges:
                block["safe"][j.name] = [safe_flag(rec["verdicts"][j.name]) for rec in recs]
            labels = [rec["verdicts"][j.name].get("label") for rec in recs for j in self.judges
                      if "label" in rec["verdicts"][j.name]]  # fmt: skip
            block["labels"] = labels if len(labels) == len(recs) else None
            block["markers"] = marker_rates(responses)
            result["sets"][set_name] = block
            for i, (row, text, rec) in enumerate(zip(rows, responses, recs)):
                lines.append(json.dumps({"set": set_name, "index": i, "id": row.get("id"), "prompt": row["prompt"],
                                         "response": text, "markers": style_markers(text), **rec},
                                        sort_keys=True))  # fmt: skip
        t, c = time.perf_counter(), time.process_time()
        result["task_correct"] = letter_correct(model, self.tok, self.data.task_test,
                                                batch_size=self.cfg.eval_batch_size)  # fmt: skip
        seconds["task"] = round(time.perf_counter() - t, 1)
        cpu["task"] = round(time.process_time() - c, 1)
        jsonl.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(jsonl, "\n".join(lines) + "\n")
        from peft_safety.sources.offline import sha256_file

        result["generations"] = jsonl.name
        result["generations_sha256"] = sha256_file(jsonl)
        result["eval_seconds"] = seconds
        result["eval_cpu_seconds"] = cpu
        return result


def rejudge(jsonl: str | Path, judges: list[Any]) -> list[dict[str, Any]]:
    """Run other judges on the answers stored in a run's JSONL (same prompts, same answers); returns new records."""
    import json

    from peft_safety.evaluation.refusal import judge_all

    recs = [json.loads(line) for line in Path(jsonl).read_text(encoding="utf-8").splitlines() if line.strip()]
    _, verdicts = judge_all(judges, [r["prompt"] for r in recs], [r["response"] for r in recs])
    return [{**r, "verdicts": {**r["verdicts"], **v["verdicts"]}} for r, v in zip(recs, verdicts)]
