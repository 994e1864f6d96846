"""Context managers that register hooks and always remove them, with fp32 accumulators.

* `GradientFold`: enables gradients on the target parameters only, folds each parameter's gradient into an fp32
  accumulator the moment it is complete (``register_post_accumulate_grad_hook``) and frees ``.grad`` at once, so at
  most one parameter's gradient is alive at a time beyond what autograd itself holds. On exit, whatever happened,
  it removes the hooks, restores every ``requires_grad`` flag and the train/eval mode, and leaves no ``.grad``
  behind on the targets.
* `ForwardHooks`: registers forward hooks on a set of modules and removes them on exit.

Memory: one fp32 accumulator per target parameter (4 bytes per entry, on the parameter's device, so ``device_map``
models keep their placement). For a sharded parameter the accumulator covers this rank's shard only:

* FSDP2 (``fully_shard``): the hook fires on the sharded ``DTensor`` parameter after FSDP's reduce-scatter, and folds
  the local part of the reduced gradient. While active, the reduction is a plain sum (no division by the world
  size: ``set_gradient_divide_factor(1.0)`` with sum-only collectives); the settings are restored on exit.
* DeepSpeed ZeRO-3: the hook receives the full (gathered-parameter) gradient of this rank's data, reduce-scatters
  it (sum) into the rank's flat partition, folds that, and frees the gradient, so DeepSpeed never sees it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch
from torch import nn

__all__ = ["ForwardHooks", "GradientFold", "input_requires_grad", "model_input_device"]


def model_input_device(model: nn.Module) -> torch.device:
    """Device of the input embeddings (where batches must go), falling back to the first parameter's device."""
    getter = getattr(model, "get_input_embeddings", None)
    emb = getter() if callable(getter) else None
    weight = getattr(emb, "weight", None)
    if isinstance(weight, torch.Tensor):
        return weight.device
    return next(model.parameters()).device


@contextlib.contextmanager
def input_requires_grad(model: nn.Module, enabled: bool = True) -> Iterator[None]:
    """Make the input embeddings' output require grad while active (needed by reentrant gradient checkpointing when
    the embeddings are frozen: without it no gradient reaches the checkpointed layers). Always removed on exit."""
    getter = getattr(model, "get_input_embeddings", None)
    emb = getter() if callable(getter) else None
    if not enabled or emb is None:
        yield
        return

    def hook(_module: nn.Module, _inputs: Any, output: torch.Tensor) -> None:
        if isinstance(output, torch.Tensor) and not output.requires_grad:
            output.requires_grad_(True)

    handle = emb.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


class GradientFold:
    """Fold gradients of ``params`` into fp32 accumulators during ``backward``.

    Args:
        model: the model (every parameter's ``requires_grad`` is saved and restored; non-targets are frozen while
            active so that backward computes no gradient for them).
        params: ``{name: parameter}`` to accumulate.
        fold: ``fold(name, accumulator, grad)`` adds ``grad`` into the fp32 ``accumulator`` in place (e.g.
            ``acc.add_(grad.abs())``); default: signed sum.

    Attributes:
        accumulators: ``{name: fp32 tensor}`` shaped like each parameter (like its local shard when sharded), on
            its device.
        calls: ``{name: number of folded gradients}``.
        shards: ``{name: Shard}`` of the sharded targets (empty for an unsharded model).

    Example:

    ```python
    >>> with GradientFold(model, params, fold=lambda n, acc, g: acc.add_(g.abs())) as gf:
    ...     loss.backward()
    >>> gf.accumulators[name]
    ```
    """

    def __init__(
        self,
        model: nn.Module,
        params: Mapping[str, nn.Parameter],
        fold: Callable[[str, torch.Tensor, torch.Tensor], Any] | None = None,
    ) -> None:
        self.model = model
        self.params = dict(params)
        self.fold = fold or (lambda _name, acc, grad: acc.add_(grad))
        self.accumulators: dict[str, torch.Tensor] = {}
        self.calls: dict[str, int] = {}
        self.shards: dict[str, Any] = {}
        self._handles: list[Any] = []
        self._flags: list[tuple[nn.Parameter, bool]] = []
        self._fsdp_settings: list[tuple[Any, Any, Any]] = []
        self._training = model.training

    def reset(self) -> None:
        """Zero the accumulators (keep the hooks)."""
        for acc in self.accumulators.values():
            acc.zero_()
        self.calls = dict.fromkeys(self.calls, 0)

    def _hook(self, name: str) -> Callable[[torch.Tensor], None]:
        from .distributed import reduce_scatter_flat

        acc = self.accumulators[name]
        shard = self.shards.get(name)
        zero3 = shard is not None and hasattr(self.params[name], "ds_tensor")

        def hook(param: torch.Tensor) -> None:
            grad = param.grad
            if grad is not None:
                if zero3:
                    grad = reduce_scatter_flat(grad, shard).view(acc.shape)
                elif shard is not None:
                    grad = grad.to_local() if hasattr(grad, "to_local") else grad
                self.fold(name, acc, grad)
                self.calls[name] += 1
            # free the gradient at once: the accumulator holds everything we need
            param.grad = None

        return hook

    def _sum_reductions(self) -> None:
        """FSDP2 averages gradients over the ranks by default; scoring sums them (restored in `_cleanup`)."""
        for module in self.model.modules():
            if hasattr(module, "set_gradient_divide_factor") and hasattr(module, "_get_fsdp_state"):
                for group in module._get_fsdp_state()._fsdp_param_groups:
                    self._fsdp_settings.append(
                        (group, group.gradient_divide_factor, getattr(group, "force_sum_reduction_for_comms", False))
                    )
                    group.gradient_divide_factor = 1.0
                    group.force_sum_reduction_for_comms = True

    def __enter__(self) -> GradientFold:
        self._training = self.model.training
        # eval mode: no dropout, so scores are deterministic; autograd is unaffected
        self.model.eval()
        seen: set[int] = set()
        for param in self.model.parameters():
            if id(param) not in seen:
                seen.add(id(param))
                self._flags.append((param, param.requires_grad))
        try:
            from .distributed import shard_of

            for param, _ in self._flags:
                param.requires_grad_(False)
            for name, param in self.params.items():
                if not param.is_floating_point():
                    raise TypeError(
                        f"Parameter {name!r} has dtype {param.dtype} (quantized?); gradient scorers need floating "
                        "weights. Exclude it with exclude_modules or score a de-quantized copy."
                    )
                param.grad = None
                param.requires_grad_(True)
                shard = shard_of(param)
                shape = param.shape if shard is None else shard.shape
                if shard is not None:
                    self.shards[name] = shard
                self.accumulators[name] = torch.zeros(shape, dtype=torch.float32, device=param.device)
                self.calls[name] = 0
                self._handles.append(param.register_post_accumulate_grad_hook(self._hook(name)))
            self._sum_reductions()
        except BaseException:
            self._cleanup()
            raise
        return self

    def _cleanup(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        for param in self.params.values():
            param.grad = None
        for param, flag in self._flags:
            param.requires_grad_(flag)
        self._flags.clear()
        for group, factor, force_sum in self._fsdp_settings:
            group.gradient_divide_factor = factor
            group.force_sum_reduction_for_comms = force_sum
        self._fsdp_settings.clear()
        self.model.train(self._training)

    def __exit__(self, *exc: Any) -> None:
        self._cleanup()


class ForwardHooks:
    """Register ``hook_factory(name, module)`` as a forward hook on each of ``modules``; removed on exit.

    Args:
        modules: ``{name: module}``.
        hook_factory: returns the hook ``(module, args, output) -> None`` for one module.
        with_kwargs: register with ``with_kwargs=True`` (the hook then receives ``(module, args, kwargs, output)``).
    """

    def __init__(
        self,
        modules: Mapping[str, nn.Module],
        hook_factory: Callable[[str, nn.Module], Callable[..., Any]],
        with_kwargs: bool = False,
    ) -> None:
        self.modules = dict(modules)
        self.hook_factory = hook_factory
        self.with_kwargs = with_kwargs
        self._handles: list[Any] = []

    def __enter__(self) -> ForwardHooks:
        try:
            for name, module in self.modules.items():
                hook = self.hook_factory(name, module)
                self._handles.append(module.register_forward_hook(hook, with_kwargs=self.with_kwargs))
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc: Any) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
