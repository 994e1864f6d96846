"""peft-safety: safety-critical parameters for Hugging Face PEFT and TRL.

Importing ``peft_safety`` registers the ``SAFETY`` PEFT type (so that ``PeftModel.from_pretrained`` can load
peft-safety adapters) and nothing else: it imports neither trl nor datasets, and does not initialise CUDA. Public names
are resolved lazily on first access.

The top level holds what a first session with the library needs: the pipeline's nouns (`SafetyMask`, `Scores`,
`CalibrationSet`) and verbs (`load_model`, `load_rows`, `score`, `select`, `apply_mask_`, `evaluate`), the scorer
registry, the PEFT config/model pairs, the TRL config/trainer pair and `SafetyError` (the list: ``docs/api.md``).
Everything else is imported from its stage package, e.g. ``from peft_safety.analysis import stability``.

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
from typing import TYPE_CHECKING

from ._lazy import lazy_getattr
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

# The public surface: the pipeline's nouns and verbs, the PEFT and TRL pairs, the scorer registry. This table is the
# one list (``__all__`` is built from it; the ``TYPE_CHECKING`` block below mirrors it for type checkers and a test
# keeps the two equal, and docs/api.md lists exactly these names). Every other public name lives in its stage package
# (``peft_safety.mask``, ``.scoring``, ``.analysis``, ``.tuner``, ``.training``, ``.posthoc``, ``.evaluation``,
# ``.sources``, ``.recipes``).
_EXPORTS: dict[str, str] = {
    # nouns
    "SafetyMask": "peft_safety.mask",
    "Scores": "peft_safety.scoring",
    "CalibrationSet": "peft_safety.scoring.calibration",
    # verbs, in pipeline order
    "load_model": "peft_safety.sources.models",
    "load_rows": "peft_safety.sources.datasets",
    "score": "peft_safety.scoring",
    "select": "peft_safety.scoring.selection",
    "apply_mask_": "peft_safety.training.apply",
    "evaluate": "peft_safety.evaluation",
    # the scorer registry
    "SCORERS": "peft_safety.scoring",
    "register_scorer": "peft_safety.scoring",
    # PEFT: a config and a model per adapter type, and the checked masked-LoRA entry point
    "SafetyConfig": "peft_safety.tuner",
    "SafetyModel": "peft_safety.tuner",
    "SafetyLoraConfig": "peft_safety.tuner",
    "SafetyLoraModel": "peft_safety.tuner",
    "get_masked_lora_model": "peft_safety.tuner",
    # TRL: the config and the trainer
    "SafetySFTConfig": "peft_safety.training.config",
    "SafetySFTTrainer": "peft_safety.training.trainer",
    # the base class of every error the library raises
    "SafetyError": "peft_safety.errors",
}

__all__ = sorted([*_EXPORTS, "__version__"])


__getattr__ = lazy_getattr(__name__, _EXPORTS, globals())


def __dir__() -> list[str]:
    return __all__


if TYPE_CHECKING:  # pragma: no cover
    from .errors import SafetyError  # noqa: F401
    from .evaluation import evaluate  # noqa: F401
    from .mask import SafetyMask  # noqa: F401
    from .scoring import SCORERS, Scores, register_scorer, score  # noqa: F401
    from .scoring.calibration import CalibrationSet  # noqa: F401
    from .scoring.selection import select  # noqa: F401
    from .sources.datasets import load_rows  # noqa: F401
    from .sources.models import load_model  # noqa: F401
    from .training.apply import apply_mask_  # noqa: F401
    from .training.config import SafetySFTConfig  # noqa: F401
    from .training.trainer import SafetySFTTrainer  # noqa: F401
    from .tuner import (  # noqa: F401
        SafetyConfig,
        SafetyLoraConfig,
        SafetyLoraModel,
        SafetyModel,
        get_masked_lora_model,
    )
