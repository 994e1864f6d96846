"""Validated loading of SAFETY (SET) adapters: every bad file is refused with a clear error, before any allocation
sized by the file; base provenance (fingerprints, Hub id) is recorded on save and checked on load."""

from __future__ import annotations

import json
import time

import pytest
import torch
from peft import PeftModel, get_peft_model
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
from safetensors.torch import load_file, save_file

import peft_safety  # noqa: F401  (registers the SAFETY type)
from peft_safety.mask import Head, Neuron, SafetyMask, Weight
from peft_safety.testing import tiny_llama
from peft_safety.tuner import SafetyConfig

Q = "model.layers.0.self_attn.q_proj"
V = "model.layers.0.self_attn.v_proj"
DOWN = "model.layers.1.mlp.down_proj"
GRAN = {Q + ".weight": Weight(), V + ".weight": Neuron(axis=0), DOWN + ".weight": Head(head_dim=8, axis=1)}
PREFIX = "base_model.model."


def make_mask(model, fraction=0.25, seed=0):
    params = dict(model.named_parameters())
    gen = torch.Generator().manual_seed(seed)
    indices, shapes = {}, {}
    for name, gran in GRAN.items():
        shape = tuple(params[name].shape)
        units = gran.num_units(shape)
        indices[name] = torch.randperm(units, generator=gen)[: max(1, int(units * fraction))].sort().values
        shapes[name] = shape
    return SafetyMask(indices=indices, shapes=shapes, granularity=GRAN)


def ids():
    return torch.randint(3, 128, (2, 10), generator=torch.Generator().manual_seed(0))


@pytest.fixture
def saved(tmp_path):
    """A saved SET adapter (random deltas) and the logits it gives on `ids()`."""
    model = get_peft_model(tiny_llama(seed=0), SafetyConfig(mask=make_mask(tiny_llama(seed=0)), init_weights=False))
    with torch.no_grad():
        ref = model(ids()).logits
    model.save_pretrained(tmp_path / "adapter")
    return tmp_path / "adapter", ref


def edit_config(path, fn):
    cfg = json.loads((path / "adapter_config.json").read_text())
    fn(cfg)
    (path / "adapter_config.json").write_text(json.dumps(cfg))


def edit_weights(path, fn):
    state = load_file(path / "adapter_model.safetensors")
    fn(state)
    save_file(state, path / "adapter_model.safetensors", metadata={"format": "pt"})
    # a hand-edited file is not an interrupted save: drop the record that ties config and weights together
    edit_config(path, lambda cfg: cfg.pop("weights_digest", None))


def load(path, **kwargs):
    return PeftModel.from_pretrained(tiny_llama(seed=0), path, **kwargs)


def test_good_adapter_loads_exactly(saved):
    path, ref = saved
    with torch.no_grad():
        assert torch.equal(load(path)(ids()).logits, ref)


# ---- adapter_config.json: mask_layout is checked before anything is allocated ----------------------------------------


def test_huge_n_is_refused_before_allocation(saved):
    path, _ = saved
    edit_config(path, lambda cfg: cfg["mask_layout"][Q].update(n=10**12))
    start = time.perf_counter()
    with pytest.raises(ValueError, match=rf"{Q}.*'n'.*1000000000000"):
        load(path)
    assert time.perf_counter() - start < 20  # allocating 10**12 int64 would fail or take minutes


@pytest.mark.parametrize(
    ("change", "fragment"),
    [
        ({"n": -1}, "'n'"),
        ({"n": True}, "'n'"),
        ({"n": 3.5}, "'n'"),
        ({"n": "12"}, "'n'"),
        ({"kind": "diagonal"}, "'kind'"),
        ({"shape": [32, 65]}, "shape"),
        ({"shape": "32x64"}, "shape"),
    ],
)
def test_bad_layout_entry(saved, change, fragment):
    path, _ = saved
    edit_config(path, lambda cfg: cfg["mask_layout"][Q].update(change))
    with pytest.raises(ValueError, match=fragment) as err:
        load(path)
    assert Q in str(err.value)


def test_layout_must_be_a_dict_of_entries(saved):
    path, _ = saved
    edit_config(path, lambda cfg: cfg.update(mask_layout=[Q]))
    with pytest.raises(ValueError, match="mask_layout"):
        load(path)
    edit_config(path, lambda cfg: cfg.update(mask_layout={Q: {"kind": "entries", "n": 4}}))
    with pytest.raises(ValueError, match="shape"):
        load(path)


def test_module_in_config_but_not_in_model(saved):
    path, _ = saved

    def rename(cfg):
        cfg["mask_layout"]["model.layers.7.self_attn.q_proj"] = cfg["mask_layout"].pop(Q)

    edit_config(path, rename)
    with pytest.raises(ValueError, match=r"model\.layers\.7\.self_attn\.q_proj.*not in this model"):
        load(path)


# ---- adapter_model.safetensors: index and value tensors --------------------------------------------------------------


def _idx(module):
    return PREFIX + module + ".safety_indices"


def _val(module):
    return PREFIX + module + ".safety_values"


@pytest.mark.parametrize(
    ("edit", "fragment"),
    [
        (lambda t: t.clone().fill_(64 * 64), "outside"),
        (lambda t: torch.cat([torch.tensor([-1], dtype=t.dtype), t[1:]]), "outside"),
        (lambda t: t.reshape(1, -1), "1-D"),
        (lambda t: torch.cat([t[:1], t[:-1]]), "sorted"),
        (lambda t: t.flip(0), "sorted"),
        (lambda t: t.to(torch.bool), "integer"),
        (lambda t: t.to(torch.float32), "integer"),
    ],
    ids=["out-of-range", "negative", "2-D", "duplicate", "unsorted", "bool", "float"],
)
def test_bad_entry_indices(saved, edit, fragment):
    path, _ = saved
    edit_weights(path, lambda state: state.update({_idx(Q): edit(state[_idx(Q)])}))
    with pytest.raises(ValueError, match=fragment) as err:
        load(path)
    assert Q + ".safety_indices" in str(err.value)


def test_bad_row_and_head_indices(saved):
    path, _ = saved
    edit_weights(path, lambda state: state.update({_idx(V): state[_idx(V)].clone().fill_(10**6)}))
    with pytest.raises(ValueError, match=rf"{V}\.safety_indices.*outside"):
        load(path)


def test_missing_index_tensor(saved):
    path, _ = saved
    edit_weights(path, lambda state: state.pop(_idx(Q)))
    with pytest.raises(ValueError, match=rf"{Q}\.safety_indices.*missing"):
        load(path)


def test_missing_value_tensor(saved):
    path, _ = saved
    edit_weights(path, lambda state: state.pop(_val(DOWN)))
    with pytest.raises(ValueError, match=rf"{DOWN}\.safety_values.*missing"):
        load(path)


def test_values_of_wrong_shape(saved):
    path, _ = saved
    edit_weights(path, lambda state: state.update({_val(Q): state[_val(Q)][:-1].clone()}))
    with pytest.raises(ValueError, match=rf"{Q}\.safety_values.*shape"):
        load(path)


def test_values_not_float(saved):
    path, _ = saved
    edit_weights(path, lambda state: state.update({_val(Q): state[_val(Q)].to(torch.int32)}))
    with pytest.raises(ValueError, match=rf"{Q}\.safety_values.*floating"):
        load(path)


def test_module_in_weights_but_not_in_config(saved):
    path, _ = saved
    edit_config(path, lambda cfg: cfg["mask_layout"].pop(DOWN))
    with pytest.raises(ValueError, match=rf"{DOWN}.*mask_layout"):
        load(path)


def test_module_in_config_but_not_in_weights(saved):
    path, _ = saved

    def drop(state):
        state.pop(_idx(DOWN))
        state.pop(_val(DOWN))

    edit_weights(path, drop)
    with pytest.raises(ValueError, match=rf"{DOWN}.*missing"):
        load(path)


# ---- interrupted save: weights written, config not -------------------------------------------------------------------


def test_interrupted_save_is_detected(saved, tmp_path):
    path, _ = saved
    other = get_peft_model(
        tiny_llama(seed=0), SafetyConfig(mask=make_mask(tiny_llama(seed=0), seed=5), init_weights=False)
    )
    other.save_pretrained(tmp_path / "other")
    # the second save got as far as the weights file: the folder holds new weights and the old config
    (path / "adapter_model.safetensors").write_bytes((tmp_path / "other" / "adapter_model.safetensors").read_bytes())
    with pytest.raises(ValueError, match="do not belong together"):
        load(path)


def test_same_mask_new_values_interrupted_save_is_detected(saved, tmp_path):
    path, _ = saved

    def bump(state):
        state[_val(Q)] = state[_val(Q)] + 1.0

    state = load_file(path / "adapter_model.safetensors")
    bump(state)
    save_file(state, path / "adapter_model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match="do not belong together"):
        load(path)


def test_in_memory_state_dict_round_trip_after_training_is_not_an_interrupted_save(saved):
    path, _ = saved
    model = load(path, is_trainable=True)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.5)
    state = get_peft_model_state_dict(model)
    fresh = load(path, is_trainable=True)
    set_peft_model_state_dict(fresh, state)
    with torch.no_grad():
        assert torch.equal(fresh(ids()).logits, model(ids()).logits)


# ---- base provenance -------------------------------------------------------------------------------------------------


def test_fingerprint_and_hub_id_recorded(tmp_path):
    base = tiny_llama(seed=0)
    base.config._name_or_path = "org/tiny-base"
    model = get_peft_model(base, SafetyConfig(mask=make_mask(base)))
    model.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == "org/tiny-base"
    assert set(cfg["base_fingerprints"]) == {Q + ".weight", V + ".weight", DOWN + ".weight"}
    assert "base_fingerprint_check" not in cfg  # the loader decides, not the file


def test_local_cache_path_recorded_as_hub_id(tmp_path):
    commit = "89abcdef0123456789abcdef0123456789abcdef"
    snap = tmp_path / "models--org--tiny" / "snapshots" / commit
    snap.mkdir(parents=True)
    base = tiny_llama(seed=0)
    base.config._name_or_path = str(snap)
    base.name_or_path = str(snap)
    get_peft_model(base, SafetyConfig(mask=make_mask(base))).save_pretrained(tmp_path / "a")
    cfg = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert (cfg["base_model_name_or_path"], cfg["revision"]) == ("org/tiny", commit)


def test_other_base_is_refused_and_override_warns(saved):
    path, _ = saved
    other = tiny_llama(seed=0)
    with torch.no_grad():
        other.model.layers[1].mlp.down_proj.weight.mul_(-3)
    with pytest.raises(ValueError, match=rf"{DOWN}\.weight.*base_fingerprint_check='warn'"):
        PeftModel.from_pretrained(other, path)
    with pytest.warns(UserWarning, match=DOWN):
        PeftModel.from_pretrained(tiny_llama(seed=0).apply(_scale_down), path, base_fingerprint_check="warn")
    loaded = PeftModel.from_pretrained(tiny_llama(seed=0).apply(_scale_down), path, base_fingerprint_check="ignore")
    assert loaded.peft_config["default"].base_fingerprint_check == "ignore"


def _scale_down(module):
    if hasattr(module, "down_proj"):
        with torch.no_grad():
            module.down_proj.weight.mul_(-3)


def test_fingerprint_check_on_load_adapter_and_transformers_load_adapter(saved):
    path, _ = saved
    model = load(path)
    other = tiny_llama(seed=0).apply(_scale_down)
    with pytest.raises(ValueError, match="base_fingerprint_check"):
        other.load_adapter(str(path))
    fine = load(path)
    fine.load_adapter(path, adapter_name="again")
    assert "again" in fine.peft_config and model is not None


def test_same_base_in_half_precision_passes(saved):
    path, _ = saved
    for dtype in (torch.bfloat16, torch.float16):
        PeftModel.from_pretrained(tiny_llama(seed=0).to(dtype), path)


def test_override_context_for_load_adapter(saved):
    from peft_safety.tuner.provenance import fingerprint_check_override

    path, _ = saved
    model = PeftModel.from_pretrained(tiny_llama(seed=0).apply(_scale_down), path, base_fingerprint_check="ignore")
    with pytest.raises(ValueError, match="fingerprint_check_override"):
        model.load_adapter(path, adapter_name="second")
    with fingerprint_check_override("warn"), pytest.warns(UserWarning, match=DOWN):
        model.load_adapter(path, adapter_name="second")
    assert "second" in model.peft_config


def test_non_finite_values(saved):
    path, _ = saved

    def poison(state):
        state[_val(V)] = state[_val(V)].clone()
        state[_val(V)][0, 0] = float("nan")

    edit_weights(path, poison)
    with pytest.raises(ValueError, match=rf"{V}\.safety_values.*NaN or infinite"):
        load(path)


def test_truncated_weights_file(saved):
    path, _ = saved
    data = (path / "adapter_model.safetensors").read_bytes()
    (path / "adapter_model.safetensors").write_bytes(data[: len(data) // 2])
    from peft_safety.errors import SafetyFileError

    # named before safetensors reads it (was safetensors' own "incomplete metadata", which names no file)
    with pytest.raises(SafetyFileError, match=r"adapter_model\.safetensors.*truncated"):
        load(path)


def test_missing_or_empty_layout(saved):
    path, _ = saved
    edit_config(path, lambda cfg: cfg.update(mask_layout={}))
    with pytest.raises(ValueError, match="mask_layout"):
        load(path)
    edit_config(path, lambda cfg: cfg.update(mask_layout=None))
    with pytest.raises(ValueError, match="needs a mask"):
        load(path)


def test_autopeft_checks_the_base_it_loads(tmp_path):
    from peft import AutoPeftModelForCausalLM

    from peft_safety.tuner.provenance import fingerprint_check_override

    tiny_llama(seed=0).save_pretrained(tmp_path / "base")
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tmp_path / "base")
    get_peft_model(base, SafetyConfig(mask=make_mask(base))).save_pretrained(tmp_path / "adapter")
    AutoPeftModelForCausalLM.from_pretrained(tmp_path / "adapter")  # same base: fine
    # the folder named by base_model_name_or_path now holds other weights
    tiny_llama(seed=0).apply(_scale_down).save_pretrained(tmp_path / "base")
    with pytest.raises(ValueError, match=rf"{DOWN}\.weight"):
        AutoPeftModelForCausalLM.from_pretrained(tmp_path / "adapter")
    with fingerprint_check_override("ignore"):
        AutoPeftModelForCausalLM.from_pretrained(tmp_path / "adapter")


def test_policy_written_into_the_file_does_not_weaken_the_check(saved):
    path, _ = saved
    edit_config(path, lambda cfg: cfg.update(base_fingerprint_check="ignore"))
    with pytest.raises(ValueError, match=rf"{DOWN}\.weight"):
        PeftModel.from_pretrained(tiny_llama(seed=0).apply(_scale_down), path)
