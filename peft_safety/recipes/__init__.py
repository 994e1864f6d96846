"""Recipes: applications built from the library's stages (nothing inside the library imports them).

* `peft_safety.recipes.main_job` -- the main job (`run_main_job`, ``peft-safety demo``): score the embedded model,
  select a mask, run SET and SPA, evaluate and write a report;
* `peft_safety.recipes.sft` -- the TRL-style SFT entry point shared by ``examples/sft_safety.py`` and
  ``peft-safety train``.
"""
