"""One conformance table over both adapter types: the generic behaviour every PEFT tuner must have, checked per
(adapter type, mask granularity) case, in the style of PEFT's ``PeftCommonTester`` (our own checks, no code copied).

Each adapter type is described by a tester (`SetTester`, `SafetyLoraTester`): how to build and randomise an adapter,
the update a layer *should* add (an fp64 reference computed from the mask by hand, never by the library), and which
entries the guarantee protects (SET: everything outside the mask stays bit-identical; masked LoRA: everything on the
mask stays bit-identical). The checks: forward against the reference, save/load round trip exact (safetensors and
.bin, with and without ``low_cpu_mem_usage``), merge/unmerge/safe merge, non-finite weights refused, disable/enable,
inference mode and trainable parameters, add/set/delete adapters, mixed-batch inference, dtype autocast on half
precision bases, an FSDP-style state-dict round trip, mixed PEFT types refused, the guarantee after training, and the
reload in a fresh process through ``PeftModel.from_pretrained`` and ``AutoPeftModelForCausalLM`` with the guarantee
measured there.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from _spa_reference import identity_update, lora_layers
from _spa_reference import reference_delta as lora_reference_delta
from peft import (
    LoraConfig,
    PeftMixedModel,
    PeftModel,
    get_peft_model,
    get_peft_model_state_dict,
    inject_adapter_in_model,
    set_peft_model_state_dict,
)
from peft.tuners.tuners_utils import BaseTunerLayer
from safetensors.torch import load_file

from peft_safety.mask import Head, Layer, Neuron, Weight, fingerprints_of
from peft_safety.testing import tiny_llama
from peft_safety.tuner import SafetyConfig, SafetyLinear, SafetyLoraConfig

ROOT = Path(__file__).resolve().parents[2]

# one granularity per case, on two modules each (q/k/v/o: 32x32 or 16x32; gate/up: 64x32; down: 32x64)
GRANULARITIES = {
    "weight": {"model.layers.0.self_attn.q_proj.weight": Weight(), "model.layers.1.mlp.down_proj.weight": Weight()},
    "neuron_rows": {
        "model.layers.0.mlp.gate_proj.weight": Neuron(axis=0),
        "model.layers.1.self_attn.v_proj.weight": Neuron(axis=0),
    },
    "neuron_cols": {
        "model.layers.0.mlp.down_proj.weight": Neuron(axis=1),
        "model.layers.1.self_attn.o_proj.weight": Neuron(axis=1),
    },
    "head": {
        "model.layers.0.self_attn.k_proj.weight": Head(head_dim=8, axis=0),
        "model.layers.1.self_attn.o_proj.weight": Head(head_dim=8, axis=1),
    },
    "layer": {"model.layers.0.mlp.up_proj.weight": Layer(), "model.layers.1.self_attn.v_proj.weight": Layer()},
    "mixed": {
        "model.layers.0.self_attn.v_proj.weight": Weight(),
        "model.layers.1.mlp.up_proj.weight": Neuron(axis=0),
        "model.layers.0.self_attn.o_proj.weight": Head(head_dim=8, axis=1),
        "model.layers.1.mlp.gate_proj.weight": Layer(),
    },
    # TRL's default path: LoraConfig() targets q_proj and v_proj only; the mask also covers modules LoRA never adapts
    "trl_default": {
        "model.layers.0.self_attn.q_proj.weight": Weight(),
        "model.layers.1.self_attn.v_proj.weight": Neuron(axis=0),
        "model.layers.0.mlp.down_proj.weight": Neuron(axis=1),
        "model.layers.1.mlp.up_proj.weight": Weight(),
        "model.layers.0.mlp.gate_proj.weight": Layer(),
    },
}
IDS = torch.arange(3, 27).view(2, 12)


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits


def base_logits() -> torch.Tensor:
    return logits(tiny_llama(seed=0))


def dense_of(mask, key: str) -> torch.Tensor | None:
    name = f"{key}.weight"
    return mask.to_dense(name) if name in mask.names else None


class SetTester:
    """The ``SAFETY`` type: trainable deltas at the mask's entries; everything outside the mask is protected."""

    name = "SAFETY"
    config_cls = SafetyConfig
    mixed_batch = "refused"
    trainable_attrs = ("safety_values",)

    @staticmethod
    def config(mask, **kwargs):
        return SafetyConfig(mask=mask, **kwargs)

    @staticmethod
    def layers(model) -> dict:
        return {
            k.removeprefix("base_model.model."): m for k, m in model.named_modules() if isinstance(m, SafetyLinear)
        }

    @classmethod
    def randomise_(cls, model, adapter: str = "default", seed: int = 1) -> None:
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for layer in cls.layers(model).values():
                if adapter in layer.safety_values:
                    values = layer.safety_values[adapter]
                    values.copy_((torch.randn(values.shape, generator=gen) * 0.05).to(values.dtype))

    @staticmethod
    def protected(dense: torch.Tensor) -> torch.Tensor:
        return ~dense

    @staticmethod
    def reference_delta(layer, key: str, mask, adapter: str) -> torch.Tensor:
        """fp64 delta of one module, placed by a naive loop over the mask's own units (no library code)."""
        name = f"{key}.weight"
        shape = (layer.out_features, layer.in_features)
        delta = torch.zeros(shape, dtype=torch.float64)
        if adapter not in layer.safety_values:
            return delta
        gran, v = mask.granularity_of(name), layer.safety_values[adapter].detach().double()
        units = [int(u) for u in mask[name]]
        if isinstance(gran, Weight):
            for k, flat in enumerate(units):
                delta[flat // shape[1], flat % shape[1]] += v[k]
        elif isinstance(gran, Layer):
            delta += v
        else:
            width = 1 if isinstance(gran, Neuron) else gran.head_dim
            for k, pos in enumerate(u * width + o for u in units for o in range(width)):
                if gran.axis == 0:
                    delta[pos, :] += v[k, :]
                else:
                    delta[:, pos] += v[:, k]
        return delta

    @staticmethod
    def expected_trainable(mask) -> int:
        return mask.numel()

    @staticmethod
    def adapter_dtype(base_dtype: torch.dtype, autocast: bool) -> torch.dtype:
        return torch.float32  # documented: float32 deltas stay float32 on half-precision bases (values_dtype)

    @staticmethod
    def poison_(model) -> None:
        layer = next(iter(SetTester.layers(model).values()))
        with torch.no_grad():
            layer.safety_values["default"].view(-1)[0] = float("inf")


class SafetyLoraTester:
    """The ``SAFETY_LORA`` type: LoRA on every linear module; everything on the mask is protected."""

    name = "SAFETY_LORA"
    config_cls = SafetyLoraConfig
    mixed_batch = "supported"
    trainable_attrs = ("lora_A", "lora_B")

    @staticmethod
    def config(mask, **kwargs):
        lora = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", **kwargs)
        return SafetyLoraConfig.from_lora_config(lora, mask)

    @staticmethod
    def layers(model) -> dict:
        return lora_layers(model)

    @classmethod
    def randomise_(cls, model, adapter: str = "default", seed: int = 1) -> None:
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for layer in cls.layers(model).values():
                if adapter not in layer.lora_A:
                    continue
                for factors in (layer.lora_A, layer.lora_B):
                    w = factors[adapter].weight
                    w.copy_((torch.randn(w.shape, generator=gen) * 0.2).to(w.dtype))

    @staticmethod
    def protected(dense: torch.Tensor) -> torch.Tensor:
        return dense

    @staticmethod
    def reference_delta(layer, key: str, mask, adapter: str) -> torch.Tensor:
        if adapter not in layer.lora_A:
            return torch.zeros(layer.out_features, layer.in_features, dtype=torch.float64)
        return lora_reference_delta(layer, dense_of(mask, key), adapter)

    @staticmethod
    def expected_trainable(mask) -> None:
        return None  # LoRA's factor count, not the mask's: checked by name instead

    @staticmethod
    def adapter_dtype(base_dtype: torch.dtype, autocast: bool) -> torch.dtype:
        return torch.float32 if autocast else base_dtype

    @staticmethod
    def poison_(model) -> None:
        layer = next(iter(SafetyLoraTester.layers(model).values()))
        with torch.no_grad():
            layer.lora_B["default"].weight.fill_(float("nan"))


class SafetyLoraDefaultTargetsTester(SafetyLoraTester):
    """``SAFETY_LORA`` built from ``LoraConfig()`` without ``target_modules`` (PEFT's defaults for Llama: q_proj and
    v_proj), as TRL's default path does: mask entries in modules LoRA does not adapt need no mask in the adapter."""

    @staticmethod
    def config(mask, **kwargs):
        return SafetyLoraConfig.from_lora_config(LoraConfig(r=4, lora_alpha=8, **kwargs), mask)


TESTERS = {
    "SAFETY": SetTester,
    "SAFETY_LORA": SafetyLoraTester,
    "SAFETY_LORA_DEFAULT_TARGETS": SafetyLoraDefaultTargetsTester,
}
CASES = [(t, k) for t in ("SAFETY", "SAFETY_LORA") for k in GRANULARITIES if k != "trl_default"]
CASES += [("SAFETY_LORA_DEFAULT_TARGETS", "trl_default")]
pytestmark = pytest.mark.parametrize(("adapter_type", "kind"), CASES, ids=[f"{t}-{k}" for t, k in CASES])


class Case:
    """One (adapter type, granularity) case: builds adapters and checks them against the tester's references."""

    def __init__(self, tester, kind: str, random_mask) -> None:
        self.tester, self.kind, self._random_mask = tester, kind, random_mask

    def mask(self, seed: int = 0, model=None, fingerprints: bool = False):
        model = tiny_llama(seed=0) if model is None else model
        return self._random_mask(model, GRANULARITIES[self.kind], seed=seed, fingerprints=fingerprints)

    def build(self, model=None, mask=None, seed: int = 1, config_kwargs=None, **peft_kwargs):
        """A ``PeftModel`` of this case with random adapter weights: ``(peft_model, mask)``."""
        model = tiny_llama(seed=0) if model is None else model
        mask = self.mask(model=model) if mask is None else mask
        peft_model = get_peft_model(model, self.tester.config(mask, **(config_kwargs or {})), **peft_kwargs)
        self.tester.randomise_(peft_model, "default", seed=seed)
        return peft_model, mask

    def reference_logits(self, peft_model, masks: dict) -> torch.Tensor:
        """fp64 logits of the base model with every active adapter's reference delta added to its weight."""
        ref = copy.deepcopy(tiny_llama(seed=0)).double()
        params = dict(ref.named_parameters())
        with torch.no_grad():
            for key, layer in self.tester.layers(peft_model).items():
                for adapter in layer.active_adapters:
                    if adapter in masks:
                        params[f"{key}.weight"] += self.tester.reference_delta(layer, key, masks[adapter], adapter)
            return ref(IDS).logits

    def assert_like_reference(self, peft_model, masks: dict) -> None:
        out = logits(peft_model).double()
        ref = self.reference_logits(peft_model, masks)
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
        assert (ref - base_logits().double()).abs().max() > 1e-3  # the adapter matters at this tolerance

    def assert_update_exact(self, peft_model, mask, adapter: str = "default", rtol=1e-5, atol=1e-6) -> int:
        """What each adapted layer adds in forward (its output on an identity input minus the base's): exactly zero on
        the protected entries, the fp64 reference elsewhere. Returns the number of protected entries checked."""
        checked = 0
        for key, layer in self.tester.layers(peft_model).items():
            got = identity_update(layer)
            want = self.tester.reference_delta(layer, key, mask, adapter)
            torch.testing.assert_close(got.double(), want, rtol=rtol, atol=atol, msg=f"{key}: update")
            dense = dense_of(mask, key)
            if dense is None:
                continue
            protected = self.tester.protected(dense)
            moved = int(torch.count_nonzero(got[protected]))
            assert moved == 0, f"{key}: {moved} protected entries of the effective update are not exactly zero"
            checked += int(protected.sum())
        return checked

    def assert_guarantee(self, weights: dict, base: dict, mask) -> int:
        """Merged (or current base) weights against the original base: the protected entries bit-identical, every
        parameter outside the mask too for SET. Returns how many entries outside the protected set changed."""
        changed = 0
        for name, old in base.items():
            new = weights[name].detach()
            if name in mask.names:
                protected = self.tester.protected(mask.to_dense(name))
                assert torch.equal(new[protected], old[protected]), f"protected entries of {name} moved"
                changed += int((new[~protected] != old[~protected]).sum())
            elif self.tester is SetTester:
                assert torch.equal(new, old), f"{name} is outside the SET mask but changed"
        return changed


@pytest.fixture
def case(adapter_type, kind, random_mask) -> Case:
    return Case(TESTERS[adapter_type], kind, random_mask)


def _base_weights() -> dict:
    return {n: p.detach().clone() for n, p in tiny_llama(seed=0).named_parameters()}


def _weights(model) -> dict:
    """``{base parameter name: tensor}`` of a model, through PEFT wrappers."""
    from peft_safety.vocab import base_name

    return {base_name(n): p for n, p in model.named_parameters()}


# ---- forward ---------------------------------------------------------------------------------------------------------


def test_forward_and_effective_update_match_the_reference(case):
    peft_model, mask = case.build()
    case.assert_like_reference(peft_model, {"default": mask})
    checked = case.assert_update_exact(peft_model, mask)
    # a Layer() mask covers whole tensors: SET then protects nothing inside them, masked LoRA leaves them out
    assert checked > 0 or case.kind == "layer"


# ---- save / load -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("safe_serialization", [True, False], ids=["st", "bin"])
@pytest.mark.parametrize("low_cpu_mem_usage", [False, True], ids=["eager", "lcmu"])
def test_save_load_round_trip_exact(case, tmp_path, safe_serialization, low_cpu_mem_usage):
    peft_model, mask = case.build()
    ref = logits(peft_model)
    peft_model.save_pretrained(tmp_path, safe_serialization=safe_serialization)
    weights = "adapter_model.safetensors" if safe_serialization else "adapter_model.bin"
    assert sorted(os.listdir(tmp_path)) == ["README.md", "adapter_config.json", weights]
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["peft_type"] == case.tester.name
    assert "mask" not in saved and "fingerprint_check" not in saved  # runtime state, never in the file
    loaded = PeftModel.from_pretrained(tiny_llama(seed=0), tmp_path, low_cpu_mem_usage=low_cpu_mem_usage)
    assert type(loaded.peft_config["default"]) is case.tester.config_cls
    assert not any(p.device.type == "meta" for p in loaded.parameters())
    assert not any(b.device.type == "meta" for b in loaded.buffers())
    assert torch.equal(logits(loaded), ref)
    case.assert_like_reference(loaded, {"default": mask})
    case.assert_update_exact(loaded, mask)


# ---- merge / unmerge / safe merge ------------------------------------------------------------------------------------


def test_merge_unmerge_and_safe_merge(case):
    peft_model, mask = case.build()
    base = _base_weights()
    ref = case.reference_logits(peft_model, {"default": mask})
    with torch.no_grad():
        peft_model.merge_adapter()
        torch.testing.assert_close(logits(peft_model).double(), ref, rtol=1e-5, atol=1e-5)
        assert case.assert_guarantee(_weights(peft_model), base, mask) > 0 or case.kind == "layer"
        peft_model.unmerge_adapter()
        torch.testing.assert_close(logits(peft_model).double(), ref, rtol=1e-5, atol=1e-5)
        weights = _weights(peft_model)
        case.assert_guarantee(weights, base, mask)
        for name, old in base.items():
            torch.testing.assert_close(weights[name].detach(), old, rtol=0, atol=1e-6)  # unmerge restores the base
        merged = peft_model.merge_and_unload(safe_merge=True)
    assert not any(isinstance(m, BaseTunerLayer) for m in merged.modules())
    torch.testing.assert_close(logits(merged).double(), ref, rtol=1e-5, atol=1e-5)
    case.assert_guarantee(dict(merged.named_parameters()), base, mask)


def test_safe_merge_refuses_non_finite_weights_and_writes_nothing(case):
    peft_model, _ = case.build()
    case.tester.poison_(peft_model)
    before = {n: p.detach().clone() for n, p in _weights(peft_model).items()}
    # PEFT's tuners word it so (peft/tuners/lora/layer.py); callers match on it
    with pytest.raises(
        ValueError, match=r"NaNs detected in the merged weights\. The adapter default seems to be broken"
    ):
        peft_model.merge_adapter(safe_merge=True)
    after = _weights(peft_model)
    # nothing written: every finite tensor (the base weights among them) is unchanged
    assert all(torch.equal(after[n].detach(), old) for n, old in before.items() if old.isfinite().all())


# ---- disable / enable, inference mode --------------------------------------------------------------------------------


def test_disable_and_enable(case):
    peft_model, mask = case.build()
    on = logits(peft_model)
    with peft_model.disable_adapter():
        assert torch.equal(logits(peft_model), base_logits())
    assert torch.equal(logits(peft_model), on)
    peft_model.base_model.disable_adapter_layers()
    assert torch.equal(logits(peft_model), base_logits())
    peft_model.base_model.enable_adapter_layers()
    assert torch.equal(logits(peft_model), on)
    case.assert_like_reference(peft_model, {"default": mask})


def test_inference_mode_and_trainable_parameters(case, tmp_path):
    frozen_at_creation, _ = case.build(config_kwargs={"inference_mode": True})
    assert not any(p.requires_grad for p in frozen_at_creation.parameters())
    peft_model, mask = case.build()
    trainable = {n for n, p in peft_model.named_parameters() if p.requires_grad}
    assert trainable and all(any(f".{a}." in n for a in case.tester.trainable_attrs) for n in trainable)
    if case.tester.expected_trainable(mask) is not None:
        assert sum(p.numel() for p in peft_model.parameters() if p.requires_grad) == case.tester.expected_trainable(
            mask
        )
    # the indices are buffers: saved, never trained
    assert not any("safety_indices" in n or "lora_safety" in n for n, _ in peft_model.named_parameters())
    peft_model.save_pretrained(tmp_path)
    frozen = PeftModel.from_pretrained(tiny_llama(seed=0), tmp_path)
    assert frozen.peft_config["default"].inference_mode
    assert not any(p.requires_grad for p in frozen.parameters())
    again = PeftModel.from_pretrained(tiny_llama(seed=0), tmp_path, is_trainable=True)
    assert {n for n, p in again.named_parameters() if p.requires_grad} == trainable


# ---- several adapters ------------------------------------------------------------------------------------------------


def test_add_set_delete_adapters(case):
    peft_model, mask = case.build()
    first = logits(peft_model)
    other_mask = case.mask(seed=5)
    peft_model.add_adapter("other", case.tester.config(other_mask))
    case.tester.randomise_(peft_model, "other", seed=9)
    assert peft_model.active_adapter == "default"
    assert torch.equal(logits(peft_model), first)  # an added adapter is not active
    assert not any(p.requires_grad for n, p in peft_model.named_parameters() if ".other" in n)
    peft_model.set_adapter("other")
    assert all(p.requires_grad for n, p in peft_model.named_parameters() if n.endswith((".other", ".other.weight")))
    assert not any(p.requires_grad for n, p in peft_model.named_parameters() if ".default" in n)
    case.assert_like_reference(peft_model, {"other": other_mask})
    case.assert_update_exact(peft_model, other_mask, adapter="other")
    peft_model.set_adapter("default")
    case.assert_update_exact(peft_model, mask)
    peft_model.delete_adapter("other")
    assert list(peft_model.peft_config) == ["default"]
    assert not any(".other" in k or k.endswith("other") for k in peft_model.state_dict())
    assert torch.equal(logits(peft_model), first)
    # a new adapter with the default (identity) initialisation: the base model again
    peft_model.add_adapter("third", case.tester.config(case.mask(seed=3)))
    peft_model.set_adapter("third")
    peft_model.delete_adapter("default")
    assert torch.equal(logits(peft_model), base_logits())


def test_mixed_batch_inference(case):
    peft_model, _ = case.build()
    other_mask = case.mask(seed=5)
    peft_model.add_adapter("other", case.tester.config(other_mask))
    case.tester.randomise_(peft_model, "other", seed=9)
    peft_model.eval()  # PEFT allows adapter_names in eval mode only
    ids = torch.cat([IDS, IDS[:1]])
    names = ["default", "other", "__base__"]
    if case.tester.mixed_batch == "refused":
        with pytest.raises(ValueError, match="Mixed-batch inference"):
            peft_model(ids, adapter_names=names)
        return
    with torch.no_grad():
        mixed = peft_model(ids, adapter_names=names).logits
        single = {}
        for name in ("default", "other"):
            peft_model.set_adapter(name)
            single[name] = peft_model(ids).logits
        with peft_model.disable_adapter():
            plain = peft_model(ids).logits
    # each row runs through its own adapter only, masked: the same as the single-adapter runs
    torch.testing.assert_close(mixed[0], single["default"][0], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(mixed[1], single["other"][1], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(mixed[2], plain[2], rtol=1e-6, atol=1e-6)
    assert not torch.allclose(single["default"][0], single["other"][0], atol=1e-3)


def test_refused_mixed_batch_leaves_the_model_as_it_was(case, tmp_path):
    """A mixed-batch call the model refuses (SET: always; masked LoRA: a batch of another length, or merged adapters)
    leaves no hook behind: every later call, plain or mixed, and the generic checks behave as before."""
    peft_model, mask = case.build()
    peft_model.add_adapter("other", case.tester.config(case.mask(seed=5)))
    case.tester.randomise_(peft_model, "other", seed=9)
    peft_model.eval()
    before = logits(peft_model)
    refusals = [(["default", "other"], "Mixed-batch inference")]
    if case.tester.mixed_batch == "supported":
        refusals = [(["default", "other", "__base__"], "Length of `adapter_names`")]
    for names, message in refusals:
        with pytest.raises(ValueError, match=message):
            peft_model(IDS, adapter_names=names)
        assert not any(m._forward_pre_hooks for m in peft_model.modules())
        assert torch.equal(logits(peft_model), before)
    if case.tester.mixed_batch == "supported":
        with torch.no_grad():
            mixed = peft_model(IDS, adapter_names=["other", "default"]).logits  # mixed batches still work
            peft_model.set_adapter("other")
            torch.testing.assert_close(mixed[0], logits(peft_model)[0], rtol=1e-6, atol=1e-6)
            peft_model.set_adapter("default")
    case.assert_like_reference(peft_model, {"default": mask})
    case.assert_update_exact(peft_model, mask)
    with peft_model.disable_adapter():
        assert torch.equal(logits(peft_model), base_logits())
    peft_model.save_pretrained(tmp_path)
    assert torch.equal(logits(PeftModel.from_pretrained(tiny_llama(seed=0), tmp_path)), logits(peft_model))
    if case.tester.mixed_batch == "supported":  # refused inside the layers, after PEFT installed its hooks
        with torch.no_grad():
            peft_model.merge_adapter()
            with pytest.raises(ValueError, match="merged adapters"):
                peft_model(IDS, adapter_names=["default", "other"])
            assert not any(m._forward_pre_hooks for m in peft_model.modules())
            peft_model.unmerge_adapter()
            torch.testing.assert_close(logits(peft_model), before, rtol=1e-5, atol=1e-5)


# ---- add_weighted_adapter --------------------------------------------------------------------------------------------


def _mask_union(first, second):
    """The union of two masks of one case (same granularity per parameter), as dense tensors per parameter."""
    return {
        n: first.to_dense(n) | second.to_dense(n) if n in second.names else first.to_dense(n) for n in first.names
    } | {n: second.to_dense(n) for n in second.names if n not in first.names}


@pytest.mark.parametrize("combination_type", ["cat", "svd", "linear"])
def test_add_weighted_adapter_protects_the_union_of_the_masks(case, tmp_path, combination_type):
    """Masked LoRA: the combination's update is exactly zero on every entry either adapter protects, and "cat" gives
    the weighted sum of the two adapters' updates elsewhere (fp64 reference from the source factors). SET: refused."""
    peft_model, mask = case.build()
    other_mask = case.mask(seed=5)
    peft_model.add_adapter("other", case.tester.config(other_mask))
    case.tester.randomise_(peft_model, "other", seed=9)
    weights = {"default": 0.7, "other": -0.4}
    if case.tester is SetTester:
        with pytest.raises(NotImplementedError, match="not available for SAFETY"):
            peft_model.add_weighted_adapter(list(weights), list(weights.values()), "combined")
        return
    layers = case.tester.layers(peft_model)
    expected = {}
    for key, layer in layers.items():
        total = torch.zeros(layer.out_features, layer.in_features, dtype=torch.float64)
        for adapter, w in weights.items():
            if adapter in layer.lora_A:
                a, b = layer.lora_A[adapter].weight.double(), layer.lora_B[adapter].weight.double()
                total += w * float(layer.scaling[adapter]) * (b @ a)
        expected[key] = total
    union = _mask_union(mask, other_mask)
    peft_model.add_weighted_adapter(
        list(weights), list(weights.values()), "combined", combination_type=combination_type
    )
    peft_model.set_adapter("combined")
    checked = 0
    for key, layer in case.tester.layers(peft_model).items():
        if "combined" not in layer.lora_A:
            continue
        got = identity_update(layer).double()
        protected = union.get(f"{key}.weight")
        if protected is not None:
            assert int(torch.count_nonzero(got[protected])) == 0, f"{key}: protected entries moved"
            checked += int(protected.sum())
            if combination_type == "cat":
                want = expected[key].masked_fill(protected, 0.0)
                torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        elif combination_type == "cat":
            torch.testing.assert_close(got, expected[key], rtol=1e-5, atol=1e-6)
    assert checked > 0 or case.kind == "layer"
    for name in union:  # the combination never adapts a module either adapter leaves out
        key = name.rpartition(".")[0]
        if isinstance(mask.granularity_of(name) if name in mask.names else other_mask.granularity_of(name), Layer):
            assert "combined" not in getattr(case.tester.layers(peft_model).get(key), "lora_A", {})
    combined = logits(peft_model)
    peft_model.save_pretrained(tmp_path, selected_adapters=["combined"])
    loaded = PeftModel.from_pretrained(tiny_llama(seed=0), tmp_path / "combined")
    # the same tensors (PEFT's SVD leaves non-contiguous factors, so the matmuls may round differently)
    torch.testing.assert_close(logits(loaded), combined, rtol=1e-6, atol=1e-6)
    for key, layer in case.tester.layers(loaded).items():  # the union mask was saved and restored
        protected = union.get(f"{key}.weight")
        if protected is not None:
            assert int(torch.count_nonzero(identity_update(layer)[protected])) == 0, key


# ---- dtype -----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("autocast_adapter_dtype", [True, False], ids=["autocast", "no-autocast"])
def test_dtype_autocast_on_half_precision_bases(case, tmp_path, dtype, autocast_adapter_dtype):
    model = tiny_llama(seed=0).to(dtype)
    peft_model, mask = case.build(model=model, mask=case.mask(), autocast_adapter_dtype=autocast_adapter_dtype)
    adapter = {p.dtype for n, p in peft_model.named_parameters() if p.requires_grad}
    if adapter:  # a SAFETY_LORA "layer" case may have adapters everywhere but the masked modules
        assert adapter == {case.tester.adapter_dtype(dtype, autocast_adapter_dtype)}
    out = logits(peft_model)
    assert out.dtype == dtype and out.isfinite().all()
    tol = 2e-2 if dtype == torch.bfloat16 else 2e-3
    case.assert_update_exact(peft_model, mask, rtol=tol, atol=tol)
    peft_model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(
        tiny_llama(seed=0).to(dtype), tmp_path, autocast_adapter_dtype=autocast_adapter_dtype
    )
    assert torch.equal(logits(loaded), out)


# ---- state dicts -----------------------------------------------------------------------------------------------------


def test_fsdp_style_state_dict_round_trip(case):
    peft_model, mask = case.build()
    # FSDP hands PEFT the full model state dict (gathered), not the module: select the adapter entries from it
    state = get_peft_model_state_dict(peft_model, state_dict=peft_model.state_dict())
    assert state and all(k.startswith("base_model.model.") for k in state)
    assert all(".default." not in k for k in state)
    stored = "safety_indices" if case.tester is SetTester else "lora_safety"
    assert any(stored in k for k in state) or (case.tester is SafetyLoraTester and case.kind == "layer")
    config = peft_model.peft_config["default"]
    layout_only = type(config)(**{k: v for k, v in config.to_dict().items() if k != "peft_type"})
    assert layout_only.mask is None  # rebuilt from mask_layout alone, as a loader does
    target = inject_adapter_in_model(layout_only, tiny_llama(seed=0), low_cpu_mem_usage=True)
    result = set_peft_model_state_dict(target, state, low_cpu_mem_usage=True)
    assert not [k for k in result.unexpected_keys if "safety" in k or "lora" in k]
    assert torch.equal(logits(target), logits(peft_model))
    case.assert_update_exact(target, mask)


# ---- mixed PEFT types --------------------------------------------------------------------------------------------------


def test_other_peft_types_are_refused(case):
    mask = case.mask()
    refused = rf"'{case.tester.name}' is not compatible with the `PeftMixedModel`"
    with pytest.raises(ValueError, match=refused):
        get_peft_model(tiny_llama(seed=0), case.tester.config(mask), mixed=True)
    mixed = PeftMixedModel(tiny_llama(seed=0), LoraConfig(target_modules=["v_proj"]))
    with pytest.raises(ValueError, match=refused):
        mixed.add_adapter("ours", case.tester.config(mask))
    peft_model, _ = case.build(mask=mask)
    # a plain LoRA adapter next to ours: beside a masked one it would move the protected entries
    with pytest.raises(ValueError, match="Cannot combine adapters with different peft types"):
        peft_model.add_adapter("plain", LoraConfig(target_modules=["v_proj"]))
    # SafetyLoraModel refuses it too on paths that bypass PEFT's type check
    if issubclass(case.tester, SafetyLoraTester):
        with pytest.raises(TypeError, match="SafetyLoraConfig adapters only"):
            peft_model.base_model._check_new_adapter_config(LoraConfig(target_modules=["v_proj"]))


# ---- the guarantee after training ------------------------------------------------------------------------------------


def test_guarantee_after_training_and_merge(case, train):
    peft_model, mask = case.build()
    train(peft_model, steps=3)
    with torch.no_grad():
        unmerged = logits(peft_model)
    # the trained adapter still does what the reference says: the base plus the fp64 deltas of its weights
    case.assert_like_reference(peft_model, {"default": mask})
    case.assert_update_exact(peft_model, mask)
    merged = peft_model.merge_and_unload()
    torch.testing.assert_close(logits(merged), unmerged, rtol=1e-5, atol=1e-5)
    changed = case.assert_guarantee(dict(merged.named_parameters()), _base_weights(), mask)
    if not (case.tester is SafetyLoraTester and case.kind == "layer"):
        assert changed > 0  # training did move the unprotected entries: the check is not vacuous


# ---- reload in a fresh process ---------------------------------------------------------------------------------------

_CHILD = """
import json, sys
import torch
import peft_safety  # registers SAFETY and SAFETY_LORA
from peft import AutoPeftModelForCausalLM, PeftModel
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM
from peft_safety import SafetyMask

torch.set_num_threads(1)  # as in the parent (tests/conftest.py): same kernels, bit-identical sums
base_dir, jobs, out_file = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3]
ids = torch.arange(3, 27).view(2, 12)
tensors, stats = {}, {}
for case, job in jobs.items():
    folder = job["folder"]
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), folder)
    auto = AutoPeftModelForCausalLM.from_pretrained(folder)
    with torch.no_grad():
        tensors[case + ".from_pretrained"] = model(ids).logits.contiguous()
        tensors[case + ".auto"] = auto(ids).logits.contiguous()
    base = dict(AutoModelForCausalLM.from_pretrained(base_dir).named_parameters())
    merged = dict(auto.merge_and_unload().named_parameters())
    mask = SafetyMask.from_pretrained(folder)
    other = AutoModelForCausalLM.from_pretrained(base_dir)
    with torch.no_grad():
        other.get_parameter(next(iter(mask.names))).mul_(-3)
    try:
        mask.validate(other, fingerprint_check="error")
        refused = False
    except ValueError:
        refused = True
    moved_protected = moved_free = moved_outside = 0
    for name, old in base.items():
        changed = merged[name] != old
        if name not in mask.names:
            moved_outside += int(changed.sum())
            continue
        protected = ~mask.to_dense(name) if job["protect"] == "outside" else mask.to_dense(name)
        moved_protected += int((changed & protected).sum())
        moved_free += int((changed & ~protected).sum())
    stats[case] = {
        "type": type(model.peft_config["default"]).__name__, "moved_protected": moved_protected,
        "moved_free": moved_free, "moved_outside": moved_outside, "refused_other_base": refused,
    }
save_file(tensors, out_file)
print(json.dumps(stats))
"""


@pytest.fixture(scope="module")
def fresh_process(tmp_path_factory, base_dir, random_mask):
    """Every case saved here (adapter and mask in one folder, on a base read from disk), reloaded in one fresh
    interpreter by PeftModel.from_pretrained and AutoPeftModelForCausalLM, the merged weights compared there."""
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("fresh")
    jobs, expected = {}, {}
    for adapter_type, kind in CASES:
        case = Case(TESTERS[adapter_type], kind, random_mask)
        model = AutoModelForCausalLM.from_pretrained(base_dir)
        mask = case.mask(model=model)
        mask = mask.with_fingerprints(fingerprints_of(model, mask.shapes))
        peft_model, _ = case.build(model=model, mask=mask)
        folder = root / f"{adapter_type}-{kind}"
        peft_model.save_pretrained(folder)
        mask.save_pretrained(folder)
        saved = json.loads((folder / "adapter_config.json").read_text())
        assert (saved["base_model_name_or_path"], saved["base_model_source"]) == (str(base_dir), "local"), folder
        protect = "outside" if case.tester is SetTester else "inside"
        jobs[f"{adapter_type}-{kind}"] = {"folder": str(folder), "protect": protect}
        expected[f"{adapter_type}-{kind}"] = (logits(peft_model), case.reference_logits(peft_model, {"default": mask}))
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    out_file = root / "logits.safetensors"
    proc = subprocess.run(
        [sys.executable, "-c", _CHILD, str(base_dir), json.dumps(jobs), str(out_file)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return load_file(out_file), json.loads(proc.stdout.strip().splitlines()[-1]), expected


def test_fresh_process_reload_is_exact_and_keeps_the_guarantee(case, adapter_type, kind, fresh_process):
    tensors, stats, expected = fresh_process
    key = f"{adapter_type}-{kind}"
    in_process, ref = expected[key]
    assert torch.equal(tensors[key + ".from_pretrained"], in_process)
    assert torch.equal(tensors[key + ".auto"], in_process)
    torch.testing.assert_close(tensors[key + ".auto"].double(), ref, rtol=1e-5, atol=1e-5)
    got = stats[key]
    assert got["type"] == case.tester.config_cls.__name__
    assert got["moved_protected"] == 0  # merged weights equal the base bit for bit on every protected entry
    assert got["refused_other_base"]  # the mask's fingerprints reject other weights
    if case.tester is SetTester:
        assert got["moved_outside"] == 0  # SET changes nothing outside the mask
        assert got["moved_free"] > 0
    elif kind != "layer":
        assert got["moved_free"] > 0  # the adapter did change the rest of the masked tensors (not vacuous)
