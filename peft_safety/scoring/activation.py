"""Wanda scores (Wei et al. 2024): ``|W| * ||X_j||_2`` over response tokens, forward only.

For every target ``nn.Linear``, a forward hook adds ``sum_{t in R} x_{t,j}^2`` (fp32) for the input channel ``j``,
where ``R`` are the positions whose label is not ``-100`` (the response tokens under ``loss="response_only"``, the
reference's ``tar != -100``). After all batches the sums are divided by the number of samples (the reference keeps a
running mean over samples), and ``score[i, j] = |W[i, j]| * sqrt(mean[j])``.

Fused MoE experts (transformers 5 ``mlp.experts.gate_up_proj`` ``(E, 2*ff, h)`` and ``mlp.experts.down_proj``
``(E, h, ff)``): a forward hook on the experts module reads the routed hidden states and ``top_k_index``, and for each
expert ``e`` adds the squared norms of the response tokens routed to ``e`` (the input of ``gate_up_proj[e]``) and
recomputes ``act(gate) * up`` for those tokens (the input of ``down_proj[e]``, which is not observable by a hook).
That recomputation costs one extra expert forward and is exact. Scores are per expert: ``(E, d_out, d_in)``.

Other target kinds (embeddings, non-Linear weights) have no input activations in this sense and are rejected with
an error that says to exclude them.

Sharded models (FSDP2 ``fully_shard``, DeepSpeed ZeRO-3): the hooks see the full input activations, so the per-channel
sums are small vectors (``d_in`` per matrix, ``E x d_in`` per fused expert tensor); the ranks split the batches, the
vectors are all-reduced, and each rank multiplies its own shard of ``|W|``: sharded `Scores`, equal to the
one-process scores up to the order of fp32 summation. Fused experts under ZeRO-3 are refused (their input
recomputation reads ``gate_up_proj`` after DeepSpeed may have released it).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from .gradient import _dist_info, _progress
from .hooks import ForwardHooks, model_input_device
from .registry import register_scorer
from .targets import Targets

__all__ = ["wanda"]


@register_scorer("wanda")
def wanda(
    model: nn.Module,
    calib: Any,
    *,
    targets: Targets,
    batch_size: int = 8,
    progress: bool = True,
    **_: Any,
) -> Any:
    """Wanda scores ``|W| * ||X_j||_2`` over the labelled (response) tokens.

    Args:
        model: the model.
        calib: a `CalibrationSet`; positions with a label are the ones measured (use ``loss="full_text"`` to measure
            every token).
        targets: eligible parameters: ``nn.Linear`` weights and fused expert tensors.
        batch_size: rows per batch (results do not depend on it).
        progress: progress bar.

    Returns:
        `Scores` (``Weight()``); provenance ``method="wanda"``, ``aggregation="mean_over_samples"``.

    Raises:
        ValueError: empty data, no labelled tokens, or a target that is not a Linear/fused-expert weight.
    """
    if calib is None or len(calib) == 0:
        raise ValueError("wanda needs calibration data: pass a non-empty CalibrationSet.")
    named_modules = dict(model.named_modules())
    params = targets.parameters(model)
    linear: dict[str, nn.Module] = {}
    experts: dict[str, nn.Module] = {}
    for name, info in targets.items():
        module = named_modules.get(info.module_name)
        if info.expert_dim == 0 and module is not None:
            experts[info.module_name] = module
        elif isinstance(module, nn.Linear) and name.endswith(".weight"):
            linear[name] = module
        else:
            raise ValueError(
                f"wanda cannot score {name!r} (role {info.role!r}): it has no Linear input activations. Exclude it "
                "(exclude_modules=[...]) or use a gradient scorer."
            )
    from .distributed import Comm, is_sharded_model, local_values, shard_of

    sharded = is_sharded_model(model)
    if sharded and experts and any(hasattr(p, "ds_tensor") for p in params.values()):
        raise ValueError(
            "wanda cannot score fused expert tensors under DeepSpeed ZeRO-3: the input of down_proj is recomputed "
            "from gate_up_proj, which ZeRO-3 releases after the experts' forward. Exclude the experts "
            "(exclude_modules=['experts']), or score the experts under FSDP2 or unsharded."
        )
    sums: dict[str, torch.Tensor] = {}
    for name, param in params.items():
        info = targets[name]
        full = tuple(info.shape)
        width = full[-1]
        shape = (full[0], width) if info.expert_dim == 0 else (width,)
        sums[name] = torch.zeros(shape, dtype=torch.float32, device=param.device)
    state: dict[str, torch.Tensor | None] = {"mask": None}

    def linear_hook(name: str, _module: nn.Module):
        acc = sums[name]

        def hook(_mod: nn.Module, args: tuple, _output: Any) -> None:
            x = args[0].reshape(-1, args[0].shape[-1])
            mask = state["mask"].reshape(-1)
            if mask.numel() != x.shape[0]:
                # e.g. a per-expert module that only sees its routed tokens: which of them are response tokens is
                # unknown here, so refuse rather than silently measure the prompt too
                raise ValueError(
                    f"wanda cannot tell the response tokens of {name!r}: its input has {x.shape[0]} tokens, the batch "
                    f"{mask.numel()}. Exclude it (exclude_modules=[...])."
                )
            sel = x[mask.to(x.device)]
            acc.add_(sel.float().pow(2).sum(dim=0).to(acc.device))

        return hook

    expert_names = {m: [n for n in params if targets[n].module_name == m] for m in experts}

    def expert_hook(module_name: str, module: nn.Module):
        names = expert_names[module_name]

        def hook(_mod: nn.Module, args: tuple, _output: Any) -> None:
            hidden, top_k_index = args[0], args[1]
            mask = state["mask"]
            flat_mask = mask.reshape(-1).to(hidden.device) if mask is not None else None
            for name in names:
                param, acc = params[name], sums[name]
                role = targets[name].role
                for e in range(param.shape[0]):
                    routed = (top_k_index == e).any(dim=-1)
                    if flat_mask is not None:
                        routed = routed & flat_mask
                    if not bool(routed.any()):
                        continue
                    x = hidden[routed]
                    if role == "down":
                        gate_up = getattr(module, "gate_up_proj", None)
                        act = getattr(module, "act_fn", None)
                        if gate_up is None or act is None:
                            raise ValueError(
                                f"Cannot recompute the input of {name!r}: {type(module).__name__} has no gate_up_proj "
                                "/ act_fn. Exclude it from wanda."
                            )
                        gate, up = nn.functional.linear(x, gate_up[e]).chunk(2, dim=-1)
                        x = act(gate) * up
                    acc[e].add_(x.float().pow(2).sum(dim=0).to(acc.device))

        return hook

    rank, world = _dist_info()
    device = model_input_device(model)
    n_batches = calib.num_batches(batch_size)
    if sharded:  # lockstep: every rank runs the same number of forwards (the sharding gathers weights in each)
        steps = -(-n_batches // world)
        mine = [(s * world + rank, s * world + rank < n_batches) for s in range(steps)]
    else:
        mine = [(i, True) for i in range(n_batches) if i % world == rank]
    was_training = model.training
    model.eval()
    try:
        with (
            torch.no_grad(),
            ForwardHooks(linear, lambda n, m: linear_hook(n, m)),
            ForwardHooks(experts, lambda n, m: expert_hook(n, m)),
        ):
            for i, real in _progress(mine, len(mine), "wanda", progress and rank == 0):
                start = i * batch_size if real else 0
                rows = range(start, min(start + batch_size, len(calib)))
                batch = {k: v.to(device) for k, v in calib.collate(rows).items()}
                labels = batch.pop("labels")
                # a padding step (no batch left for this rank) measures no token
                state["mask"] = (labels != -100) if real else torch.zeros_like(labels, dtype=torch.bool)
                model(**batch, use_cache=False)
    finally:
        state["mask"] = None
        model.train(was_training)
    if world > 1:
        for t in sums.values():
            torch.distributed.all_reduce(t)
    if calib.num_loss_tokens == 0:
        raise ValueError("The CalibrationSet has no labelled token; wanda measures labelled positions only.")
    values = {}
    shards = {}
    for name, acc in sums.items():
        norm = acc.div_(len(calib)).sqrt_()
        shard = shard_of(params[name]) if sharded else None
        weight = local_values(params[name], shard).abs().float()
        expert = targets[name].expert_dim == 0
        if shard is None:
            values[name] = weight * (norm[:, None, :] if expert else norm[None, :])
        else:
            shards[name] = shard
            values[name] = weight.mul_(_channel_factor(norm, shard, tuple(targets[name].shape), expert))
    provenance = {
        "method": "wanda",
        "aggregation": "mean_over_samples",
        "tokens": "labelled",
        "sign": "nonnegative",
        "higher": "more important",
    }
    from .scores import Scores

    if not shards:
        return Scores(values, shapes=targets.shapes, provenance=provenance)
    from .distributed import sharded_fingerprints

    fingerprints = sharded_fingerprints({n: params[n] for n in shards}, shards, targets.shapes, Comm())
    return Scores(values, shapes=targets.shapes, provenance=provenance, shards=shards, fingerprints=fingerprints)


wanda.supports_sharding = True  # type: ignore[attr-defined]


def _channel_factor(norm: torch.Tensor, shard: Any, full: tuple[int, ...], expert: bool) -> torch.Tensor:
    """``||X_j||`` of each entry of a weight shard (shaped like the shard): the norm of its input column ``j`` (and
    of its expert, for fused expert tensors ``(E, d_out, d_in)``, whose ``norm`` is ``(E, d_in)``)."""
    if len(shard.grid) == len(full):  # a box of the full tensor
        cols = slice(shard.offsets[-1], shard.offsets[-1] + shard.shape[-1])
        if expert:
            lead = slice(shard.offsets[0], shard.offsets[0] + shard.shape[0])
            return norm[lead, cols][:, None, :]
        return norm[cols].reshape((1,) * (len(full) - 1) + (-1,))
    # a flat partition: the column (and expert) of each global flat index
    g = shard.to_global(torch.arange(shard.numel, device=norm.device))
    col = g % full[-1]
    if expert:
        return norm[g // math.prod(full[1:]), col]
    return norm[col]
