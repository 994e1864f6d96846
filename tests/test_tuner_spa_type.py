"""The SAFETY_LORA PEFT type: self-describing masked-LoRA adapters that every PEFT loading path restores with their
masks, validated like untrusted files, with base-model provenance; and guarantee checks that measure behaviour."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch
from _spa_reference import assert_effective_update_exact, explicit_merge, lora_layers, randomise_lora_
from peft import AutoPeftModelForCausalLM, LoraConfig, PeftModel, get_peft_model
from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_PREFIX_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING
from peft.tuners.lora.layer import Linear as LoraLinear
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from peft_safety.mask import Head, Layer, Neuron, SafetyMask, Weight
from peft_safety.testing import tiny_llama, tiny_tokenizer
from peft_safety.tuner import SafetyLoraConfig, SafetyLoraModel, _registration
from peft_safety.tuner.lora import SafetyLoraLinear, get_masked_lora_model, load_masked_lora, mask_lora_config

Q0 = "model.layers.0.self_attn.q_proj"
V1 = "model.layers.1.self_attn.v_proj"
DOWN0 = "model.layers.0.mlp.down_proj"
O1 = "model.layers.1.self_attn.o_proj"
UP1 = "model.layers.1.mlp.up_proj"


def make_mask(model) -> SafetyMask:
    p = dict(model.named_parameters())
    gran = {
        f"{Q0}.weight": Weight(),
        f"{V1}.weight": Neuron(axis=0),
        f"{DOWN0}.weight": Neuron(axis=1),
        f"{O1}.weight": Head(head_dim=8, axis=0),
        f"{UP1}.weight": Layer(),
    }
    indices = {
        f"{Q0}.weight": torch.arange(0, 1024, 9, dtype=torch.int32),
        f"{V1}.weight": torch.tensor([1, 4, 9], dtype=torch.int32),
        f"{DOWN0}.weight": torch.tensor([2, 17, 30], dtype=torch.int32),
        f"{O1}.weight": torch.tensor([1], dtype=torch.int32),
        f"{UP1}.weight": torch.tensor([0], dtype=torch.int32),
    }
    return SafetyMask(indices=indices, shapes={n: tuple(p[n].shape) for n in gran}, granularity=gran)


def lora(**kw):
    return LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", **kw)


IDS = torch.arange(3, 19).view(2, 8)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A base model folder and a trained-looking SAFETY_LORA adapter saved from it: (base_dir, adapter_dir, mask,
    reference logits of the explicit fp64 merge)."""
    root = tmp_path_factory.mktemp("spa")
    base_dir = root / "base"
    tiny_llama(seed=0).save_pretrained(base_dir)
    tiny_tokenizer().save_pretrained(base_dir)
    model = AutoModelForCausalLM.from_pretrained(base_dir)
    mask = make_mask(model)
    peft_model = get_masked_lora_model(model, lora(), mask)
    randomise_lora_(peft_model, std=0.3)
    with torch.no_grad():
        ref = explicit_merge(AutoModelForCausalLM.from_pretrained(base_dir), peft_model, mask)(IDS).logits
    adapter_dir = root / "adapter"
    peft_model.save_pretrained(adapter_dir)
    return base_dir, adapter_dir, mask, ref


def base(saved):
    return AutoModelForCausalLM.from_pretrained(saved[0])


def check_loaded(model, saved):
    _, _, mask, ref = saved
    with torch.no_grad():
        torch.testing.assert_close(model(IDS).logits, ref, rtol=1e-5, atol=1e-5)
    assert assert_effective_update_exact(model, mask) > 0


# --- the type and its registration ----------------------------------------------------------------------------------


def test_registered_in_peft_tables_next_to_safety():
    assert PEFT_TYPE_TO_CONFIG_MAPPING["SAFETY_LORA"] is SafetyLoraConfig
    assert PEFT_TYPE_TO_TUNER_MAPPING["SAFETY_LORA"] is SafetyLoraModel
    assert PEFT_TYPE_TO_PREFIX_MAPPING["SAFETY_LORA"] == "lora_"
    assert _registration.is_registered()


def test_registration_refuses_a_foreign_safety_lora(monkeypatch):
    class Foreign:
        pass

    monkeypatch.setitem(PEFT_TYPE_TO_CONFIG_MAPPING, "SAFETY_LORA", Foreign)
    with pytest.raises(RuntimeError, match="'SAFETY_LORA' is already registered"):
        _registration.register()


def test_adapter_config_describes_the_masks(saved):
    adapter_dir = saved[1]
    cfg = json.loads((adapter_dir / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "SAFETY_LORA"
    assert cfg["mask"] is None and "base_fingerprint_check" not in cfg
    assert cfg["mask_layout"] == {
        Q0: {"kind": "entries", "n": 114, "shape": [32, 32]},
        V1: {"kind": "rows", "n": 3, "shape": [16, 32]},
        DOWN0: {"kind": "cols", "n": 3, "shape": [32, 64]},
        O1: {"kind": "rows", "n": 8, "shape": [32, 32]},
    }
    assert UP1 in cfg["exclude_modules"]
    assert set(cfg["base_fingerprints"]) == {f"{k}.weight" for k in cfg["mask_layout"]}
    assert cfg["weights_digest"].startswith("b2b:")
    keys = load_file(adapter_dir / "adapter_model.safetensors")
    assert keys[f"base_model.model.{Q0}.lora_safety_entries"].dtype == torch.int32


# --- every PEFT loading path restores the masks ---------------------------------------------------------------------


def test_peft_model_from_pretrained(saved):
    loaded = PeftModel.from_pretrained(base(saved), saved[1])
    assert isinstance(loaded.peft_config["default"], SafetyLoraConfig)
    check_loaded(loaded, saved)


def test_auto_peft_model(saved):
    check_loaded(AutoPeftModelForCausalLM.from_pretrained(saved[1]), saved)


def test_transformers_load_adapter(saved):
    model = base(saved)
    model.load_adapter(str(saved[1]))
    assert isinstance(model.model.layers[0].self_attn.q_proj, SafetyLoraLinear)
    check_loaded(model, saved)


def test_peft_load_adapter_second_adapter(saved):
    model = PeftModel.from_pretrained(base(saved), saved[1])
    model.load_adapter(saved[1], adapter_name="other")
    model.set_adapter("other")
    check_loaded(model, saved)


def test_merge_and_unload_keeps_masked_entries_bit_identical(saved):
    _, adapter_dir, mask, ref = saved
    before = {n: p.detach().clone() for n, p in base(saved).named_parameters()}
    merged = PeftModel.from_pretrained(base(saved), adapter_dir).merge_and_unload(safe_merge=True)
    for name, p in merged.named_parameters():
        if name in mask:
            dense = mask.to_dense(name)
            assert torch.equal(p.detach()[dense], before[name][dense]), name
    with torch.no_grad():
        torch.testing.assert_close(merged(IDS).logits, ref, rtol=1e-5, atol=1e-5)


def test_resave_and_reload_round_trip(saved, tmp_path):
    loaded = load_masked_lora(base(saved), str(saved[1]), is_trainable=True)
    loaded.save_pretrained(tmp_path)
    check_loaded(PeftModel.from_pretrained(base(saved), tmp_path), saved)


def test_plain_peft_without_import_refuses(saved):
    script = (
        "import sys\nfrom peft import PeftModel\nfrom transformers import AutoModelForCausalLM\n"
        "PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(sys.argv[1]), sys.argv[2])\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", script, str(saved[0]), str(saved[1])], capture_output=True, text=True, timeout=300
    )
    assert out.returncode != 0
    assert "KeyError: 'SAFETY_LORA'" in out.stderr


def test_load_model_and_eval_entry_point_load_masks(saved):
    from peft_safety.sources.models import load_model

    model, _ = load_model(str(saved[0]), torch.float32, "cpu", adapter=str(saved[1]))
    check_loaded(model, saved)


def test_legacy_lora_typed_folder_loads_with_masks(saved, tmp_path):
    # adapters saved before SAFETY_LORA existed: peft_type LORA plus lora_safety_* buffers
    cfg = json.loads((saved[1] / "adapter_config.json").read_text())
    for key in ("mask", "mask_layout", "mask_source", "entries_method", "base_fingerprints", "base_model_source",
                "weights_digest"):  # fmt: skip
        cfg.pop(key)
    cfg["peft_type"] = "LORA"
    (tmp_path / "adapter_config.json").write_text(json.dumps(cfg))
    (tmp_path / "adapter_model.safetensors").write_bytes((saved[1] / "adapter_model.safetensors").read_bytes())
    check_loaded(load_masked_lora(base(saved), str(tmp_path)), saved)
    from peft_safety.sources.models import load_model

    model, _ = load_model(str(saved[0]), torch.float32, "cpu", adapter=str(tmp_path))
    check_loaded(model, saved)


def test_plain_lora_adapter_cannot_join_a_masked_model(saved):
    loaded = PeftModel.from_pretrained(base(saved), saved[1])
    with pytest.raises((TypeError, ValueError)):
        loaded.add_adapter("plain", lora())


def test_config_from_a_mask_and_refusals():
    model = tiny_llama(seed=0)
    mask = make_mask(model)
    cfg = SafetyLoraConfig(r=4, target_modules="all-linear", mask=mask)
    peft_model = get_peft_model(model, cfg)
    assert isinstance(peft_model.base_model, SafetyLoraModel)
    randomise_lora_(peft_model)
    assert assert_effective_update_exact(peft_model, mask) > 0
    with pytest.raises(ValueError, match="needs a mask"):
        SafetyLoraConfig(r=4)
    with pytest.raises(ValueError, match="use_dora=True"):
        SafetyLoraConfig(r=4, mask=mask, use_dora=True)
    with pytest.raises(TypeError, match="takes a SafetyMask"):
        SafetyLoraConfig(r=4, mask=42)
    with pytest.raises(ValueError, match="base_fingerprint_check='maybe' is invalid"):
        SafetyLoraConfig(r=4, mask=mask, base_fingerprint_check="maybe")


# --- files from the internet: every check before allocation, clear errors ------------------------------------------


def _corrupt_copy(saved, tmp_path, edit_config=None, edit_weights=None):
    cfg = json.loads((saved[1] / "adapter_config.json").read_text())
    weights = load_file(saved[1] / "adapter_model.safetensors")
    if edit_config is not None:
        edit_config(cfg)
    if edit_weights is not None:
        edit_weights(weights)
        cfg["weights_digest"] = None  # isolate the tensor checks from the digest check
    (tmp_path / "adapter_config.json").write_text(json.dumps(cfg))
    save_file(weights, tmp_path / "adapter_model.safetensors")
    return tmp_path


KEY = f"base_model.model.{Q0}.lora_safety_entries"
ROWS = f"base_model.model.{V1}.lora_safety_rows"


def _set(cfg, module, field, value):
    cfg["mask_layout"][module][field] = value


BAD_FILES = {
    # adapter_config.json
    "n huge": (
        lambda c: _set(c, Q0, "n", 10**12),
        None,
        ValueError,
        r"\['n'\]=1000000000000 must be an int between 1 and 1024",
    ),
    "n zero": (lambda c: _set(c, Q0, "n", 0), None, ValueError, r"\['n'\]=0"),
    "n bool": (lambda c: _set(c, Q0, "n", True), None, ValueError, r"\['n'\]=True"),
    "n float": (lambda c: _set(c, Q0, "n", 114.0), None, ValueError, r"\['n'\]=114.0"),
    "kind unknown": (lambda c: _set(c, Q0, "kind", "diag"), None, ValueError, r"\['kind'\]='diag'"),
    "shape 3-d": (lambda c: _set(c, Q0, "shape", [32, 32, 1]), None, ValueError, r"\['shape'\]"),
    "shape negative": (lambda c: _set(c, Q0, "shape", [-32, 32]), None, ValueError, r"\['shape'\]"),
    "shape other model": (lambda c: _set(c, Q0, "shape", [64, 16]), None, ValueError, "belongs to another base model"),
    "layout not a dict": (lambda c: c.update(mask_layout=[1, 2]), None, TypeError, "mask_layout must be a dict"),
    "entry extra key": (lambda c: _set(c, Q0, "extra", 1), None, ValueError, "exactly the keys"),
    "module missing from model": (
        lambda c: c["mask_layout"].update({"model.layers.9.self_attn.q_proj": c["mask_layout"][Q0]}),
        None,
        ValueError,
        "this model does not have it",
    ),
    "layout lacks a module": (lambda c: c["mask_layout"].pop(V1), None, ValueError, "mask_layout does not list"),
    "digest mismatch": (lambda c: c.update(weights_digest="b2b:" + "0" * 32), None, ValueError, "interrupted"),
    # adapter_model.safetensors
    "index out of range": (None, lambda w: w[KEY].__setitem__(-1, 5000), ValueError, "out of range"),
    "negative index": (None, lambda w: w[KEY].__setitem__(0, -3), ValueError, "out of range"),
    "unsorted": (None, lambda w: w.__setitem__(KEY, w[KEY].flip(0).contiguous()), ValueError, "sorted and unique"),
    "duplicate": (None, lambda w: w[KEY].__setitem__(1, int(w[KEY][0])), ValueError, "sorted and unique"),
    "float dtype": (None, lambda w: w.__setitem__(KEY, w[KEY].float()), TypeError, "int32/int64"),
    "bool dtype": (None, lambda w: w.__setitem__(ROWS, torch.ones(3, dtype=torch.bool)), TypeError, "int32/int64"),
    "2-d": (None, lambda w: w.__setitem__(KEY, w[KEY][:112].view(2, 56).contiguous()), ValueError, "1-D"),
    "wrong count": (None, lambda w: w.__setitem__(KEY, w[KEY][:100].contiguous()), ValueError, "declares n=114"),
    "missing tensor": (None, lambda w: w.pop(KEY), ValueError, "no mask tensor"),
    "extra tensor": (
        None,
        lambda w: w.__setitem__(f"base_model.model.{UP1}.lora_safety_rows", torch.tensor([1], dtype=torch.int32)),
        ValueError,
        "does not list",
    ),
}


@pytest.mark.parametrize("case", list(BAD_FILES))
def test_bad_adapter_files_fail_clearly(saved, tmp_path, case):
    edit_config, edit_weights, error, fragment = BAD_FILES[case]
    folder = _corrupt_copy(saved, tmp_path, edit_config, edit_weights)
    with pytest.raises(error, match=fragment):
        PeftModel.from_pretrained(base(saved), folder)


def test_int64_indices_are_accepted(saved, tmp_path):
    folder = _corrupt_copy(saved, tmp_path, edit_weights=lambda w: w.__setitem__(KEY, w[KEY].long()))
    check_loaded(PeftModel.from_pretrained(base(saved), folder), saved)


def test_huge_declared_n_fails_fast_without_allocating(saved, tmp_path):
    import time

    folder = _corrupt_copy(saved, tmp_path, lambda c: _set(c, Q0, "shape", [10**6, 10**6]) or _set(c, Q0, "n", 10**12))
    start = time.perf_counter()
    with pytest.raises(ValueError, match="belongs to another base model"):
        PeftModel.from_pretrained(base(saved), folder)
    assert time.perf_counter() - start < 5


def test_bad_buffer_on_a_path_without_checkpoint_hook_fails_on_first_use(saved, tmp_path):
    # transformers' load_adapter does not call PEFT's remap hook: the layer checks its buffer itself
    folder = _corrupt_copy(saved, tmp_path, edit_weights=lambda w: w[KEY].__setitem__(-1, 5000))
    model = base(saved)
    model.load_adapter(str(folder))
    with pytest.raises(ValueError, match="out of range"):
        model(IDS)


def test_unloaded_placeholder_is_refused():
    model = tiny_llama(seed=0)
    cfg = mask_lora_config(lora(), make_mask(model))
    layout_only = SafetyLoraConfig(**{**{k: v for k, v in cfg.to_dict().items() if k != "peft_type"}, "mask": None})
    peft_model = get_peft_model(model, layout_only)  # layers built from the layout, weights never loaded
    with pytest.raises(ValueError, match="placeholder"):
        peft_model(IDS)


def test_fingerprint_mismatch_error_by_default_and_overridable(saved):
    other = base(saved)
    with torch.no_grad():
        other.model.layers[0].self_attn.q_proj.weight.mul_(-3)
    with pytest.raises(ValueError, match="other base weights"):
        PeftModel.from_pretrained(other, saved[1])
    with pytest.warns(UserWarning, match="other base weights"):
        load_masked_lora(base_with_edit(saved), str(saved[1]), base_fingerprint_check="warn")
    PeftModel.from_pretrained(base_with_edit(saved), saved[1], base_fingerprint_check="ignore")


def test_policy_written_into_the_file_does_not_weaken_the_check(saved, tmp_path):
    # the policy is the loader's choice: "ignore" added to adapter_config.json by hand must not disable the check
    path = _corrupt_copy(saved, tmp_path, edit_config=lambda cfg: cfg.update(base_fingerprint_check="ignore"))
    other = base(saved)
    with torch.no_grad():
        other.model.layers[0].self_attn.q_proj.weight.mul_(-3)
    with pytest.raises(ValueError, match="other base weights"):
        PeftModel.from_pretrained(other, path)


def base_with_edit(saved):
    model = base(saved)
    with torch.no_grad():
        model.model.layers[0].self_attn.q_proj.weight.mul_(-3)
    return model


def test_records_hub_id_of_a_marked_local_copy(tmp_path):
    from peft_safety.tuner.provenance import SOURCE_MARKER

    base_dir = tmp_path / "base"
    tiny_llama(seed=0).save_pretrained(base_dir)
    (base_dir / SOURCE_MARKER).write_text(json.dumps({"hub_id": "HuggingFaceTB/SmolLM2-135M-Instruct"}))
    model = AutoModelForCausalLM.from_pretrained(base_dir)
    peft_model = get_masked_lora_model(model, lora(), make_mask(model))
    peft_model.save_pretrained(tmp_path / "ad")
    cfg = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert cfg["base_model_source"] == "hub"


# --- guarantee checks measure behaviour ---------------------------------------------------------------------------


def _plain_lora_forward(monkeypatch):
    """The breakage the checks must catch: masked layers run LoRA's unmasked forward."""
    monkeypatch.setattr(SafetyLoraLinear, "forward", LoraLinear.forward)


def test_violation_metric_sees_an_unmasked_forward(monkeypatch):
    from peft_safety.analysis.probes import mask_drift

    model = tiny_llama(seed=0)
    mask = make_mask(model)
    peft_model = get_masked_lora_model(model, lora(), mask)
    randomise_lora_(peft_model)
    masked = int(sum(int(mask.to_dense(n).sum()) for n in mask.names if not isinstance(mask.granularity_of(n), Layer)))
    assert mask_drift(peft_model, None, mask, mode="freeze", strict=False)["violations"] == 0
    _plain_lora_forward(monkeypatch)
    metrics = mask_drift(peft_model, None, mask, mode="freeze", strict=False)
    # the factors are random everywhere, so every masked entry of every adapted module leaks
    assert metrics["violations"] == masked
    assert metrics["masked_relative"] > 0


def test_verify_safety_sees_an_unmasked_forward(tmp_path, monkeypatch):
    pytest.importorskip("trl")
    from datasets import Dataset

    from peft_safety.training.config import SafetySFTConfig
    from peft_safety.training.freeze import FreezeViolationError
    from peft_safety.training.trainer import SafetySFTTrainer

    model = tiny_llama(seed=0)
    mask = make_mask(model).restrict([f"{Q0}.weight", f"{V1}.weight"])
    rows = [{"prompt": f"Question {i}?", "completion": f" Answer {i}."} for i in range(4)]
    args = SafetySFTConfig(
        output_dir=str(tmp_path), max_steps=1, per_device_train_batch_size=4, learning_rate=1e-2, bf16=False,
        max_length=32, save_strategy="no", report_to=[], use_cpu=True, safety_mode="freeze", safety_verify=False,
    )  # fmt: skip
    trainer = SafetySFTTrainer(
        model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tiny_tokenizer(),
        peft_config=LoraConfig(r=4, target_modules=["q_proj", "v_proj"]), safety_mask=mask,
    )  # fmt: skip
    trainer.train()
    assert trainer.verify_safety()["safety/violations"] == 0
    _plain_lora_forward(monkeypatch)
    with pytest.raises(FreezeViolationError, match="entries that must stay unchanged moved"):
        trainer.verify_safety()


def test_trainer_bf16_autocast_on_cpu(tmp_path):
    # TRL's default bf16=True on CPU used to crash the sparse CSR kernels; the default dense path is exact under it
    pytest.importorskip("trl")
    from datasets import Dataset

    from peft_safety.training.config import SafetySFTConfig
    from peft_safety.training.trainer import SafetySFTTrainer

    for method in ("dense", "sparse"):
        model = tiny_llama(seed=0)
        mask = make_mask(model).restrict([f"{Q0}.weight", f"{V1}.weight"])
        rows = [{"prompt": f"Question {i}?", "completion": f" Answer {i}."} for i in range(4)]
        args = SafetySFTConfig(
            output_dir=str(tmp_path / method), max_steps=2, per_device_train_batch_size=4, learning_rate=1e-2,
            bf16=True, max_length=32, save_strategy="no", report_to=[], use_cpu=True, safety_mode="freeze",
            safety_verify=method == "dense",
        )  # fmt: skip
        peft_config = mask_lora_config(
            LoraConfig(r=4, target_modules=["q_proj", "v_proj"]), mask, entries_method=method
        )
        trainer = SafetySFTTrainer(
            model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tiny_tokenizer(),
            peft_config=peft_config, safety_mask=mask,
        )  # fmt: skip
        trainer.train()
        assert math.isfinite(trainer.state.log_history[-1]["train_loss"])
        layer = lora_layers(trainer.model)[Q0]
        assert layer.entries_path("default") == method


LEGACY_BAD = {
    "float buffer": (lambda w: w.__setitem__(KEY, w[KEY].float()), "int32/int64 tensor"),
    "2-d buffer": (lambda w: w.__setitem__(KEY, w[KEY][:112].view(2, 56).contiguous()), "1-D int32/int64"),
    "out of range": (lambda w: w[KEY].__setitem__(-1, 5000), "out of range"),
    "unsorted": (lambda w: w.__setitem__(KEY, w[KEY].flip(0).contiguous()), "sorted and unique"),
    "unknown module": (
        lambda w: w.__setitem__(
            "base_model.model.model.layers.7.mlp.up_proj.lora_safety_rows", torch.tensor([1], dtype=torch.int32)
        ),
        "does not have as an nn.Linear",
    ),
}


@pytest.mark.parametrize("case", list(LEGACY_BAD))
def test_legacy_folder_checked_before_reading(saved, tmp_path, case):
    edit, fragment = LEGACY_BAD[case]
    cfg = json.loads((saved[1] / "adapter_config.json").read_text())
    cfg = {k: v for k, v in cfg.items() if k not in ("mask", "mask_layout", "mask_source", "entries_method",
                                                     "base_fingerprints", "base_model_source", "weights_digest")}  # fmt: skip
    cfg["peft_type"] = "LORA"
    (tmp_path / "adapter_config.json").write_text(json.dumps(cfg))
    weights = load_file(saved[1] / "adapter_model.safetensors")
    edit(weights)
    save_file(weights, tmp_path / "adapter_model.safetensors")
    with pytest.raises((ValueError, TypeError), match=fragment):
        load_masked_lora(base(saved), str(tmp_path))
