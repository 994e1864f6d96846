"""Which parameters are eligible for scoring, and what role each one plays.

`resolve_targets(model, ...)` returns a `Targets` object: an ordered mapping ``{parameter name: TargetInfo}`` in the
model's parameter order. A `TargetInfo` says what the tensor is (its *role*: ``"q"``, ``"k"``, ``"v"``, ``"o"``,
``"qkv"``, ``"gate"``, ``"up"``, ``"gate_up"``, ``"down"``, ``"router"``, ``"embed"``, ``"lm_head"`` or ``"linear"``
for any other ``nn.Linear``), which decoder layer it belongs to, whether it is an expert weight (per-expert module
``experts.{e}.*`` or a fused 3-D tensor whose leading dimension is the expert), its neuron axis (rows = 0 for
q/k/v/gate/up, columns = 1 for o/down, see docs/concepts.md) and, for fused projections, the row ranges of each part.

Default eligibility:

* every ``nn.Linear`` weight inside the model except the output embedding (``lm_head``);
* fused 3-D expert tensors (``mlp.experts.gate_up_proj`` ``(E, 2*ff, h)`` and ``mlp.experts.down_proj``
  ``(E, h, ff)`` in transformers 5 MoE models);
* MoE routers (``mlp.gate``, ``block_sparse_moe.gate``, ``shared_expert_gate``) only with ``include_router=True``;
  they are always recognised by name, so excluding them is explicit (ESI's substring filter misses Qwen2-MoE's
  ``shared_expert_gate``);
* embeddings with ``include_embeddings=True``, ``lm_head`` with ``include_lm_head=True``; a tied ``lm_head`` is the
  embedding tensor itself, scored once under the embedding's name (`Targets.tied` records the alias);
* norms and biases never (a bias is not a weight in the `SafetyMask` sense).

Example:

```python
>>> from peft_safety.scoring.targets import resolve_targets
>>> from peft_safety.testing import tiny_llama
>>> targets = resolve_targets(tiny_llama())
>>> targets["model.layers.0.mlp.down_proj.weight"].neuron_axis
1
```
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..vocab import layer_index

__all__ = [
    "ROLE_AXES",
    "ROUTER_SUFFIXES",
    "SUFFIX_ROLES",
    "TargetInfo",
    "Targets",
    "attention_geometry",
    "fused_row_ranges",
    "query_to_kv_rows",
    "resolve_targets",
]

#: module-name suffix -> role, for every supported family (Llama, Mistral, Qwen2, Qwen2-MoE, Mixtral, Gemma, Phi-3,
#: per-expert Mixtral w1/w2/w3). Matched on the last component of the module path.
SUFFIX_ROLES: dict[str, str] = {
    "q_proj": "q",
    "k_proj": "k",
    "v_proj": "v",
    "o_proj": "o",
    "qkv_proj": "qkv",  # Phi-3 fused attention
    "gate_proj": "gate",
    "up_proj": "up",
    "down_proj": "down",
    "gate_up_proj": "gate_up",  # Phi-3 fused MLP and transformers 5 fused experts
    "w1": "gate",  # Mixtral per-expert modules: w1 = gate, w3 = up, w2 = down
    "w3": "up",
    "w2": "down",
}

#: role -> neuron axis: output rows (0) for q/k/v/gate/up and their fusions, input columns (1) for o/down
ROLE_AXES: dict[str, int | None] = {
    "q": 0,
    "k": 0,
    "v": 0,
    "qkv": 0,
    "gate": 0,
    "up": 0,
    "gate_up": 0,
    "o": 1,
    "down": 1,
    "router": 0,
    "embed": None,
    "lm_head": 0,
    "linear": None,
}

#: module-path suffixes of MoE routers (excluded unless ``include_router=True``)
ROUTER_SUFFIXES: tuple[str, ...] = ("mlp.gate", "block_sparse_moe.gate", "shared_expert_gate", "mlp.router")

_EXPERT_RE = re.compile(r"(?:^|\.)experts\.(\d+)(?:\.|$)")


@dataclass(frozen=True)
class TargetInfo:
    """What one eligible parameter is.

    Attributes:
        name: the parameter name (``model.named_parameters()``).
        role: ``"q"``, ``"k"``, ``"v"``, ``"o"``, ``"qkv"``, ``"gate"``, ``"up"``, ``"gate_up"``, ``"down"``,
            ``"router"``, ``"embed"``, ``"lm_head"`` or ``"linear"`` (an ``nn.Linear`` outside the table).
        layer: the decoder-layer index, or `None` outside the decoder layers.
        shape: the parameter shape.
        neuron_axis: 0 (rows: output channels) or 1 (columns: input channels) for neuron granularity, `None` when
            neurons are undefined for this role.
        expert: the expert index of a per-expert module (``experts.{e}.w1``), else `None`.
        expert_dim: 0 for a fused expert tensor whose leading dimension indexes experts (``(E, d_out, d_in)``),
            else `None`.
        fused: for fused projections, ``((part role, row start, row stop), ...)`` over the rows of one expert/matrix
            (``qkv``: q, k, v; ``gate_up``: gate, up); empty otherwise.
    """

    name: str
    role: str
    layer: int | None
    shape: tuple[int, ...]
    neuron_axis: int | None
    expert: int | None = None
    expert_dim: int | None = None
    fused: tuple[tuple[str, int, int], ...] = ()

    @property
    def module_name(self) -> str:
        """The owning module's path (the parameter name without its last component)."""
        return self.name.rsplit(".", 1)[0] if "." in self.name else ""

    @property
    def num_experts(self) -> int | None:
        """Number of experts stacked in a fused expert tensor, else `None`."""
        return self.shape[0] if self.expert_dim == 0 else None


@dataclass
class Targets(Mapping[str, TargetInfo]):
    """Ordered ``{parameter name: TargetInfo}`` of the parameters a scorer should score.

    Attributes:
        infos: the mapping itself (model parameter order).
        tied: ``{alias name: scored name}`` for tied weights (``lm_head.weight`` -> ``model.embed_tokens.weight``).
        model_class: class name of the model the targets were resolved on.
    """

    infos: dict[str, TargetInfo]
    tied: dict[str, str] = field(default_factory=dict)
    model_class: str = ""

    def __getitem__(self, name: str) -> TargetInfo:
        return self.infos[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self.infos)

    def __len__(self) -> int:
        return len(self.infos)

    @property
    def names(self) -> list[str]:
        """Parameter names, in order."""
        return list(self.infos)

    @property
    def shapes(self) -> dict[str, tuple[int, ...]]:
        """``{name: shape}`` (what `SafetyMask.shapes` needs)."""
        return {n: i.shape for n, i in self.infos.items()}

    def numel(self) -> int:
        """Total number of entries over the eligible parameters."""
        total = 0
        for info in self.infos.values():
            n = 1
            for d in info.shape:
                n *= d
            total += n
        return total

    def parameters(self, model: nn.Module) -> dict[str, nn.Parameter]:
        """``{name: parameter}`` of ``model`` for every target (raises `ValueError` if one is missing)."""
        params = dict(model.named_parameters())
        missing = [n for n in self.infos if n not in params]
        if missing:
            raise ValueError(
                f"{len(missing)} target parameters are not in {type(model).__name__} (first: {missing[0]!r}); "
                "resolve the targets on this model with resolve_targets(model)."
            )
        return {n: params[n] for n in self.infos}

    def restrict(self, names: Sequence[str]) -> Targets:
        """A copy keeping only ``names`` (order preserved)."""
        keep = set(names)
        return Targets({n: i for n, i in self.infos.items() if n in keep}, dict(self.tied), self.model_class)

    def by_role(self, *roles: str) -> list[str]:
        """Names of the targets whose role is one of ``roles``."""
        return [n for n, i in self.infos.items() if i.role in roles]


# ---------------------------------------------------------------------- geometry
def _text_config(model: Any) -> Any:
    config = getattr(model, "config", None)
    if config is None:
        raise ValueError(f"{type(model).__name__} has no .config; pass the attention geometry explicitly.")
    getter = getattr(config, "get_text_config", None)
    return getter() if callable(getter) else config


def attention_geometry(model: Any) -> tuple[int, int, int]:
    """``(n_heads, n_kv_heads, head_dim)`` of a transformers model, read from its (text) config.

    Raises:
        ValueError: the config lacks ``num_attention_heads`` or the sizes are inconsistent.
    """
    config = _text_config(model)
    n_heads = getattr(config, "num_attention_heads", None)
    if not n_heads:
        raise ValueError(f"{type(model).__name__}.config has no num_attention_heads; pass the geometry explicitly.")
    n_kv = getattr(config, "num_key_value_heads", None) or n_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // n_heads
    if n_heads % n_kv:
        raise ValueError(f"num_attention_heads={n_heads} is not a multiple of num_key_value_heads={n_kv}.")
    return int(n_heads), int(n_kv), int(head_dim)


def query_to_kv_rows(
    index: int | Sequence[int] | torch.Tensor, n_heads: int, n_kv_heads: int, head_dim: int
) -> torch.Tensor:
    """Map query-space indices ``h * head_dim + d`` to the k/v rows they read under GQA.

    Query head ``h`` reads kv head ``floor(h / g)`` with ``g = n_heads / n_kv_heads``, so the row is
    ``floor(h / g) * head_dim + d``. (SN-Tune's ``index // g`` is wrong: it gives ``(h * head_dim + d) // g``.)

    Args:
        index: query-space indices in ``[0, n_heads * head_dim)``.
        n_heads: number of query heads.
        n_kv_heads: number of key/value heads (divides ``n_heads``).
        head_dim: head dimension.

    Returns:
        An int64 tensor of kv rows, one per input index (not deduplicated: ``g`` query dims share each row).

    Raises:
        ValueError: bad geometry or an index out of range.

    Example:

    ```python
    >>> query_to_kv_rows([0, 9, 17, 31], n_heads=4, n_kv_heads=2, head_dim=8).tolist()
    [0, 1, 9, 15]
    ```
    """
    if n_heads < 1 or n_kv_heads < 1 or head_dim < 1 or n_heads % n_kv_heads:
        raise ValueError(
            f"Bad attention geometry n_heads={n_heads}, n_kv_heads={n_kv_heads}, head_dim={head_dim}: all must be "
            "positive and n_heads a multiple of n_kv_heads."
        )
    idx = torch.as_tensor(index, dtype=torch.long).reshape(-1)
    if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= n_heads * head_dim):
        raise ValueError(f"Query-space indices must lie in [0, {n_heads * head_dim}), got {idx.min()}..{idx.max()}.")
    group = n_heads // n_kv_heads
    head, dim = idx // head_dim, idx % head_dim
    return (head // group) * head_dim + dim


def fused_row_ranges(role: str, rows: int, geometry: tuple[int, int, int] | None = None) -> tuple:
    """Row ranges of the parts of a fused projection: ``((part, start, stop), ...)``.

    Args:
        role: ``"qkv"`` or ``"gate_up"`` (anything else returns ``()``).
        rows: number of rows of the fused matrix (of one expert for 3-D expert tensors).
        geometry: ``(n_heads, n_kv_heads, head_dim)``, needed for ``"qkv"``.
    """
    if role == "gate_up":
        half = rows // 2
        return (("gate", 0, half), ("up", half, rows))
    if role == "qkv":
        if geometry is None:
            return ()
        n_heads, n_kv, head_dim = geometry
        q, kv = n_heads * head_dim, n_kv * head_dim
        if q + 2 * kv != rows:
            raise ValueError(f"qkv_proj has {rows} rows but the geometry {geometry} implies {q + 2 * kv}.")
        return (("q", 0, q), ("k", q, q + kv), ("v", q + kv, q + 2 * kv))
    return ()


# ---------------------------------------------------------------------- resolution
def _is_router(module_name: str) -> bool:
    return any(module_name == s or module_name.endswith("." + s) for s in ROUTER_SUFFIXES)


def _matches(patterns: str | Sequence[str], *names: str) -> bool:
    if isinstance(patterns, str):
        return any(re.fullmatch(patterns, n) for n in names if n)
    return any(n == p or n.endswith("." + p) for p in patterns for n in names if n)


def _candidates(model: nn.Module) -> dict[str, tuple[str, str]]:
    """Every parameter that could ever be a target: name -> (module path, kind)."""
    embeddings = {id(m) for m in model.modules() if isinstance(m, nn.Embedding)}
    out: dict[str, tuple[str, str]] = {}
    seen: set[int] = set()
    for mod_name, module in model.named_modules():
        for p_name, param in module.named_parameters(recurse=False):
            full = f"{mod_name}.{p_name}" if mod_name else p_name
            if id(param) in seen:
                continue  # a tied weight: named once, under its first owner (as named_parameters() does)
            seen.add(id(param))
            ndim = len(getattr(param, "ds_shape", None) or param.shape)  # DeepSpeed ZeRO-3 keeps the shape aside
            if p_name == "bias" or ndim < 2:
                continue  # biases and norms: never weights of a mask
            if id(module) in embeddings:
                out[full] = (mod_name, "embed")
            elif isinstance(module, nn.Linear) or (p_name == "weight" and _is_router(mod_name)):
                out[full] = (mod_name, "linear")
            elif ndim == 3 and p_name in SUFFIX_ROLES:
                out[full] = (mod_name, "fused_experts")
    return out


def resolve_targets(
    model: nn.Module,
    *,
    target_modules: str | Sequence[str] | None = None,
    exclude_modules: str | Sequence[str] | None = None,
    include_router: bool = False,
    include_embeddings: bool = False,
    include_lm_head: bool = False,
) -> Targets:
    """Resolve the eligible parameters of ``model`` and their roles.

    Args:
        model: the model (parameter names as in ``model.named_parameters()``).
        target_modules: restrict to these modules: a list of names or suffixes (``["q_proj", "mlp.down_proj",
            "experts.gate_up_proj"]``: a name matches when it equals an entry or ends with ``"." + entry``), or a
            regex string matched in full against the module path and the parameter name (PEFT's convention).
            Explicitly named embeddings, ``lm_head`` and routers are included.
        exclude_modules: remove these (same matching rules).
        include_router: include MoE routers (excluded by default, explicitly).
        include_embeddings: include the input embedding matrix.
        include_lm_head: include the output embedding (a tied one is scored once, under the embedding's name).

    Returns:
        `Targets` in model parameter order.

    Raises:
        ValueError: a list entry in ``target_modules`` / ``exclude_modules`` matches nothing (the message lists the
            known module suffixes), or nothing is eligible (an unknown architecture: the message names the model
            class and says how to pass ``target_modules``).
        TypeError: ``target_modules`` is neither a string nor a sequence of strings.
    """
    for arg_name, arg in (("target_modules", target_modules), ("exclude_modules", exclude_modules)):
        if (arg is not None and not isinstance(arg, str)) and (
            not isinstance(arg, Sequence) or not all(isinstance(a, str) for a in arg)
        ):
            raise TypeError(f"{arg_name} must be a str (regex) or a list of str, got {arg!r}.")
    candidates = _candidates(model)
    input_emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    output_emb = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    in_w = getattr(input_emb, "weight", None)
    out_w = getattr(output_emb, "weight", None)
    tied = in_w is not None and out_w is not None and in_w is out_w
    named = dict(model.named_parameters())
    by_id = {id(p): n for n, p in named.items()}
    in_name = by_id.get(id(in_w)) if in_w is not None else None
    out_name = None if out_w is None else by_id.get(id(out_w))
    lm_alias = None
    if out_w is not None:
        # named_parameters() deduplicates a tied lm_head under the embedding's name; recover the alias name
        for mod_name, module in model.named_modules():
            if module is output_emb:
                lm_alias = f"{mod_name}.weight" if mod_name else "weight"
                break

    def role_of(name: str, module_name: str, kind: str) -> str:
        if kind == "embed" or name == in_name:
            return "embed"
        if name == out_name and not tied:
            return "lm_head"
        if _is_router(module_name):
            return "router"
        last = name.rsplit(".", 1)[-1] if kind == "fused_experts" else module_name.rsplit(".", 1)[-1]
        return SUFFIX_ROLES.get(last, "linear")

    def unmatched(patterns: Sequence[str]) -> list[str]:
        return [
            p
            for p in patterns
            if not any(_matches([p], mod, name, name.removesuffix(".weight")) for name, (mod, _) in candidates.items())
            and not (lm_alias and _matches([p], lm_alias.removesuffix(".weight"), lm_alias))
        ]

    for arg_name, arg in (("target_modules", target_modules), ("exclude_modules", exclude_modules)):
        if arg is not None and not isinstance(arg, str):
            bad = unmatched(arg)
            if bad:
                known = sorted({mod.rsplit(".", 1)[-1] for mod, _ in candidates.values() if mod} | set(SUFFIX_ROLES))
                raise ValueError(
                    f"{arg_name} entries {bad} match no module of {type(model).__name__}. Module name suffixes seen: "
                    f"{', '.join(k for k in known if any(m.endswith(k) for m, _ in candidates.values()))}."
                )

    geometry = None
    try:
        geometry = attention_geometry(model)
    except (ValueError, AttributeError, TypeError):
        geometry = None

    infos: dict[str, TargetInfo] = {}
    tied_map: dict[str, str] = {}
    for name, (module_name, kind) in candidates.items():
        role = role_of(name, module_name, kind)
        keys = (module_name, name, name.removesuffix(".weight"))
        explicit = target_modules is not None and _matches(target_modules, *keys)
        if tied and role == "embed" and target_modules is not None and lm_alias:
            explicit = explicit or _matches(target_modules, lm_alias.removesuffix(".weight"), lm_alias)
        if target_modules is not None:
            eligible = explicit
        elif role == "embed":
            eligible = include_embeddings or (tied and include_lm_head)
        elif role == "lm_head":
            eligible = include_lm_head
        elif role == "router":
            eligible = include_router
        else:
            eligible = True
        if role == "router" and target_modules is not None and not include_router and not explicit:
            eligible = False
        if exclude_modules is not None and _matches(exclude_modules, *keys):
            eligible = False
        if not eligible:
            continue
        param = named[name]
        shape = tuple(int(d) for d in (getattr(param, "ds_shape", None) or param.shape))
        expert_dim = 0 if kind == "fused_experts" else None
        m = _EXPERT_RE.search(name)
        expert = int(m.group(1)) if m else None
        rows = shape[1] if expert_dim == 0 else shape[0]
        infos[name] = TargetInfo(
            name=name,
            role=role,
            layer=layer_index(name),
            shape=shape,
            neuron_axis=ROLE_AXES.get(role),
            expert=expert,
            expert_dim=expert_dim,
            fused=fused_row_ranges(role, rows, geometry),
        )
        if role == "embed" and tied and lm_alias and lm_alias != name:
            tied_map[lm_alias] = name
    if not infos:
        raise ValueError(
            f"No parameter of {type(model).__name__} is eligible for scoring: no nn.Linear or fused expert weight "
            "matched"
            + (f" target_modules={target_modules!r}" if target_modules is not None else "")
            + ". Pass target_modules=[...] with the module names or suffixes to score (e.g. ['c_attn', 'c_fc']), "
            "or a regex over module paths."
        )
    return Targets(infos=infos, tied=tied_map, model_class=type(model).__name__)
