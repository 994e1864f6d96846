"""peft-safety: safety-critical parameters for Hugging Face PEFT and TRL.

Importing ``peft_safety`` registers the ``SAFETY`` PEFT type (so that ``PeftModel.from_pretrained`` can load
peft-safety adapters) and nothing else: it imports neither trl nor datasets, and does not initialise CUDA. Public names
are resolved lazily on first access.

The registration needs ``peft`` (and so torch), which takes seconds to import. When ``peft`` is already imported it runs
at once; otherwise it runs right after ``peft`` finishes importing (an import hook, removed after it fires), so that
``import peft_safety`` alone, e.g. for ``peft-safety --help``, imports neither torch nor peft, and PEFT's tables hold
the ``SAFETY`` type before any code can read them.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
from typing import TYPE_CHECKING, Any

from ._version import __version__ as __version__


def _register_safety_type() -> None:
    from .tuner import _registration  # noqa: F401  (registers the SAFETY PEFT type on import)


class _RegisterAfterPeftImport(importlib.abc.MetaPathFinder):
    """Finds nothing itself: when ``peft`` is about to be imported, wraps its loader so the SAFETY type is registered
    as soon as ``peft`` has executed, then leaves ``sys.meta_path``. (``importlib.util.find_spec("peft")`` alone, as
    availability checks do, also comes here; the hook stays until an import really executes peft.)"""

    def find_spec(self, fullname, path=None, target=None):
        if fullname != "peft":
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                break
        else:
            return None
        if spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        run_module = spec.loader.exec_module

        def exec_module(module):
            if self in sys.meta_path:
                sys.meta_path.remove(self)
            run_module(module)
            _register_safety_type()

        spec.loader.exec_module = exec_module  # this loader instance serves only this spec of peft
        return spec


if "peft" in sys.modules:
    _register_safety_type()
elif not any(isinstance(f, _RegisterAfterPeftImport) for f in sys.meta_path):
    sys.meta_path.insert(0, _RegisterAfterPeftImport())

# public name -> module that defines it
_EXPORTS: dict[str, str] = {
    "SafetyError": "peft_safety.errors",
    "SafetyFileError": "peft_safety.errors",
    "check_adapter_folder": "peft_safety._files",
    "Granularity": "peft_safety.mask",
    "Head": "peft_safety.mask",
    "Layer": "peft_safety.mask",
    "MaskSummary": "peft_safety.mask",
    "Neuron": "peft_safety.mask",
    "SafetyMask": "peft_safety.mask",
    "Weight": "peft_safety.mask",
    "fingerprint_tensor": "peft_safety.mask",
    "fingerprints_of": "peft_safety.mask",
    "write_card": "peft_safety.mask",
    "granularity_from_dict": "peft_safety.mask",
    "mask_model_card": "peft_safety.mask.hub",
    "push_mask_to_hub": "peft_safety.mask.hub",
    "Scores": "peft_safety.scoring.scores",
    "isolate": "peft_safety.scoring.selection",
    "select": "peft_safety.scoring.selection",
    "bootstrap_masks": "peft_safety.scoring.consensus",
    "consensus": "peft_safety.scoring.consensus",
    "consensus_mask": "peft_safety.scoring.consensus",
    "LayerDistribution": "peft_safety.analysis",
    "StabilityReport": "peft_safety.analysis",
    "iou_matrix": "peft_safety.analysis",
    "layer_distribution": "peft_safety.analysis",
    "overlap_report": "peft_safety.analysis",
    "plot_angle_gap": "peft_safety.analysis",
    "plot_iou_matrix": "peft_safety.analysis",
    "plot_layer_heatmap": "peft_safety.analysis",
    "stability": "peft_safety.analysis",
    "CalibrationSet": "peft_safety.scoring.calibration",
    "build_refusal_set": "peft_safety.scoring.rows",
    "build_utility_set": "peft_safety.scoring.rows",
    "refusal_rows": "peft_safety.scoring.calibration",
    "utility_rows": "peft_safety.scoring.calibration",
    "SCORERS": "peft_safety.scoring",
    "Targets": "peft_safety.scoring",
    "attention_geometry": "peft_safety.scoring",
    "query_to_kv_rows": "peft_safety.scoring",
    "register_scorer": "peft_safety.scoring",
    "resolve_targets": "peft_safety.scoring",
    "score": "peft_safety.scoring",
    "SafetyNeuronResult": "peft_safety.scoring.neuron",
    "detect_safety_neurons": "peft_safety.scoring.neuron",
    "rsn_tune_mask": "peft_safety.scoring.neuron",
    "angle_gap": "peft_safety.scoring.layer",
    "locate_safety_layers": "peft_safety.scoring.layer",
    "over_rejection_probe": "peft_safety.scoring.layer",
    "safety_layer_mask": "peft_safety.scoring.layer",
    "mask_drift": "peft_safety.analysis.probes",
    "noised": "peft_safety.analysis.probes",
    "restored_from": "peft_safety.analysis.probes",
    "rewind_": "peft_safety.analysis.probes",
    "scaled": "peft_safety.analysis.probes",
    "zeroed": "peft_safety.analysis.probes",
    "SafetyConfig": "peft_safety.tuner",
    "SafetyLoraConfig": "peft_safety.tuner",
    "SafetyLoraModel": "peft_safety.tuner",
    "SafetyLayer": "peft_safety.tuner",
    "SafetyLinear": "peft_safety.tuner",
    "SafetyModel": "peft_safety.tuner",
    "SafetyPeftType": "peft_safety.tuner",
    "check_masked_lora_model": "peft_safety.tuner",
    "get_masked_lora_model": "peft_safety.tuner",
    "SafetySFTConfig": "peft_safety.training.config",
    "SafetySFTTrainer": "peft_safety.training.trainer",
    "RefusalEvalCallback": "peft_safety.training.callbacks",
    "SafetyDriftCallback": "peft_safety.training.callbacks",
    "FreezeReport": "peft_safety.training.freeze",
    "FreezeViolationError": "peft_safety.training.freeze",
    "Freezer": "peft_safety.training.freeze",
    "RealignCallback": "peft_safety.training.realign",
    "RealignReport": "peft_safety.training.realign",
    "realign_": "peft_safety.training.realign",
    "reference_snapshot": "peft_safety.training.realign",
    "mix_replay": "peft_safety.training.replay",
    "Lisa": "peft_safety.training.lisa",
    "Booster": "peft_safety.training.booster",
    "AlignmentDelta": "peft_safety.posthoc",
    "SafeLoraReport": "peft_safety.posthoc",
    "add_safety_vector": "peft_safety.posthoc",
    "antidote": "peft_safety.posthoc",
    "safe_lora_project": "peft_safety.posthoc",
    "apply_mask_": "peft_safety.training.apply",
    "MODEL_SOURCES": "peft_safety.sources.models",
    "load_default_model": "peft_safety.sources.models",
    "load_model": "peft_safety.sources.models",
    "resolve_model": "peft_safety.sources.models",
    "DATA_SOURCES": "peft_safety.sources.datasets",
    "assert_disjoint": "peft_safety.sources.datasets",
    "deduplicate": "peft_safety.sources.datasets",
    "load_rows": "peft_safety.sources.datasets",
    "EvalReport": "peft_safety.evaluation",
    "KeywordJudge": "peft_safety.evaluation",
    "ModelJudge": "peft_safety.evaluation",
    "Verdict": "peft_safety.evaluation",
    "evaluate": "peft_safety.evaluation",
    "generate_responses": "peft_safety.evaluation",
    "multiple_choice_accuracy": "peft_safety.evaluation",
    "perplexity": "peft_safety.evaluation",
    "RefusalEvaluator": "peft_safety.evaluation",
    "refusal_evaluator": "peft_safety.evaluation",
    "ClassifierJudge": "peft_safety.evaluation",
    "train_classifier_judge": "peft_safety.evaluation",
    "bootstrap_ci": "peft_safety.evaluation",
    "mcnemar_exact": "peft_safety.evaluation",
    "paired_bootstrap": "peft_safety.evaluation",
    "MainJobConfig": "peft_safety.recipes.main_job",
    "MainJobResult": "peft_safety.recipes.main_job",
    "run_main_job": "peft_safety.recipes.main_job",
}

__all__ = sorted([*_EXPORTS, "__version__"])


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'peft_safety' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__


if TYPE_CHECKING:  # pragma: no cover
    from ._files import check_adapter_folder  # noqa: F401
    from .analysis import (  # noqa: F401
        LayerDistribution,
        StabilityReport,
        iou_matrix,
        layer_distribution,
        overlap_report,
        plot_angle_gap,
        plot_iou_matrix,
        plot_layer_heatmap,
        stability,
    )
    from .analysis.probes import mask_drift, noised, restored_from, rewind_, scaled, zeroed  # noqa: F401
    from .errors import SafetyError, SafetyFileError  # noqa: F401
    from .evaluation import (  # noqa: F401
        ClassifierJudge,
        EvalReport,
        KeywordJudge,
        ModelJudge,
        RefusalEvaluator,
        Verdict,
        bootstrap_ci,
        evaluate,
        generate_responses,
        mcnemar_exact,
        multiple_choice_accuracy,
        paired_bootstrap,
        perplexity,
        refusal_evaluator,
        train_classifier_judge,
    )
    from .mask import (  # noqa: F401
        Granularity,
        Head,
        Layer,
        MaskSummary,
        Neuron,
        SafetyMask,
        Weight,
        fingerprint_tensor,
        fingerprints_of,
        granularity_from_dict,
        write_card,
    )
    from .mask.hub import mask_model_card, push_mask_to_hub  # noqa: F401
    from .posthoc import AlignmentDelta, SafeLoraReport, add_safety_vector, antidote, safe_lora_project  # noqa: F401
    from .recipes.main_job import MainJobConfig, MainJobResult, run_main_job  # noqa: F401
    from .scoring import (  # noqa: F401
        SCORERS,
        Targets,
        attention_geometry,
        query_to_kv_rows,
        register_scorer,
        resolve_targets,
        score,
    )
    from .scoring.calibration import CalibrationSet, refusal_rows, utility_rows  # noqa: F401
    from .scoring.consensus import bootstrap_masks, consensus, consensus_mask  # noqa: F401
    from .scoring.layer import angle_gap, locate_safety_layers, over_rejection_probe, safety_layer_mask  # noqa: F401
    from .scoring.neuron import SafetyNeuronResult, detect_safety_neurons, rsn_tune_mask  # noqa: F401
    from .scoring.rows import build_refusal_set, build_utility_set  # noqa: F401
    from .scoring.scores import Scores  # noqa: F401
    from .scoring.selection import isolate, select  # noqa: F401
    from .sources.datasets import DATA_SOURCES, assert_disjoint, deduplicate, load_rows  # noqa: F401
    from .sources.models import MODEL_SOURCES, load_default_model, load_model, resolve_model  # noqa: F401
    from .training.apply import apply_mask_  # noqa: F401
    from .training.booster import Booster  # noqa: F401
    from .training.callbacks import RefusalEvalCallback, SafetyDriftCallback  # noqa: F401
    from .training.config import SafetySFTConfig  # noqa: F401
    from .training.freeze import Freezer, FreezeReport, FreezeViolationError  # noqa: F401
    from .training.lisa import Lisa  # noqa: F401
    from .training.realign import RealignCallback, RealignReport, realign_, reference_snapshot  # noqa: F401
    from .training.replay import mix_replay  # noqa: F401
    from .training.trainer import SafetySFTTrainer  # noqa: F401
    from .tuner import (  # noqa: F401
        SafetyConfig,
        SafetyLayer,
        SafetyLinear,
        SafetyLoraConfig,
        SafetyLoraModel,
        SafetyModel,
        SafetyPeftType,
        check_masked_lora_model,
        get_masked_lora_model,
    )
