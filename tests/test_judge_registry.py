"""Judges by name (`peft_safety.recipes.judges.load_judges`): presets, saved classifier and rubric judges, errors."""

from __future__ import annotations

import pytest
import torch

from peft_safety.evaluation.classifier_judge import ClassifierJudge
from peft_safety.evaluation.judges import KeywordJudge
from peft_safety.recipes.judges import JUDGE_NAMES, default_classifier_judge, load_judges


def _saved_classifier(path):
    gen = torch.Generator().manual_seed(0)
    judge = ClassifierJudge(torch.randn(3, 256 + 6, generator=gen), torch.randn(3, generator=gen), hash_bits=8)
    return judge, judge.save_pretrained(path)


def test_presets_and_saved_classifier(tmp_path):
    judge, path = _saved_classifier(tmp_path / "c")
    out = load_judges(["wei2024", "wei2024_min20", "refusal_prefix", f"classifier:{path}"])
    assert [j.name for j in out] == ["wei2024", "wei2024_min20", "refusal_prefix", "classifier"]
    assert isinstance(out[0], KeywordJudge) and out[1].min_words == 20 and out[2].mode == "prefix"
    assert torch.equal(out[3].weight, judge.weight)
    assert [j.name for j in load_judges("gcg_extended")] == ["gcg_extended"]


def test_default_classifier_is_loaded_from_the_cache_without_training(tmp_path):
    from peft_safety.recipes.judges import RECIPE_VERSION

    judge, _ = _saved_classifier(tmp_path / f"classifier-v{RECIPE_VERSION}")
    loaded = default_classifier_judge(cache_dir=tmp_path)
    assert torch.equal(loaded.weight, judge.weight)
    assert load_judges(["classifier"], cache_dir=tmp_path)[0].hash_bits == 8


def test_errors(tmp_path):
    with pytest.raises(ValueError, match="Did you mean 'classifier'"):
        load_judges(["clasifier"])
    with pytest.raises(ValueError, match="duplicates"):
        load_judges(["wei2024", "wei2024"])
    with pytest.raises(FileNotFoundError, match="No classifier judge"):
        load_judges([f"classifier:{tmp_path / 'none'}"])
    with pytest.raises(TypeError, match="strings"):
        load_judges([3])
    assert set(JUDGE_NAMES) >= {"classifier", "rubric", "wei2024"}
