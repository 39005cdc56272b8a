"""The early-exit configuration a model gets by default, merged with the user's settings.

For an alias with shipped tuned heads (``eeserve/data/exit_heads/<alias>/``) the heads folder's
``exit_config.json`` supplies the defaults; ``exit_heads='none'`` turns them off.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from eeserve.config import EarlyExitConfig

log = logging.getLogger(__name__)

SHIPPED_HEADS_DIR = Path(__file__).resolve().parent.parent / "data" / "exit_heads"

# The EarlyExitConfig fields a heads folder's exit_config.json may set in its ``serving`` (and
# ``serving_unverified``) part: read here, written by ``eeserve calibrate`` (``serving_settings``).
SERVING_KEYS = ("exit_layers", "exit_policy", "confidence", "threshold", "kv_fill", "min_exit_layer", "vocab_prune_k",
                "max_exit_batch", "verify_exits", "max_draft_tokens")


def serving_settings(**fields: Any) -> dict[str, Any]:
    """A ``serving`` part for exit_config.json (keys in the order given).

    Raises:
        ValueError: a key that is not one of ``SERVING_KEYS``.
    """
    bad = [k for k in fields if k not in SERVING_KEYS]
    if bad:
        raise ValueError(f"serving settings must be among {', '.join(SERVING_KEYS)}, got {bad}")
    return dict(fields)


def shipped_heads(model: str) -> Path | None:
    """Folder of the tuned exit heads shipped for an alias, or None."""
    d = SHIPPED_HEADS_DIR / model
    return d if (d / "exit_config.json").is_file() else None


def config_from_heads_dir(path: Path, unverified: bool = False) -> dict[str, Any]:
    """EarlyExitConfig fields stored in a heads folder's exit_config.json: its exit layers, or the
    subset its ``serving`` part names (calibration keeps only the exits it uses), and the serving
    settings. With ``unverified``, the ``serving_unverified`` part instead when there is one (the
    thresholds calibrated for a target agreement, kept when ``calibrate --verify-exits`` wrote
    ``serving``)."""
    cfg = json.loads((Path(path) / "exit_config.json").read_text())
    fields = {"exit_layers": tuple(cfg["exit_layers"]), "exit_head": cfg["head_type"], "exit_heads": str(path)}
    serving = cfg.get("serving_unverified" if unverified and "serving_unverified" in cfg else "serving", {})
    for k in SERVING_KEYS:
        if k in serving:
            v = serving[k]
            fields[k] = tuple(v) if isinstance(v, list) else v
    return fields


def _warn_unverified(folder: Path, fill: str | None, threshold_given: bool) -> None:
    """Tell the user when exits go unverified over a heads folder whose default verifies them."""
    cfg = json.loads((folder / "exit_config.json").read_text())
    if not cfg.get("serving", {}).get("verify_exits"):
        return
    why = f"kv_fill {fill!r}: exits are not verified (verify_exits needs 'recompute')" if fill else "exits not verified"
    if threshold_given:
        if fill:
            log.warning("%s", why)
    elif "serving_unverified" in cfg:
        log.warning("%s; using the thresholds %s calibrated for unverified exits", why,
                    cfg["serving_unverified"].get("threshold"))
    else:
        log.warning("%s; the heads folder's thresholds were chosen for verified exits and let more wrong tokens "
                    "through unverified: set a threshold (--threshold), or calibrate for a target agreement", why)


def resolve_early_exit(model: str, overrides: dict[str, Any]) -> EarlyExitConfig:
    """Merge: shipped or given heads folder defaults, then the user's explicit settings.

    Raises:
        ValueError: an invalid field (from EarlyExitConfig), a heads folder without exit_config.json,
            or settings that cannot work with the heads folder (``check_exit_config``).
    """
    overrides = dict(overrides)
    heads = overrides.pop("exit_heads", None)
    # verify_exits needs recompute: a user who picks another K/V fill over a folder that verifies
    # gets its unverified setting (and is told), as does one who turns verification off
    fill = overrides.get("kv_fill")
    drop_verify = "verify_exits" not in overrides and fill is not None and fill != "recompute"
    unverified = overrides.get("verify_exits") is False or drop_verify
    folder: Path | None = None
    if heads is None:
        folder = shipped_heads(model)
    elif str(heads).lower() != "none":
        folder = Path(heads)
        if not (folder / "exit_config.json").is_file():
            raise ValueError(f"exit_heads {heads!r} must be a folder containing exit_config.json and exit_heads.safetensors")
    base: dict[str, Any] = config_from_heads_dir(folder, unverified) if folder is not None else {}
    if unverified and folder is not None:
        _warn_unverified(folder, fill if drop_verify else None, "threshold" in overrides)
    if drop_verify:
        base.pop("verify_exits", None)
        base.pop("max_draft_tokens", None)
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
    if "exit_layers" in overrides and "min_exit_layer" not in overrides:
        # the folder's lower bound was chosen for its own exit layers
        merged.pop("min_exit_layer", None)
    if "exit_policy" not in merged and merged.get("exit_layers"):
        merged["exit_policy"] = "token"
    if merged.get("exit_policy", "none") != "none" and not merged.get("exit_layers"):
        raise ValueError("exit_layers must be given (e.g. --exit-layers 12,16,20,24) when exit_policy is not none")
    config = EarlyExitConfig(**merged)
    check_exit_config(config)
    return config


def check_exit_config(config: EarlyExitConfig, num_layers: int | None = None) -> None:
    """Refuse, before any weight loads, early-exit settings that cannot work for the model.

    Reads only the heads folder's exit_config.json: every exit layer needs a trained head there,
    a head type other than ``shared`` and the ``classifier`` measure need a heads folder (with a
    classifier), and with ``num_layers`` (from the model's config.json) every exit layer must
    leave at least one layer to skip.

    Args:
        config: the early-exit settings.
        num_layers: the model's decoder layers, when known.

    Raises:
        ValueError: naming the field (``exit_layers``, ``exit_head``, ``confidence``), the value
            and what would work instead.
    """
    if not config.enabled:
        return
    if num_layers is not None:
        bad = [e for e in config.exit_layers if not 1 <= e < num_layers]
        if bad:
            raise ValueError(f"exit_layers must be in 1..{num_layers - 1} for this {num_layers}-layer model, "
                             f"got {list(config.exit_layers)}")
    if config.exit_heads is None:
        if config.exit_head != "shared":
            raise ValueError(f"exit_head must be 'shared' when no exit_heads folder is given (--exit-heads DIR), "
                             f"got {config.exit_head!r}: other head types need trained heads")
        if config.confidence == "classifier":
            raise ValueError("confidence must not be 'classifier' when no exit_heads folder is given: the classifier "
                             "is trained with the heads (--exit-heads DIR); use softmax, margin, entropy or saturation")
        return
    folder = Path(config.exit_heads)
    try:
        cfg = json.loads((folder / "exit_config.json").read_text())
        available = [int(e) for e in cfg["exit_layers"]]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"exit_heads {str(folder)!r} must hold a readable exit_config.json with exit_layers ({e})") from None
    missing = [e for e in config.exit_layers if e not in available]
    if missing:
        raise ValueError(
            f"exit_layers must each have a trained head in {str(folder)!r}, which has {available}; got "
            f"{list(config.exit_layers)} ({missing} missing): use --exit-layers from {available}, or "
            "--exit-heads none (exit_heads='none') for the untrained shared head at any layer"
        )
    if config.confidence == "classifier" and not cfg.get("has_classifier", False):
        raise ValueError(f"confidence must not be 'classifier': the heads in {str(folder)!r} have no classifier")
