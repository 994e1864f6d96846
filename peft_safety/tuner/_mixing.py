"""One PEFT type per model: how our tuners refuse adapters of another type, with what to do instead.

PEFT keeps a model's adapter configs in one dict, shared by the tuner and the model it adapts (``BaseTuner.__init__``
ends with ``model.peft_config = tuner.peft_config``). A second tuner created on that model later (``get_peft_model``
on a model that carries our adapter, transformers' ``model.load_adapter`` of a LoRA folder, ``inject_adapter_in_model``)
finds that dict and writes its config into it before injecting anything. So our tuners keep their configs in
`AdapterConfigs`, a dict that refuses a config of another type at that first write, naming what to do instead
(`peft_type.MIXING_HINTS`); and they refuse to be created on a model that already carries another type's
adapters (`refuse_foreign_configs`, before PEFT writes into that model's dict). ``PeftModel.add_adapter`` / ``load_adapter`` compare the types themselves before our code
runs; their error shows the same hint through `SafetyPeftType`'s formatting.
"""

from __future__ import annotations

from typing import Any

from .peft_type import MIXING_HINTS

__all__ = ["AdapterConfigs", "own_configs", "refuse_foreign_configs"]


def _type_name(config: Any) -> str:
    peft_type = getattr(config, "peft_type", None)
    return str(getattr(peft_type, "value", peft_type) or type(config).__name__)


class AdapterConfigs(dict):
    """``{adapter name: config}`` of one of our tuners that accepts configs of ``config_cls`` only.

    Args:
        config_cls: the config class of the tuner's PEFT type.
        type_name: the PEFT type, for messages.
        items: the configs to start with.
    """

    def __init__(self, config_cls: type, type_name: str, items: Any = ()) -> None:
        self.config_cls = config_cls
        self.type_name = type_name
        super().__init__()
        self.update(items)

    def __setitem__(self, adapter_name: str, config: Any) -> None:
        if not isinstance(config, self.config_cls):
            raise ValueError(
                f"Cannot add adapter {adapter_name!r} of PEFT type {_type_name(config)} to a model that carries "
                f"{self.type_name} adapters ({', '.join(map(repr, self))}): {MIXING_HINTS[self.type_name]}."
            )
        super().__setitem__(adapter_name, config)

    def update(self, *args: Any, **kwargs: Any) -> None:
        for key, value in dict(*args, **kwargs).items():
            self[key] = value

    def setdefault(self, key: str, default: Any = None) -> Any:
        if key not in self:
            self[key] = default
        return self[key]

    def __reduce__(self) -> tuple:
        return (type(self), (self.config_cls, self.type_name, dict(self)))


def refuse_foreign_configs(model: Any, adapter_name: str, type_name: str) -> None:
    """Before our tuner is created on ``model``: refuse when the model already carries adapters of another type.

    Checked on the model's own dict of configs before PEFT writes the new config into it (it would overwrite an
    adapter of the same name, e.g. ``"default"``), so nothing changes when it is refused.

    Raises:
        ValueError: naming the other type and what to do instead.
    """
    configs = getattr(model, "peft_config", None)
    if not isinstance(configs, dict):
        return
    foreign = {name: cfg for name, cfg in configs.items() if _type_name(cfg) != type_name}
    if not foreign:
        return
    name, other = next(iter(foreign.items()))
    raise ValueError(
        f"Cannot add the {type_name} adapter {adapter_name!r} to a model that already carries adapter {name!r} of PEFT "
        f"type {_type_name(other)}: a model holds adapters of one PEFT type. Merge the existing adapter into the base "
        f"first (base = model.merge_and_unload()), then add the {type_name} adapter to the merged model."
    )


def own_configs(tuner: Any, config_cls: type, type_name: str) -> None:
    """After our tuner's ``BaseTuner.__init__``: keep its configs (shared with the model) in an `AdapterConfigs`."""
    configs = tuner.peft_config
    if not isinstance(configs, AdapterConfigs):
        configs = AdapterConfigs(config_cls, type_name, configs)
        tuner.peft_config = configs
    tuner.model.peft_config = configs
