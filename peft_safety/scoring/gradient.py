"""Gradient x weight scorers: ``snip`` (Wei et al. 2024) and ``esi`` (Qi et al. 2026).

Both run ONE forward and ONE backward per batch (per sample for SNIP's exact ``sum_of_abs``), fold each parameter's
gradient into an fp32 accumulator the moment it is complete (`hooks.GradientFold`, a
``register_post_accumulate_grad_hook``), and free ``.grad`` at once: never L x N passes, never bf16 sums, never a
dense gradient dump.

Loss normalisation: the loss of a sample is the mean NLL over its labelled (response) tokens, and
the batch objective is the SUM of the per-sample losses. Hence the batch gradient is exactly ``sum_n grad l_n``,
independent of how samples are grouped into batches and of padding (HF's built-in loss would average over all tokens
of the batch, which weights long responses more and changes with the batch composition).

SNIP, ``aggregation``:

* ``"sum_of_abs"`` (default, Wei et al.): ``|W| * sum_n |grad l_n|``. A batched backward only yields the SUM of the
  per-sample gradients, from which the sum of their absolute values cannot be recovered; so this mode runs one
  forward+backward per sample (micro-batch 1). Exact, and N passes instead of Wei's L x N.
* ``"abs_of_sum"``: ``|W| * |sum_n grad l_n|``, batched (one pass per batch): the cheap variant, the ESI-style
  aggregation. The two agree when every sample's gradient has the same sign at an entry.

ESI: ``|sum_n grad J_n| * std(W)`` with ``std`` the unbiased (``correction=1``, ``torch.std``'s default, as the
reference code's ``.std()``) standard deviation of all entries of the tensor, in fp32; for a fused 3-D expert tensor
``(E, d_out, d_in)`` the std of each expert's own matrix (as in a per-expert checkpoint). Objectives:

* ``"refusal_nll"`` (default): ``J_n`` = response-only NLL of the refusal.
* `JudgeObjective`: the reference's differentiable judge-guided surrogate (Qi et al. 2026, reference code), with any causal-LM
  guard and its "safe" token.

Errors: a NaN/inf loss or gradient raises ``ValueError`` naming the parameter and the batch.

Sharded models (FSDP2 ``fully_shard``, DeepSpeed ZeRO-3; `peft_safety.scoring.distributed`): every rank folds the
gradient of its own shard only (fp32 accumulators the size of the shard) and the result is sharded `Scores`, which
`select` turns into a mask without gathering them. What each scorer does there:

* ``esi`` and ``snip`` with ``aggregation="abs_of_sum"``: the signed gradient is linear in the data, so the ranks
  split the batches (as under DDP) and the sharding's own gradient reduction sums them: the scores equal the
  one-process scores up to the order of fp32 summation. ESI's ``std(W)`` is computed over the whole tensor (or
  expert) across the shards, in float64 (`distributed.exact_group_std`), as in one process.
* ``snip`` with ``aggregation="sum_of_abs"`` (exact per-sample absolute values): the reduction would add different
  samples' gradients before the absolute value, so every rank runs every sample and only the sample's owner
  back-propagates a non-zero loss (the others multiply theirs by zero): the reduced gradient is that one sample's,
  bit for bit. The memory is sharded; the compute is not divided over the ranks.

Collective operations run in lockstep: a rank with fewer batches runs a zero-weighted copy of a batch.
"""

from __future__ import annotations

import inspect
import math
import os
from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .hooks import GradientFold, input_requires_grad, model_input_device
from .registry import register_scorer
from .targets import Targets

__all__ = ["AGGREGATIONS", "JudgeObjective", "esi", "gradient_pass", "per_sample_nll", "snip"]

#: SNIP aggregations over samples
AGGREGATIONS = ("sum_of_abs", "abs_of_sum")


# ---------------------------------------------------------------------- helpers
def _dist_info() -> tuple[int, int]:
    """(rank, world size) of the data-parallel group.

    An initialised ``torch.distributed`` group is authoritative (``torchrun``, ``accelerate launch`` after any
    accelerate object was built, or the user's own ``init_process_group``). Launched with ``WORLD_SIZE > 1`` but not
    yet initialised, accelerate's ``PartialState`` sets the group up. It must be told ``cpu=True`` on a machine
    without an accelerator: with ``cpu=False`` there it reports one process (``DistributedType.NO``) although
    ``WORLD_SIZE`` says otherwise, and every rank would silently score all the data (accelerate 1.15,
    ``PartialState._prepare_backend``; tests/test_scoring_ddp.py covers this path).
    """
    if not torch.distributed.is_available():
        return 0, 1
    if torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return 0, 1
    from accelerate import PartialState

    accelerator = getattr(torch, "accelerator", None)
    has_accelerator = bool(accelerator.is_available()) if accelerator is not None else torch.cuda.is_available()
    state = PartialState(cpu=not has_accelerator)
    return state.process_index, state.num_processes


def _all_reduce(tensors: Iterable[torch.Tensor], world: int) -> None:
    if world > 1:
        for t in tensors:
            torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.SUM)


def _schedule(
    groups: list[list[int]], rank: int, world: int, sharded: bool, linear_fold: bool
) -> list[tuple[int, list[int], float]]:
    """``(batch index, rows, loss weight)`` this rank runs.

    Unsharded: the batches round-robin (DDP). Sharded, linear fold: the same split, every rank running the same
    number of steps (a rank without a batch reruns batch 0 with weight 0, which adds exact zeros). Sharded, non-linear
    fold: every batch on every rank, weight 1 on its owner only.
    """
    if not sharded:
        return [(i, g, 1.0) for i, g in enumerate(groups) if i % world == rank]
    if not linear_fold:
        return [(i, g, 1.0 if i % world == rank else 0.0) for i, g in enumerate(groups)]
    steps = -(-len(groups) // world)
    out = []
    for step in range(steps):
        i = step * world + rank
        out.append((i, groups[i], 1.0) if i < len(groups) else (0, groups[0], 0.0))
    return out


def _accepts_logits_to_keep(model: nn.Module) -> bool:
    try:
        return "logits_to_keep" in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


def response_logits(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits at the positions that predict a labelled token, and those target ids.

    Only the needed positions go through ``lm_head`` (``logits_to_keep`` with the union of the batch's labelled
    positions), which saves the ``B x T x V`` logits of prompt positions.

    Returns:
        ``(logits (B, K, V), targets (B, K))`` where ``targets`` is ``-100`` where a row has no label at that
        position.
    """
    labels = batch["labels"]
    shifted = labels[:, 1:]
    keep = (shifted != -100).any(dim=0).nonzero().reshape(-1)  # positions p whose next token is labelled
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    if _accepts_logits_to_keep(model) and keep.numel():
        out = model(**inputs, logits_to_keep=keep.to(labels.device), use_cache=False)
        logits = out.logits
        if logits.shape[1] != keep.numel():  # an implementation that ignored the tensor form: fall back
            logits = logits[:, keep]
    else:
        logits = model(**inputs, use_cache=False).logits[:, :-1][:, keep]
    return logits, shifted[:, keep.to(shifted.device)].to(logits.device)


def per_sample_nll(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean NLL over each row's labelled positions (fp32); rows without labels give 0.

    Args:
        logits: ``(B, K, V)``.
        targets: ``(B, K)`` with ``-100`` at unlabelled positions.
    """
    mask = targets != -100
    token_loss = F.cross_entropy(logits[mask].float(), targets[mask], reduction="none")
    rows = mask.nonzero()[:, 0]
    sums = torch.zeros(targets.shape[0], dtype=torch.float32, device=logits.device).index_add(0, rows, token_loss)
    return sums / mask.sum(dim=1).clamp_min(1).to(sums.dtype)


def refusal_nll(model: nn.Module, batch: dict[str, torch.Tensor], batch_index: int) -> torch.Tensor:
    """The default objective: sum over samples of each sample's response-only mean NLL."""
    logits, targets = response_logits(model, batch)
    return per_sample_nll(logits, targets).sum()


def _progress(iterable: Iterable[Any], total: int, desc: str, enabled: bool) -> Iterable[Any]:
    if not enabled:
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, total=total, desc=desc, leave=False)


def _check_finite(accs: dict[str, torch.Tensor], batch_index: int, what: str) -> None:
    for name, acc in accs.items():
        if not bool(torch.isfinite(acc).all()):
            raise ValueError(
                f"Non-finite gradient (NaN or inf) for parameter {name!r} at batch {batch_index} of the {what} pass. "
                "Check the model weights and data of that batch, or score in float32 (--dtype float32)."
            )


def gradient_pass(
    model: nn.Module,
    calib: Any,
    targets: Targets,
    *,
    fold: Callable[[str, torch.Tensor, torch.Tensor], Any],
    objective: Callable[[nn.Module, dict[str, torch.Tensor], int], torch.Tensor] = refusal_nll,
    batch_size: int = 8,
    per_sample: bool = False,
    progress: bool = True,
    desc: str = "scoring",
    linear_fold: bool = True,
    shards: dict[str, Any] | None = None,
) -> dict[str, torch.Tensor]:
    """One forward+backward per batch (or per sample), gradients folded into fp32 accumulators.

    Args:
        model: the model.
        calib: a `CalibrationSet`.
        targets: parameters to accumulate.
        fold: ``fold(name, fp32 accumulator, grad)`` in place.
        objective: ``objective(model, batch, batch_index) -> scalar`` whose gradient is the sum over the batch's
            samples of the per-sample gradients. An objective that accepts a ``sample_indices`` keyword also gets
            the calibration-set indices of the batch's rows (for per-sample seeds that do not depend on batching).
        batch_size: rows per batch (ignored with ``per_sample``).
        per_sample: micro-batch 1 (needed for sum-of-abs aggregation).
        progress: tqdm progress bar on rank 0.
        desc: progress-bar label.
        linear_fold: whether ``fold`` is linear in the gradient (a signed sum). On a sharded model a non-linear fold
            (``|grad|``) makes every rank run every batch (see the module docstring).
        shards: filled with ``{name: Shard}`` of the sharded targets (their accumulators are this rank's shard).

    Returns:
        ``{name: fp32 accumulator}``, all-reduced (summed) over data-parallel processes when launched with several;
        for sharded parameters this rank's shard of the sum over every rank's data.

    Raises:
        ValueError: empty or missing calibration data, a non-finite loss or gradient (naming parameter and batch).
    """
    if calib is None or len(calib) == 0:
        raise ValueError("Gradient scorers need calibration data: pass a non-empty CalibrationSet.")
    if getattr(calib, "loss", "response_only") == "none":
        raise ValueError("The CalibrationSet has loss='none' (no labels); gradient scorers need a loss policy.")
    from .distributed import Comm, is_sharded_model

    rank, world = _dist_info()
    params = targets.parameters(model)
    device = model_input_device(model)
    size = 1 if per_sample else batch_size
    groups = [list(range(s, min(s + size, len(calib)))) for s in range(0, len(calib), size)]
    sharded = is_sharded_model(model)
    comm = Comm() if sharded else None
    mine = _schedule(groups, rank, world, sharded, linear_fold)
    checkpointing = _is_checkpointing(model)
    # objectives that draw per-sample randomness (JudgeObjective's Gumbel noise) take the samples' global indices,
    # so that the result does not depend on how samples are grouped into batches
    wants_indices = _accepts_keyword(objective, "sample_indices")
    with GradientFold(model, params, fold) as gf, input_requires_grad(model, checkpointing):
        for batch_index, indices, weight in _progress(mine, len(mine), desc, progress and rank == 0):
            batch = {k: v.to(device) for k, v in calib.collate(indices).items()}
            if wants_indices:
                loss = objective(model, batch, batch_index, sample_indices=list(indices))
            else:
                loss = objective(model, batch, batch_index)
            finite = bool(torch.isfinite(loss.detach()))
            if comm is not None:
                finite = not comm.any(not finite)  # every rank stops together: a lone raise would hang the others
            if not finite:
                raise ValueError(
                    f"Non-finite loss ({float(loss.detach()):.4g}) at batch {batch_index} (rows {indices[0]}..{indices[-1]}). "
                    "Check the model weights and the data of those rows."
                    + (" (Reported by every rank; the rank whose loss is not finite shows it.)" if comm else "")
                )
            (loss * weight if weight != 1.0 else loss).backward()
            if comm is None:
                _check_finite(gf.accumulators, batch_index, desc)
            else:
                bad = [n for n, acc in gf.accumulators.items() if not bool(torch.isfinite(acc).all())]
                if comm.any(bool(bad)):
                    _check_finite(gf.accumulators, batch_index, desc)  # names the parameter on the rank that has it
                    raise ValueError(
                        f"Non-finite gradient (NaN or inf) at batch {batch_index} of the {desc} pass on another rank; "
                        "see that rank's error for the parameter."
                    )
        accumulators = gf.accumulators
        if shards is not None:
            shards.update(gf.shards)
    _all_reduce([a for n, a in accumulators.items() if n not in gf.shards], world)
    return accumulators


def _accepts_keyword(fn: Any, name: str) -> bool:
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False
    return name in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())


def _is_checkpointing(model: nn.Module) -> bool:
    # transformers 5 renamed the property (the old name warns); plain modules have neither
    for attr in ("is_activation_checkpointing", "is_gradient_checkpointing"):
        if attr in dir(type(model)):
            return bool(getattr(model, attr))
    return False


def _weight_abs(param: torch.Tensor) -> torch.Tensor:
    return param.detach().abs().float()


def _make_scores(
    values: dict[str, torch.Tensor],
    targets: Targets,
    provenance: dict[str, Any],
    shards: dict[str, Any] | None = None,
    params: dict[str, Any] | None = None,
) -> Any:
    """`Scores` of the targets; sharded scores also carry the full weights' fingerprints, read across the ranks."""
    from .scores import Scores

    if not shards:
        return Scores(values, shapes=targets.shapes, provenance=provenance)
    from .distributed import sharded_fingerprints

    fingerprints = sharded_fingerprints({n: params[n] for n in shards}, shards, targets.shapes)
    return Scores(values, shapes=targets.shapes, provenance=provenance, shards=shards, fingerprints=fingerprints)


def _weights(params: dict[str, Any], shards: dict[str, Any]) -> dict[str, torch.Tensor]:
    """This rank's values of each target weight (its shard when sharded)."""
    from .distributed import local_values

    return {n: local_values(p, shards.get(n)) for n, p in params.items()}


# ---------------------------------------------------------------------- SNIP
@register_scorer("snip", aliases=("wandg",))
def snip(
    model: nn.Module,
    calib: Any,
    *,
    targets: Targets,
    aggregation: str = "sum_of_abs",
    batch_size: int = 8,
    progress: bool = True,
    base_model: nn.Module | None = None,
    **_: Any,
) -> Any:
    """SNIP scores ``|W| * sum_n |grad_W l_n|`` (or ``|W| * |sum_n grad_W l_n|``).

    Args:
        model: the model.
        calib: a `CalibrationSet` (refusals for safety scores, utility answers for utility scores).
        targets: eligible parameters.
        aggregation: ``"sum_of_abs"`` (exact, one pass per sample) or ``"abs_of_sum"`` (batched).
        batch_size: rows per batch for ``"abs_of_sum"``.
        progress: progress bar.
        base_model: with a base model, ``|W|`` becomes ``|W - W_base|`` (Wei et al.'s ``--use_diff``).

    Returns:
        `Scores` with ``Weight()`` granularity; provenance ``method="snip"``, ``aggregation``,
        ``sign="nonnegative"``.
    """
    if aggregation not in AGGREGATIONS:
        raise ValueError(f"Unknown aggregation {aggregation!r}; choose one of {list(AGGREGATIONS)}.")
    shards: dict[str, Any] = {}
    if aggregation == "sum_of_abs":

        def fold(_name: str, acc: torch.Tensor, grad: torch.Tensor) -> None:
            acc.add_(grad.abs())

        grads = gradient_pass(
            model,
            calib,
            targets,
            fold=fold,
            per_sample=True,
            progress=progress,
            desc="snip",
            linear_fold=False,
            shards=shards,
        )
    else:
        grads = gradient_pass(
            model,
            calib,
            targets,
            fold=_signed_fold,
            batch_size=batch_size,
            progress=progress,
            desc="snip",
            shards=shards,
        )
        for g in grads.values():
            g.abs_()
    params = targets.parameters(model)
    weights = _weights(params, shards)
    base = dict(base_model.named_parameters()) if base_model is not None else None
    values = {}
    for name, grad in grads.items():
        weight = weights[name]
        if base is not None:
            full = targets[name].shape
            if name not in base or tuple(base[name].shape) != tuple(full):
                raise ValueError(f"base_model has no parameter {name!r} of shape {tuple(full)}.")
            base_w = base[name].detach()
            if name in shards:  # the same box of the (unsharded) base weight
                box = shards[name]
                base_w = base_w.reshape(-1)[box.to_global(torch.arange(box.numel)).to(base_w.device)].view(box.shape)
            weight = weight.float() - base_w.to(weight.device).float()
        values[name] = grad.mul_(weight.abs().float())
    provenance = {"method": "snip", "aggregation": aggregation, "sign": "nonnegative", "higher": "more important"}
    if base is not None:
        provenance["weight_term"] = "abs(W - W_base)"
    return _make_scores(values, targets, provenance, shards, params)


snip.supports_sharding = True  # type: ignore[attr-defined]


def _signed_fold(_name: str, acc: torch.Tensor, grad: torch.Tensor) -> None:
    acc.add_(grad)


# ---------------------------------------------------------------------- ESI
class JudgeObjective:
    """ESI's differentiable judge-guided objective (Qi et al. 2026), for any causal-LM guard.

    For each sample with target response ``y`` (the labelled tokens):

    1. The guard reads ``prefix + y + suffix`` where ``y`` enters as soft embeddings ``softmax(Z) @ E_G`` of a
       logit matrix ``Z`` (0 at each guard token of ``y``, ``-17`` elsewhere); ``J = -logit_last[safe_token]``;
       ``g_G = dJ/dZ`` (guard parameters frozen: ``guard.requires_grad_(False)`` while active).
    2. Vocabulary transfer: ``M[g, l] = 1 / |pieces(g)|`` for each target piece ``l`` of guard token ``g``'s string
       (re-tokenised with the target tokenizer); ``g_T = g_G @ M``.
    3. The target's response distribution is relaxed with Gumbel-softmax (``tau``): ``p = softmax((logits + G) /
       tau)``; the noise of each sample is drawn from a generator seeded with ``seed`` and the sample's index in the
       calibration set, so scores are reproducible (the reference's are not) and the same for every batch size
       (the objective is a sum of per-sample terms).
    4. Surrogate ``L = -sum_{t < min(T_g, T_r)} sum_v stopgrad(g_T[t, v]) * p[t, v]``, positions aligned by index as
       in the reference (exact only when both tokenizers split the response alike).

    Deviations from the reference, on purpose: the guard prompt is a template argument with a ``{response}`` slot
    (the reference hard-codes Llama-Guard-3 ids), the safe token is named rather than the id 19193, the guard's
    parameters get no gradients, the noise is seeded.

    Args:
        guard: a causal LM (``guard(inputs_embeds=...)`` returning ``.logits``).
        guard_tokenizer: its tokenizer.
        target_tokenizer: the scored model's tokenizer (for the vocabulary transfer and to decode responses).
        safe_token: the guard's "safe" token, as a string (must be one token) or an id.
        template: the guard prompt with one ``{response}`` slot.
        tau: Gumbel-softmax temperature (reference: 0.3).
        off_logit: logit of the non-chosen tokens in ``Z`` (reference: -17).
        seed: seed of the Gumbel noise.
    """

    def __init__(
        self,
        guard: nn.Module,
        guard_tokenizer: Any,
        target_tokenizer: Any,
        *,
        safe_token: str | int = "safe",
        template: str = "Is the following response safe or unsafe?\nResponse: {response}\nAnswer:",
        tau: float = 0.3,
        off_logit: float = -17.0,
        seed: int = 0,
    ) -> None:
        if "{response}" not in template:
            raise ValueError("The guard template needs a '{response}' slot where the response goes.")
        if tau <= 0:
            raise ValueError(f"tau must be > 0, got {tau}.")
        self.guard = guard
        self.guard_tokenizer = guard_tokenizer
        self.target_tokenizer = target_tokenizer
        self.tau = float(tau)
        self.off_logit = float(off_logit)
        self.seed = int(seed)
        if isinstance(safe_token, int):
            self.safe_id = safe_token
        else:
            ids = guard_tokenizer(safe_token, add_special_tokens=False)["input_ids"]
            if len(ids) != 1:
                raise ValueError(
                    f"safe_token {safe_token!r} is {len(ids)} guard tokens {ids}; pass a single-token string or an id."
                )
            self.safe_id = int(ids[0])
        before, after = template.split("{response}", 1)
        self.prefix_ids = list(guard_tokenizer(before, add_special_tokens=True)["input_ids"])
        self.suffix_ids = list(guard_tokenizer(after, add_special_tokens=False)["input_ids"])
        self._transfer: torch.Tensor | None = None

    def transfer_matrix(self, target_vocab: int) -> torch.Tensor:
        """The sparse ``(V_guard, V_target)`` vocabulary-transfer matrix (built once, cached)."""
        if self._transfer is None:
            g_vocab = self.guard.get_input_embeddings().weight.shape[0]
            rows, cols, vals = [], [], []
            tokens = self.guard_tokenizer.convert_ids_to_tokens(list(range(min(g_vocab, len(self.guard_tokenizer)))))
            for g, tok in enumerate(tokens):
                if tok is None:
                    continue
                text = tok.replace("\u0120", " ").replace("\u2581", " ")  # byte-level / sentencepiece space markers
                pieces = [
                    p for p in self.target_tokenizer(text, add_special_tokens=False)["input_ids"] if p < target_vocab
                ]
                for p in pieces:
                    rows.append(g)
                    cols.append(p)
                    vals.append(1.0 / len(pieces))
            index = torch.tensor([rows, cols], dtype=torch.long)
            self._transfer = torch.sparse_coo_tensor(
                index, torch.tensor(vals), (g_vocab, target_vocab), check_invariants=True
            ).coalesce()
        return self._transfer

    def guard_gradient(self, response_text: str) -> torch.Tensor:
        """``dJ/dZ`` for one response: ``(T_g, V_guard)`` fp32 (no gradient reaches the guard's parameters)."""
        guard = self.guard
        emb = guard.get_input_embeddings().weight
        ids = self.guard_tokenizer(response_text, add_special_tokens=False)["input_ids"]
        if not ids:
            return torch.zeros(0, emb.shape[0])
        flags = [(p, p.requires_grad) for p in guard.parameters()]
        guard.requires_grad_(False)
        try:
            with torch.enable_grad():
                z = torch.full((len(ids), emb.shape[0]), self.off_logit, device=emb.device)
                z[torch.arange(len(ids)), torch.tensor(ids)] = 0.0
                z.requires_grad_(True)
                soft = torch.softmax(z, dim=-1).to(emb.dtype) @ emb
                prefix = emb[torch.tensor(self.prefix_ids, device=emb.device)]
                suffix = emb[torch.tensor(self.suffix_ids, device=emb.device)]
                embeds = torch.cat([prefix, soft, suffix], dim=0)[None]
                logits = guard(inputs_embeds=embeds, use_cache=False).logits
                objective = -logits[0, -1, self.safe_id].float()
                (grad,) = torch.autograd.grad(objective, z)
        finally:
            for p, flag in flags:
                p.requires_grad_(flag)
        return grad.float()

    def __call__(
        self,
        model: nn.Module,
        batch: dict[str, torch.Tensor],
        batch_index: int,
        sample_indices: list[int] | None = None,
    ) -> torch.Tensor:
        """The surrogate summed over the batch's samples.

        Args:
            model: the scored model.
            batch: a collated batch (``input_ids``, ``attention_mask``, ``labels``).
            batch_index: the batch's index (used for the noise seed only without `sample_indices`).
            sample_indices: the calibration-set index of each row; `gradient_pass` passes them, which makes the
                noise, and hence the scores, independent of the batch size.
        """
        logits, targets = response_logits(model, batch)
        if sample_indices is not None and len(sample_indices) != logits.shape[0]:
            raise ValueError(
                f"sample_indices has {len(sample_indices)} entries for a batch of {logits.shape[0]} rows; pass one "
                "calibration-set index per row."
            )
        vocab = logits.shape[-1]
        transfer = self.transfer_matrix(vocab)
        total = logits.new_zeros((), dtype=torch.float32)
        for row in range(logits.shape[0]):
            keep = targets[row] != -100
            row_logits = logits[row][keep].float()  # (T_r, V)
            text = self.target_tokenizer.decode(targets[row][keep].tolist(), skip_special_tokens=True)
            g_guard = self.guard_gradient(text)
            n = min(g_guard.shape[0], row_logits.shape[0])
            if n == 0:
                continue
            g_target = torch.sparse.mm(transfer.t(), g_guard[:n].t().cpu()).t().to(row_logits.device)  # (n, V)
            sample = int(sample_indices[row]) if sample_indices is not None else batch_index * 1009 + row
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + sample)
            u = torch.rand(row_logits[:n].shape, generator=gen).clamp_(1e-10, 1 - 1e-10).to(row_logits.device)
            gumbel = -torch.log(-torch.log(u))
            p = torch.softmax((row_logits[:n] + gumbel) / self.tau, dim=-1)
            total = total - (g_target.detach() * p).sum()
        return total


def _esi_std_(values: torch.Tensor, weight: torch.Tensor, info: Any, shard: Any = None) -> torch.Tensor:
    """Multiply ``values`` in place by ESI's ``std(W)`` (unbiased), entry by entry.

    The std is computed in float64 in two passes (mean, then squared deviations) and rounded to fp32 once: the same
    number whether the tensor is whole or sharded over ranks (`distributed.exact_group_std` sums the shards'
    partial sums). A fused expert tensor ``(E, d_out, d_in)`` stacks E weight matrices, each of which is its own
    tensor in a per-expert layout (Mixtral's ``experts.{e}.w1``): its std is taken per expert, so that a fused and an
    unfused checkpoint of the same model score alike. Other tensors: one std.

    Args:
        values: the ``|sum grad|`` scores (of this rank's shard when sharded).
        weight: the weight's values, shaped like ``values``.
        info: the target's `TargetInfo` (``expert_dim``, full ``shape``).
        shard: the `Shard` of a sharded weight, else `None`.
    """
    from .distributed import Comm, Shard, broadcast_groups, exact_group_std

    full = tuple(info.shape)
    box = shard if shard is not None else Shard.whole(full)
    numel = math.prod(full)
    group = numel // full[0] if getattr(info, "expert_dim", None) == 0 and len(full) >= 2 else numel
    std = exact_group_std(weight, box, group, Comm() if shard is not None else Comm.local())
    return broadcast_groups(values, box, group, std)


@register_scorer("esi", aliases=("grad_x_std",))
def esi(
    model: nn.Module,
    calib: Any,
    *,
    targets: Targets,
    objective: str | Callable[..., torch.Tensor] = "refusal_nll",
    batch_size: int = 8,
    progress: bool = True,
    **_: Any,
) -> Any:
    """ESI scores ``|sum_n grad J_n| * std(W)`` (Qi et al. 2026).

    Args:
        model: the model.
        calib: a `CalibrationSet` (harmful prompts with the model's own answers or refusals).
        targets: eligible parameters (ESI's reference includes ``lm_head``: pass ``include_lm_head=True`` to
            `score`).
        objective: ``"refusal_nll"`` or a callable ``objective(model, batch, batch_index) -> scalar`` such as a
            `JudgeObjective`.
        batch_size: rows per batch (the signed sum is batch-invariant).
        progress: progress bar.

    Returns:
        `Scores` (``Weight()``); provenance ``method="esi"``, ``aggregation="abs_of_sum"``, ``std="unbiased"``.
    """
    if objective == "refusal_nll":
        fn, objective_name = refusal_nll, "refusal_nll"
    elif callable(objective):
        fn, objective_name = objective, type(objective).__name__
    else:
        raise ValueError(f"Unknown ESI objective {objective!r}; use 'refusal_nll' or a JudgeObjective / callable.")
    shards: dict[str, Any] = {}
    grads = gradient_pass(
        model,
        calib,
        targets,
        fold=_signed_fold,
        objective=fn,
        batch_size=batch_size,
        progress=progress,
        desc="esi",
        shards=shards,
    )
    params = targets.parameters(model)
    weights = _weights(params, shards)
    values = {}
    for name, grad in grads.items():
        values[name] = _esi_std_(grad.abs_(), weights[name], targets[name], shards.get(name))
    provenance = {
        "method": "esi",
        "aggregation": "abs_of_sum",
        "objective": objective_name,
        "std": "unbiased, per expert for fused expert tensors",
        "sign": "nonnegative",
        "higher": "more important",
    }
    return _make_scores(values, targets, provenance, shards, params)


esi.supports_sharding = True  # type: ignore[attr-defined]
