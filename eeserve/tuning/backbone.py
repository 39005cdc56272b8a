"""The frozen backbone the tuning commands work on (``tune``, ``calibrate``, ``eval-exits``)."""

from __future__ import annotations


def load_llm(model: str, dtype: str = "float32"):
    """The engine with early exit off (a full-depth reference and the frozen backbone)."""
    from eeserve import LLM

    return LLM(model, dtype=dtype, early_exit={"exit_heads": "none"})
