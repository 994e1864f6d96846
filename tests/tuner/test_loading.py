"""Loading adapters of both types: every PEFT loading path restores them exactly, and every file is untrusted.

Bad ``adapter_config.json`` layouts and bad ``adapter_model.safetensors`` tensors are refused with a clear error that
names the module, before anything sized by the file is allocated. The layout cases run over both types (one
validator, ``peft_safety.tuner._layout``); the tensor cases per type where the file formats differ.
"""

from __future__ import annotations

import json
import shutil
import time

import pytest
import torch
from _spa_reference import assert_effective_update_exact, randomise_lora_
from peft import AutoPeftModelForCausalLM, PeftModel, get_peft_model
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from peft_safety.mask import Head, Layer, Neuron, SafetyMask, Weight
from peft_safety.testing import tiny_llama
from peft_safety.tuner import SafetyConfig, SafetyLinear, SafetyLoraConfig, SafetyLoraLinear, get_masked_lora_model

Q = "model.layers.0.self_attn.q_proj"
V = "model.layers.1.self_attn.v_proj"
DOWN = "model.layers.0.mlp.down_proj"
O_PROJ = "model.layers.1.self_attn.o_proj"
UP = "model.layers.1.mlp.up_proj"
PREFIX = "base_model.model."
IDS = torch.arange(3, 19).view(2, 8)

# fixed indices, so that the saved layouts can be spelled out
GRANULARITY = {
    f"{Q}.weight": Weight(),
    f"{V}.weight": Neuron(axis=0),
    f"{DOWN}.weight": Neuron(axis=1),
    f"{O_PROJ}.weight": Head(head_dim=8, axis=0),
    f"{UP}.weight": Layer(),
}
INDICES = {
    f"{Q}.weight": torch.arange(0, 1024, 9, dtype=torch.int32),
    f"{V}.weight": torch.tensor([1, 4, 9], dtype=torch.int32),
    f"{DOWN}.weight": torch.tensor([2, 17, 30], dtype=torch.int32),
    f"{O_PROJ}.weight": torch.tensor([1], dtype=torch.int32),
    f"{UP}.weight": torch.tensor([0], dtype=torch.int32),
}
LAYOUT = {
    Q: {"kind": "entries", "n": 114, "shape": [32, 32]},
    V: {"kind": "rows", "n": 3, "shape": [16, 32]},
    DOWN: {"kind": "cols", "n": 3, "shape": [32, 64]},
    O_PROJ: {"kind": "rows", "n": 8, "shape": [32, 32]},
}


def make_mask(model) -> SafetyMask:
    p = dict(model.named_parameters())
    return SafetyMask(INDICES, {n: tuple(p[n].shape) for n in GRANULARITY}, granularity=GRANULARITY)


class SetFormat:
    name = "SAFETY"
    config_cls = SafetyConfig

    @staticmethod
    def build(model, mask):
        return get_peft_model(model, SafetyConfig(mask=mask, init_weights=False))

    @staticmethod
    def index_key(module: str) -> str:
        return f"{PREFIX}{module}.safety_indices"

    @staticmethod
    def check_layers(model, mask) -> None:
        assert any(isinstance(m, SafetyLinear) for m in model.modules())


class LoraFormat:
    name = "SAFETY_LORA"
    config_cls = SafetyLoraConfig

    @staticmethod
    def build(model, mask):
        from peft import LoraConfig

        peft_model = get_masked_lora_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"), mask)
        randomise_lora_(peft_model, std=0.3)
        return peft_model

    @staticmethod
    def index_key(module: str) -> str:
        kind = LAYOUT[module]["kind"]
        return f"{PREFIX}{module}.lora_safety_{kind}"

    @staticmethod
    def check_layers(model, mask) -> None:
        assert any(isinstance(m, SafetyLoraLinear) for m in model.modules())
        assert assert_effective_update_exact(model, mask) > 0


FORMATS = {"SAFETY": SetFormat, "SAFETY_LORA": LoraFormat}
TYPES = pytest.mark.parametrize("adapter_type", list(FORMATS))


@pytest.fixture(scope="module")
def saved(tmp_path_factory, base_dir):
    """Per type, an adapter with random weights saved from the base in ``base_dir``: {type: (folder, mask, logits)}."""
    out = {}
    for adapter_type, fmt in FORMATS.items():
        model = AutoModelForCausalLM.from_pretrained(base_dir)
        mask = make_mask(model)
        peft_model = fmt.build(model, mask)
        with torch.no_grad():
            ref = peft_model(IDS).logits
        folder = tmp_path_factory.mktemp(adapter_type)
        peft_model.save_pretrained(folder)
        out[adapter_type] = (folder, mask, ref)
    return out


def base(base_dir):
    return AutoModelForCausalLM.from_pretrained(base_dir)


def check_loaded(model, adapter_type, saved) -> None:
    _, mask, ref = saved[adapter_type]
    with torch.no_grad():
        assert torch.equal(model(IDS).logits, ref)
    FORMATS[adapter_type].check_layers(model, mask)


def copy_of(saved, adapter_type, tmp_path, edit_config=None, edit_weights=None):
    """A copy of the saved folder with the config and/or the weights edited (a hand edit: no digest)."""
    folder = tmp_path / "copy"
    shutil.copytree(saved[adapter_type][0], folder)
    cfg = json.loads((folder / "adapter_config.json").read_text())
    if edit_config is not None:
        edit_config(cfg)
    if edit_weights is not None:
        weights = load_file(folder / "adapter_model.safetensors")
        edit_weights(weights)
        save_file(weights, folder / "adapter_model.safetensors", metadata={"format": "pt"})
        cfg["weights_digest"] = None  # isolate the tensor checks from the digest check
    (folder / "adapter_config.json").write_text(json.dumps(cfg))
    return folder


# ---- every loading path ----------------------------------------------------------------------------------------------


@TYPES
def test_every_loading_path_restores_the_adapter(saved, base_dir, adapter_type):
    from peft_safety.sources.models import load_model

    folder = saved[adapter_type][0]
    loaded = PeftModel.from_pretrained(base(base_dir), folder)
    assert type(loaded.peft_config["default"]) is FORMATS[adapter_type].config_cls
    check_loaded(loaded, adapter_type, saved)
    check_loaded(AutoPeftModelForCausalLM.from_pretrained(folder), adapter_type, saved)
    plain = base(base_dir)
    plain.load_adapter(str(folder))  # transformers' integration
    check_loaded(plain, adapter_type, saved)
    second = PeftModel.from_pretrained(base(base_dir), folder)
    second.load_adapter(folder, adapter_name="other")
    second.set_adapter("other")
    check_loaded(second, adapter_type, saved)
    model, _ = load_model(str(base_dir), torch.float32, "cpu", adapter=str(folder))  # peft-safety eval --adapter
    check_loaded(model, adapter_type, saved)


@TYPES
def test_resave_and_reload_round_trip(saved, base_dir, adapter_type, tmp_path):
    loaded = PeftModel.from_pretrained(base(base_dir), saved[adapter_type][0], is_trainable=True)
    loaded.save_pretrained(tmp_path)
    check_loaded(PeftModel.from_pretrained(base(base_dir), tmp_path), adapter_type, saved)


@TYPES
def test_two_saved_adapters_reload(saved, base_dir, adapter_type, tmp_path):
    """save_pretrained of a model with two adapters writes a subfolder for the second; both reload exactly."""
    fmt = FORMATS[adapter_type]
    model = base(base_dir)
    mask = make_mask(model)
    other_mask = make_mask(model).restrict([f"{Q}.weight", f"{V}.weight"])
    peft_model = fmt.build(model, mask)
    config = SafetyConfig(mask=other_mask, init_weights=False) if adapter_type == "SAFETY" else None
    if config is None:
        from peft import LoraConfig

        config = SafetyLoraConfig.from_lora_config(LoraConfig(r=4, target_modules=["q_proj", "v_proj"]), other_mask)
    peft_model.add_adapter("other", config)
    if adapter_type == "SAFETY_LORA":
        randomise_lora_(peft_model, seed=3, std=0.3)  # both adapters
    with torch.no_grad():
        first = peft_model(IDS).logits
        peft_model.set_adapter("other")
        second = peft_model(IDS).logits
    assert not torch.allclose(first, second)
    peft_model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(base(base_dir), tmp_path)
    loaded.load_adapter(tmp_path / "other", adapter_name="other")
    with torch.no_grad():
        assert torch.equal(loaded(IDS).logits, first)
        loaded.set_adapter("other")
        assert torch.equal(loaded(IDS).logits, second)


def test_masked_lora_config_describes_the_masks(saved):
    folder = saved["SAFETY_LORA"][0]
    cfg = json.loads((folder / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "SAFETY_LORA"
    assert "mask" not in cfg and "fingerprint_check" not in cfg
    assert cfg["mask_layout"] == LAYOUT
    assert UP in cfg["exclude_modules"]
    assert set(cfg["base_fingerprints"]) == {f"{k}.weight" for k in cfg["mask_layout"]}
    assert cfg["weights_digest"].startswith("b2b:")
    weights = load_file(folder / "adapter_model.safetensors")
    assert weights[f"{PREFIX}{Q}.lora_safety_entries"].dtype == torch.int32
    assert torch.equal(weights[f"{PREFIX}{Q}.lora_safety_entries"], INDICES[f"{Q}.weight"])


# ---- adapter_config.json: the layout, checked before anything is allocated (both types) -----------------------------


def _set(field, value):
    return lambda cfg: cfg["mask_layout"][Q].__setitem__(field, value)


LAYOUT_EDITS = {
    "n huge": (_set("n", 10**12), r"\['n'\] = 1000000000000 must be an int between 1 and 1024"),
    "n zero": (_set("n", 0), r"\['n'\] = 0 must be an int between 1"),
    "n negative": (_set("n", -1), r"\['n'\] = -1"),
    "n bool": (_set("n", True), r"\['n'\] = True"),
    "n float": (_set("n", 114.0), r"\['n'\] = 114.0"),
    "n string": (_set("n", "12"), r"\['n'\] = '12'"),
    "kind unknown": (_set("kind", "diag"), r"\['kind'\] = 'diag' is not a storage kind"),
    "kind old spelling": (_set("kind", "dense"), r"\['kind'\] = 'dense' is not a storage kind"),
    "shape 3-d": (_set("shape", [32, 32, 1]), r"\['shape'\] = \[32, 32, 1\] must be two positive ints"),
    "shape negative": (_set("shape", [-32, 32]), r"\['shape'\]"),
    "shape string": (_set("shape", "32x32"), r"\['shape'\]"),
    "shape of another model": (_set("shape", [64, 16]), r"is for a 64x16 weight.*belongs to another base model"),
    "layout not a dict": (lambda c: c.update(mask_layout=[Q]), "mask_layout must be a"),
    "entry extra key": (_set("extra", 1), "exactly the keys"),
    "entry missing key": (lambda c: c["mask_layout"][Q].pop("shape"), "exactly the keys"),
    "module not in the model": (
        lambda c: c["mask_layout"].update({"model.layers.9.self_attn.q_proj": c["mask_layout"][Q]}),
        r"model\.layers\.9\.self_attn\.q_proj.*not in this model",
    ),
    "module missing from the layout": (lambda c: c["mask_layout"].pop(V), "mask_layout does not list"),
    "digest mismatch": (lambda c: c.update(weights_digest="b2b:" + "0" * 32), "interrupted"),
}
NAMES_Q = {k for k in LAYOUT_EDITS if k.startswith(("n ", "kind", "shape", "entry"))}


@TYPES
@pytest.mark.parametrize("case", list(LAYOUT_EDITS))
def test_bad_layout_fails_clearly(saved, base_dir, tmp_path, adapter_type, case):
    edit, fragment = LAYOUT_EDITS[case]
    folder = copy_of(saved, adapter_type, tmp_path, edit_config=edit)
    with pytest.raises(ValueError, match=fragment) as err:
        PeftModel.from_pretrained(base(base_dir), folder)
    if case in NAMES_Q:
        assert Q in str(err.value)  # the message names the module


def test_whole_kind_is_a_set_kind_only(saved, base_dir, tmp_path):
    folder = copy_of(saved, "SAFETY_LORA", tmp_path, edit_config=_set("kind", "whole"))
    with pytest.raises(ValueError, match=r"'whole' is not a storage kind of this adapter type"):
        PeftModel.from_pretrained(base(base_dir), folder)


@TYPES
def test_huge_declared_size_fails_fast_without_allocating(saved, base_dir, tmp_path, adapter_type):
    def edit(cfg):
        cfg["mask_layout"][Q].update(shape=[10**6, 10**6], n=10**12)

    folder = copy_of(saved, adapter_type, tmp_path, edit_config=edit)
    start = time.perf_counter()
    with pytest.raises(ValueError, match="belongs to another base model"):
        PeftModel.from_pretrained(base(base_dir), folder)
    assert time.perf_counter() - start < 5


@TYPES
def test_missing_layout_needs_a_mask(saved, base_dir, tmp_path, adapter_type):
    folder = copy_of(saved, adapter_type, tmp_path, edit_config=lambda c: c.update(mask_layout=None))
    with pytest.raises(ValueError, match="needs a mask"):
        PeftModel.from_pretrained(base(base_dir), folder)


def test_empty_set_layout_is_refused(saved, base_dir, tmp_path):
    folder = copy_of(saved, "SAFETY", tmp_path, edit_config=lambda c: c.update(mask_layout={}))
    with pytest.raises(ValueError, match="mask_layout must be a non-empty dict"):
        PeftModel.from_pretrained(base(base_dir), folder)


# ---- adapter_model.safetensors: the index tensors (both types), the values (SET) ------------------------------------


def _index_edit(fn):
    return lambda fmt: lambda w: w.__setitem__(fmt.index_key(Q), fn(w[fmt.index_key(Q)]))


INDEX_EDITS = {
    "out of range": (_index_edit(lambda t: torch.cat([t[:-1], t.new_tensor([5000])])), "out of range"),
    "negative": (_index_edit(lambda t: torch.cat([t.new_tensor([-3]), t[1:]])), "out of range"),
    "unsorted": (_index_edit(lambda t: t.flip(0).contiguous()), "strictly increasing"),
    "duplicate": (_index_edit(lambda t: torch.cat([t[:1], t[:-1]])), "strictly increasing"),
    "float": (_index_edit(lambda t: t.float()), "int32/int64"),
    "bool": (_index_edit(lambda t: torch.ones_like(t, dtype=torch.bool)), "int32/int64"),
    "2-d": (_index_edit(lambda t: t[:112].reshape(2, 56).contiguous()), "1-D"),
    "empty": (_index_edit(lambda t: t[:0].contiguous()), "non-empty|declares n=114"),
}


@TYPES
@pytest.mark.parametrize("case", list(INDEX_EDITS))
def test_bad_index_tensor_fails_clearly(saved, base_dir, tmp_path, adapter_type, case):
    edit, fragment = INDEX_EDITS[case]
    fmt = FORMATS[adapter_type]
    folder = copy_of(saved, adapter_type, tmp_path, edit_weights=edit(fmt))
    with pytest.raises(ValueError, match=fragment) as err:
        PeftModel.from_pretrained(base(base_dir), folder)
    assert Q in str(err.value)


@TYPES
def test_bad_row_indices_fail_clearly(saved, base_dir, tmp_path, adapter_type):
    key = FORMATS[adapter_type].index_key(V)
    folder = copy_of(
        saved, adapter_type, tmp_path, edit_weights=lambda w: w.__setitem__(key, w[key].clone().fill_(10**6))
    )
    with pytest.raises(ValueError, match=rf"{V}.*out of range \[0, 16\) for the rows"):
        PeftModel.from_pretrained(base(base_dir), folder)


@TYPES
def test_int64_indices_are_accepted(saved, base_dir, tmp_path, adapter_type):
    key = FORMATS[adapter_type].index_key(Q)
    folder = copy_of(saved, adapter_type, tmp_path, edit_weights=lambda w: w.__setitem__(key, w[key].long()))
    check_loaded(PeftModel.from_pretrained(base(base_dir), folder), adapter_type, saved)


@TYPES
def test_tensors_of_a_module_the_layout_lacks_are_refused(saved, base_dir, tmp_path, adapter_type):
    # loading would silently drop them: the config does not belong to these weights
    folder = copy_of(saved, adapter_type, tmp_path, edit_config=lambda c: c["mask_layout"].pop(DOWN))
    with pytest.raises(ValueError, match=rf"{DOWN}.*mask_layout does not list"):
        PeftModel.from_pretrained(base(base_dir), folder)


@TYPES
def test_missing_index_tensor(saved, base_dir, tmp_path, adapter_type):
    key = FORMATS[adapter_type].index_key(Q)
    folder = copy_of(saved, adapter_type, tmp_path, edit_weights=lambda w: w.pop(key))
    fragment = rf"{Q}\.(safety_indices|lora_safety_entries)"
    with pytest.raises(ValueError, match=fragment):
        PeftModel.from_pretrained(base(base_dir), folder)


def test_masked_lora_index_count_must_match_the_layout(saved, base_dir, tmp_path):
    key = LoraFormat.index_key(Q)
    folder = copy_of(saved, "SAFETY_LORA", tmp_path, edit_weights=lambda w: w.__setitem__(key, w[key][:100].clone()))
    with pytest.raises(ValueError, match="declares n=114"):
        PeftModel.from_pretrained(base(base_dir), folder)


def test_masked_lora_extra_mask_tensor_is_refused(saved, base_dir, tmp_path):
    extra = f"{PREFIX}{UP}.lora_safety_rows"
    folder = copy_of(
        saved,
        "SAFETY_LORA",
        tmp_path,
        edit_weights=lambda w: w.__setitem__(extra, torch.tensor([1], dtype=torch.int32)),
    )
    with pytest.raises(ValueError, match=rf"lora_safety_rows for module '{UP}'.*places no adapter there"):
        PeftModel.from_pretrained(base(base_dir), folder)


def _values(module):
    return f"{PREFIX}{module}.safety_values"


SET_VALUE_EDITS = {
    "wrong shape": (lambda w: w.__setitem__(_values(Q), w[_values(Q)][:-1].clone()), rf"{Q}\.safety_values.*shape"),
    "not float": (
        lambda w: w.__setitem__(_values(Q), w[_values(Q)].to(torch.int32)),
        rf"{Q}\.safety_values.*floating",
    ),
    "non-finite": (
        lambda w: w.__setitem__(_values(V), w[_values(V)].index_fill(1, torch.tensor([0]), float("nan"))),
        rf"{V}\.safety_values.*NaN or infinite",
    ),
    "missing": (lambda w: w.pop(_values(DOWN)), rf"{DOWN}\.safety_values.*missing"),
    "module without tensors": (
        lambda w: [w.pop(k) for k in (SetFormat.index_key(DOWN), _values(DOWN))],
        rf"{DOWN}.*missing",
    ),
}


@pytest.mark.parametrize("case", list(SET_VALUE_EDITS))
def test_bad_set_values_fail_clearly(saved, base_dir, tmp_path, case):
    edit, fragment = SET_VALUE_EDITS[case]
    folder = copy_of(saved, "SAFETY", tmp_path, edit_weights=edit)
    with pytest.raises(ValueError, match=fragment):
        PeftModel.from_pretrained(base(base_dir), folder)


@TYPES
def test_truncated_weights_file(saved, base_dir, tmp_path, adapter_type):
    folder = copy_of(saved, adapter_type, tmp_path)
    data = (folder / "adapter_model.safetensors").read_bytes()
    (folder / "adapter_model.safetensors").write_bytes(data[: len(data) // 2])
    from peft_safety.errors import SafetyFileError

    # named before safetensors reads it (safetensors' own "incomplete metadata" names no file)
    with pytest.raises(SafetyFileError, match=r"adapter_model\.safetensors.*truncated"):
        PeftModel.from_pretrained(base(base_dir), folder)


def test_bad_buffer_on_a_path_without_the_checkpoint_hook_fails_on_first_use(saved, base_dir, tmp_path):
    # transformers' load_adapter does not call PEFT's remap hook: the masked layer checks its buffer itself
    key = LoraFormat.index_key(Q)
    folder = copy_of(saved, "SAFETY_LORA", tmp_path, edit_weights=lambda w: w[key].__setitem__(-1, 5000))
    model = base(base_dir)
    model.load_adapter(str(folder))
    with pytest.raises(ValueError, match="out of range"):
        model(IDS)


# ---- interrupted saves ------------------------------------------------------------------------------------------------


@TYPES
def test_interrupted_save_is_detected(saved, base_dir, tmp_path, adapter_type):
    fmt = FORMATS[adapter_type]
    model = base(base_dir)
    other_mask = make_mask(model).restrict([f"{Q}.weight", f"{DOWN}.weight"])
    fmt.build(model, other_mask).save_pretrained(tmp_path / "other")
    folder = copy_of(saved, adapter_type, tmp_path)
    # the second save got as far as the weights file: the folder holds new weights and the old config
    shutil.copy(tmp_path / "other" / "adapter_model.safetensors", folder / "adapter_model.safetensors")
    with pytest.raises(ValueError, match="do not belong together"):
        PeftModel.from_pretrained(base(base_dir), folder)


@TYPES
def test_same_mask_new_values_interrupted_save_is_detected(saved, base_dir, tmp_path, adapter_type):
    folder = copy_of(saved, adapter_type, tmp_path)
    weights = load_file(folder / "adapter_model.safetensors")
    key = next(k for k in weights if "safety_values" in k or "lora_B" in k)
    weights[key] = weights[key] + 1.0
    save_file(weights, folder / "adapter_model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match="do not belong together"):
        PeftModel.from_pretrained(base(base_dir), folder)


@TYPES
def test_in_memory_round_trip_after_training_is_not_an_interrupted_save(saved, base_dir, adapter_type):
    folder = saved[adapter_type][0]
    model = PeftModel.from_pretrained(base(base_dir), folder, is_trainable=True)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.5)
    state = get_peft_model_state_dict(model)
    fresh = PeftModel.from_pretrained(base(base_dir), folder, is_trainable=True)
    set_peft_model_state_dict(fresh, state)
    with torch.no_grad():
        assert torch.equal(fresh(IDS).logits, model(IDS).logits)


# ---- SET placeholders --------------------------------------------------------------------------------------------------


def test_set_load_resizes_placeholders_when_the_mask_differs(tmp_path, random_mask):
    gran = {f"{Q}.weight": Weight(), f"{V}.weight": Neuron(axis=0), f"{DOWN}.weight": Head(head_dim=8, axis=1)}
    model = tiny_llama(seed=0)
    big = random_mask(model, gran, fraction=0.3, seed=1)
    small = random_mask(model, gran, fraction=0.1, seed=2)
    peft_model = get_peft_model(model, SafetyConfig(mask=big, init_weights=False))
    with torch.no_grad():
        ref = peft_model(IDS).logits
    peft_model.save_pretrained(tmp_path)
    # a config whose layout (placeholder sizes) comes from another mask: the checkpoint's sizes must win
    other = get_peft_model(tiny_llama(seed=0), SafetyConfig(mask=small))
    config = SafetyConfig.from_pretrained(tmp_path)
    config.mask_layout = other.peft_config["default"].mask_layout
    loaded = PeftModel.from_pretrained(tiny_llama(seed=0), tmp_path, config=config)
    with torch.no_grad():
        assert torch.equal(loaded(IDS).logits, ref)
    # the same through a state dict onto a model built from the other mask
    target = get_peft_model(tiny_llama(seed=0), SafetyConfig(mask=small))
    set_peft_model_state_dict(target, get_peft_model_state_dict(peft_model))
    with torch.no_grad():
        assert torch.equal(target(IDS).logits, ref)


def test_set_load_keeps_parameter_objects_when_shapes_agree(random_mask):
    model = tiny_llama(seed=0)
    peft_model = get_peft_model(model, SafetyConfig(mask=make_mask(model), init_weights=False))
    state = get_peft_model_state_dict(peft_model)
    before = {n: id(p) for n, p in peft_model.named_parameters() if p.requires_grad}
    set_peft_model_state_dict(peft_model, state)
    assert before == {n: id(p) for n, p in peft_model.named_parameters() if p.requires_grad}


# ---- every loader: PEFT's, AutoPeftModel, transformers' load_adapter (no PEFT load hook), PeftModel.load_adapter ----


def _forward(model):
    with torch.no_grad():
        model(IDS)  # transformers' load_adapter bypasses PEFT's load hook: its checks run on the first forward
    return model


def every_loader(folder, make_base, first_folder, **first_kwargs) -> dict:
    """``{loader: load}``: each loads ``folder`` onto ``make_base()`` (AutoPeftModel: onto the base the folder names)
    and runs a forward. ``PeftModel.load_adapter`` loads it as a second adapter next to ``first_folder``."""

    def transformers_load_adapter():
        model = make_base()
        model.load_adapter(str(folder))
        return _forward(model)

    def peft_load_adapter():
        model = PeftModel.from_pretrained(make_base(), first_folder, **first_kwargs)
        model.load_adapter(folder, adapter_name="second")
        model.set_adapter("second")
        return _forward(model)

    return {
        "PeftModel.from_pretrained": lambda: _forward(PeftModel.from_pretrained(make_base(), folder)),
        "AutoPeftModelForCausalLM": lambda: _forward(AutoPeftModelForCausalLM.from_pretrained(folder)),
        "transformers load_adapter": transformers_load_adapter,
        "PeftModel.load_adapter": peft_load_adapter,
    }


def assert_every_loader_refuses(loaders: dict, fragment: str, tf_fragment: str | None = None) -> None:
    for name, load in loaders.items():
        wanted = tf_fragment if (tf_fragment and name == "transformers load_adapter") else fragment
        with pytest.raises(ValueError, match=wanted):
            load()


def redigest(cfg, folder):
    from peft_safety.tuner.provenance import digest_of_folder

    cfg["weights_digest"] = digest_of_folder(folder)


def copy_redigested(saved, adapter_type, tmp_path, edit_weights):
    """A copy whose weights are edited and whose config records their new digest (a consistent, hand-made folder)."""
    folder = copy_of(saved, adapter_type, tmp_path, edit_weights=edit_weights)
    cfg = json.loads((folder / "adapter_config.json").read_text())
    redigest(cfg, folder)
    (folder / "adapter_config.json").write_text(json.dumps(cfg))
    return folder


@TYPES
def test_every_loader_accepts_the_saved_adapter(saved, base_dir, adapter_type):
    folder = saved[adapter_type][0]
    for load in every_loader(folder, lambda: base(base_dir), folder).values():
        check_loaded(load(), adapter_type, saved)


@TYPES
def test_a_policy_written_into_the_file_is_ignored_by_every_loader(saved, base_dir, tmp_path, adapter_type):
    """The fingerprint policy is the loader's choice: a value added to adapter_config.json, under any spelling, is
    not read by any loader, and the adapter is refused on another base."""
    other_dir = tmp_path / "other-base"
    other = base(base_dir)
    with torch.no_grad():
        other.get_parameter(f"{Q}.weight").mul_(-3)
    other.save_pretrained(other_dir)

    def edit(cfg):
        cfg.update(fingerprint_check="ignore", base_fingerprint_check="ignore", _fingerprint_check="ignore")
        cfg["base_model_name_or_path"] = str(other_dir)  # what AutoPeftModelForCausalLM loads

    folder = copy_of(saved, adapter_type, tmp_path, edit_config=edit)
    loaders = every_loader(
        folder,
        lambda: AutoModelForCausalLM.from_pretrained(other_dir),
        saved[adapter_type][0],
        fingerprint_check="ignore",
    )
    assert_every_loader_refuses(loaders, rf"other base weights.*{Q}\.weight")


@TYPES
def test_a_mask_named_in_the_file_is_refused_by_every_loader(saved, base_dir, tmp_path, adapter_type):
    """A 'mask' key would replace the saved layout and turn the load into a creation (base recorded, not checked):
    refused on every loader, before anything is built."""
    mask_dir = tmp_path / "mask"
    saved[adapter_type][1].save_pretrained(mask_dir)
    folder = copy_of(saved, adapter_type, tmp_path, edit_config=lambda c: c.update(mask=str(mask_dir)))
    assert_every_loader_refuses(
        every_loader(folder, lambda: base(base_dir), saved[adapter_type][0]),
        r"has a 'mask' key|mask=.* together with peft_type=",  # PeftConfig.from_pretrained: AutoPeft, transformers
    )


NON_FINITE = {
    "SAFETY-values": ("SAFETY", f"{PREFIX}{V}.safety_values", rf"{V}\.safety_values.*NaN or infinite"),
    "SAFETY_LORA-lora_B": ("SAFETY_LORA", f"{PREFIX}{Q}.lora_B.weight", rf"{Q}\.lora_B\.weight.*NaN or infinite"),
    "SAFETY_LORA-lora_A": (
        "SAFETY_LORA",
        f"{PREFIX}{DOWN}.lora_A.weight",
        rf"{DOWN}\.lora_A\.weight.*NaN or infinite",
    ),
}


@pytest.mark.parametrize("case", list(NON_FINITE))
@pytest.mark.parametrize("value", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_non_finite_weights_are_refused_by_every_loader(saved, base_dir, tmp_path, case, value):
    adapter_type, key, fragment = NON_FINITE[case]

    def edit(w):
        w[key] = w[key].clone()
        w[key].view(-1)[1] = value

    folder = copy_redigested(saved, adapter_type, tmp_path, edit)
    assert_every_loader_refuses(every_loader(folder, lambda: base(base_dir), saved[adapter_type][0]), fragment)


@TYPES
def test_a_missing_tensor_is_refused_by_every_loader(saved, base_dir, tmp_path, adapter_type):
    """A weights file without one of the declared tensors (digest recomputed, so only the structure check can see it):
    the layer would keep its random initialisation or placeholder."""
    key = f"{PREFIX}{DOWN}.safety_values" if adapter_type == "SAFETY" else f"{PREFIX}{DOWN}.lora_A.weight"
    folder = copy_redigested(saved, adapter_type, tmp_path, lambda w: w.pop(key))
    attr = "safety_values" if adapter_type == "SAFETY" else r"lora_A\.weight"
    assert_every_loader_refuses(
        every_loader(folder, lambda: base(base_dir), saved[adapter_type][0]), rf"{DOWN}\.{attr}.*placeholder"
    )


def test_a_config_that_drops_a_trained_module_from_target_modules_is_refused_by_every_loader(
    saved, base_dir, tmp_path
):
    """The module's LoRA weights and mask are in the file, but the config no longer places an adapter there: loading
    would drop them silently. PEFT's loaders name the module; transformers' (no load hook) sees the weights digest."""

    def edit(cfg):
        cfg["target_modules"] = [t for t in cfg["target_modules"] if t != DOWN]

    folder = copy_of(saved, "SAFETY_LORA", tmp_path, edit_config=edit)
    assert_every_loader_refuses(
        every_loader(folder, lambda: base(base_dir), saved["SAFETY_LORA"][0]),
        rf"holds lora_A\.weight, lora_B\.weight, lora_safety_cols for module '{DOWN}'.*places no adapter there",
        tf_fragment="do not belong together",
    )


@TYPES
def test_a_config_that_drops_a_module_from_the_layout_is_refused_by_every_loader(
    saved, base_dir, tmp_path, adapter_type
):
    folder = copy_of(saved, adapter_type, tmp_path, edit_config=lambda c: c["mask_layout"].pop(DOWN))
    fragment = rf"{DOWN}.*mask_layout does not list" if adapter_type == "SAFETY" else rf"'{DOWN}'.*does not list"
    assert_every_loader_refuses(
        every_loader(folder, lambda: base(base_dir), saved[adapter_type][0]), fragment, "do not belong together"
    )


@TYPES
def test_every_loader_with_trainable_tokens_and_modules_to_save(base_dir, tmp_path, adapter_type):
    """PEFT's other adapter tensors (trainable tokens, a module saved whole) travel with ours: the checks look at
    LoRA's and SET's tensors only, and every loader restores the adapter exactly."""
    model = AutoModelForCausalLM.from_pretrained(base_dir)
    mask = make_mask(model)
    extra = {"trainable_token_indices": [5, 9], "modules_to_save": ["lm_head"]}
    if adapter_type == "SAFETY":
        config = SafetyConfig(mask=mask, init_weights=False, **extra)
    else:
        from peft import LoraConfig

        config = SafetyLoraConfig.from_lora_config(LoraConfig(r=4, target_modules="all-linear", **extra), mask)
    peft_model = get_peft_model(model, config)
    if adapter_type == "SAFETY_LORA":
        randomise_lora_(peft_model, std=0.3)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "trainable_tokens_delta" in name or "modules_to_save" in name:
                p.add_(0.1)
        ref = peft_model(IDS).logits
    peft_model.save_pretrained(tmp_path)
    for name, load in every_loader(tmp_path, lambda: base(base_dir), tmp_path).items():
        with torch.no_grad():
            assert torch.equal(load()(IDS).logits, ref), name
