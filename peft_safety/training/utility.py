"""Utility-aware SET: train a safety mask's entries on refusal rows *and* on benign rows that keep the model's behaviour.

SET trained on refusal rows alone learns "refuse" as the answer to everything: the mask's entries move the model
towards refusals of benign requests as much as of harmful ones. `SafetyUtility` adds benign rows whose targets are
answers the model should keep giving, and, optionally, a KL term that holds the SET model's next-token distribution to
the base model's on those answers:

* **Utility rows.** ``ratio`` utility rows per training (refusal) row: ``n = round(ratio * N)`` rows for ``N``
  training rows, spread evenly through the stream by the rule of safety replay (`replay_positions`: every prefix of
  the mixed set holds its share), drawn from the utility rows in seeded whole permutations (every row before any
  repeats). The rows come from ``source``: rows given directly, a named offline set / ``.json``/``.jsonl``/``.csv``
  file / Hub id read by `peft_safety.sources.datasets.load_rows` (their responses are the targets), or ``"self"``.
* **Self-distillation** (``"self"``, the default of `SafetySFTConfig.safety_utility_dataset`): the targets are the
  model's *own* greedy answers (`peft_safety.scoring.generation.generate_responses`, the library's batched greedy
  decoding, rendered as the training rows will be: the chat template for conversational rows, the raw text for
  standard ones) to benign prompts, generated once when the trainer is built, before any adapter exists. Answers cut by
  the token budget are trimmed after their last full sentence; an empty answer, or one a refusal judge flags (the
  ``wei2024`` keyword preset by default), is not used as a target: training on the base model's own refusals of benign
  requests would teach exactly the over-refusal this is meant to prevent. ``"self"`` reads the prompts of
  `DEFAULT_UTILITY_PROMPTS` (varied benign requests: customer-support and code-assistant turns, finance questions);
  ``"self:NAME[,NAME...]"`` reads those of other named sets or files.
* **KL term** (``kl_weight > 0``): on each training micro-batch, one batch of utility rows (prepared by the trainer
  exactly as its training set) is run through the model twice, with the SET adapter enabled and disabled (the disabled
  adapter *is* the base model: no copy of the weights is kept), and
  ``kl_weight * mean_t KL(p_base(. | x_<t) || p_model(. | x_<t))`` over the answer tokens ``t`` (labels not -100) is
  added to the loss (fp32 log-softmax). It needs an adapter (``safety_mode="train_only"`` without
  ``safety_train_only_full_weights``).

Why both: the utility rows say what to answer; the KL term says how confident to stay on every other token, which the
cross-entropy on one greedy answer does not constrain.
"""

from __future__ import annotations

import logging
import math
import random
import re
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from ..errors import SafetyError
from ._rows import RowsProtection, _first_row
from .replay import _as_pair, _convert, _fmt, interleave_rows

logger = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_UTILITY_PROMPTS",
    "DEFAULT_UTILITY_RATIO",
    "SafetyUtility",
    "kl_to_base",
    "mix_utility",
    "parse_utility_source",
    "self_distilled_rows",
    "utility_count",
]

#: the prompt sets ``"self"`` answers: varied benign requests that are no evaluation set of the library
DEFAULT_UTILITY_PROMPTS: tuple[str, ...] = ("forgelm_chat", "fiqa")
#: utility rows per refusal row when ``safety_mode="train_only"`` and the ratio is left unset
DEFAULT_UTILITY_RATIO = 1.0
#: the judge whose refusals are not used as self-distillation targets
DEFAULT_UTILITY_JUDGE = "wei2024"

_FORWARD_KEYS = ("input_ids", "attention_mask", "position_ids")


def utility_count(n_train: int, ratio: float) -> int:
    """``round(n_train * ratio)``: utility rows for ``n_train`` training rows at ``ratio`` rows per training row."""
    if isinstance(n_train, bool) or not isinstance(n_train, int) or n_train < 0:
        raise SafetyError(f"n_train must be a non-negative int, got {n_train!r}.")
    _check_ratio(ratio)
    return round(n_train * float(ratio))


def _check_ratio(ratio: Any) -> None:
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not math.isfinite(ratio) or ratio < 0:
        raise SafetyError(
            f"safety_utility_ratio must be a finite number >= 0 (utility rows per refusal row; 0 turns them off), got "
            f"{ratio!r}."
        )


def parse_utility_source(value: Any) -> tuple[str, Any]:
    """``("self", [prompt set, ...])`` for ``"self"`` / ``"self:a,b"``, else ``("rows", value)``."""
    if isinstance(value, str) and (value == "self" or value.startswith("self:")):
        names = (
            [n.strip() for n in value[len("self:") :].split(",")] if ":" in value else list(DEFAULT_UTILITY_PROMPTS)
        )
        if not names or any(not n for n in names):
            raise SafetyError(
                f"safety_utility_dataset={value!r}: write 'self' (the default prompt sets "
                f"{', '.join(DEFAULT_UTILITY_PROMPTS)}) or 'self:NAME[,NAME...]' with named offline sets or files."
            )
        return "self", names
    return "rows", value


def _trim(answer: str) -> str:
    """Cut an answer the token budget truncated after its last full sentence (when that keeps a third of it)."""
    answer = answer.strip()
    if not answer or answer[-1] in ".!?)\"'`":
        return answer
    ends = [m.end() for m in re.finditer(r"[.!?](\s|$)", answer)]
    return answer[: ends[-1]].strip() if ends and ends[-1] > len(answer) // 3 else answer


def _default_judge() -> Any:
    from ..evaluation.judges import KeywordJudge

    return KeywordJudge(DEFAULT_UTILITY_JUDGE)


def self_distilled_rows(
    model: nn.Module,
    tokenizer: Any,
    prompts: Sequence[str],
    *,
    n: int,
    template: str = "chat",
    max_new_tokens: int = 64,
    batch_size: int = 16,
    judge: Any = None,
    seed: int = 0,
) -> tuple[list[dict[str, str]], dict[str, Any]]:
    """The model's own greedy answers to benign prompts, as utility rows.

    Prompts are taken in a seeded order until ``n`` usable answers exist (or the prompts run out); an answer is usable
    when it is not empty after `_trim` and ``judge`` does not call it a refusal.

    Args:
        model: the model whose behaviour is kept (the base model, before any adapter).
        tokenizer: its tokenizer.
        prompts: the benign prompts.
        n: how many rows are wanted.
        template: ``"chat"`` or ``"raw"`` (how `generate_responses` renders a prompt; match the training rows).
        max_new_tokens: generation budget per answer.
        batch_size: prompts per ``generate`` call.
        judge: a judge (``judge(prompts, responses) -> verdicts``) whose refusals are dropped; default ``wei2024``.
        seed: seed of the prompt order.

    Returns:
        ``(rows, info)``: ``[{"prompt", "response"}]`` (at most ``n``) and counts (``generated``, ``dropped_refusal``,
        ``dropped_empty``).

    Raises:
        ValueError: no prompts, or not one usable answer.
    """
    from ..scoring.generation import generate_responses

    prompts = [p for p in prompts if isinstance(p, str) and p.strip()]
    if not prompts:
        raise SafetyError("Self-distilled utility rows need benign prompts; the prompt set is empty.")
    judge = judge if judge is not None else _default_judge()
    order = list(range(len(prompts)))
    random.Random(seed).shuffle(order)
    rows: list[dict[str, str]] = []
    info = {"generated": 0, "dropped_refusal": 0, "dropped_empty": 0}
    was_training = model.training
    model.eval()
    try:
        start = 0
        while len(rows) < n and start < len(order):
            # a little more than still needed: some answers are dropped
            take = [prompts[i] for i in order[start : start + max(batch_size, math.ceil((n - len(rows)) * 1.25))]]
            start += len(take)
            answers = [
                _trim(a)
                for a in generate_responses(
                    model, tokenizer, take, max_new_tokens=max_new_tokens, batch_size=batch_size, template=template,
                    seed=seed, progress=False,
                )
            ]  # fmt: skip
            info["generated"] += len(take)
            verdicts = judge.judge(take, answers)
            for prompt, answer, verdict in zip(take, answers, verdicts):
                if not answer:
                    info["dropped_empty"] += 1
                elif verdict.refused is not False:  # a refusal, or a judge that could not decide
                    info["dropped_refusal"] += 1
                elif len(rows) < n:
                    rows.append({"prompt": prompt, "response": answer})
    finally:
        model.train(was_training)
    if not rows:
        raise SafetyError(
            f"None of the model's {info['generated']} answers to the benign prompts is usable as a utility target "
            f"({info['dropped_refusal']} refusals, {info['dropped_empty']} empty): give rows with answers "
            "(safety_utility_dataset=<file or named set>) or turn utility rows off (safety_utility_ratio=0)."
        )
    return rows, info


def mix_utility(train: Any, utility: Any, ratio: float, *, seed: int = 0, return_sources: bool = False) -> Any:
    """``train`` with ``round(len(train) * ratio)`` utility rows mixed in (module docstring: the rule).

    Args:
        train: the training (refusal) rows, a list of dicts or a ``datasets.Dataset`` (``messages`` or
            ``prompt``/``completion``).
        utility: utility rows (``prompt``+``response``, ``prompt``+``completion`` or ``messages``).
        ratio: utility rows per training row (>= 0; 0 returns ``train`` unchanged).
        seed: seed of the utility-row permutation.
        return_sources: also return a list of booleans, `True` where a row is a utility row.

    Returns:
        The mixed rows, of the type of ``train``; with ``return_sources``, ``(mixed, is_utility)``.
    """
    _check_ratio(ratio)
    is_dataset = hasattr(train, "to_list") and hasattr(train, "column_names")
    rows = train.to_list() if is_dataset else list(train)
    n = utility_count(len(rows), ratio)
    if n == 0:
        return (train, [False] * len(rows)) if return_sources else train
    pool = utility.to_list() if hasattr(utility, "to_list") else list(utility or [])
    if not pool:
        raise SafetyError(f"safety_utility_ratio={ratio} needs utility rows, but the utility data set is empty.")
    return interleave_rows(train, rows, pool, n, seed=seed, return_sources=return_sources)


def kl_to_base(logits: torch.Tensor, base_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean over answer tokens of ``KL(p_base || p_model)`` (fp32).

    Position ``t`` of the logits predicts token ``t + 1``; the answer tokens are those whose label (shifted by one) is
    not -100. Returns 0 (with a gradient path) when a batch has no answer token.
    """
    shift = labels[:, 1:]
    valid = shift != -100
    logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)[valid]
    base_logp = torch.log_softmax(base_logits[:, :-1].float(), dim=-1)[valid]
    if logp.shape[0] == 0:
        return logits.sum() * 0.0
    return (base_logp.exp() * (base_logp - logp)).sum(-1).mean()


def _tokenizer_of(model: nn.Module) -> Any:
    """The tokenizer saved with ``model`` (``config._name_or_path``), or `None` when there is none to load."""
    path = getattr(getattr(model, "config", None), "_name_or_path", None)
    if not path:
        return None
    try:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as err:
        logger.info("No tokenizer loadable from %r for self-distilled utility rows: %s", path, err)
        return None


def _unwrap(model: nn.Module) -> nn.Module:
    while hasattr(model, "module") and isinstance(model.module, nn.Module):
        model = model.module
    return model


class SafetyUtility(RowsProtection):
    """Utility rows (and an optional KL term) for SET, as a protection (see the module docstring).

    Hooks: `prepare_dataset` (reads or generates the utility rows, mixes them into the training set and keeps them in
    the training set's format), `prepare_batches` (the KL term's batches), `on_wrapped` (checks that the base model can
    be reached by disabling the adapter), `extra_loss` (the KL term), `metrics` (``safety/utility_kl``).

    Args:
        source: utility rows (a list of dicts, a ``datasets.Dataset``), a named offline set / file / Hub id with
            responses, or ``"self"`` / ``"self:NAME[,NAME...]"`` (the model's own answers; needs ``model`` and
            ``tokenizer``).
        ratio: utility rows per training row (> 0).
        kl_weight: weight of the KL term (0: off).
        model: the base model (for ``"self"``), before any adapter is attached.
        tokenizer: its tokenizer (for ``"self"``).
        max_new_tokens: generation budget of a self-distilled answer.
        judge: the judge whose refusals are dropped from the self-distilled targets (default ``wei2024``).
        seed: seed of the row order and of the prompt order.
        auto: the protection was turned on by default (``safety_mode="train_only"`` with the ratio unset): training
            rows in a format utility rows cannot be converted to (``text``) turn it off with a warning instead of an
            error.

    Attributes:
        info: counts of what was read, generated, dropped and mixed in.
        last_kl: the KL term's value (before the weight) on the last micro-batch.
    """

    name = "utility"

    def __init__(
        self,
        source: Any = "self",
        *,
        ratio: float = DEFAULT_UTILITY_RATIO,
        kl_weight: float = 0.0,
        model: nn.Module | None = None,
        tokenizer: Any = None,
        max_new_tokens: int = 64,
        judge: Any = None,
        seed: int = 0,
        auto: bool = False,
    ) -> None:
        _check_ratio(ratio)
        if not ratio > 0:
            raise SafetyError("SafetyUtility needs safety_utility_ratio > 0 (0 means: no utility protection).")
        if isinstance(kl_weight, bool) or not isinstance(kl_weight, (int, float)) or not kl_weight >= 0:
            raise SafetyError(f"safety_kl_weight must be a number >= 0, got {kl_weight!r}.")
        if source is None:
            source = "self"
        super().__init__(source, seed=seed, what="benign", field="safety_utility_dataset")
        self.kind, self.prompt_sets = parse_utility_source(source) if isinstance(source, str) else ("rows", None)
        self.ratio = float(ratio)
        self.kl_weight = float(kl_weight)
        self.model = model
        self.tokenizer = tokenizer
        self.max_new_tokens = int(max_new_tokens)
        self.judge = judge
        self.auto = bool(auto)
        self.enabled = True
        self.info: dict[str, Any] = {}
        self.last_kl: float | None = None
        self._base_model: nn.Module | None = None

    @classmethod
    def from_args(
        cls, args: Any, *, model: nn.Module | None = None, tokenizer: Any = None, rows: Any = None
    ) -> SafetyUtility | None:
        """The protection a `SafetySFTConfig` asks for, or `None` (ratio 0, or unset outside ``train_only``)."""
        ratio = getattr(args, "safety_utility_ratio", None)
        auto = ratio is None
        if auto:
            ratio = DEFAULT_UTILITY_RATIO if getattr(args, "safety_mode", None) == "train_only" else 0.0
        _check_ratio(ratio)
        if not ratio:
            if rows is not None:
                raise SafetyError(
                    "SafetySFTTrainer(safety_utility_dataset=...) was given but safety_utility_ratio is 0: set a ratio "
                    "(utility rows per refusal row, e.g. 1) or drop the rows."
                )
            return None
        source = rows if rows is not None else getattr(args, "safety_utility_dataset", None)
        return cls(
            source,
            ratio=float(ratio),
            kl_weight=float(getattr(args, "safety_kl_weight", 0.0) or 0.0),
            model=model,
            tokenizer=tokenizer,
            max_new_tokens=int(getattr(args, "safety_utility_max_new_tokens", 64)),
            seed=int(getattr(args, "seed", 0)) + 2,
            auto=auto,
        )

    # ------------------------------------------------------------------ rows
    def _self_rows(self, n: int, template: str) -> list[dict[str, str]]:
        from ..sources.datasets import load_rows

        if self.tokenizer is None and self.model is not None:
            self.tokenizer = _tokenizer_of(self.model)
        if self.model is None or self.tokenizer is None:
            raise SafetyError(
                "safety_utility_dataset='self' answers benign prompts with the model itself: the trainer needs the "
                "model and a processing_class (tokenizer) when it is built; or give rows with answers "
                "(safety_utility_dataset=<file or named set>)."
            )
        prompts: list[str] = []
        for name in self.prompt_sets:
            prompts += [r["prompt"] for r in load_rows(name, normalize=False) if isinstance(r.get("prompt"), str)]
        rows, info = self_distilled_rows(
            self.model, self.tokenizer, prompts, n=n, template=template, max_new_tokens=self.max_new_tokens,
            judge=self.judge, seed=self.seed,
        )  # fmt: skip
        self.info.update({"prompt_sets": list(self.prompt_sets), "prompts": len(prompts), **info})
        return rows

    def prepare_dataset(self, train_dataset: Any, args: Any = None) -> Any:
        """Read or generate the utility rows and return ``train_dataset`` with them mixed in (`mix_utility`).

        Raises:
            ValueError: no training set, training rows of a format utility rows cannot take (unless turned on by
                default, which then turns it off with a warning), no usable utility row.
        """
        first = _first_row(train_dataset) if train_dataset is not None else None
        try:
            if not isinstance(first, dict):
                raise SafetyError(
                    "Utility rows are mixed into the training set, but the trainer got no training rows (a list of "
                    "dicts or a datasets.Dataset)."
                )
            fmt = _fmt(first)
        except ValueError as err:
            if self.auto:
                logger.warning(
                    "Utility-aware SET is the default of safety_mode='train_only' but is off for this run: %s Set "
                    "safety_utility_ratio=0 to silence this, or use prompt/completion or messages rows.",
                    err,
                )
                self.enabled = False
                return train_dataset
            raise SafetyError(f"safety_utility_ratio={self.ratio}: {err}") from err
        n = utility_count(len(train_dataset), self.ratio)
        if self.kind == "self":
            template = "chat" if fmt in ("messages", "conversational_pc") else "raw"
            raw = self._self_rows(n, template)
        else:
            raw = self._raw_rows()
        if self.kind == "self":
            self.info["source"] = "self:" + ",".join(self.prompt_sets)
        else:
            self.info["source"] = self.source if isinstance(self.source, str) else "rows"
        self.info["utility_pool"] = len(raw)
        mixed = mix_utility(train_dataset, raw, self.ratio, seed=self.seed)
        self.info["utility_rows"] = len(mixed) - len(train_dataset)
        self.info["training_rows"] = len(train_dataset)
        pairs = [_as_pair(r, i) for i, r in enumerate(raw)]
        self.rows = [_convert(p, r, fmt, first) for p, r in pairs]
        if self.kind == "self":
            self.model = None  # the generation is done: no reference to the base model is kept
        return mixed

    def prepare_batches(self, make_loader: Any) -> None:
        if self.enabled and self.kl_weight > 0:
            super().prepare_batches(make_loader)

    # ------------------------------------------------------------------ the KL term
    def on_wrapped(self, model: nn.Module) -> None:
        if not (self.enabled and self.kl_weight > 0):
            return
        if not hasattr(_unwrap(model), "disable_adapter"):
            raise SafetyError(
                "safety_kl_weight > 0 compares the model with its base, reached by disabling the SET adapter; this "
                f"model ({type(model).__name__}) has no adapter (safety_train_only_full_weights=True?). Train a SET "
                "adapter, or set safety_kl_weight=0."
            )

    def kl_term(self, model: nn.Module, batch: Mapping[str, Any]) -> torch.Tensor:
        """``KL(base || model)`` averaged over the answer tokens of ``batch`` (`kl_to_base`), before the weight."""
        if "labels" not in batch:
            raise SafetyError("The KL term needs labels on the utility batches (the trainer's collator gives them).")
        kwargs = {k: batch[k] for k in _FORWARD_KEYS if k in batch}
        logits = model(**kwargs, use_cache=False).logits
        with torch.no_grad(), _unwrap(model).disable_adapter():
            base_logits = model(**kwargs, use_cache=False).logits
        return kl_to_base(logits, base_logits, batch["labels"])

    def extra_loss(self, model: nn.Module, inputs: Mapping[str, Any]) -> torch.Tensor | None:
        if not (self.enabled and self.kl_weight > 0):
            return None
        device = inputs["input_ids"].device if "input_ids" in inputs else next(model.parameters()).device
        batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in self.next_batch().items()}
        kl = self.kl_term(model, batch)
        self.last_kl = float(kl.detach())
        return self.kl_weight * kl

    def metrics(self) -> dict[str, float]:
        return {} if self.last_kl is None else {"safety/utility_kl": self.last_kl}

    def state(self) -> dict[str, Any]:
        return {
            "protection": self.name,
            "enabled": self.enabled,
            "ratio": self.ratio,
            "kl_weight": self.kl_weight,
            **self.info,
        }
