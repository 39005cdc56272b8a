"""The early-exit configuration a model gets by default, merged with the user's settings.

For an alias with shipped tuned heads (``eeserve/data/exit_heads/<alias>/``) the heads folder's
``exit_config.json`` supplies the defaults; ``exit_heads='none'`` turns them off.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from eeserve.config import EarlyExitConfig

SHIPPED_HEADS_DIR = Path(__file__).resolve().parent.parent / "data" / "exit_heads"


def shipped_heads(model: str) -> Path | None:
    """Folder of the tuned exit heads shipped for an alias, or None."""
    d = SHIPPED_HEADS_DIR / model
    return d if (d / "exit_config.json").is_file() else None


def config_from_heads_dir(path: Path) -> dict[str, Any]:
    """EarlyExitConfig fields stored in a heads folder's exit_config.json: its exit layers, or the
    subset its ``serving`` part names (calibration keeps only the exits it uses), and the serving
    settings."""
    cfg = json.loads((Path(path) / "exit_config.json").read_text())
    fields = {"exit_layers": tuple(cfg["exit_layers"]), "exit_head": cfg["head_type"], "exit_heads": str(path)}
    serving = cfg.get("serving", {})
    for k in ("exit_layers", "exit_policy", "confidence", "threshold", "kv_fill", "min_exit_layer", "vocab_prune_k",
              "max_exit_batch", "verify_exits", "max_draft_tokens"):
        if k in serving:
            v = serving[k]
            fields[k] = tuple(v) if isinstance(v, list) else v
    return fields


def resolve_early_exit(model: str, overrides: dict[str, Any]) -> EarlyExitConfig:
    """Merge: shipped or given heads folder defaults, then the user's explicit settings.

    Raises:
        ValueError: an invalid field (from EarlyExitConfig), or a heads folder without exit_config.json.
    """
    overrides = dict(overrides)
    heads = overrides.pop("exit_heads", None)
    base: dict[str, Any] = {}
    if heads is None:
        shipped = shipped_heads(model)
        if shipped is not None:
            base = config_from_heads_dir(shipped)
    elif str(heads).lower() != "none":
        if not (Path(heads) / "exit_config.json").is_file():
            raise ValueError(f"exit_heads {heads!r} must be a folder containing exit_config.json and exit_heads.safetensors")
        base = config_from_heads_dir(Path(heads))
    if overrides.get("exit_head", base.get("exit_head")) == "shared":
        base.pop("exit_heads", None)
    merged = {**base, **overrides}
    if (
        "exit_layers" in overrides
        and "exit_layers" in base
        and tuple(overrides["exit_layers"]) != tuple(base["exit_layers"])
        and "threshold" not in overrides
    ):
        # per-exit thresholds of the heads folder no longer line up with new exit layers
        if isinstance(merged.get("threshold"), tuple):
            merged.pop("threshold")
    if merged.get("kv_fill") != "recompute":
        # the heads folder's verify_exits needs recompute; a user who picks propagate gets plain exits
        for k in ("verify_exits", "max_draft_tokens"):
            if k not in overrides:
                merged.pop(k, None)
    if "exit_policy" not in merged and merged.get("exit_layers"):
        merged["exit_policy"] = "token"
    if merged.get("exit_policy", "none") != "none" and not merged.get("exit_layers"):
        raise ValueError("exit_layers must be given (e.g. --exit-layers 12,16,20,24) when exit_policy is not none")
    return EarlyExitConfig(**merged)
