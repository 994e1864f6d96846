"""Safety neurons (SN-Tune / PLND, Zhao et al. ICLR 2025) and RSN-Tune's safety-minus-foundation mask.

Forward passes only (no gradients). For every sample (one row of the `CalibrationSet`), every decoder layer and every
module, a per-unit importance is computed:

* **FFN neurons** (unit ``k`` of the intermediate space, shared by gate row ``k``, up row ``k`` and down column
  ``k``): ``sum_t |h_t[k]|`` with ``h = act(x W_gate^T) * (x W_up^T)`` the input of ``down_proj``, summed over the
  sample's positions. This is the PLND paper's "activation" form without ``||W_down[:, k]||``; the reference code
  used ``sum_t |x_t W_up^T|`` (no gate), see ``docs/scorers/safety_neurons.md``.
* **q/k neurons** (query-space dimension ``(h, d)``): attention deactivation,
  ``sum_{i, j} (softmax_j(A_ij - s q_{ihd} k_{jhd}) - softmax_j(A_ij))^2`` with ``A`` the masked, scaled attention
  logits of head ``h`` and ``s`` the attention scaling (``1/sqrt(d_h)``): the change of the attention map when that
  dimension is removed. Computed exactly, chunked over head dimensions so that at most ``chunk_elements`` perturbed
  attention entries exist at once (never the ``H * d_h * T^2`` tensor). q row ``h * d_h + d`` gets the score of
  ``(h, d)``. A k row of kv head ``kv`` is read by the ``g = H / H_kv`` query heads of its group, and deactivating
  it removes the rank-1 term from all of them; the heads' attention maps change independently, so the exact score of
  the kv row is the **sum** of the query-space scores of the dims that map to it (``query_to_kv_rows``:
  ``floor(h / g) * d_h + d``, never SN-Tune's ``index // g``).
* **v/o neurons**: ``sum_t |(softmax(A) V)_{t, h, d}|``, the attention output per query-space dimension. o column
  ``h * d_h + d`` gets it directly; a v row gets the sum over the query heads of its group (as for k).

Selection (PLND): per sample, per module and per layer, the top-``k`` units (``top_k_attn`` for q/k/v/o,
``top_k_ffn`` for gate/up/down; an int or a fraction of the module's units; only units with a positive score count,
so an expert that a sample never routes to gets no vote); then the units in the top-``k`` of at least
``min_support`` of the samples (``1.0`` = PLND's intersection over all documents); then optionally at most
``max_per_module`` units per module, the ones with the highest **mean score** over samples (SN-Tune's "100 per
module" cap, taken by score instead of Python-set order). Ties are broken by the lower unit index everywhere.

MoE: fused transformers 5 expert tensors are scored per expert (``gate_up_proj`` rows ``e * 2 ff + k`` and
``e * 2 ff + ff + k``, ``down_proj`` columns ``e * ff + k``, as in docs/concepts.md), each expert being its own module
for the per-sample top-k; the importance of an expert neuron sums ``|h|`` over the tokens routed to that expert
(routing weights not applied, like the dense case ignores ``W_down``). Shared experts are ordinary MLPs. Routers are
never neurons. Per-expert ``nn.Linear`` modules (``experts.{e}.w1``) are skipped with a warning: their inputs are
the routed tokens without their batch position, so per-sample statistics are not recoverable from a hook.

Memory: the per-sample scores of one batch (``B x units`` per module, fp32) plus, per attention layer during the
forward, the fp32 attention map and ``chunk_elements`` perturbed entries (x3 for temporaries). Accumulators: one fp32
mean and one int32 support count per unit.

The attention statistics need the post-RoPE queries and keys as the model uses them: during scoring the model's
``config._attn_implementation`` is switched to an eager implementation of ours, registered once in transformers'
``AttentionInterface`` / ``AttentionMaskInterface`` under the name ``"peft_safety_capture"``, and always switched back.
Models whose attention does not go through that interface are rejected with an error naming the modules to exclude.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ..mask import Neuron, SafetyMask
from .registry import register_scorer
from .scores import Scores, SelectionRule
from .targets import Targets, query_to_kv_rows, resolve_targets

if TYPE_CHECKING:  # pragma: no cover
    from .calibration import CalibrationSet

__all__ = [
    "ATTENTION_ROLES",
    "FFN_ROLES",
    "SafetyNeuronResult",
    "SupportRule",
    "attention_deactivation_scores",
    "detect_safety_neurons",
    "rsn_tune_mask",
    "safety_neurons",
]

#: roles whose units are scored by the attention statistics
ATTENTION_ROLES = ("q", "k", "v", "o")
#: roles whose units are scored by the FFN activation statistic
FFN_ROLES = ("gate", "up", "down")
#: SN-Tune trains rows of q, k, v, up and columns of down (gate and o are scored by the reference, never tuned)
DEFAULT_MODULES = ("q", "k", "v", "up", "down")
_ATTN_NAME = "peft_safety_capture"
_SINK: contextvars.ContextVar[_BatchState | None] = contextvars.ContextVar("peft_safety_neuron_sink", default=None)


# ---------------------------------------------------------------------------------------------------------------------
# attention statistics
# ---------------------------------------------------------------------------------------------------------------------
def _repeat_kv(x: torch.Tensor, groups: int) -> torch.Tensor:
    """(B, H_kv, S, d) -> (B, H_kv * groups, S, d), query head h reading kv head h // groups."""
    return x if groups == 1 else x.repeat_interleave(groups, dim=1)


def attention_deactivation_scores(
    query: torch.Tensor,
    key: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    *,
    scaling: float,
    query_mask: torch.Tensor | None = None,
    chunk_elements: int = 2**24,
) -> torch.Tensor:
    """PLND's q/k importance: how much the attention map changes when one query-space dimension is removed.

    For head ``h`` and dimension ``d``: ``sum_i sum_j (softmax_j(A_ij - scaling * q_{i,d} k_{j,d}) - P_ij)^2`` with
    ``A`` the scaled, masked logits and ``P = softmax(A)``, summed over the valid query positions ``i``. Exact, in
    fp32, chunked over ``d`` so that at most ``chunk_elements`` perturbed entries exist at once.

    Args:
        query: ``(B, H, T, d)`` post-RoPE queries.
        key: ``(B, H_kv, S, d)`` post-RoPE keys (``H`` a multiple of ``H_kv``: GQA).
        attention_mask: additive mask broadcastable to ``(B, H, T, S)`` (0 = attend, very negative = masked), or
            `None`.
        scaling: the logits scale (``1 / sqrt(d)`` for most models).
        query_mask: ``(B, T)`` bool, the query positions that count (padding excluded); `None` = all.
        chunk_elements: memory budget in perturbed attention entries (``B * H * chunk * T * S``); at least one
            dimension is processed at a time.

    Returns:
        ``(B, H, d)`` fp32 scores in query space.

    Raises:
        ValueError: inconsistent shapes.

    Example:

    ```python
    >>> q, k = torch.randn(1, 4, 5, 8), torch.randn(1, 2, 5, 8)
    >>> attention_deactivation_scores(q, k, scaling=8**-0.5).shape
    torch.Size([1, 4, 8])
    ```
    """
    if query.dim() != 4 or key.dim() != 4 or query.shape[-1] != key.shape[-1] or query.shape[0] != key.shape[0]:
        raise ValueError(
            f"query must be (B, H, T, d) and key (B, H_kv, S, d) with the same B and d, got {tuple(query.shape)} "
            f"and {tuple(key.shape)}."
        )
    batch, heads, t_len, dim = query.shape
    if heads % key.shape[1]:
        raise ValueError(f"{heads} query heads are not a multiple of {key.shape[1]} key heads.")
    q = query.float()
    k = _repeat_kv(key.float(), heads // key.shape[1])
    logits = _logits(q, k, attention_mask, scaling)
    probs = torch.softmax(logits, dim=-1)
    s_len = k.shape[2]
    valid = (
        torch.ones(batch, t_len, dtype=torch.bool, device=q.device)
        if query_mask is None
        else query_mask.to(device=q.device, dtype=torch.bool)
    )
    out = torch.zeros(batch, heads, dim, dtype=torch.float32, device=q.device)
    step = max(1, int(chunk_elements) // max(1, batch * heads * t_len * s_len))
    qt, kt = q.transpose(2, 3), k.transpose(2, 3)  # (B, H, d, T), (B, H, d, S)
    for d0 in range(0, dim, step):
        d1 = min(dim, d0 + step)
        # the rank-1 logit term each dimension contributes: (B, H, c, T, S)
        term = (scaling * qt[:, :, d0:d1, :, None]) * kt[:, :, d0:d1, None, :]
        changed = torch.softmax(logits[:, :, None] - term, dim=-1)
        sq = (changed - probs[:, :, None]).square().sum(-1)  # (B, H, c, T)
        # where() and not a product: a fully masked padding row may hold NaN, which 0 * NaN would keep
        sq = torch.where(valid[:, None, None, :], sq, torch.zeros((), dtype=sq.dtype, device=sq.device))
        out[:, :, d0:d1] = sq.sum(-1)
    return out


def _logits(q: torch.Tensor, k: torch.Tensor, attention_mask: torch.Tensor | None, scaling: float) -> torch.Tensor:
    logits = torch.matmul(q, k.transpose(-1, -2)) * scaling
    if attention_mask is not None:
        logits = logits + attention_mask[..., : k.shape[-2]].float()
    return logits


def _capture_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor]:
    """An eager attention (transformers' ``AttentionInterface`` signature) that also feeds the active scoring state.

    The output is what eager attention computes (fp32 softmax, output cast back to the query dtype); dropout is not
    applied (scoring runs in eval mode).
    """
    if kwargs.get("softcap") is not None or kwargs.get("s_aux") is not None:
        raise ValueError(
            f"{type(module).__name__} uses attention logit soft-capping or sinks, which safety-neuron scoring does not "
            "model. Exclude its q/k/v/o projections (exclude_modules=['q_proj', 'k_proj', 'v_proj', 'o_proj'])."
        )
    if scaling is None:
        scaling = getattr(module, "scaling", query.shape[-1] ** -0.5)
    groups = query.shape[1] // key.shape[1]
    logits = _logits(query.float(), _repeat_kv(key.float(), groups), attention_mask, scaling)
    probs = torch.softmax(logits, dim=-1)
    output = torch.matmul(probs, _repeat_kv(value.float(), groups))  # (B, H, T, d)
    state = _SINK.get()
    if state is not None:
        state.on_attention(module, query, key, attention_mask, float(scaling), output)
    return output.to(query.dtype).transpose(1, 2).contiguous(), probs.to(query.dtype)


def _register_capture() -> None:
    """Register the capturing attention (and the eager mask format it needs) in transformers, once."""
    from transformers.masking_utils import AttentionMaskInterface, eager_mask
    from transformers.modeling_utils import AttentionInterface

    # register() writes the class-level table, which both the attention and the mask dispatch read
    if AttentionInterface._global_mapping.get(_ATTN_NAME) is not _capture_attention:
        AttentionInterface.register(_ATTN_NAME, _capture_attention)
    if AttentionMaskInterface._global_mapping.get(_ATTN_NAME) is not eager_mask:
        AttentionMaskInterface.register(_ATTN_NAME, eager_mask)


@contextlib.contextmanager
def _capturing(model: nn.Module, state: _BatchState) -> Iterator[None]:
    """Route ``model``'s attention through `_capture_attention` and the hooks into ``state``; always undo both."""
    _register_capture()
    configs: dict[int, Any] = {}
    for module in model.modules():
        config = getattr(module, "config", None)
        if config is not None and hasattr(config, "_attn_implementation_internal"):
            configs.setdefault(id(config), config)
            for key in getattr(config, "sub_configs", {}) or {}:
                sub = getattr(config, key, None)
                if sub is not None and hasattr(sub, "_attn_implementation_internal"):
                    configs.setdefault(id(sub), sub)
    saved = [(config, config._attn_implementation_internal) for config in configs.values()]
    handles: list[Any] = []
    token = _SINK.set(state)
    try:
        for config, _ in saved:
            config._attn_implementation_internal = _ATTN_NAME
        handles = state.install_hooks(model)
        yield
    finally:
        for handle in handles:
            handle.remove()
        for config, value in saved:
            config._attn_implementation_internal = value
        _SINK.reset(token)


# ---------------------------------------------------------------------------------------------------------------------
# the plan: which parameter gets which statistic, and its modules ("slots") for the per-sample top-k
# ---------------------------------------------------------------------------------------------------------------------
@dataclass
class _Slot:
    """One module of one layer: units ``[start, stop)`` of a parameter's score vector, with its role."""

    name: str
    start: int
    stop: int
    role: str


@dataclass
class _Plan:
    names: list[str] = field(default_factory=list)  # scored parameters, model order
    units: dict[str, int] = field(default_factory=dict)
    axes: dict[str, int] = field(default_factory=dict)
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    slots: list[_Slot] = field(default_factory=list)
    # attention module path -> [(param name, role, offset)] for q/k/v/o (offset: row offset inside a fused qkv)
    attention: dict[str, list[tuple[str, str, int]]] = field(default_factory=dict)
    # down_proj module path -> [(param name, role, offset)] for gate/up/down of that MLP
    mlp: dict[str, list[tuple[str, str, int]]] = field(default_factory=dict)
    # fused experts module path -> [(param name, role)] ("gate_up" or "down")
    experts: dict[str, list[tuple[str, str]]] = field(default_factory=dict)


def _parent(path: str) -> str:
    return path.rsplit(".", 1)[0] if "." in path else ""


def _build_plan(model: nn.Module, targets: Targets, modules: Sequence[str]) -> _Plan:
    plan = _Plan()
    wanted = set(modules)
    skipped_experts: list[str] = []
    named_modules = dict(model.named_modules())
    for name, info in targets.items():
        parts = info.fused or ((info.role, 0, None),)
        roles = {part[0] for part in parts}
        if not roles & wanted:
            continue
        if info.expert is not None:
            skipped_experts.append(name)
            continue
        if info.neuron_axis is None or not roles <= {*ATTENTION_ROLES, *FFN_ROLES}:
            continue
        granularity = Neuron(info.neuron_axis)
        n_units = granularity.num_units(info.shape)
        module_path = info.module_name
        if info.expert_dim == 0:  # fused (E, d_out, d_in) experts: one module per expert
            n_experts = info.shape[0]
            per_expert = n_units // n_experts
            for e in range(n_experts):
                for role, start, stop in parts:
                    stop = per_expert if stop is None else stop
                    if role in wanted:
                        plan.slots.append(_Slot(name, e * per_expert + start, e * per_expert + stop, role))
            plan.experts.setdefault(module_path, []).append((name, info.role))
        else:
            for role, start, stop in parts:
                if role in wanted:
                    plan.slots.append(_Slot(name, start, n_units if stop is None else stop, role))
            if roles & set(ATTENTION_ROLES):
                for role, start, _ in parts:
                    plan.attention.setdefault(_parent(module_path), []).append((name, role, start))
            else:
                down_path = _find_down(named_modules, _parent(module_path))
                if down_path is None:
                    warnings.warn(
                        f"safety_neurons: no down projection found next to {module_path!r}; its neurons are not "
                        "scored. Pass exclude_modules to silence this.",
                        UserWarning,
                        stacklevel=3,
                    )
                    plan.slots = [s for s in plan.slots if s.name != name]
                    continue
                for role, start, _ in parts:
                    plan.mlp.setdefault(down_path, []).append((name, role, start))
        plan.names.append(name)
        plan.units[name] = n_units
        plan.axes[name] = info.neuron_axis
        plan.shapes[name] = tuple(info.shape)
    if skipped_experts:
        warnings.warn(
            f"safety_neurons: {len(skipped_experts)} per-expert nn.Linear weights (first: {skipped_experts[0]!r}) are "
            "not scored: their inputs carry no batch position, so per-sample statistics cannot be recovered. Use a "
            "model with fused expert tensors, or exclude them with exclude_modules=['experts'] to silence this.",
            UserWarning,
            stacklevel=3,
        )
    if not plan.names:
        raise ValueError(
            f"No parameter to score: none of the targets has a role in modules={list(modules)} (roles seen: "
            f"{sorted({i.role for i in targets.values()})}). Safety neurons score q, k, v, o, gate, up and down "
            "projections; check target_modules / exclude_modules."
        )
    return plan


def _find_down(named_modules: dict[str, nn.Module], mlp_path: str) -> str | None:
    from .targets import SUFFIX_ROLES

    mlp = named_modules.get(mlp_path)
    if mlp is None:
        return None
    for child_name, child in mlp.named_children():
        if SUFFIX_ROLES.get(child_name) == "down" and isinstance(child, nn.Linear):
            return f"{mlp_path}.{child_name}" if mlp_path else child_name
    return None


# ---------------------------------------------------------------------------------------------------------------------
# one batch: hooks fill per-sample scores
# ---------------------------------------------------------------------------------------------------------------------
class _BatchState:
    """Per-batch, per-sample score buffers ``{name: (B, units)}`` filled by the hooks and the capturing attention."""

    def __init__(self, model: nn.Module, plan: _Plan, chunk_elements: int) -> None:
        self.plan = plan
        self.chunk_elements = chunk_elements
        self.modules = dict(model.named_modules())
        self.attention_paths = {id(self.modules[p]): p for p in plan.attention if p in self.modules}
        missing = [p for p in plan.attention if p not in self.modules]
        if missing:
            raise ValueError(f"Attention module {missing[0]!r} not found in the model.")
        self.seen_attention: set[str] = set()
        self.scores: dict[str, torch.Tensor] = {}
        self.valid: torch.Tensor | None = None

    def start(self, valid: torch.Tensor) -> None:
        self.valid = valid
        batch = valid.shape[0]
        self.scores = {
            n: torch.zeros(batch, u, dtype=torch.float32, device=valid.device) for n, u in self.plan.units.items()
        }

    def _add(self, name: str, offset: int, values: torch.Tensor) -> None:
        self.scores[name][:, offset : offset + values.shape[1]] += values.to(self.scores[name].device)

    # --- attention
    def on_attention(self, module, query, key, attention_mask, scaling, output) -> None:
        path = self.attention_paths.get(id(module))
        if path is None:
            return
        self.seen_attention.add(path)
        valid = self.valid.to(query.device)
        if valid.shape[1] != query.shape[2]:
            raise ValueError(
                f"Attention of {path!r} saw {query.shape[2]} query positions for a batch of length {valid.shape[1]}; "
                "safety-neuron scoring needs one full forward pass per batch (no cache)."
            )
        members = self.plan.attention[path]
        roles = {role for _, role, _ in members}
        batch, heads, _, dim = query.shape
        kv_heads = key.shape[1]
        kv_rows = query_to_kv_rows(torch.arange(heads * dim), heads, kv_heads, dim).to(query.device)
        qk = vo = None
        if roles & {"q", "k"}:
            qk = attention_deactivation_scores(
                query, key, attention_mask, scaling=scaling, query_mask=valid, chunk_elements=self.chunk_elements
            ).reshape(batch, heads * dim)
        if roles & {"v", "o"}:
            vo = torch.where(valid[:, None, :, None], output.abs(), torch.zeros((), device=output.device))
            vo = vo.sum(2).reshape(batch, heads * dim)
        for name, role, offset in members:
            if role == "q":
                self._add(name, offset, qk)
            elif role == "o":
                self._add(name, offset, vo)
            elif role in ("k", "v"):
                src = qk if role == "k" else vo
                grouped = torch.zeros(batch, kv_heads * dim, dtype=torch.float32, device=src.device)
                grouped.index_add_(1, kv_rows, src)  # exact: the g query heads of a kv row change independently
                self._add(name, offset, grouped)

    # --- dense MLP: the input of down_proj is act(gate) * up
    def _mlp_hook(self, path: str) -> Callable:
        def hook(module, args):
            hidden = args[0]
            batch, length = self.valid.shape
            hidden = hidden.reshape(batch, length, -1).float()
            valid = self.valid.to(hidden.device)
            act = torch.where(valid[..., None], hidden.abs(), torch.zeros((), device=hidden.device)).sum(1)
            for name, _role, offset in self.plan.mlp[path]:
                self._add(name, offset, act)

        return hook

    # --- fused experts: recompute each expert's act(gate) * up for its routed tokens
    def _experts_hook(self, path: str) -> Callable:
        def hook(module, args, kwargs, _output):
            hidden = kwargs.get("hidden_states", args[0] if args else None)
            top_k_index = kwargs.get("top_k_index", args[1] if len(args) > 1 else None)
            gate_up = module.gate_up_proj
            n_experts, two_ff, _ = gate_up.shape
            ff = two_ff // 2
            batch, length = self.valid.shape
            valid = self.valid.to(hidden.device).reshape(-1)
            per_sample = torch.zeros(batch, n_experts * ff, dtype=torch.float32, device=hidden.device)
            sample_of = torch.arange(batch * length, device=hidden.device) // length
            for e in range(n_experts):
                tokens = (top_k_index == e).any(-1).nonzero().reshape(-1)
                tokens = tokens[valid[tokens]]
                if tokens.numel() == 0:
                    continue
                gate, up = nn.functional.linear(hidden[tokens].float(), gate_up[e].float()).chunk(2, dim=-1)
                act = (module.act_fn(gate) * up).abs()
                per_sample[:, e * ff : (e + 1) * ff].index_add_(0, sample_of[tokens], act)
            for name, role in self.plan.experts[path]:
                if role == "down":
                    self._add(name, 0, per_sample)
                else:  # gate_up rows: expert e holds [gate 0..ff) [up ff..2ff)
                    per_expert = per_sample.reshape(batch, n_experts, 1, ff).expand(batch, n_experts, 2, ff)
                    self._add(name, 0, per_expert.reshape(batch, n_experts * two_ff))

        return hook

    def install_hooks(self, model: nn.Module) -> list[Any]:
        handles = []
        try:
            for path in self.plan.mlp:
                handles.append(self.modules[path].register_forward_pre_hook(self._mlp_hook(path)))
            for path in self.plan.experts:
                module = self.modules[path]
                _check_experts_layout(path, module)
                handles.append(module.register_forward_hook(self._experts_hook(path), with_kwargs=True))
        except BaseException:
            for handle in handles:
                handle.remove()
            raise
        return handles


def _check_experts_layout(path: str, module: nn.Module) -> None:
    gate_up, down = getattr(module, "gate_up_proj", None), getattr(module, "down_proj", None)
    ok = (
        isinstance(gate_up, torch.Tensor)
        and isinstance(down, torch.Tensor)
        and gate_up.dim() == 3
        and down.dim() == 3
        and gate_up.shape[1] == 2 * down.shape[2]
        and callable(getattr(module, "act_fn", None))
        and getattr(module, "has_gate", True)
        and getattr(module, "is_concatenated", True)
        and not getattr(module, "is_transposed", False)
        and not getattr(module, "has_bias", False)
    )
    if not ok:
        raise ValueError(
            f"Fused experts {path!r} ({type(module).__name__}) do not have the layout safety-neuron scoring reads "
            "(gate_up_proj (E, 2*ff, h) concatenated [gate; up], down_proj (E, h, ff), act_fn, no bias). Exclude "
            "them with exclude_modules=['experts.gate_up_proj', 'experts.down_proj']."
        )


# ---------------------------------------------------------------------------------------------------------------------
# public API
# ---------------------------------------------------------------------------------------------------------------------
@dataclass
class SafetyNeuronResult:
    """What `detect_safety_neurons` returns.

    Attributes:
        mask: the selected neurons (`SafetyMask`, ``Neuron(axis)`` per parameter: rows of q/k/v/gate/up, columns of
            o/down).
        scores: the mean importance over samples per unit (`Scores`, same granularity), for plots and other selections.
        support: ``{name: int32 tensor}``: in how many samples' top-k each unit was.
        num_samples: number of samples.
    """

    mask: SafetyMask
    scores: Scores
    support: dict[str, torch.Tensor]
    num_samples: int


def _check_k(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"{name} must be an int (units per module) or a float fraction in (0, 1], got {value!r}.")
    if isinstance(value, int) and value < 1:
        raise ValueError(f"{name} must be >= 1 when an int, got {value}.")
    if isinstance(value, float) and not 0.0 < value <= 1.0:
        raise ValueError(f"{name} must be in (0, 1] when a float (a fraction of each module's units), got {value}.")


def _k_of(value: int | float, n_units: int) -> int:
    if isinstance(value, float):
        return max(1, min(n_units, math.ceil(value * n_units)))
    return min(n_units, value)


def _top_units(values: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the ``k`` largest entries per row of ``values`` (B, n); ties -> lower index (stable sort)."""
    order = torch.sort(values, dim=-1, descending=True, stable=True).indices
    return order[..., :k]


def detect_safety_neurons(
    model: nn.Module,
    calib: CalibrationSet,
    *,
    targets: Targets | None = None,
    modules: Sequence[str] | str = DEFAULT_MODULES,
    top_k_attn: int | float = 0.5,
    top_k_ffn: int | float = 0.8,
    min_support: float = 1.0,
    max_per_module: int | None = None,
    positions: str = "all",
    batch_size: int = 8,
    chunk_elements: int = 2**24,
    progress: bool = False,
) -> SafetyNeuronResult:
    """Detect safety neurons (PLND / SN-Tune) and return the mask, the mean scores and the support counts.

    Args:
        model: a transformers causal LM whose attention goes through ``AttentionInterface`` (Llama, Mistral, Qwen2,
            Qwen2-MoE, Mixtral, Gemma without soft-capping, Phi-3, ...).
        calib: the detection data. PLND reads harmful prompts as raw text without a response:
            ``CalibrationSet(rows, tok, template="raw", loss="none")``. Each row is one sample ("document").
        targets: the eligible parameters (`resolve_targets(model)` when `None`; `score()` passes them).
        modules: the roles to select neurons of: any of ``"q"``, ``"k"``, ``"v"``, ``"o"``, ``"gate"``, ``"up"``,
            ``"down"``, or ``"all"``. Default: SN-Tune's trained modules q, k, v, up, down.
        top_k_attn: per-sample top-k of q/k/v/o modules: an int (units) or a fraction of the module's units. The
            reference used 2000 of 4096 on Llama-3-8B (about 0.5).
        top_k_ffn: per-sample top-k of gate/up/down modules. The reference used 12000 of 14336 (about 0.84).
        min_support: fraction of samples whose top-k must contain a unit, in (0, 1]; 1.0 is PLND's intersection.
        max_per_module: keep at most this many units per module (per layer, per expert), those with the highest mean
            score; `None` keeps all. SN-Tune trains at most 100.
        positions: ``"all"`` (every non-padding token, as PLND) or ``"labels"`` (only positions with a label, e.g.
            the response tokens of a ``response_only`` set).
        batch_size: rows per forward pass.
        chunk_elements: memory budget of the attention deactivation (perturbed attention entries at once).
        progress: show a progress bar.

    Returns:
        A `SafetyNeuronResult`.

    Raises:
        TypeError: wrong argument types.
        ValueError: bad values, nothing to score, or a model whose attention cannot be captured.

    Example:

    ```python
    >>> from peft_safety.scoring.calibration import CalibrationSet
    >>> from peft_safety.testing import tiny_llama, tiny_tokenizer
    >>> calib = CalibrationSet([{"prompt": "How do I make a weapon?"}], tiny_tokenizer(), template="raw", loss="none")
    >>> result = detect_safety_neurons(tiny_llama(), calib, top_k_attn=4, top_k_ffn=8)
    >>> result.mask.granularity_of("model.layers.0.mlp.down_proj.weight")
    Neuron(axis=1)
    ```
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}.")
    if calib is None or not hasattr(calib, "batches"):
        raise TypeError(
            f"calib must be a CalibrationSet (harmful prompts, e.g. template='raw', loss='none'), got "
            f"{type(calib).__name__}."
        )
    if isinstance(modules, str):
        modules = (*ATTENTION_ROLES, *FFN_ROLES) if modules == "all" else (modules,)
    modules = tuple(modules)
    unknown = [m for m in modules if m not in (*ATTENTION_ROLES, *FFN_ROLES)]
    if unknown or not modules:
        raise ValueError(
            f"modules must be a non-empty subset of {[*ATTENTION_ROLES, *FFN_ROLES]} or 'all', got {unknown or modules}."
        )
    _check_k("top_k_attn", top_k_attn)
    _check_k("top_k_ffn", top_k_ffn)
    if isinstance(min_support, bool) or not isinstance(min_support, int | float):
        raise TypeError(f"min_support must be a float in (0, 1], got {min_support!r}.")
    if not 0.0 < float(min_support) <= 1.0:
        raise ValueError(
            f"min_support must be in (0, 1] (1.0 = every sample, PLND's intersection), got {min_support}."
        )
    if max_per_module is not None and (isinstance(max_per_module, bool) or not isinstance(max_per_module, int)):
        raise TypeError(f"max_per_module must be an int or None, got {max_per_module!r}.")
    if max_per_module is not None and max_per_module < 1:
        raise ValueError(f"max_per_module must be >= 1 (or None for no cap), got {max_per_module}.")
    if positions not in ("all", "labels"):
        raise ValueError(f"positions must be 'all' or 'labels', got {positions!r}.")
    if targets is None:
        targets = resolve_targets(model)

    plan = _build_plan(model, targets, modules)
    state = _BatchState(model, plan, chunk_elements)
    device = next(model.parameters()).device
    sums = {n: torch.zeros(u, dtype=torch.float32) for n, u in plan.units.items()}
    support = {n: torch.zeros(u, dtype=torch.int32) for n, u in plan.units.items()}
    num_samples = 0
    batches: Any = calib.batches(batch_size)
    if progress:
        with contextlib.suppress(ImportError):
            from tqdm.auto import tqdm

            batches = tqdm(batches, total=calib.num_batches(batch_size), desc="safety neurons")
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), _capturing(model, state):
            for batch in batches:
                valid = batch["attention_mask"].bool()
                if positions == "labels":
                    valid = valid & (batch["labels"] != -100)
                state.start(valid.to(device))
                inputs = {
                    k: v.to(device) for k, v in batch.items() if k in ("input_ids", "attention_mask", "position_ids")
                }
                model(**inputs, use_cache=False)
                if plan.attention and not state.seen_attention:
                    raise ValueError(
                        f"{type(model).__name__}'s attention does not go through transformers' AttentionInterface, so "
                        "q/k/v/o neurons cannot be scored. Pass modules=('gate', 'up', 'down') to score the MLP only."
                    )
                scores = {n: s.cpu() for n, s in state.scores.items()}
                for slot in plan.slots:
                    block = scores[slot.name][:, slot.start : slot.stop]
                    k = _k_of(top_k_attn if slot.role in ATTENTION_ROLES else top_k_ffn, slot.stop - slot.start)
                    top = _top_units(block, k)
                    member = torch.zeros_like(block, dtype=torch.bool).scatter_(1, top, True) & (block > 0)
                    support[slot.name][slot.start : slot.stop] += member.sum(0, dtype=torch.int32)
                for name, s in scores.items():
                    sums[name] += s.sum(0)
                num_samples += valid.shape[0]
    finally:
        model.train(was_training)

    means = {n: s / max(num_samples, 1) for n, s in sums.items()}
    need = max(1, math.ceil(float(min_support) * num_samples - 1e-9))
    granularity = {n: Neuron(plan.axes[n]) for n in plan.names}
    provenance = {
        "method": "safety_neurons",
        "granularity": "neuron",
        "aggregation": "per-sample top-k per module, then support across samples",
        "score": "ffn: sum_t |act(gate)*up|; q/k: attention-map change under deactivation (sum over kv group for k); "
        "v/o: sum_t |attention output| (sum over kv group for v)",
        "sign_convention": "higher = more important",
        "modules": list(modules),
        "top_k_attn": top_k_attn,
        "top_k_ffn": top_k_ffn,
        "min_support": float(min_support),
        "support_needed": need,
        "max_per_module": max_per_module,
        "positions": positions,
        "num_samples": num_samples,
    }
    if hasattr(calib, "provenance"):
        for key, value in calib.provenance().items():
            provenance.setdefault(key, value)
    rule = SupportRule(
        support=support,
        need=need,
        max_per_module=max_per_module,
        slots=tuple((slot.name, slot.start, slot.stop) for slot in plan.slots),
    )
    scores = Scores(means, granularity=granularity, shapes=plan.shapes, provenance=provenance, rule=rule)
    mask = rule.select(scores)
    return SafetyNeuronResult(mask=mask, scores=scores, support=support, num_samples=num_samples)


@dataclass(frozen=True, eq=False)
class SupportRule(SelectionRule):
    """PLND's selection as a rule of the ``safety_neurons`` scores (``select(scores)`` applies it).

    Per module block ``(name, start, stop)`` (one module of one layer; one expert of a fused MoE tensor): the units in
    the top-k of at least ``need`` samples (``support[name][unit] >= need``); with ``max_per_module``, at most that
    many of them, those with the highest score (the mean importance over samples; ties to the lower unit).

    Attributes:
        support: ``{name: int32 tensor}``: in how many samples' top-k each unit was.
        need: samples needed.
        max_per_module: cap per module block, or `None`.
        slots: the module blocks ``(name, start, stop)``.
    """

    support: dict[str, torch.Tensor]
    need: int
    max_per_module: int | None
    slots: tuple[tuple[str, int, int], ...]

    def indices(self, scores: Scores) -> dict[str, torch.Tensor]:
        chosen: dict[str, list[torch.Tensor]] = {}
        for name, start, stop in self.slots:
            if name not in scores:
                continue  # restricted away
            units = (self.support[name][start:stop] >= self.need).nonzero().reshape(-1)
            if self.max_per_module is not None and units.numel() > self.max_per_module:
                mean = scores[name][start:stop].cpu()[units]
                units = units[_top_units(mean[None], self.max_per_module)[0]]
            chosen.setdefault(name, []).append(units + start)
        return {n: torch.cat(parts).unique().sort().values.to(torch.int32) for n, parts in chosen.items()}

    def describe(self) -> dict[str, Any]:
        return {"support_needed": self.need, "max_per_module": self.max_per_module}


@register_scorer("safety_neurons", aliases=("sn_tune", "plnd"))
def safety_neurons(
    model: nn.Module, calib: CalibrationSet, *, targets: Targets | None = None, **kwargs: Any
) -> Scores:
    """The registered ``safety_neurons`` scorer (aliases ``sn_tune``, ``plnd``): `detect_safety_neurons`'s scores.

    Args:
        model: the model.
        calib: harmful prompts (PLND: ``template="raw"``, ``loss="none"``).
        targets: the eligible parameters (passed by `peft_safety.scoring.score`).
        **kwargs: the options of `detect_safety_neurons`.

    Returns:
        `Scores` with ``Neuron`` granularity (the mean importance per unit) carrying PLND's selection as their rule
        (`SupportRule`): ``select(scores)`` gives the safety neurons. Use `detect_safety_neurons` for the support
        counts.
    """
    return detect_safety_neurons(model, calib, targets=targets, **kwargs).scores


def rsn_tune_mask(
    model: nn.Module,
    safety_calib: CalibrationSet,
    foundation_calib: CalibrationSet,
    *,
    targets: Targets | None = None,
    **kwargs: Any,
) -> SafetyMask:
    """RSN-Tune's protected set: safety neurons minus foundation neurons (``SN - FN``), for ``mode="freeze"``.

    Both sets are detected with the same options (harmful prompts for SN, a general corpus such as Wikipedia for
    FN), and the difference is taken per parameter by mask algebra (the reference's ``deduplicate``, which its
    training script never calls).

    Args:
        model: the model.
        safety_calib: harmful prompts.
        foundation_calib: general-domain text.
        targets: the eligible parameters (`resolve_targets(model)` when `None`).
        **kwargs: the options of `detect_safety_neurons`, shared by both detections.

    Returns:
        The `SafetyMask` ``SN - FN`` (``Neuron`` granularity), provenance recording both sets' sizes.

    Example:

    ```python
    >>> mask = rsn_tune_mask(model, harmful_calib, wiki_calib, top_k_attn=0.5, top_k_ffn=0.8)
    >>> trainer = SafetySFTTrainer(model, args=SafetySFTConfig(safety_mask=mask, safety_mode="freeze"), ...)
    ```
    """
    if targets is None:
        targets = resolve_targets(model)
    safety = detect_safety_neurons(model, safety_calib, targets=targets, **kwargs).mask
    foundation = detect_safety_neurons(model, foundation_calib, targets=targets, **kwargs).mask
    diff = safety - foundation
    provenance = dict(safety.provenance)
    provenance.update(
        {
            "method": "rsn_tune",
            "aggregation": "safety_neurons(safety data) - safety_neurons(foundation data)",
            "safety_units": len(safety),
            "foundation_units": len(foundation),
            "foundation_data_hash": foundation.provenance.get("data_hash"),
        }
    )
    return SafetyMask(
        dict(diff),
        diff.shapes,
        {n: diff.granularity_of(n) for n in diff.shapes},
        fingerprints=diff.fingerprints or None,
        provenance=provenance,
    )
