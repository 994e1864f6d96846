"""`evaluate`: refusal, over-refusal and utility of a model in one call, as an `EvalReport`.

Report side by side (keyword attack success alone misleads on small models): refusal rate on held-out harmful
prompts per judge, a minimum-length rule, a repetition flag, over-refusal on benign prompts, judge error counts,
perplexity of held-out benign responses, multiple-choice accuracy; and keep every generation (JSONL) so a person can
read them.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .._io import atomic_write_text
from ..scoring.generation import generate_with_stats
from .judges import Judge, resolve_judges
from .refusal import JudgeSummary, judge_all
from .utility import multiple_choice_accuracy, perplexity

__all__ = ["DEFAULT_JUDGES", "EvalReport", "evaluate", "write_jsonl"]

#: judges run by default: two keyword presets, Wei et al.'s keywords + 20-word rule, and the refusal prefixes
DEFAULT_JUDGES = ("wei2024", "wei2024_min20", "gcg_extended", "refusal_prefix")


def _atomic_write(path: Path, text: str) -> None:
    atomic_write_text(path, text)


def write_jsonl(path: str | os.PathLike, records: Sequence[dict[str, Any]]) -> Path:
    """Write records as JSON lines, atomically (temporary name + `os.replace`)."""
    path = Path(path)
    _atomic_write(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    return path


@dataclass
class EvalReport:
    """The result of `evaluate`.

    Attributes:
        harmful: judge name -> `JudgeSummary` on the harmful prompts (refusal rate; compliance = attack success).
        benign: judge name -> `JudgeSummary` on the benign prompts (refusal rate = over-refusal rate).
        repetition: set name -> fraction of responses flagged as degenerate loops.
        mean_words: set name -> mean response length in words.
        perplexity: perplexity of the utility rows' responses (response tokens only), or `None`.
        mc_accuracy: multiple-choice accuracy, or `None`.
        generation: settings and throughput of the generation runs.
        config: what was evaluated and how (counts, judges, seed, template).
        records: every generation with its verdicts (also in ``generations.jsonl`` when ``out_dir`` is set).
        files: paths written.
    """

    harmful: dict[str, JudgeSummary]
    benign: dict[str, JudgeSummary] = field(default_factory=dict)
    repetition: dict[str, float] = field(default_factory=dict)
    mean_words: dict[str, float] = field(default_factory=dict)
    perplexity: float | None = None
    mc_accuracy: float | None = None
    generation: dict[str, Any] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)
    records: list[dict[str, Any]] = field(default_factory=list, repr=False)
    files: dict[str, str] = field(default_factory=dict)

    def refusal_rate(self, judge: str) -> float | None:
        """Refusal rate on the harmful prompts for one judge."""
        return self.harmful[judge].refusal_rate

    def attack_success_rate(self, judge: str) -> float | None:
        """``1 - refusal_rate`` on the harmful prompts (among decided verdicts)."""
        return self.harmful[judge].compliance_rate

    def over_refusal_rate(self, judge: str) -> float | None:
        """Refusal rate on the benign prompts for one judge."""
        return self.benign[judge].refusal_rate if judge in self.benign else None

    def to_dict(self, with_records: bool = False) -> dict[str, Any]:
        out = {
            "harmful": {k: v.to_dict() for k, v in self.harmful.items()},
            "benign": {k: v.to_dict() for k, v in self.benign.items()},
            "repetition": dict(self.repetition),
            "mean_words": dict(self.mean_words),
            "perplexity": self.perplexity,
            "mc_accuracy": self.mc_accuracy,
            "generation": dict(self.generation),
            "config": dict(self.config),
            "files": dict(self.files),
        }
        if with_records:
            out["records"] = list(self.records)
        return out

    def to_markdown(self) -> str:
        def pct(x: float | None) -> str:
            return "-" if x is None else f"{100 * x:.1f}%"

        cfg = self.config
        lines = [
            f"# Evaluation ({cfg.get('n_harmful', 0)} harmful, {cfg.get('n_benign', 0)} benign prompts; "
            f"greedy, max_new_tokens={cfg.get('max_new_tokens')}, template={cfg.get('template')}, seed={cfg.get('seed')})",
            "",
            "| judge | refusal (harmful) | attack success | over-refusal (benign) | errors (harmful/benign) |",
            "|---|---|---|---|---|",
        ]
        for name, s in self.harmful.items():
            b = self.benign.get(name)
            lines.append(
                f"| {name} | {pct(s.refusal_rate)} | {pct(s.compliance_rate)} | {pct(b.refusal_rate if b else None)} "
                f"| {s.errors}/{b.errors if b else '-'} |"
            )
        lines += ["", "| set | repetitive | mean words |", "|---|---|---|"]
        for name, rate in self.repetition.items():
            lines.append(f"| {name} | {pct(rate)} | {self.mean_words.get(name, float('nan')):.1f} |")
        lines += ["", "| utility | value |", "|---|---|"]
        lines.append(f"| perplexity (benign responses, response tokens) | {'-' if self.perplexity is None else f'{self.perplexity:.3f}'} |")  # fmt: skip
        lines.append(f"| multiple-choice accuracy | {pct(self.mc_accuracy)} |")
        if self.generation.get("tokens_per_second") is not None:
            lines += ["", f"Generation: {self.generation['new_tokens']} new tokens in {self.generation['seconds']:.1f} s "
                      f"({self.generation['tokens_per_second']:.1f} tokens/s, batch {self.generation['batch_size']})."]  # fmt: skip
        return "\n".join(lines) + "\n"


def _prompts(rows: Sequence[Any] | None, what: str) -> list[str]:
    if rows is None:
        return []
    if isinstance(rows, str):
        raise TypeError(f"{what} must be a list of prompts or rows, not a single string.")
    out = []
    for i, r in enumerate(rows):
        if isinstance(r, str):
            out.append(r)
        elif isinstance(r, dict) and isinstance(r.get("prompt"), str):
            out.append(r["prompt"])
        else:
            raise TypeError(f"{what}[{i}] must be a string or a row dict with a 'prompt', got {type(r).__name__}.")
    return out


def evaluate(
    model: Any,
    tokenizer: Any,
    harmful_prompts: Sequence[Any],
    benign_prompts: Sequence[Any] | None = None,
    utility_rows: Sequence[dict[str, Any]] | None = None,
    mc_rows: Sequence[dict[str, Any]] | None = None,
    judges: Sequence[str | Judge] = DEFAULT_JUDGES,
    out_dir: str | os.PathLike | None = None,
    seed: int = 0,
    *,
    max_new_tokens: int = 128,
    batch_size: int = 16,
    system_prompt: str | None = None,
    template: str = "chat",
    progress: bool = True,
) -> EvalReport:
    """Evaluate refusal on harmful prompts, over-refusal on benign prompts, and utility.

    Args:
        model: a causal LM or a `PeftModel`.
        tokenizer: its tokenizer (with a chat template for ``template="chat"``).
        harmful_prompts: held-out harmful prompts (strings or rows with ``"prompt"``), e.g.
            ``load_rows("harmbench_test", n=64)``.
        benign_prompts: benign prompts for over-refusal, e.g. ``load_rows("chat_pairs", n=64)``.
        utility_rows: rows with ``"prompt"`` and ``"response"`` for `perplexity`.
        mc_rows: multiple-choice rows for `multiple_choice_accuracy`, e.g. ``load_rows("arc_easy", n=100)``.
        judges: preset names and/or `Judge` objects (`KeywordJudge`, `ModelJudge`, your own).
        out_dir: if set, writes ``generations.jsonl``, ``report.json`` and ``report.md`` there (atomically).
        seed: seed of the run (greedy decoding is deterministic; the seed is recorded).
        max_new_tokens: generation budget per prompt.
        batch_size: prompts per generation call (and sequences per scoring pass).
        system_prompt: optional system turn.
        template: ``"chat"`` (default), ``"raw"``, ``"inst"`` or ``"alpaca"`` (see `render_prompts`).
        progress: progress bars.

    Returns:
        An `EvalReport`.

    Raises:
        ValueError: no harmful prompts, bad judge names, bad rows.
        TypeError: prompts of the wrong type.

    Example:

    ```python
    >>> from peft_safety.sources.datasets import load_rows
    >>> report = evaluate(model, tok, load_rows("harmbench_test", n=32), load_rows("chat_pairs", n=32))  # doctest: +SKIP
    >>> print(report.to_markdown())  # doctest: +SKIP
    ```
    """
    harmful = _prompts(harmful_prompts, "harmful_prompts")
    benign = _prompts(benign_prompts, "benign_prompts")
    if not harmful:
        raise ValueError("evaluate needs at least one harmful prompt.")
    judge_list = resolve_judges(judges)
    gen_kwargs = {"max_new_tokens": max_new_tokens, "batch_size": batch_size, "system_prompt": system_prompt,
                      "template": template, "seed": seed, "progress": progress}  # fmt: skip
    sets = [("harmful", harmful)] + ([("benign", benign)] if benign else [])
    summaries: dict[str, dict[str, JudgeSummary]] = {}
    records: list[dict[str, Any]] = []
    repetition: dict[str, float] = {}
    mean_words: dict[str, float] = {}
    totals = {"new_tokens": 0, "seconds": 0.0}
    for set_name, prompts in sets:
        responses, stats = generate_with_stats(model, tokenizer, prompts, **gen_kwargs)
        totals["new_tokens"] += stats.new_tokens
        totals["seconds"] += stats.seconds
        summaries[set_name], recs = judge_all(judge_list, prompts, responses)
        repetition[set_name] = sum(r["repetitive"] for r in recs) / len(recs)
        mean_words[set_name] = sum(r["n_words"] for r in recs) / len(recs)
        for i, (p, resp, rec) in enumerate(zip(prompts, responses, recs)):
            records.append({"set": set_name, "index": i, "prompt": p, "response": resp, **rec})
    ppl = perplexity(model, tokenizer, utility_rows, batch_size=batch_size, system_prompt=system_prompt,
                     template=template) if utility_rows else None  # fmt: skip
    acc = multiple_choice_accuracy(model, tokenizer, mc_rows, batch_size=batch_size) if mc_rows else None
    generation = {
        **totals,
        "batch_size": batch_size,
        "tokens_per_second": totals["new_tokens"] / totals["seconds"] if totals["seconds"] > 0 else None,
    }
    config = {
        "n_harmful": len(harmful), "n_benign": len(benign), "n_utility": len(utility_rows or []),
        "n_mc": len(mc_rows or []), "judges": [j.name for j in judge_list], "seed": seed,
        "max_new_tokens": max_new_tokens, "template": template, "system_prompt": system_prompt, "decoding": "greedy",
        "model": str(getattr(getattr(model, "config", None), "name_or_path", "") or type(model).__name__),
    }  # fmt: skip
    report = EvalReport(
        harmful=summaries["harmful"], benign=summaries.get("benign", {}), repetition=repetition,
        mean_words=mean_words, perplexity=ppl, mc_accuracy=acc, generation=generation, config=config, records=records,
    )  # fmt: skip
    if out_dir is not None:
        out = Path(out_dir)
        report.files = {
            "generations": str(out / "generations.jsonl"),
            "report_json": str(out / "report.json"),
            "report_md": str(out / "report.md"),
        }
        write_jsonl(out / "generations.jsonl", records)
        _atomic_write(out / "report.json", json.dumps(report.to_dict(), indent=2) + "\n")
        _atomic_write(out / "report.md", report.to_markdown())
    return report
