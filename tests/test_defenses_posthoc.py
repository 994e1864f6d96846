"""The post-hoc defenses against independent references on tiny models: Antidote's pruned set vs Wanda top-k written
out by hand, Safe LoRA's projection vs its explicit fp64 formula, RESTA's add-back vs plain tensor arithmetic; the
alignment direction from a model pair, a dict and a SET adapter; every artifact through save -> a fresh process ->
the standard loaders."""

from __future__ import annotations

import copy
import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from peft import LoraConfig, PeftModel, get_peft_model

from peft_safety.analysis.probes import rewind_
from peft_safety.mask import SafetyMask, Weight
from peft_safety.posthoc import AlignmentDelta, add_safety_vector, antidote, safe_lora_project
from peft_safety.posthoc.antidote import antidote_row_count
from peft_safety.scoring.calibration import CalibrationSet
from peft_safety.testing import tiny_llama, tiny_tokenizer

ROOT = Path(__file__).resolve().parents[1]
HARM = [
    {"prompt": f"How do I hurt #{i}?", "response": f"Sure, step {i} is to {'x' * (i % 4)} do it."} for i in range(5)
]
ENV = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}


def _run_child(code: str, *args: str) -> None:
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code), *args], env=ENV, capture_output=True,
                          text=True, timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]


def _lora_model(seed: int = 0, base=None, targets=("q_proj", "v_proj", "up_proj")):
    """A LoRA model with random (non-zero) A and B, as after fine-tuning."""
    model = get_peft_model(base if base is not None else tiny_llama(seed=0),
                           LoraConfig(r=4, lora_alpha=8, target_modules=list(targets), lora_dropout=0.0))  # fmt: skip
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return model


# ---------------------------------------------------------------------------------------------------------------------
# Antidote
# ---------------------------------------------------------------------------------------------------------------------
def _wanda_by_hand(model, modules: dict[str, torch.nn.Linear], calib: CalibrationSet) -> dict[str, torch.Tensor]:
    """|W| * sqrt(mean over rows of sum over tokens of x_j^2), one row at a time, inputs read by our own hooks."""
    sums = {n: torch.zeros(m.in_features, dtype=torch.float64) for n, m in modules.items()}
    handles = []
    for n, m in modules.items():

        def hook(_m, args, _out, n=n):
            x = args[0].reshape(-1, args[0].shape[-1]).double()
            sums[n] += (x**2).sum(dim=0)

        handles.append(m.register_forward_hook(hook))
    model.eval()
    with torch.no_grad():
        for i in range(len(calib)):
            model(input_ids=calib.example(i)["input_ids"][None])
    for h in handles:
        h.remove()
    return {
        n: m.weight.detach().double().abs() * torch.sqrt(sums[n] / len(calib))[None, :] for n, m in modules.items()
    }


def _top_per_row_by_hand(scores: torch.Tensor, fraction: float) -> list[int]:
    rows, width = scores.shape
    k = width - math.floor(width * (1 - fraction))
    out = []
    for r in range(rows):
        ranked = sorted(range(width), key=lambda c: (-float(scores[r, c]), c))
        out.extend(r * width + c for c in sorted(ranked[:k]))
    return out


def _check_pruned(before: dict, after: dict, mask: SafetyMask, names: dict[str, str]) -> None:
    for key, name in names.items():
        dense = mask.to_dense(key)
        assert torch.equal(after[name][dense], torch.zeros(int(dense.sum()))), key
        assert torch.equal(after[name][~dense], before[name][~dense]), key


@pytest.mark.parametrize("fraction", [0.1, 0.3])
def test_antidote_on_lora_prunes_wanda_top_k_of_the_factors(fraction):
    tok = tiny_tokenizer()
    model = _lora_model()
    reference = _lora_model()
    calib = CalibrationSet(HARM, tok, loss="full_text")
    modules = {n: m for n, m in reference.named_modules() if n.endswith(("lora_A.default", "lora_B.default"))}
    expected = _wanda_by_hand(reference, modules, calib)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    pruned, mask = antidote(model, HARM, fraction, tokenizer=tok, batch_size=2)
    assert pruned is model
    keys = {n.removeprefix("base_model.model.").removesuffix(".weight"): n for n in modules}
    assert set(mask.names) == {k + ".weight" for k in keys}  # A and B of every adapted module, nothing else
    for key, module_name in keys.items():
        got = sorted(int(i) for i in mask[key + ".weight"])
        assert got == _top_per_row_by_hand(expected[module_name], fraction), key
        width = modules[module_name].in_features
        assert len(got) == modules[module_name].out_features * antidote_row_count(width, fraction)
    after = {n: p.detach() for n, p in model.named_parameters()}
    _check_pruned(before, after, mask, {k + ".weight": m + ".weight" for k, m in keys.items()})
    assert all(torch.equal(after[n], before[n]) for n in after if "lora_" not in n)  # base weights untouched
    assert mask.provenance["method"] == "antidote" and mask.provenance["target"] == "lora"


def test_antidote_on_a_full_model_prunes_qkv_by_hand():
    tok = tiny_tokenizer()
    model, reference = tiny_llama(seed=0), tiny_llama(seed=0)
    calib = CalibrationSet(HARM, tok, loss="full_text")
    modules = {n: m for n, m in reference.named_modules() if n.endswith(("q_proj", "k_proj", "v_proj"))}
    expected = _wanda_by_hand(reference, modules, calib)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    _, mask = antidote(model, calib, 0.2)
    assert set(mask.names) == {n + ".weight" for n in modules}
    for name in modules:
        assert sorted(int(i) for i in mask[name + ".weight"]) == _top_per_row_by_hand(expected[name], 0.2), name
    after = {n: p.detach() for n, p in model.named_parameters()}
    _check_pruned(before, after, mask, {n + ".weight": n + ".weight" for n in modules})
    assert all(torch.equal(after[n], before[n]) for n in after if n not in {m + ".weight" for m in modules})
    # target_modules chooses others
    _, mask = antidote(tiny_llama(seed=0), calib, 0.2, target_modules=["o_proj"])
    assert {n.split(".")[-2] for n in mask.names} == {"o_proj"}


_ANTIDOTE_CHILD = """
    import json, sys
    import torch
    import peft_safety
    from peft import PeftModel
    from peft_safety.analysis.probes import named_parameters_by_base_name
    from transformers import AutoModelForCausalLM

    base, pruned_dir, original_dir, mask_dir, out = sys.argv[1:6]
    pruned = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), pruned_dir)
    original = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), original_dir)
    mask = peft_safety.SafetyMask.from_pretrained(mask_dir)
    params = named_parameters_by_base_name(pruned)
    zero = all(bool((params[n].detach().reshape(-1)[mask[n].long()] == 0).all()) for n in mask.names)
    written = peft_safety.rewind_(pruned, original, mask)
    undone = all(torch.equal(a.detach(), b.detach()) for a, b in zip(pruned.parameters(), original.parameters()))
    json.dump({"zero": zero, "written": written, "undone": undone, "method": mask.provenance["method"]}, open(out, "w"))
"""


def test_antidote_mask_ships_and_undoes_in_a_fresh_process(tmp_path):
    tiny_llama(seed=0).save_pretrained(tmp_path / "base")
    from transformers import AutoModelForCausalLM

    model = _lora_model(base=AutoModelForCausalLM.from_pretrained(tmp_path / "base"))
    model.save_pretrained(tmp_path / "original")
    pruned, mask = antidote(model, HARM, 0.25, tokenizer=tiny_tokenizer())
    pruned.save_pretrained(tmp_path / "pruned")
    mask.save_pretrained(tmp_path / "mask")
    _run_child(_ANTIDOTE_CHILD, *(str(tmp_path / d) for d in ("base", "pruned", "original", "mask")),
               str(tmp_path / "out.json"))  # fmt: skip
    result = json.loads((tmp_path / "out.json").read_text())
    assert result == {"zero": True, "written": mask.numel(), "undone": True, "method": "antidote"}
    # in this process too: rewind_ from the original puts back exactly what was pruned
    original = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(tmp_path / "base"), tmp_path / "original"
    )
    assert rewind_(pruned, original, mask) == mask.numel()
    assert all(torch.equal(a, b) for a, b in zip(pruned.parameters(), original.parameters()))


def test_antidote_errors():
    tok = tiny_tokenizer()
    with pytest.raises(ValueError, match="needs tokenizer"):
        antidote(tiny_llama(seed=0), HARM, 0.1)
    with pytest.raises(ValueError, match=r"must lie in \(0, 1\]"):
        antidote(tiny_llama(seed=0), HARM, 1.5, tokenizer=tok)
    from peft_safety.tuner import SafetyLoraConfig

    p = dict(tiny_llama(seed=0).named_parameters())
    name = "model.layers.0.self_attn.q_proj.weight"
    mask = SafetyMask({name: [1, 2]}, {name: tuple(p[name].shape)}, Weight())
    masked = get_peft_model(tiny_llama(seed=0), SafetyLoraConfig(mask=mask, r=2, target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="type SAFETY_LORA"):
        antidote(masked, HARM, 0.1, tokenizer=tok)
    merged = _lora_model()
    merged.merge_adapter()
    with pytest.raises(ValueError, match="merged"):
        antidote(merged, HARM, 0.1, tokenizer=tok)


# ---------------------------------------------------------------------------------------------------------------------
# the alignment direction
# ---------------------------------------------------------------------------------------------------------------------
def _aligned_pair(modules=("q_proj", "v_proj"), seed: int = 5):
    base, aligned = tiny_llama(seed=0), tiny_llama(seed=0)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in aligned.named_parameters():
            if name.split(".")[-2] in modules:
                p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return base, aligned


def test_alignment_from_models_dict_and_set_adapter():
    base, aligned = _aligned_pair()
    delta = AlignmentDelta.from_models(base, aligned)
    b, a = dict(base.named_parameters()), dict(aligned.named_parameters())
    changed = [n for n in a if not torch.equal(a[n], b[n])]
    assert list(delta) == changed and len(changed) == 4  # all-zero deltas are left out
    for n in changed:
        assert torch.equal(delta[n], a[n].detach() - b[n].detach())
    only_q = AlignmentDelta.from_models(base, aligned, target_modules=["q_proj"])
    assert {n.split(".")[-2] for n in only_q} == {"q_proj"}
    assert list(AlignmentDelta.from_deltas({f"base_model.model.{n}": delta[n] for n in delta})) == changed
    # a SET adapter: its delta equals (merged - base), read through the tuner layers
    from peft_safety.tuner import SafetyConfig

    names = [n for n in b if n.endswith(("q_proj.weight", "down_proj.weight"))]
    g = torch.Generator().manual_seed(0)
    mask = SafetyMask({n: torch.randperm(b[n].numel(), generator=g)[:40].sort().values for n in names},
                      {n: tuple(b[n].shape) for n in names}, Weight())  # fmt: skip
    set_model = get_peft_model(tiny_llama(seed=0), SafetyConfig(mask=mask, init_weights=False))
    direction = AlignmentDelta.from_adapter(set_model)
    merged = dict(copy.deepcopy(set_model).merge_and_unload().named_parameters())
    assert sorted(direction) == sorted(names) and direction.provenance["peft_type"] == "SAFETY"
    for n in names:
        torch.testing.assert_close(direction[n], merged[n].detach() - b[n].detach(), rtol=0, atol=1e-7)
        assert int(torch.count_nonzero(direction[n])) == 40
    with pytest.raises(ValueError, match="adapter layers injected"):
        AlignmentDelta.from_models(base, set_model)
    with pytest.raises(ValueError, match="zero everywhere"):
        AlignmentDelta.from_models(base, tiny_llama(seed=0))
    with pytest.raises(ValueError, match="No adapter layer"):
        AlignmentDelta.from_adapter(set_model, "other")


# ---------------------------------------------------------------------------------------------------------------------
# Safe LoRA
# ---------------------------------------------------------------------------------------------------------------------
def _explicit(peft_model, delta: AlignmentDelta) -> dict[str, tuple[float, torch.Tensor, torch.Tensor]]:
    """Per LoRA layer, in fp64 with C formed explicitly: (cos(C dW, dW), dW, C dW), dW = scaling * B A."""
    out = {}
    for name, module in peft_model.named_modules():
        if not hasattr(module, "lora_A") or "default" not in module.lora_A:
            continue
        key = name.removeprefix("base_model.model.") + ".weight"
        b = module.lora_B["default"].weight.detach().double()
        a = module.lora_A["default"].weight.detach().double()
        dw = module.scaling["default"] * (b @ a)
        if key not in delta:
            out[key] = (None, dw, None)
            continue
        v = delta[key].double()
        c = (v @ v.T) / torch.linalg.norm(v)  # Frobenius norm, as in the reference code
        cdw = c @ dw
        out[key] = (float(F.cosine_similarity(cdw.reshape(1, -1), dw.reshape(1, -1))), dw, cdw)
    return out


def _updates(peft_model) -> dict[str, torch.Tensor]:
    return {name.removeprefix("base_model.model.") + ".weight": module.get_delta_weight("default").double()
            for name, module in peft_model.named_modules() if hasattr(module, "lora_A") and "default" in module.lora_A}  # fmt: skip


@pytest.mark.parametrize("rule", ["threshold", "top_k"])
def test_safe_lora_matches_the_explicit_formula(rule):
    base, aligned = _aligned_pair(("q_proj", "v_proj"))
    delta = AlignmentDelta.from_models(base, aligned)
    model = _lora_model(seed=3, base=aligned)  # LoRA on q, v and up: up has no alignment delta
    reference = _explicit(model, delta)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    cosines = sorted(c for c, _, _ in reference.values() if c is not None)
    assert len(cosines) == 4 and len(set(cosines)) == 4
    if rule == "threshold":
        threshold = (cosines[1] + cosines[2]) / 2
        chosen = {k for k, (c, _, _) in reference.items() if c is not None and c <= threshold}
        _, report = safe_lora_project(model, delta, threshold=threshold)
    else:
        chosen = {k for k, (c, _, _) in reference.items() if c is not None and c <= cosines[2]}  # the 3 lowest
        _, report = safe_lora_project(model, delta, top_k=3)
    assert set(report.projected) == chosen and len(chosen) == (2 if rule == "threshold" else 3)
    for layer in report.layers:
        cos, dw, cdw = reference[layer.name]
        if cos is None:
            assert layer.skipped == "no alignment delta" and layer.cosine is None
        else:
            assert layer.cosine == pytest.approx(cos, abs=1e-10)
    after = _updates(model)
    for key, (_, dw, cdw) in reference.items():
        expected = cdw if key in chosen else dw
        torch.testing.assert_close(after[key], expected, rtol=2e-6, atol=1e-7, msg=key)
    for name, p in model.named_parameters():  # only lora_B of the projected layers changed
        layer = name.removeprefix("base_model.model.").split(".lora_")[0] + ".weight"
        assert torch.equal(p.detach(), before[name]) == ("lora_B" not in name or layer not in chosen), name


_SAFE_LORA_CHILD = """
    import sys
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base, adapter, out = sys.argv[1:4]
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), adapter)
    deltas = {n.removeprefix("base_model.model.") + ".weight": m.get_delta_weight("default").double()
              for n, m in model.named_modules() if hasattr(m, "lora_A") and "default" in m.lora_A}
    torch.save(deltas, out)
"""


def test_safe_lora_adapter_reloads_in_a_fresh_process(tmp_path):
    from transformers import AutoModelForCausalLM

    base, aligned = _aligned_pair(("q_proj", "v_proj"))
    aligned.save_pretrained(tmp_path / "aligned")
    delta = AlignmentDelta.from_models(base, aligned)
    model = _lora_model(seed=3, base=AutoModelForCausalLM.from_pretrained(tmp_path / "aligned"))
    reference = _explicit(model, delta)
    _, report = safe_lora_project(model, delta, top_k=2)
    model.save_pretrained(tmp_path / "safe")
    _run_child(_SAFE_LORA_CHILD, str(tmp_path / "aligned"), str(tmp_path / "safe"), str(tmp_path / "out.pt"))
    reloaded = torch.load(tmp_path / "out.pt")
    assert len(report.projected) == 2
    for key, (_, dw, cdw) in reference.items():
        torch.testing.assert_close(reloaded[key], cdw if key in report.projected else dw, rtol=2e-6, atol=1e-7)


def test_safe_lora_against_a_set_direction():
    """SET, then Safe LoRA against the SET direction: only the SET-adapted layers have a direction."""
    from peft_safety.tuner import SafetyConfig

    b = dict(tiny_llama(seed=0).named_parameters())
    names = [n for n in b if n.endswith(("q_proj.weight", "v_proj.weight")) and ".0." in n]
    g = torch.Generator().manual_seed(2)
    mask = SafetyMask({n: torch.randperm(b[n].numel(), generator=g)[:64].sort().values for n in names},
                      {n: tuple(b[n].shape) for n in names}, Weight())  # fmt: skip
    direction = AlignmentDelta.from_adapter(
        get_peft_model(tiny_llama(seed=0), SafetyConfig(mask=mask, init_weights=False))
    )
    model = _lora_model(seed=4)
    reference = _explicit(model, direction)
    _, report = safe_lora_project(model, direction, threshold=1.0)  # every layer with a direction
    assert set(report.projected) == set(names)
    after = _updates(model)
    for key, (_, dw, cdw) in reference.items():
        torch.testing.assert_close(after[key], cdw if key in names else dw, rtol=2e-6, atol=1e-7)


def test_safe_lora_errors():
    base, aligned = _aligned_pair()
    delta = AlignmentDelta.from_models(base, aligned)
    with pytest.raises(ValueError, match="exactly one of"):
        safe_lora_project(_lora_model(), delta)
    with pytest.raises(ValueError, match="exactly one of"):
        safe_lora_project(_lora_model(), delta, threshold=0.5, top_k=2)
    with pytest.raises(TypeError, match="PEFT model"):
        safe_lora_project(tiny_llama(seed=0), delta, top_k=1)
    with pytest.raises(TypeError, match="AlignmentDelta"):
        safe_lora_project(_lora_model(), dict(delta), top_k=1)
    other = AlignmentDelta.from_deltas({"model.layers.0.self_attn.q_proj.weight": torch.ones(3, 3)})
    with pytest.raises(ValueError, match="another architecture"):
        safe_lora_project(_lora_model(), other, top_k=1)
    merged = _lora_model()
    merged.merge_adapter()
    with pytest.raises(ValueError, match="merged"):
        safe_lora_project(merged, delta, top_k=1)


# ---------------------------------------------------------------------------------------------------------------------
# RESTA
# ---------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_add_safety_vector_is_plain_tensor_arithmetic(dtype):
    base, aligned = _aligned_pair(("q_proj", "down_proj"))
    vector = AlignmentDelta.from_models(base, aligned)
    finetuned = tiny_llama(seed=7).to(dtype)
    before = {n: p.detach().clone() for n, p in finetuned.named_parameters()}
    b, a = dict(base.named_parameters()), dict(aligned.named_parameters())
    out = add_safety_vector(finetuned, vector, scale=0.7)
    assert out is finetuned
    for n, p in finetuned.named_parameters():
        if n in vector:
            expected = before[n] + (0.7 * (a[n].detach() - b[n].detach())).to(dtype)
            assert torch.equal(p.detach(), expected), n
        else:
            assert torch.equal(p.detach(), before[n]), n


def test_add_safety_vector_refuses_a_lora_model_and_works_after_merging(tmp_path):
    base, aligned = _aligned_pair(("q_proj",))
    vector = AlignmentDelta.from_models(base, aligned)
    lora = _lora_model(seed=1)
    with pytest.raises(ValueError, match="merge_and_unload"):
        add_safety_vector(lora, vector)
    merged = lora.merge_and_unload()
    expected = {n: p.detach().clone() + vector[n] if n in vector else p.detach().clone()
                for n, p in merged.named_parameters()}  # fmt: skip
    add_safety_vector(merged, vector)
    merged.save_pretrained(tmp_path / "resta")
    torch.save(expected, tmp_path / "expected.pt")
    _run_child(
        """
        import sys, torch
        from transformers import AutoModelForCausalLM
        model = AutoModelForCausalLM.from_pretrained(sys.argv[1])
        expected = torch.load(sys.argv[2])
        got = dict(model.named_parameters())
        assert set(got) == set(expected), set(got) ^ set(expected)
        bad = [n for n in expected if not torch.equal(got[n].detach(), expected[n])]
        assert not bad, bad
        """,
        str(tmp_path / "resta"),
        str(tmp_path / "expected.pt"),
    )
    with pytest.raises(ValueError, match="does not have"):
        add_safety_vector(tiny_llama(seed=0, num_hidden_layers=1), vector)
    with pytest.raises(ValueError, match="finite"):
        add_safety_vector(tiny_llama(seed=0), vector, scale=float("nan"))


@pytest.mark.slow
def test_set_then_safe_lora_and_resta_on_smollm2(tmp_path):
    """The documented flow on the embedded SmolLM2-135M-Instruct: SET-align on refusal rows, take the SET direction,
    LoRA fine-tune the aligned model, project it (Safe LoRA) and add the vector back (RESTA); checked against the
    explicit formulas on every layer."""
    pytest.importorskip("trl")
    from datasets import Dataset
    from transformers import AutoModelForCausalLM

    from peft_safety.scoring import score
    from peft_safety.scoring.selection import select
    from peft_safety.sources.datasets import load_rows
    from peft_safety.sources.models import load_model
    from peft_safety.training.config import SafetySFTConfig
    from peft_safety.training.trainer import SafetySFTTrainer

    model, tok = load_model("smollm2-135m")
    refusals = load_rows("uncensorbench_refusal", n=8, seed=0)
    mask = select(score(model, CalibrationSet(refusals, tok, max_length=64), "snip", progress=False), fraction=0.01)
    common = dict(max_steps=2, per_device_train_batch_size=2, max_length=64, bf16=False, activation_checkpointing=False,
                  logging_steps=100, save_strategy="no", report_to=[], use_cpu=True, seed=0, disable_tqdm=True)  # fmt: skip
    chat = [{"messages": [{"role": "user", "content": r["prompt"]}, {"role": "assistant", "content": r["response"]}]}
            for r in refusals]  # fmt: skip
    set_trainer = SafetySFTTrainer(model, args=SafetySFTConfig(str(tmp_path / "set"), learning_rate=1e-3,
                                                               safety_mode="train_only", **common),
                                   train_dataset=Dataset.from_list(chat), processing_class=tok, safety_mask=mask)  # fmt: skip
    set_trainer.train()
    direction = AlignmentDelta.from_adapter(set_trainer.model)
    assert direction.provenance["peft_type"] == "SAFETY" and direction.nonzero() <= mask.numel()
    set_trainer.model.merge_and_unload().save_pretrained(tmp_path / "aligned")
    task = [{"messages": [{"role": "user", "content": r["prompt"]}, {"role": "assistant", "content": r["response"]}]}
            for r in load_rows("chat_pairs", n=8, seed=0)]  # fmt: skip
    lora_trainer = SafetySFTTrainer(AutoModelForCausalLM.from_pretrained(tmp_path / "aligned"),
                                    args=SafetySFTConfig(str(tmp_path / "lora"), learning_rate=1e-3, **common),
                                    train_dataset=Dataset.from_list(task), processing_class=tok,
                                    peft_config=LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))  # fmt: skip
    lora_trainer.train()
    lora_trainer.model.save_pretrained(tmp_path / "adapter")
    fresh = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tmp_path / "aligned"), tmp_path / "adapter")
    reference = _explicit(fresh, direction)
    _, report = safe_lora_project(fresh, direction, top_k=5)
    with_direction = [k for k, (c, _, _) in reference.items() if c is not None]
    assert with_direction and len(report.projected) == min(5, len(with_direction))
    after = _updates(fresh)
    for key, (_, dw, cdw) in reference.items():
        torch.testing.assert_close(after[key], cdw if key in report.projected else dw, rtol=1e-5, atol=1e-8)
    merged = fresh.merge_and_unload()
    before = {n: p.detach().clone() for n, p in merged.named_parameters()}
    add_safety_vector(merged, direction)
    for n, p in merged.named_parameters():
        expected = before[n] + direction[n] if n in direction else before[n]
        assert torch.equal(p.detach(), expected), n
