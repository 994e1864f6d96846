"""Independent references for masked-LoRA (SPA) tests: what a layer *does* (its forward on an identity input) and
what it *should* do (an fp64 ``B @ A * scaling`` with the masked entries set to zero), written here without any
peft-safety tuner code."""

from __future__ import annotations

import torch
from torch import nn


def base_of(layer: nn.Module) -> nn.Module:
    return layer.get_base_layer() if hasattr(layer, "get_base_layer") else layer


def identity_update(layer: nn.Module, dtype: torch.dtype | None = None) -> torch.Tensor:
    """``layer(I) - base(I)``, transposed to the weight's ``(d_out, d_in)`` layout, with every dropout off.

    Runs the real layer, so it measures the effective update whatever the layer's forward does.
    """
    base = base_of(layer)
    weight = base.weight
    if dtype is None:
        dtype = weight.dtype if weight.dtype.is_floating_point else torch.float32
    eye = torch.eye(base.in_features, dtype=dtype, device=weight.device)
    dropouts = [m for m in layer.modules() if isinstance(m, nn.Dropout) and m.training]
    for m in dropouts:
        m.train(False)
    try:
        with torch.no_grad():
            return (layer(eye) - base(eye)).t()
    finally:
        for m in dropouts:
            m.train(True)


def reference_delta(layer: nn.Module, dense_mask: torch.Tensor | None, adapter: str = "default") -> torch.Tensor:
    """fp64 ``(B @ A) * scaling`` of a LoRA layer with the entries of ``dense_mask`` set to exactly zero."""
    a = layer.lora_A[adapter].weight.detach().double()
    b = layer.lora_B[adapter].weight.detach().double()
    delta = (b @ a) * float(layer.scaling[adapter])
    if dense_mask is not None:
        delta = delta.masked_fill(dense_mask.to(delta.device), 0.0)
    return delta


def lora_layers(model: nn.Module) -> dict[str, nn.Module]:
    """``{base-model module key: layer}`` of every module with LoRA factors."""
    out = {}
    for key, module in model.named_modules():
        if hasattr(module, "lora_A") and len(getattr(module, "lora_A", {})):
            out.setdefault(key.removeprefix("base_model.model."), module)
    return out


def randomise_lora_(model: nn.Module, seed: int = 1, std: float = 1.0) -> None:
    """Draw every LoRA factor at random (B starts at zero, which would make every comparison trivial)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            for factors in (layer.lora_A, layer.lora_B):
                for module in factors.values():
                    w = module.weight
                    if w.device.type == "meta":
                        continue
                    w.copy_((torch.randn(w.shape, generator=gen) * std).to(w.dtype))


def masked_linear_keys(mask) -> list[str]:
    from peft_safety.mask import Layer

    return [
        n.rpartition(".")[0]
        for n in mask.names
        if n.endswith(".weight") and not isinstance(mask.granularity_of(n), Layer)
    ]


def assert_effective_update_exact(model: nn.Module, mask, rtol: float = 1e-5, atol: float = 1e-6, dtype=None) -> int:
    """Every adapted masked module: the effective update matches the fp64 reference (zero on the mask) and is
    bit-exactly zero on the mask, in the forward where the layer's path promises it (a layer without entry mask, or
    ``entries_path == "dense"``) and always in the merged delta (``get_delta_weight``: what a served model gets). The
    ``"sparse"`` entry path's forward subtracts the masked entries by another route, so there its masked entries are
    held to ``atol`` (rounding) instead. Returns the number of masked entries checked."""
    layers = lora_layers(model)
    checked = 0
    for key in masked_linear_keys(mask):
        layer = layers.get(key)
        if layer is None:
            continue
        dense = mask.to_dense(f"{key}.weight")
        got = identity_update(layer, dtype=dtype)
        on_mask = got[dense.to(got.device)]
        paths = {layer.entries_path(a) for a in layer.active_adapters} if hasattr(layer, "entries_path") else {None}
        if "sparse" in paths:
            assert on_mask.numel() == 0 or float(on_mask.abs().max()) <= atol, (
                f"{key}: masked entries move beyond rounding"
            )
        else:
            moved = int(torch.count_nonzero(on_mask))
            assert moved == 0, f"{key}: {moved} masked entries of the effective update are not exactly zero"
        for a in layer.active_adapters:
            if a in layer.lora_A:
                with torch.no_grad():
                    merged = layer.get_delta_weight(a)
                moved = int(torch.count_nonzero(merged[dense.to(merged.device)]))
                assert moved == 0, f"{key}: {moved} masked entries of the merged delta of {a!r} are not exactly zero"
        want = sum(reference_delta(layer, dense, a) for a in layer.active_adapters if a in layer.lora_A)
        torch.testing.assert_close(got.double().cpu(), want.cpu(), rtol=rtol, atol=atol, msg=f"{key}: update")
        checked += int(dense.sum())
    return checked


def explicit_merge(base_model: nn.Module, peft_model: nn.Module, mask) -> nn.Module:
    """A copy of ``base_model`` with each LoRA module's fp64 masked reference delta added to its weight."""
    import copy

    merged = copy.deepcopy(base_model)
    params = dict(merged.named_parameters())
    dense_keys = set(masked_linear_keys(mask))
    with torch.no_grad():
        for key, layer in lora_layers(peft_model).items():
            dense = mask.to_dense(f"{key}.weight") if key in dense_keys else None
            delta = sum(reference_delta(layer, dense, a) for a in layer.active_adapters if a in layer.lora_A)
            weight = params[f"{key}.weight"]
            weight.copy_((weight.double() + delta.to(weight.device)).to(weight.dtype))
    return merged
