"""Exact freezing of individual weight entries during full fine-tuning.

Setting a gradient to zero does not keep a weight still: AdamW's decoupled weight decay, SGD's L2 term and momentum
all move entries whose gradient is zero. The :class:`Freezer` therefore does two things:

1. **mask the gradient before clipping**, so frozen entries do not inflate the clipping norm (post-accumulate
   gradient hooks on each parameter; :meth:`Freezer.mask_grads_` for call sites where hooks cannot fire, such as
   FSDP1's flat parameters);
2. **restore the frozen entries exactly after every optimizer step** from a copy taken at install time (an optimizer
   step post hook), which makes the guarantee hold for *any* optimizer: AdamW with weight decay, SGD with momentum
   and L2, Adafactor, Lion, 8-bit optimizers, and resumed optimizer state.

Memory is O(mask), not O(model): each frozen parameter keeps only the frozen values plus an int64 index, in the most
compact form the mask allows:

| kind | when | what is stored |
|---|---|---|
| ``rows`` | whole rows frozen (``Neuron(axis=0)``, ``Head(axis=0)``; MoE experts' rows) | row ids + those rows |
| ``cols`` | whole columns of a 2-D weight frozen (``Neuron(axis=1)``) | column ids + those columns |
| ``whole`` | the whole tensor frozen (``Layer()``) | a copy of the tensor (or nothing, see below) |
| ``entries`` | anything else (``Weight()``) | flat int64 ids + the values (12 bytes per fp32 entry) |

A tensor whose entries are *all* frozen costs nothing when its ``requires_grad`` is switched off before the optimizer
and any DDP wrapper are created (:meth:`Freezer.prepare_model`, which `apply_mask_` and the trainer call); the freezer then only
remembers a checksum so that :meth:`Freezer.verify` can still prove it unchanged.

Backends; always install **after** ``accelerator.prepare``:

| backend | gradient mask | restore |
|---|---|---|
| single process, DDP | post-accumulate grad hook (before DDP's reducer hook, so the reduced gradient is masked) | optimizer step post hook |
| FSDP2 (``fully_shard``) | post-accumulate grad hook on the ``DTensor`` parameter, mask sharded like the parameter | step post hook on the local shard |
| FSDP1 (flat parameters) | :meth:`Freezer.mask_grads_` before clipping (hooks do not fire on the views) | step post hook on the flat shard |
| DeepSpeed ZeRO | tensor ``register_hook`` (runs before DeepSpeed's own post-accumulate reduction) | :meth:`Freezer.restore_` after the engine step, through ``deepspeed.utils`` fp32 accessors (**not run: needs GPU**) |
"""

from __future__ import annotations

import hashlib
import logging
import warnings
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from ..vocab import Mode, StorageKind, base_name, check_choice, check_fingerprint_policy, check_mode
from .protection import FreezeReport, FreezeViolationError, MaskProtection

logger = logging.getLogger(__name__)

__all__ = [
    "FreezeReport",
    "Freezer",
    "FreezeViolationError",
    "dense_frozen_masks",
    "detect_backend",
]

Backend = Literal["auto", "single", "ddp", "fsdp1", "fsdp2", "deepspeed"]
_BACKENDS = ("auto", "single", "ddp", "fsdp1", "fsdp2", "deepspeed")


def _check_mode(mode: Any) -> str:
    return check_mode(mode, where="mode")


def _named_params(model: nn.Module) -> dict[str, nn.Parameter]:
    """``{base name: parameter}`` (`peft_safety.vocab.base_name`), the first parameter under each name."""
    params: dict[str, nn.Parameter] = {}
    for name, p in model.named_parameters():
        params.setdefault(base_name(name), p)
    return params


def _mask_names_and_shapes(mask: Any) -> tuple[dict[str, tuple[int, ...]], Callable[[str], torch.Tensor]]:
    """Return ``({name: shape} of every parameter the mask covers, name -> dense bool mask)``."""
    if isinstance(mask, Mapping):
        dense = {}
        for name, m in mask.items():
            if not isinstance(m, torch.Tensor) or m.dtype != torch.bool:
                raise TypeError(
                    f"A mask given as a mapping must map parameter names to torch.bool tensors; got "
                    f"{type(m).__name__} (dtype {getattr(m, 'dtype', None)}) for {name!r}. Pass a SafetyMask or "
                    "bool tensors of each parameter's shape."
                )
            dense[name] = m
        return {n: tuple(m.shape) for n, m in dense.items()}, dense.__getitem__
    if hasattr(mask, "shapes") and hasattr(mask, "to_dense"):
        shapes = {n: tuple(s) for n, s in mask.shapes.items()}
        names = set(mask.names)

        def get(name: str) -> torch.Tensor:
            if name in names:
                return mask.to_dense(name)
            return torch.zeros(shapes[name], dtype=torch.bool)

        return shapes, get
    raise TypeError(
        f"Expected a SafetyMask or a mapping {{name: bool tensor}}, got {type(mask).__name__}. Load a mask with "
        "SafetyMask.from_pretrained(path)."
    )


def _full_shape(p: torch.Tensor) -> tuple[int, ...]:
    """The logical shape of a parameter (DeepSpeed ZeRO-3 keeps it in ``ds_shape``; a DTensor's shape is global)."""
    return tuple(getattr(p, "ds_shape", None) or p.shape)


def _check_shapes(declared: Mapping[str, tuple[int, ...]], actual: Mapping[str, tuple[int, ...]]) -> None:
    for name, shape in declared.items():
        if tuple(shape) != tuple(actual[name]):
            raise ValueError(
                f"Mask shape {tuple(shape)} does not match parameter {name!r} of shape {tuple(actual[name])}; the "
                "mask was computed for another model."
            )


def _check_fingerprints(mask: Any, params: Mapping[str, torch.Tensor], policy: str) -> None:
    """The weights the freezer is installed on are those the mask was computed on (its recorded fingerprints), as
    `SafetyMask.validate` checks for `apply_mask_` and the trainer. Sharded, quantised and meta weights are skipped.

    Raises:
        ValueError: with ``policy="error"``, naming the first differing parameter and the override.
    """
    from ..mask import fingerprint_tensor

    recorded = getattr(mask, "fingerprints", None)
    if policy == "ignore" or not isinstance(recorded, Mapping):
        return
    differing = []
    for name, wanted in recorded.items():
        p = params.get(name)
        if p is None or _is_dtensor(p) or hasattr(p, "ds_shape") or p.numel() == 0:
            continue
        if not p.dtype.is_floating_point or p.device.type == "meta":
            continue
        if fingerprint_tensor(p) != wanted:
            differing.append(name)
    if not differing:
        return
    more = f" (and {len(differing) - 1} more)" if len(differing) > 1 else ""
    message = (
        f"The mask was computed on other weights than this model's: the fingerprint of {differing[0]!r}{more} differs "
        "from the one the mask recorded (another checkpoint, a fine-tuned copy, or weights this mask already "
        "protected in an earlier run). Install it on the model the mask was made for, or pass "
        "Freezer(mask, fingerprint_check='warn' or 'ignore') if this is intended (e.g. resuming a full fine-tuning "
        "from its own checkpoint)."
    )
    if policy == "error":
        raise ValueError(message)
    warnings.warn(message, UserWarning, stacklevel=4)


def dense_frozen_masks(mask: Any, mode: Mode = "freeze") -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(parameter name, bool tensor of the entries to keep unchanged)``, one parameter at a time.

    In ``"freeze"`` mode the frozen entries are the mask's; in ``"train_only"`` mode they are the complement within
    every parameter the mask covers (``mask.shapes``): a covered parameter with no entry is frozen whole. Parameters
    the mask does not cover are not yielded (they train normally). Only one dense bool tensor is alive at a time.

    Args:
        mask: a `SafetyMask` or a mapping ``{name: bool tensor}``.
        mode: ``"freeze"`` or ``"train_only"``.
    """
    _check_mode(mode)
    shapes, get = _mask_names_and_shapes(mask)
    for name in shapes:
        dense = get(name)
        frozen = ~dense if mode == "train_only" else dense
        if bool(frozen.any()):
            yield name, frozen


def detect_backend(model: nn.Module) -> str:
    """Guess the distributed backend from the (prepared) model: ``single``, ``ddp``, ``fsdp1``, ``fsdp2`` or
    ``deepspeed``."""
    if type(model).__name__ == "DeepSpeedEngine":
        return "deepspeed"
    if isinstance(model, nn.parallel.DistributedDataParallel):
        return "ddp"
    try:
        from torch.distributed.fsdp import FullyShardedDataParallel

        if any(isinstance(m, FullyShardedDataParallel) for m in model.modules()):
            return "fsdp1"
    except ImportError:  # pragma: no cover - builds without distributed
        pass
    if any(_is_dtensor(p) for p in model.parameters()):
        return "fsdp2"
    return "single"


def _is_dtensor(t: torch.Tensor) -> bool:
    return type(t).__name__ == "DTensor" or type(getattr(t, "data", None)).__name__ == "DTensor"


def _local(t: torch.Tensor) -> torch.Tensor:
    """The tensor whose storage this rank owns (the local shard of a DTensor, else the tensor's data)."""
    t = t.data if isinstance(t, nn.Parameter) else t
    return t.to_local() if hasattr(t, "to_local") else t


def _digest(t: torch.Tensor) -> str:
    data = t.detach().contiguous().cpu()
    return hashlib.sha256(data.reshape(-1).view(torch.uint8).numpy().tobytes()).hexdigest()


def _bits(t: torch.Tensor) -> torch.Tensor:
    """A view of the raw bits, so comparisons are bit-exact (NaN == NaN, -0.0 != 0.0)."""
    t = t.contiguous().reshape(-1)
    return t.view(torch.uint8)


@dataclass
class _Entry:
    """Frozen entries of one tensor: how they are indexed (``kind``), where, and their saved values."""

    name: str
    param: torch.Tensor
    kind: StorageKind  # "entries" | "rows" | "cols" | "whole" (peft_safety.vocab.STORAGE_KINDS)
    index: torch.Tensor | None  # int64 on the parameter's device; None for "whole"
    saved: torch.Tensor
    master: torch.Tensor | None = None  # DeepSpeed fp32 master values at the same positions

    @staticmethod
    def plan(local_mask: torch.Tensor) -> tuple[str, torch.Tensor | None]:
        n, total = int(local_mask.sum()), local_mask.numel()
        if n == total:
            return "whole", None
        if local_mask.dim() >= 2:
            rows = local_mask.reshape(-1, local_mask.shape[-1])
            row_any = rows.any(dim=1)
            if bool((rows == row_any[:, None]).all()):
                return "rows", row_any.nonzero().squeeze(1)
            if local_mask.dim() == 2:
                col_any = local_mask.any(dim=0)
                if bool((local_mask == col_any[None, :]).all()):
                    return "cols", col_any.nonzero().squeeze(1)
        return "entries", local_mask.reshape(-1).nonzero().squeeze(1)

    def _view(self, t: torch.Tensor) -> torch.Tensor:
        if self.kind == "rows":
            return t.view(-1, t.shape[-1])
        if self.kind == "entries":
            return t.view(-1)
        return t

    def gather(self, t: torch.Tensor) -> torch.Tensor:
        if self.kind == "whole":
            return t
        dim = 1 if self.kind == "cols" else 0
        return self._view(t).index_select(dim, self.index)

    def fill_zero_(self, t: torch.Tensor) -> None:
        if self.kind == "whole":
            t.zero_()
        else:
            self._view(t).index_fill_(1 if self.kind == "cols" else 0, self.index, 0)

    def write_(self, t: torch.Tensor, values: torch.Tensor) -> None:
        if self.kind == "whole":
            t.copy_(values)
        else:
            self._view(t).index_copy_(1 if self.kind == "cols" else 0, self.index, values)

    @property
    def nbytes(self) -> int:
        n = self.saved.numel() * self.saved.element_size()
        if self.index is not None:
            n += self.index.numel() * self.index.element_size()
        if self.master is not None:
            n += self.master.numel() * self.master.element_size()
        return n

    @property
    def num_frozen(self) -> int:
        return self.saved.numel()


class Freezer(MaskProtection):
    """Keep chosen weight entries bit-identical through full fine-tuning with any torch optimizer.

    Args:
        mask: a `SafetyMask` (or a mapping ``{parameter name: bool tensor}``) in the names of the plain model.
        mode: ``"freeze"`` keeps the mask's entries unchanged (SPA); ``"train_only"`` keeps everything *else* in the
            covered parameters unchanged. For a small mask prefer the SET adapter
            (``get_peft_model(model, SafetyConfig(...))``): ``train_only`` on full weights still pays dense gradients
            and optimizer state for every tensor with a mask entry, and stores the frozen complement.
        backend: ``"auto"`` (detect from the model given to :meth:`install`), or one of ``"single"``, ``"ddp"``,
            ``"fsdp1"``, ``"fsdp2"``, ``"deepspeed"``.
        scrub_optimizer_state: zero the optimizer state (momentum, Adam moments) at frozen positions when attaching an
            optimizer, so resumed or foreign state does not even try to move them. The restore keeps the guarantee
            either way; this only keeps the state tidy.
        log_drift: keep a CPU copy of the covered tensors at :meth:`install` and add ``safety/masked_drift`` /
            ``safety/unmasked_drift`` to :meth:`metrics` (needs a `SafetyMask`).
        fingerprint_check: what :meth:`install` does when a weight differs from the fingerprint the mask recorded
            (a mask for other weights): ``"error"`` (default), ``"warn"`` or ``"ignore"``, as `SafetyMask.validate`.
            Use ``"ignore"`` when installing on weights this mask already protected in an earlier run (a resumed
            full fine-tuning checkpoint: its unmasked entries were trained, so its fingerprints differ). Sharded
            (FSDP, DeepSpeed ZeRO-3), quantised and meta weights are not compared.

    The `Freezer` is a `Protection` (``peft_safety.training.protection``): :meth:`prepare_model` switches off the
    tensors frozen whole (before the optimizer exists), :meth:`install` registers the hooks, :meth:`before_clip` and
    :meth:`after_optimizer_step` are the two per-step calls of the backends where hooks cannot fire (FSDP1,
    DeepSpeed), :meth:`verify` proves the guarantee and :meth:`remove` undoes everything. `apply_mask_` returns one.

    Example:

    ```python
    >>> freezer = Freezer(mask, mode="freeze")
    >>> with freezer.install(model, optimizer):
    ...     for batch in loader:
    ...         model(**batch).loss.backward()
    ...         torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)   # frozen grads already zero
    ...         optimizer.step()                                            # frozen entries restored right after
    ...         optimizer.zero_grad()
    ...     freezer.verify()                                                # raises FreezeViolationError if not exact
    ```
    """

    name = "freezer"

    def __init__(
        self,
        mask: Any,
        mode: Mode = "freeze",
        *,
        backend: Backend = "auto",
        scrub_optimizer_state: bool = True,
        log_drift: bool = False,
        fingerprint_check: str = "error",
    ) -> None:
        super().__init__(mask, mode, log_drift=log_drift)
        check_choice(backend, _BACKENDS, where="backend")
        self.fingerprint_check = check_fingerprint_policy(fingerprint_check, where="fingerprint_check")
        _mask_names_and_shapes(mask)  # type check up front
        if log_drift and (isinstance(mask, Mapping) or not hasattr(mask, "to_dense")):
            raise TypeError("log_drift=True needs a SafetyMask (the drift is measured per mask entry).")
        self.backend = backend
        self.scrub_optimizer_state = scrub_optimizer_state
        self._entries: list[_Entry] = []
        self._digests: dict[str, tuple[torch.Tensor, str]] = {}
        self._handles: list[Any] = []
        self._opt_handles: list[Any] = []
        self._resolved_backend: str | None = None
        self._switched_off: list[nn.Parameter] = []

    # ------------------------------------------------------------------ before the optimizer exists
    def prepare_model(self, model: nn.Module, peft_config: Any = None, args: Any = None) -> tuple[nn.Module, Any]:
        """Switch off ``requires_grad`` of every tensor whose entries are all frozen, so that it never enters the
        optimizer or a DDP bucket (zero memory, zero time); :meth:`remove` switches it back on. Call it before the
        optimizer and any DDP wrapper are built.

        Returns:
            ``(model, peft_config)`` unchanged.

        Raises:
            ValueError: when nothing in the model would train any more.
        """
        params = _named_params(model)
        for name, frozen in dense_frozen_masks(self.mask, self.mode):
            p = params.get(name)
            if p is not None and p.requires_grad and tuple(p.shape) == tuple(frozen.shape) and bool(frozen.all()):
                p.requires_grad_(False)
                p.grad = None
                self._switched_off.append(p)
        if not any(p.requires_grad for p in model.parameters()):
            self._give_back_requires_grad()
            raise ValueError(
                "The mask leaves no trainable entry in the model (every covered tensor is frozen whole and nothing "
                "else trains). Check the mode and the mask."
            )
        return model, peft_config

    def _give_back_requires_grad(self) -> None:
        for p in self._switched_off:
            p.requires_grad_(True)
        self._switched_off = []

    # ------------------------------------------------------------------ install
    @property
    def installed(self) -> bool:
        return self._model is not None

    @property
    def resolved_backend(self) -> str | None:
        """The backend in use after :meth:`install` (``None`` before)."""
        return self._resolved_backend

    @property
    def needs_grad_mask_call(self) -> bool:
        """True when gradient hooks cannot fire (FSDP1 flat parameters): the training loop must then call
        :meth:`mask_grads_` before clipping. Elsewhere the hooks already zeroed the frozen gradients and a second pass
        would only cost one more kernel per tensor each step."""
        return self._resolved_backend == "fsdp1"

    @property
    def num_frozen(self) -> int:
        """Number of frozen entries held by this rank (with a hook or a restore), plus those of switched-off tensors."""
        return sum(e.num_frozen for e in self._entries) + sum(p.numel() for p, _ in self._digests.values())

    @property
    def memory_bytes(self) -> int:
        """Bytes held for the restore: saved values and indices (O(mask))."""
        return sum(e.nbytes for e in self._entries)

    def install(self, model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> Freezer:
        """Snapshot the frozen entries of ``model`` and register the gradient hooks (and the optimizer hook).

        Call it after ``accelerator.prepare`` (and after loading a checkpoint), on every rank.

        Args:
            model: the model as it will be trained (wrapped in DDP/FSDP or not).
            optimizer: the optimizer stepping ``model``'s parameters; may be attached later with
                :meth:`attach_optimizer`.

        Returns:
            ``self``, usable as a context manager that calls :meth:`remove` on exit.

        Raises:
            RuntimeError: if already installed.
            ValueError: if a mask parameter is missing from the model or has another shape.
        """
        if self.installed:
            raise RuntimeError("This Freezer is already installed; call remove() first.")
        backend = detect_backend(model) if self.backend == "auto" else self.backend
        try:
            if backend == "fsdp1":
                self._build_fsdp1(model)
            else:
                self._build(model, backend)
            self._model = model
            self._resolved_backend = backend
            self._register_grad_hooks(backend)
            if optimizer is not None:
                self.attach_optimizer(optimizer)
            if self.log_drift:  # the reference of safety/*_drift: a CPU copy of the covered tensors
                covered = set(self.mask.shapes)
                params = _named_params(model)
                self._reference = {n: params[n].detach().to("cpu", copy=True) for n in covered if n in params}
        except BaseException:
            self._drop_hooks()
            self._entries.clear()
            self._digests.clear()
            self._model = None
            raise
        logger.info(
            "Freezer installed (%s, %s): %d frozen entries, %.1f KiB held",
            backend,
            self.mode,
            self.num_frozen,
            self.memory_bytes / 1024,
        )
        return self

    def _build(self, model: nn.Module, backend: str) -> None:
        params = _named_params(model)
        shapes, _ = _mask_names_and_shapes(self.mask)
        missing = [n for n in shapes if n not in params]
        if missing:
            raise ValueError(
                f"The mask names {len(missing)} parameter(s) the model does not have (e.g. {missing[:3]}); it was "
                "computed for another model. Load the mask that belongs to this model."
            )
        # every declared shape is compared with the model before any dense mask of that shape is built: a mask file
        # may declare any shape, and a dense bool tensor of a wrong, huge one would exhaust memory
        _check_shapes(shapes, {n: _full_shape(params[n]) for n in shapes})
        _check_fingerprints(self.mask, params, self.fingerprint_check)
        for name, frozen in dense_frozen_masks(self.mask, self.mode):
            p = params[name]
            if not p.requires_grad and bool(frozen.all()):
                # nothing can move it: remember a checksum for verify() instead of a copy. (A partially frozen
                # tensor without requires_grad is still guarded: requires_grad may be switched back on.)
                self._digests[name] = (p, _digest(_local(p)))
                continue
            local = _local(p)
            if _is_dtensor(p):
                from torch.distributed.tensor import distribute_tensor

                frozen = distribute_tensor(frozen.to(local.device), p.device_mesh, p.placements).to_local()
            frozen = frozen.to(local.device)
            if frozen.numel() == 0 or not bool(frozen.any()):
                continue
            kind, index = _Entry.plan(frozen)
            entry = _Entry(name, p, kind, index, saved=torch.empty(0))
            entry.saved = entry.gather(local).detach().clone()
            if backend == "deepspeed":
                entry.master = self._ds_master(p, entry)
            self._entries.append(entry)
            del frozen

    def _build_fsdp1(self, model: nn.Module) -> None:
        """FSDP1: map each original parameter's frozen entries into its flat parameter's local shard.

        Uses ``FlatParameter._fqns`` and ``_shard_param_infos`` (private torch API, torch 2.4-2.13).
        """
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        shapes, _ = _mask_names_and_shapes(self.mask)
        actual: dict[str, tuple[int, ...]] = {}
        for module_name, module in model.named_modules():
            flat = getattr(getattr(module, "_handle", None), "flat_param", None) if isinstance(module, FSDP) else None
            if flat is not None:
                prefix = base_name(module_name)
                for fqn, shape in zip(flat._fqns, flat._shapes):
                    actual[base_name(f"{prefix}.{fqn}" if prefix else fqn)] = tuple(shape)
        _check_shapes({n: s for n, s in shapes.items() if n in actual}, actual)  # before any dense mask is built
        frozen_by_name = dict(dense_frozen_masks(self.mask, self.mode))
        found: set[str] = set()
        for module_name, module in model.named_modules():
            if not isinstance(module, FSDP):
                continue
            handle = getattr(module, "_handle", None)
            flat = getattr(handle, "flat_param", None) if handle is not None else None
            if flat is None:
                continue
            prefix = base_name(module_name)
            pieces: list[torch.Tensor] = []
            for fqn, info in zip(flat._fqns, flat._shard_param_infos):
                name = base_name(f"{prefix}.{fqn}" if prefix else fqn)
                if name not in frozen_by_name:
                    continue
                found.add(name)
                if not info.in_shard:
                    continue
                piece = frozen_by_name[name].reshape(-1)[info.intra_param_start_idx : info.intra_param_end_idx + 1]
                pieces.append(piece.nonzero().squeeze(1) + info.offset_in_shard)
            if pieces:
                index = torch.cat(pieces).sort().values.to(flat.device)
                entry = _Entry(f"{prefix or '<root>'}._flat_param", flat, "entries", index, saved=torch.empty(0))
                entry.saved = entry.gather(flat.data).detach().clone()
                self._entries.append(entry)
        missing = sorted(set(frozen_by_name) - found)
        if missing:
            raise ValueError(
                f"The mask names {len(missing)} parameter(s) that no FSDP flat parameter holds (e.g. {missing[:3]}); "
                "it was computed for another model, or those parameters are not trainable."
            )

    def _ds_master(self, p: torch.Tensor, entry: _Entry) -> torch.Tensor | None:
        from deepspeed.utils import safe_get_full_fp32_param  # DeepSpeed path: not yet run on a GPU

        full = safe_get_full_fp32_param(p)
        return None if full is None else entry.gather(full).detach().clone()

    def _register_grad_hooks(self, backend: str) -> None:
        if backend == "fsdp1":
            return  # hooks do not fire on FSDP1's views: mask_grads_() is called before clipping instead
        for entry in self._entries:
            if not entry.param.requires_grad:
                continue
            if backend == "deepspeed":
                # runs before accumulation, hence before DeepSpeed's own post-accumulate reduction hooks
                def pre_hook(grad: torch.Tensor, entry: _Entry = entry) -> torch.Tensor:
                    grad = grad.clone()
                    entry.fill_zero_(grad)
                    return grad

                self._handles.append(entry.param.register_hook(pre_hook))
            else:

                def post_hook(param: torch.Tensor, entry: _Entry = entry) -> None:
                    if param.grad is not None:
                        entry.fill_zero_(_local(param.grad))

                self._handles.append(entry.param.register_post_accumulate_grad_hook(post_hook))

    def attach_optimizer(self, optimizer: torch.optim.Optimizer) -> Freezer:
        """Restore the frozen entries after every step of ``optimizer`` (and scrub its state at frozen positions).

        Wrappers such as accelerate's ``AcceleratedOptimizer`` are unwrapped to the torch optimizer that steps.
        Attaching another optimizer replaces the previous one.

        Args:
            optimizer: a ``torch.optim.Optimizer`` (or a wrapper exposing ``.optimizer``).

        Raises:
            TypeError: if ``optimizer`` is not a torch optimizer.
        """
        inner = optimizer
        while isinstance(getattr(inner, "optimizer", None), torch.optim.Optimizer):
            inner = inner.optimizer
        if not isinstance(inner, torch.optim.Optimizer):
            raise TypeError(
                f"attach_optimizer expects a torch.optim.Optimizer, got {type(optimizer).__name__}. Under DeepSpeed "
                "call freezer.restore_() after each engine step instead."
            )
        for h in self._opt_handles:
            h.remove()
        self._opt_handles = [inner.register_step_post_hook(lambda *_: self.restore_())]
        if self.scrub_optimizer_state:
            self._scrub(inner)
        return self

    @torch.no_grad()
    def _scrub(self, optimizer: torch.optim.Optimizer) -> None:
        for entry in self._entries:
            state = optimizer.state.get(entry.param)
            if not state:
                continue
            shape = _local(entry.param).shape
            for value in state.values():
                if isinstance(value, torch.Tensor) and _local(value).shape == shape and value.dim() > 0:
                    entry.fill_zero_(_local(value))

    # ------------------------------------------------------------------ per step
    @torch.no_grad()
    def mask_grads_(self) -> None:
        """Zero the gradient of every frozen entry now. Call before clipping where hooks cannot fire (FSDP1); it is
        harmless (idempotent) elsewhere."""
        for entry in self._entries:
            grad = entry.param.grad
            if grad is not None:
                entry.fill_zero_(_local(grad))

    @torch.no_grad()
    def restore_(self) -> None:
        """Write the saved values back into every frozen entry (called after each optimizer step)."""
        for entry in self._entries:
            entry.write_(_local(entry.param), entry.saved)
        if self._resolved_backend == "deepspeed":
            self._restore_deepspeed_master()

    def _restore_deepspeed_master(self) -> None:
        from deepspeed.utils import safe_get_full_fp32_param, safe_set_full_fp32_param

        for entry in self._entries:
            if entry.master is None:
                continue
            full = safe_get_full_fp32_param(entry.param)
            entry.write_(full, entry.master)
            safe_set_full_fp32_param(entry.param, full)

    # ------------------------------------------------------------------ verify / remove
    @torch.no_grad()
    def verify(self, reference: nn.Module | Mapping[str, torch.Tensor] | None = None, *, strict: bool = True):
        """Check that every frozen entry is bit-identical to the snapshot taken at install, or to ``reference``.

        Args:
            reference: optional model or state dict holding the original weights (names may carry wrapper or PEFT
                prefixes). With a reference the check does not depend on the freezer's own copy. Not supported for
                FSDP1 flat parameters (compare against the snapshot there).
            strict: raise `FreezeViolationError` when an entry changed; otherwise only return the report.

        Returns:
            A `FreezeReport`.

        Raises:
            FreezeViolationError: if ``strict`` and an entry changed.
            ValueError: if ``reference`` lacks a frozen parameter.
        """
        if not self.installed:
            raise RuntimeError("Freezer.verify() needs an installed freezer; call install(model) first.")
        ref: dict[str, torch.Tensor] | None = None
        if reference is not None:
            items = reference.state_dict().items() if isinstance(reference, nn.Module) else reference.items()
            ref = {base_name(k): v for k, v in items}
        report = FreezeReport()
        for entry in self._entries:
            current = entry.gather(_local(entry.param))
            if ref is None:
                expected = entry.saved
            else:
                if entry.name not in ref:
                    raise ValueError(f"The reference has no parameter {entry.name!r}; pass the original model.")
                r = ref[entry.name]
                if _is_dtensor(entry.param):
                    from torch.distributed.tensor import distribute_tensor

                    r = distribute_tensor(
                        r.to(_local(entry.param).device), entry.param.device_mesh, entry.param.placements
                    ).to_local()
                expected = entry.gather(r.to(current.device, current.dtype))
            self._compare(report, entry.name, current, expected)
        for name, (p, digest) in self._digests.items():
            if ref is None:
                if _digest(_local(p)) != digest:
                    report.changed[name] = p.numel()
                    report.max_abs_diff[name] = float("nan")
                report.checked_entries += p.numel()
                report.checked_parameters += 1
            else:
                if name not in ref:
                    raise ValueError(f"The reference has no parameter {name!r}; pass the original model.")
                self._compare(report, name, _local(p), ref[name].to(p.device, p.dtype))
        if strict and not report.ok:
            raise FreezeViolationError(str(report))
        return report

    @staticmethod
    def _compare(report: FreezeReport, name: str, current: torch.Tensor, expected: torch.Tensor) -> None:
        report.checked_entries += current.numel()
        report.checked_parameters += 1
        if torch.equal(_bits(current), _bits(expected)):
            return
        diff = current.reshape(-1).float() - expected.reshape(-1).float()
        changed = _bits(current).view(-1, current.element_size()) != _bits(expected).view(-1, current.element_size())
        report.changed[name] = report.changed.get(name, 0) + int(changed.any(dim=1).sum())
        report.max_abs_diff[name] = max(report.max_abs_diff.get(name, 0.0), float(diff.abs().nan_to_num(0.0).max()))

    def _drop_hooks(self) -> None:
        for h in self._handles + self._opt_handles:
            h.remove()
        self._handles.clear()
        self._opt_handles.clear()

    def remove(self) -> None:
        """Remove every hook, drop the saved values and switch ``requires_grad`` back on where :meth:`prepare_model`
        switched it off. Safe to call twice."""
        self._drop_hooks()
        self._entries.clear()
        self._digests.clear()
        self._model = None
        self._reference = None
        self._resolved_backend = None
        self._give_back_requires_grad()

    # ------------------------------------------------------------------ the protocol's per-step hooks and logs
    def before_clip(self, model: nn.Module | None = None) -> None:
        """Zero the frozen gradients where hooks cannot fire (FSDP1's flat parameters); a no-op elsewhere."""
        if self.needs_grad_mask_call:
            self.mask_grads_()

    def after_optimizer_step(self, step: int | None = None) -> None:
        """Restore the frozen entries where no optimizer hook fires (DeepSpeed steps inside its engine); a no-op
        elsewhere (the optimizer's step hook already did it)."""
        if self._resolved_backend == "deepspeed":
            self.restore_()

    def metrics(self) -> dict[str, float]:
        """``safety/frozen_entries`` and ``safety/freezer_bytes`` (and the drift with ``log_drift``) while installed."""
        if not self.installed:
            return {}
        return {
            "safety/frozen_entries": float(self.num_frozen),
            "safety/freezer_bytes": float(self.memory_bytes),
            **super().metrics(),
        }

    def state(self) -> dict[str, Any]:
        return {**super().state(), "backend": self._resolved_backend or self.backend, "frozen": self.num_frozen}

    def __repr__(self) -> str:
        state = f"installed on {self._resolved_backend}" if self.installed else "not installed"
        return f"Freezer(mode={self.mode!r}, {state}, frozen={self.num_frozen:,}, held={self.memory_bytes:,} B)"
