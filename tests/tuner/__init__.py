"""Tests of ``peft_safety.tuner``: the SAFETY and SAFETY_LORA adapter types."""
