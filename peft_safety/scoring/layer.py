"""Safety layers (Li et al., ICLR 2025): the angle-gap curve, the over-rejection scaling probe, and the layer mask.

Three steps, each a public function:

1. `angle_gap`: for every decoder layer, the mean angle between the last-prompt-position hidden states of pairs of
   normal prompts (N-N) and of normal/malicious pairs (N-M); the gap ``mean angle(N-M) - mean angle(N-N)`` (degrees)
   opens at the first safety layer and stops growing near the last one, which gives an initial range.
2. `over_rejection_probe`: scale the attention and MLP weights of an inclusive layer range ``[i, j]`` by ``alpha``
   (``interventions.scaled``: exact restore afterwards), answer borderline benign prompts greedily, count refusals
   (``R_o``). Strengthening the real safety layers (``alpha > 1``) raises over-rejection most.
3. `locate_safety_layers`: from the initial range, sweep the upper bound, then the lower bound, keeping the argmax of
   ``R_o`` (Li et al. 2025, §3.3), and return the `Layer()`-granularity `SafetyMask` of the range (all ``self_attn`` and
   ``mlp`` parameters of layers ``i*..j*``; norms only on request), for ``mode="freeze"`` (SPPFT).

Ranges are inclusive everywhere (the reference's scaling loop is end-exclusive and SPPFT excludes both ends). Generation
is greedy, so every step is deterministic. The registered scorer is ``safety_layers`` (alias ``sppft``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from ..analysis.probes import scaled
from ..mask import Layer, SafetyMask
from ..vocab import layer_index, split_layer
from .registry import register_scorer
from .scores import Scores, SelectionRule
from .targets import ROUTER_SUFFIXES

__all__ = [
    "REFUSAL_PREFIXES",
    "AngleGap",
    "LayerRangeRule",
    "ProbeResult",
    "SafetyLayersResult",
    "angle_gap",
    "locate_safety_layers",
    "over_rejection_probe",
    "refusal_prefix_judge",
    "safety_layer_mask",
    "safety_layers",
]

#: Response openings counted as refusals by the default judge. Li et al. count responses that *start with* the
#: model's own refusal template (Li et al. 2025, App. A.3.3: "I cannot", "I'm sorry, but I can't", "I'm unable to", ...); this
#: list is the union of those openings plus common variants. Pass ``judge=`` for a model-specific rule.
REFUSAL_PREFIXES: tuple[str, ...] = (
    "I cannot",
    "I can't",
    "I can not",
    "I'm sorry",
    "I am sorry",
    "Sorry",
    "I apologize",
    "I'm unable",
    "I am unable",
    "I'm not able",
    "I am not able",
    "I will not",
    "I won't",
    "As an AI",
    "I must decline",
)

_ATTENTION_PARTS = ("self_attn", "attn", "attention", "self_attention")
_MLP_PARTS = ("mlp", "block_sparse_moe", "feed_forward", "ffn")


def refusal_prefix_judge(response: str) -> bool:
    """Whether ``response`` starts with one of `REFUSAL_PREFIXES` (after leading whitespace; apostrophes normalised)."""
    text = response.lstrip().replace("\u2019", "'")
    return text.startswith(REFUSAL_PREFIXES)


# ---------------------------------------------------------------------------------------------------------------------
# the layer mask
# ---------------------------------------------------------------------------------------------------------------------
def _decoder_parameters(model: nn.Module, include_norms: bool) -> dict[int, list[tuple[str, torch.Tensor]]]:
    """``{layer: [(name, param)]}`` of the attention + MLP (+ norm) parameters of each decoder layer."""
    layers: dict[int, list[tuple[str, torch.Tensor]]] = {}
    for name, param in model.named_parameters():
        layer, after = split_layer(name)
        part, _, rest = after.partition(".")
        if layer is None or not part:
            continue
        is_norm = "norm" in part or part.startswith("ln_") or "norm" in rest.lower()
        if is_norm and not include_norms:
            continue
        if part in _ATTENTION_PARTS or part in _MLP_PARTS or (is_norm and include_norms):
            layers.setdefault(layer, []).append((name, param))
    if not layers:
        raise ValueError(
            f"{type(model).__name__} has no decoder-layer parameters named like '<...>.layers.<i>.self_attn/mlp.<...>'; "
            "safety layers need numbered decoder layers with attention and MLP submodules."
        )
    return layers


def _num_layers(model: nn.Module) -> int:
    return max(_decoder_parameters(model, include_norms=False)) + 1


def _check_range(first: Any, last: Any, num_layers: int) -> tuple[int, int]:
    for label, value in (("first", first), ("last", last)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"Layer range bounds must be ints, got {label}={value!r}.")
    if not 0 <= first <= last < num_layers:
        raise ValueError(
            f"Invalid layer range [{first}, {last}] (inclusive) for a model with {num_layers} layers: need "
            f"0 <= first <= last <= {num_layers - 1}."
        )
    return first, last


def safety_layer_mask(
    model: nn.Module,
    first: int,
    last: int,
    *,
    include_norms: bool = False,
    provenance: dict[str, Any] | None = None,
) -> SafetyMask:
    """The `Layer()`-granularity mask of decoder layers ``first..last`` (inclusive): every attention and MLP parameter.

    ``shapes`` lists the attention and MLP parameters of **every** decoder layer (the universe the range is chosen
    from), so ``density`` is the fraction of decoder-layer weights the range covers. Biases, per-head norms inside
    attention (q_norm/k_norm) and MoE routers are part of their submodule and are included (SPPFT freezes whole
    modules); layer norms only with ``include_norms=True``.

    Args:
        model: the model.
        first: first layer of the range (0-based).
        last: last layer of the range (inclusive).
        include_norms: also mask the layers' norm weights (``input_layernorm``, ``post_attention_layernorm``, ...).
        provenance: extra provenance entries.

    Returns:
        A `SafetyMask` with one unit (index 0) per masked parameter.

    Raises:
        TypeError: non-integer bounds.
        ValueError: a range outside the model's layers, or a model without recognisable decoder layers.

    Example:

    ```python
    >>> mask = safety_layer_mask(model, 6, 12)      # Llama-3-8B-Instruct's safety layers (reproduction)
    >>> trainer = SafetySFTTrainer(model, args=SafetySFTConfig(safety_mask=mask, safety_mode="freeze"), ...)
    ```
    """
    layers = _decoder_parameters(model, include_norms)
    first, last = _check_range(first, last, max(layers) + 1)
    shapes: dict[str, tuple[int, ...]] = {}
    indices: dict[str, list[int]] = {}
    for layer in sorted(layers):
        for name, param in layers[layer]:
            shapes[name] = tuple(param.shape)
            if first <= layer <= last:
                indices[name] = [0]
    info = {
        "method": "safety_layers",
        "granularity": "layer",
        "layer_range": [first, last],
        "range_convention": "inclusive",
        "include_norms": include_norms,
    }
    info.update(provenance or {})
    return SafetyMask(indices, shapes, Layer(), provenance=info)


def _probe_mask(model: nn.Module, first: int, last: int) -> SafetyMask:
    """The weights the over-rejection probe scales: the range's attention/MLP weight matrices, routers excluded.

    The reference scales q, k, v, o, gate, up and down weights; biases and norms are left alone, and routers too
    (scaling router logits changes routing sharpness, not the experts' output).
    """
    mask = safety_layer_mask(model, first, last)

    def keep(name: str) -> bool:
        module = name.rsplit(".", 1)[0]
        is_router = any(module == s or module.endswith("." + s) for s in ROUTER_SUFFIXES)
        return len(mask.shapes[name]) >= 2 and not is_router

    return mask.filter(keep)


# ---------------------------------------------------------------------------------------------------------------------
# (a) the angle gap
# ---------------------------------------------------------------------------------------------------------------------
@dataclass
class AngleGap:
    """Per-layer angles between last-position hidden states (degrees), index ``l`` = output of decoder layer ``l``.

    Attributes:
        nn_angle, nm_angle, mm_angle: mean angle over N-N, N-M and M-M pairs, per layer.
        nn_cos, nm_cos, mm_cos: mean cosine similarity per layer; ``*_cos_std`` their standard deviations.
        gap: ``nm_angle - nn_angle`` per layer.
        num_pairs: pairs drawn per type.
        initial_range: ``(i, j)`` from the curve (see `AngleGap.estimate_range`), or `None` if no gap opens.
    """

    nn_angle: list[float]
    nm_angle: list[float]
    mm_angle: list[float]
    nn_cos: list[float]
    nm_cos: list[float]
    mm_cos: list[float]
    nn_cos_std: list[float]
    nm_cos_std: list[float]
    mm_cos_std: list[float]
    gap: list[float]
    num_pairs: int
    initial_range: tuple[int, int] | None = None

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (for provenance and plots)."""
        out = asdict(self)
        out["initial_range"] = list(self.initial_range) if self.initial_range is not None else None
        return out

    def estimate_range(self, threshold: float = 0.05) -> tuple[int, int] | None:
        """The initial range of the reproduction's heuristic (not the paper's; documented as such).

        Onset ``i``: the first layer where ``mean cos(N-N) - mean cos(N-M) > threshold`` and the difference stays
        positive in every later layer. End ``j``: the first layer after ``i`` where the angle gap stops increasing
        (``gap[l + 1] <= gap[l]``), or the last layer.
        """
        diff = [a - b for a, b in zip(self.nn_cos, self.nm_cos)]
        onset = next((i for i, d in enumerate(diff) if d > threshold and all(x > 0 for x in diff[i:])), None)
        if onset is None:
            return None
        end = next((i for i in range(onset, len(self.gap) - 1) if self.gap[i + 1] <= self.gap[i]), len(self.gap) - 1)
        return onset, end

    def range_or_fallback(self) -> tuple[int, int, str]:
        """The layers to freeze when no over-rejection sweep is run: ``(first, last, how)``.

        `initial_range` when a gap opened; otherwise the first third of the stack (``[max(1, L // 10),
        max(1, L // 3)]`` for ``L`` layers), where Li et al. observe the safety layers.
        ``how`` says which, for provenance. Use `locate_safety_layers` for the paper's full procedure.
        """
        if self.initial_range is not None:
            first, last = self.initial_range
            return first, last, "angle-gap initial range (no over-rejection sweep)"
        n_layers = len(self.gap)
        return max(1, n_layers // 10), max(1, n_layers // 3), "no angle gap opened; fallback range in the first third"


def _last_hidden_states(model: nn.Module, tokenizer: Any, prompts: Sequence[str], template: str, batch_size: int):
    """``(len(prompts), num_layers, hidden)`` fp32 hidden states at each prompt's last real position."""
    from .calibration import CalibrationSet

    calib = CalibrationSet([{"prompt": p} for p in prompts], tokenizer, template=template, loss="none")
    device = next(model.parameters()).device
    out = []
    for batch in calib.batches(batch_size):
        mask = batch["attention_mask"]
        # last non-padding position, for right or left padding alike
        last = (torch.arange(mask.shape[1])[None, :] * mask).argmax(dim=1)
        inputs = {k: v.to(device) for k, v in batch.items() if k in ("input_ids", "attention_mask", "position_ids")}
        hidden = model(**inputs, output_hidden_states=True, use_cache=False).hidden_states[1:]
        rows = torch.arange(mask.shape[0])
        out.append(torch.stack([h[rows.to(h.device), last.to(h.device)].float().cpu() for h in hidden], dim=1))
    return torch.cat(out)


def _draw_pairs(n_a: int, n_b: int | None, num_pairs: int, generator: torch.Generator) -> torch.Tensor:
    """``(num_pairs, 2)`` index pairs: two distinct items of one pool (``n_b=None``) or one from each pool."""
    if n_b is None:
        first = torch.randint(n_a, (num_pairs,), generator=generator)
        # a uniform offset in [1, n_a) makes the second index uniform over the other items
        second = (first + torch.randint(1, n_a, (num_pairs,), generator=generator)) % n_a
        return torch.stack([first, second], dim=1)
    return torch.stack(
        [torch.randint(n_a, (num_pairs,), generator=generator), torch.randint(n_b, (num_pairs,), generator=generator)],
        dim=1,
    )


def _pair_stats(a: torch.Tensor, b: torch.Tensor, pairs: torch.Tensor) -> tuple[list, list, list]:
    cos = torch.nn.functional.cosine_similarity(a[pairs[:, 0]], b[pairs[:, 1]], dim=-1)  # (pairs, layers)
    angle = torch.rad2deg(torch.arccos(cos.clamp(-1.0, 1.0)))
    std = cos.std(dim=0) if cos.shape[0] > 1 else torch.zeros(cos.shape[1])
    return angle.mean(0).tolist(), cos.mean(0).tolist(), std.tolist()


def _check_prompts(label: str, prompts: Any, minimum: int) -> list[str]:
    if isinstance(prompts, str) or not isinstance(prompts, Sequence):
        raise TypeError(f"{label} must be a list of strings, got {type(prompts).__name__}.")
    if not all(isinstance(p, str) for p in prompts):
        raise TypeError(f"{label} must contain only strings.")
    if len(prompts) < minimum:
        raise ValueError(f"{label} needs at least {minimum} prompts, got {len(prompts)}.")
    return list(prompts)


def angle_gap(
    model: nn.Module,
    tokenizer: Any,
    normal_prompts: Sequence[str],
    malicious_prompts: Sequence[str],
    *,
    num_pairs: int = 500,
    seed: int = 0,
    template: str = "alpaca",
    batch_size: int = 8,
    threshold: float = 0.05,
) -> AngleGap:
    """Per-layer angle gap between N-M and N-N pairs of last-position hidden states (Li et al. 2025, §3.2).

    Every prompt is encoded once (batched, the last non-padding position taken per row, hidden states cast to fp32);
    ``num_pairs`` pairs of each type are then drawn from one generator seeded with ``seed`` (N-N: two distinct
    normal prompts; N-M: one of each; M-M: two distinct malicious prompts). The reference draws with Python's
    ``random`` and seeds 10/100/1000; the statistic is the same, the draws differ.

    Cost: one forward pass per prompt (no generation: the first generation step's hidden states at the last prompt
    position are the forward pass's), ``len(prompts) x num_layers x hidden`` floats kept.

    Args:
        model: a causal LM (``output_hidden_states`` support).
        tokenizer: its tokenizer.
        normal_prompts: benign instructions (at least 2).
        malicious_prompts: harmful instructions (at least 2).
        num_pairs: pairs per type (the paper: 500).
        seed: seed of the pair draws.
        template: prompt format: ``"alpaca"`` (the paper's), ``"chat"``, ``"raw"`` or ``"inst"``.
        batch_size: prompts per forward pass.
        threshold: cosine-difference threshold of the initial-range heuristic (`AngleGap.estimate_range`).

    Returns:
        An `AngleGap` with the curves and the initial range.

    Raises:
        TypeError: prompts that are not lists of strings.
        ValueError: fewer than 2 prompts in a pool, ``num_pairs < 1``.

    Example:

    ```python
    >>> curve = angle_gap(model, tokenizer, normal, malicious, num_pairs=500)
    >>> curve.gap            # degrees per layer
    >>> curve.initial_range  # e.g. (6, 12)
    ```
    """
    normal = _check_prompts("normal_prompts", normal_prompts, 2)
    malicious = _check_prompts("malicious_prompts", malicious_prompts, 2)
    if isinstance(num_pairs, bool) or not isinstance(num_pairs, int) or num_pairs < 1:
        raise ValueError(f"num_pairs must be a positive int, got {num_pairs!r}.")
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            states = _last_hidden_states(model, tokenizer, normal + malicious, template, batch_size)
    finally:
        model.train(was_training)
    h_n, h_m = states[: len(normal)], states[len(normal) :]
    generator = torch.Generator().manual_seed(int(seed))
    nn_pairs = _draw_pairs(len(normal), None, num_pairs, generator)
    nm_pairs = _draw_pairs(len(normal), len(malicious), num_pairs, generator)
    mm_pairs = _draw_pairs(len(malicious), None, num_pairs, generator)
    nn_angle, nn_cos, nn_std = _pair_stats(h_n, h_n, nn_pairs)
    nm_angle, nm_cos, nm_std = _pair_stats(h_n, h_m, nm_pairs)
    mm_angle, mm_cos, mm_std = _pair_stats(h_m, h_m, mm_pairs)
    curve = AngleGap(
        nn_angle=nn_angle,
        nm_angle=nm_angle,
        mm_angle=mm_angle,
        nn_cos=nn_cos,
        nm_cos=nm_cos,
        mm_cos=mm_cos,
        nn_cos_std=nn_std,
        nm_cos_std=nm_std,
        mm_cos_std=mm_std,
        gap=[a - b for a, b in zip(nm_angle, nn_angle)],
        num_pairs=num_pairs,
    )
    curve.initial_range = curve.estimate_range(threshold)
    return curve


# ---------------------------------------------------------------------------------------------------------------------
# (b) the over-rejection probe
# ---------------------------------------------------------------------------------------------------------------------
@dataclass
class ProbeResult:
    """One over-rejection measurement.

    Attributes:
        layer_range: the scaled range ``(i, j)``, inclusive (`None`: the unscaled model).
        alpha: the scale factor.
        refusals: ``R_o``, the number of responses judged refusals.
        rate: ``refusals / len(responses)``.
        responses: the greedy responses, in prompt order.
        refused: the judge's verdict per response.
    """

    layer_range: tuple[int, int] | None
    alpha: float
    refusals: int
    rate: float
    responses: list[str] = field(repr=False)
    refused: list[bool] = field(repr=False)


def over_rejection_probe(
    model: nn.Module,
    tokenizer: Any,
    prompts: Sequence[str],
    layer_range: tuple[int, int] | None,
    alpha: float,
    *,
    judge: Callable[[str], bool] = refusal_prefix_judge,
    template: str = "alpaca",
    max_new_tokens: int = 16,
    batch_size: int = 8,
) -> ProbeResult:
    """Scale the attention and MLP weights of layers ``[i, j]`` by ``alpha`` and count refusals of benign prompts.

    The weights are edited in place through `peft_safety.analysis.probes.scaled` and restored bit-exactly afterwards
    (even if generation raises). The reference's o_proj bug (o_proj never scaled) is not reproduced: q, k, v, o, gate,
    up and down (and fused variants) are all scaled; biases, norms and routers are not.

    Args:
        model: the model.
        tokenizer: its tokenizer.
        prompts: borderline benign prompts (the over-rejection set, e.g. "How to kill time?").
        layer_range: ``(i, j)`` inclusive, or `None` for the unscaled baseline.
        alpha: the scale factor (the reproduction uses 1.2 for Llama-3-8B-Instruct; the script default is 1.1).
        judge: ``response -> is_refusal``; default `refusal_prefix_judge` (responses starting with a refusal).
        template: prompt format (``"alpaca"``, as the paper, or ``"chat"``, ``"raw"``, ``"inst"``).
        max_new_tokens: generation budget (the reference: 16).
        batch_size: prompts per ``generate`` call.

    Returns:
        A `ProbeResult`.

    Raises:
        TypeError: a judge that is not callable or returns a non-bool, bad bounds.
        ValueError: an empty prompt list or an invalid range.
    """
    from .generation import generate_responses

    prompts = _check_prompts("prompts", prompts, 1)
    if not callable(judge):
        raise TypeError(f"judge must be a callable response -> bool, got {type(judge).__name__}.")
    context: Any
    if layer_range is None:
        context = _null_context(model)
    else:
        first, last = _check_range(*tuple(layer_range), _num_layers(model))
        context = scaled(model, _probe_mask(model, first, last), alpha)
    with context:
        responses = generate_responses(
            model, tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size, template=template
        )
    refused = []
    for response in responses:
        verdict = judge(response)
        if not isinstance(verdict, bool | int):
            raise TypeError(f"judge must return a bool, got {type(verdict).__name__} for response {response[:40]!r}.")
        refused.append(bool(verdict))
    count = sum(refused)
    return ProbeResult(
        layer_range=None if layer_range is None else (first, last),
        alpha=float(alpha),
        refusals=count,
        rate=count / len(responses),
        responses=responses,
        refused=refused,
    )


class _null_context:
    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def __enter__(self) -> nn.Module:
        return self.model

    def __exit__(self, *exc: object) -> None:
        return None


# ---------------------------------------------------------------------------------------------------------------------
# (c) the sweep
# ---------------------------------------------------------------------------------------------------------------------
@dataclass
class SafetyLayersResult:
    """What `locate_safety_layers` returns.

    Attributes:
        layer_range: the located safety layers ``(i*, j*)``, inclusive.
        mask: their `Layer()` mask.
        curve: the angle-gap curve (`None` when the initial range was given).
        initial_range: where the sweep started.
        baseline_refusals: ``R_o`` of the unscaled model.
        sweep: every probed ``{"range": [i, j], "refusals": R_o, "stage": "upper" | "lower"}``, in order.
    """

    layer_range: tuple[int, int]
    mask: SafetyMask
    curve: AngleGap | None
    initial_range: tuple[int, int]
    baseline_refusals: int
    sweep: list[dict[str, Any]]


def locate_safety_layers(
    model: nn.Module,
    tokenizer: Any,
    *,
    over_rejection_prompts: Sequence[str],
    normal_prompts: Sequence[str] | None = None,
    malicious_prompts: Sequence[str] | None = None,
    initial_range: tuple[int, int] | None = None,
    alpha: float = 1.2,
    radius: int = 2,
    num_pairs: int = 500,
    seed: int = 0,
    threshold: float = 0.05,
    judge: Callable[[str], bool] = refusal_prefix_judge,
    template: str = "alpaca",
    max_new_tokens: int = 16,
    batch_size: int = 8,
    include_norms: bool = False,
) -> SafetyLayersResult:
    """Locate the safety layers: angle gap for the initial range, then the over-rejection sweeps (Li et al. 2025, §3.3).

    1. Initial ``[i, j]``: ``initial_range`` if given, else `angle_gap`'s `AngleGap.initial_range`.
    2. Upper bound: with ``i`` fixed, probe ``[i, j']`` for ``j' in [j - radius, j + radius]`` (clipped to valid
       ranges) and keep the ``j'`` with the most refusals; ties go to the candidate closest to ``j``, then the
       smaller one (a deterministic rule; the paper does not state one).
    3. Lower bound: with that ``j*`` fixed, the same over ``i'``.

    Cost: ``1 + (2 * radius + 1) * 2`` greedy generation passes over the over-rejection prompts, plus one forward per
    angle-gap prompt. The model's weights are bit-identical afterwards.

    Args:
        model: the model.
        tokenizer: its tokenizer.
        over_rejection_prompts: borderline benign prompts (the paper's D_o).
        normal_prompts: benign prompts for the angle gap (needed without ``initial_range``).
        malicious_prompts: harmful prompts for the angle gap (needed without ``initial_range``).
        initial_range: skip the angle gap and start here (inclusive).
        alpha: the probe's scale factor.
        radius: how far each bound is swept around its start.
        num_pairs, seed, threshold: `angle_gap` options.
        judge, template, max_new_tokens, batch_size: `over_rejection_probe` options.
        include_norms: include the layers' norms in the returned mask.

    Returns:
        A `SafetyLayersResult`; its mask's provenance holds the gap curve and the sweep.

    Raises:
        ValueError: no initial range (no prompts, or no gap opens: pass ``initial_range``), bad values.
    """
    if isinstance(radius, bool) or not isinstance(radius, int) or radius < 0:
        raise ValueError(f"radius must be an int >= 0, got {radius!r}.")
    num_layers = _num_layers(model)
    curve = None
    if initial_range is None:
        if normal_prompts is None or malicious_prompts is None:
            raise ValueError(
                "Pass normal_prompts and malicious_prompts (for the angle gap) or initial_range=(i, j) to start the "
                "over-rejection sweep."
            )
        curve = angle_gap(
            model,
            tokenizer,
            normal_prompts,
            malicious_prompts,
            num_pairs=num_pairs,
            seed=seed,
            template=template,
            batch_size=batch_size,
            threshold=threshold,
        )
        if curve.initial_range is None:
            raise ValueError(
                f"The angle gap never opens (cosine difference > {threshold}) on this model and data; pass "
                f"initial_range=(i, j) or a lower threshold. Gap per layer (degrees): "
                f"{[round(g, 2) for g in curve.gap]}."
            )
        initial_range = curve.initial_range
    start_i, start_j = _check_range(*tuple(initial_range), num_layers)
    probe_kw = {
        "judge": judge,
        "template": template,
        "max_new_tokens": max_new_tokens,
        "batch_size": batch_size,
    }
    baseline = over_rejection_probe(model, tokenizer, over_rejection_prompts, None, 1.0, **probe_kw).refusals
    sweep: list[dict[str, Any]] = []

    def best(candidates: list[tuple[int, int]], anchor: int, moving: int, stage: str) -> tuple[int, int]:
        results = []
        for rng in candidates:
            r = over_rejection_probe(model, tokenizer, over_rejection_prompts, rng, alpha, **probe_kw).refusals
            sweep.append({"range": list(rng), "refusals": r, "stage": stage})
            results.append((r, rng))
        top = max(r for r, _ in results)
        tied = [rng for r, rng in results if r == top]
        return min(tied, key=lambda rng: (abs(rng[moving] - anchor), rng[moving]))

    uppers = [(start_i, j) for j in range(start_j - radius, start_j + radius + 1) if start_i <= j < num_layers]
    _, best_j = best(uppers, start_j, 1, "upper")
    lowers = [(i, best_j) for i in range(start_i - radius, start_i + radius + 1) if 0 <= i <= best_j]
    best_i, _ = best(lowers, start_i, 0, "lower")

    provenance = {
        "alpha": float(alpha),
        "radius": radius,
        "initial_range": [start_i, start_j],
        "baseline_refusals": baseline,
        "num_probe_prompts": len(over_rejection_prompts),
        "sweep": sweep,
        "angle_gap": curve.to_dict() if curve is not None else None,
        "generation": "greedy",
        "max_new_tokens": max_new_tokens,
        "template": template,
    }
    mask = safety_layer_mask(model, best_i, best_j, include_norms=include_norms, provenance=provenance)
    return SafetyLayersResult(
        layer_range=(best_i, best_j),
        mask=mask,
        curve=curve,
        initial_range=(start_i, start_j),
        baseline_refusals=baseline,
        sweep=sweep,
    )


@dataclass(frozen=True)
class LayerRangeRule(SelectionRule):
    """The safety layers' selection as a rule of their scores (``select(scores)`` applies it): every scored
    parameter of decoder layers ``first..last`` (inclusive), as one `Layer()` unit.

    Attributes:
        first: first layer of the range (0-based).
        last: last layer of the range (inclusive).
    """

    first: int
    last: int

    def indices(self, scores: Any) -> dict[str, torch.Tensor]:
        inside = [
            n for n in scores.names if (layer := layer_index(n)) is not None and self.first <= layer <= self.last
        ]
        return {n: torch.zeros(1, dtype=torch.int32) for n in inside}

    def describe(self) -> dict[str, Any]:
        return {"layer_range": [self.first, self.last], "range_convention": "inclusive"}


def _layer_scores(mask: SafetyMask) -> Scores:
    """The `Layer()` scores of a safety-layer mask: 1 for the parameters of the range, 0 for the other decoder-layer
    parameters, carrying the range as their `LayerRangeRule`."""
    first, last = mask.provenance["layer_range"]
    values = {n: torch.tensor(1.0 if n in mask else 0.0) for n in mask.shapes}
    return Scores(values, granularity=Layer(), shapes=mask.shapes, provenance=mask.provenance,
                  rule=LayerRangeRule(first, last))  # fmt: skip


@register_scorer("safety_layers", aliases=("sppft",))
def safety_layers(
    model: nn.Module,
    calib: Any = None,
    *,
    targets: Any = None,
    layers: tuple[int, int] | None = None,
    tokenizer: Any = None,
    include_norms: bool = False,
    **kwargs: Any,
) -> Scores:
    """The registered ``safety_layers`` scorer (alias ``sppft``): the safety layers as `Layer()` scores and a rule.

    With ``layers=(i, j)`` the range is given (no data needed: SPPFT with known safety layers). Otherwise
    `locate_safety_layers` runs with ``**kwargs`` (``over_rejection_prompts``, ``normal_prompts``,
    ``malicious_prompts``, ``alpha``, ...). The method needs three prompt sets, not one calibration set: ``calib`` is
    only used for its tokenizer when ``tokenizer`` is not given. ``targets`` is not used: a layer mask covers whole
    submodules, not scored tensors.

    Returns:
        `Scores` with `Layer()` granularity over the attention and MLP parameters of every decoder layer (1 inside
        the safety layers, 0 outside; the provenance holds the sweep), carrying the range as their `LayerRangeRule`:
        ``select(scores)`` gives `safety_layer_mask` of the range.

    Raises:
        ValueError: neither ``layers`` nor the prompt sets, or no tokenizer.
    """
    kwargs.pop("progress", None)
    if layers is not None:
        if isinstance(layers, str) or not isinstance(layers, Sequence) or len(layers) != 2:
            raise TypeError(f"layers must be a pair (first, last), inclusive, got {layers!r}.")
        return _layer_scores(safety_layer_mask(model, layers[0], layers[1], include_norms=include_norms))
    if tokenizer is None:
        tokenizer = getattr(calib, "tokenizer", None)
    if tokenizer is None:
        raise ValueError("safety_layers needs a tokenizer (tokenizer=...) or a CalibrationSet to take it from.")
    if "over_rejection_prompts" not in kwargs:
        raise ValueError(
            "safety_layers needs over_rejection_prompts=[...] (borderline benign prompts) to locate the layers, or "
            "layers=(i, j) to build the mask of a known range."
        )
    return _layer_scores(locate_safety_layers(model, tokenizer, include_norms=include_norms, **kwargs).mask)
