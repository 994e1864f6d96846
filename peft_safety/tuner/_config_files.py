"""How peft-safety's adapter configs write and read their folder: ``adapter_config.json`` atomically, the card, and a
check of the weights file before PEFT reads it.

`ConfigFilesMixin` is a base of `ProvenanceConfigMixin`, and so of `SafetyConfig` and `SafetyLoraConfig`. Every save
of those types goes through ``config.save_pretrained`` (``PeftModel.save_pretrained``, ``model.save_pretrained`` of a
TRL-trained model, ``Trainer.save_model``, ``push_to_hub``), so this is the one place that sees every save:

* ``adapter_config.json`` is written with `peft_safety._io.atomic_write_json` instead of PEFT's ``open(path, "w")``:
  a process killed mid-save leaves the previous config (or none), never a 0-byte one, and a symlink planted at the
  name is replaced instead of written through. The content is byte for byte what PEFT writes (``to_dict()``, sets
  as lists, ``auto_mapping`` when PEFT passes one, ``indent=2, sort_keys=True``).
* ``README.md`` gets peft-safety's section (`peft_safety.mask.cards.write_card`): the ``import peft_safety`` line
  without which the next user's ``PeftModel.from_pretrained`` fails with ``KeyError: 'SAFETY'``, the mode and the
  base model. ``PeftModel.save_pretrained`` writes its stock card before the weights and the config, so the section
  is merged into that card (its text and front matter are kept).
* `from_pretrained` checks the folder's weights file (`peft_safety._files.check_adapter_weights`) when there is one:
  empty, truncated or device files are named here instead of failing inside safetensors. A folder with a config and
  no weights file is left to the loader (reading a config alone is a normal use).
"""

from __future__ import annotations

import os
from typing import Any

from .._files import ADAPTER_CONFIG, ADAPTER_WEIGHTS, check_adapter_weights
from .._io import atomic_write_json

__all__ = ["ConfigFilesMixin", "config_file_dict"]


def config_file_dict(config: Any, auto_mapping_dict: dict[str, Any] | None = None) -> dict[str, Any]:
    """What ``PeftConfigMixin.save_pretrained`` writes into ``adapter_config.json`` for ``config``."""
    output = config.to_dict()
    for key, value in output.items():
        if isinstance(value, set):
            output[key] = list(value)
    if auto_mapping_dict is not None:
        output["auto_mapping"] = auto_mapping_dict
    return output


class ConfigFilesMixin:
    """``save_pretrained`` (atomic config, card) and ``from_pretrained`` (weights pre-check) of peft-safety's adapter
    configs; put it before the PEFT config class in the bases (it does not call PEFT's writer)."""

    def save_pretrained(self, save_directory: str, **kwargs: Any) -> None:
        if os.path.isfile(save_directory):
            raise AssertionError(f"Provided path ({save_directory}) should be a directory, not a file")  # as PEFT
        os.makedirs(save_directory, exist_ok=True)
        output = config_file_dict(self, kwargs.pop("auto_mapping_dict", None))
        atomic_write_json(os.path.join(save_directory, ADAPTER_CONFIG), output, indent=2, sort_keys=True)
        from ..mask.cards import write_card

        write_card(save_directory, adapter_config=output)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str, subfolder: str | None = None, **kwargs: Any):
        path = os.fspath(pretrained_model_name_or_path)
        folder = os.path.join(path, subfolder) if subfolder else path
        if os.path.isdir(folder) and any(os.path.lexists(os.path.join(folder, n)) for n in ADAPTER_WEIGHTS):
            check_adapter_weights(folder)
        return super().from_pretrained(pretrained_model_name_or_path, subfolder=subfolder, **kwargs)  # type: ignore[misc]
