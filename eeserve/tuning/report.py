"""What ``eeserve calibrate`` prints: its tables and progress lines (Markdown tables, so that
they paste into docs/exit_heads.md)."""

from __future__ import annotations

from collections.abc import Sequence

from eeserve.early_exit.drafts import NEVER


def fmt_thresholds(thresholds: Sequence[float]) -> str:
    """``0.900, -, 0.750``: a disabled exit (``NEVER``) as ``-``."""
    return ", ".join("-" if t >= NEVER else f"{t:.3f}" for t in thresholds)


def teacher_forced_table(rows: list[dict], target: float, how: str, full_flops: float) -> None:
    """The teacher-forced choice per confidence measure and kind of threshold."""
    print(f"teacher-forced choice at target {target:.3f} ({how}):")
    print("| confidence | thresholds | agreement (teacher-forced) | mean layers | FLOPs vs full |")
    print("|---|---|---|---|---|")
    for r in rows:
        kind = "per exit" if r["per_exit"] else "global"
        print(f"| {r['confidence']} {kind} | {fmt_thresholds(r['thresholds'])} | {r['outcome'].agreement:.3f} | "
              f"{r['outcome'].mean_layers:.2f} | {r['flops'] / full_flops:.2f} |")


def generation_line(num_prompts: int, thresholds: Sequence[float], check) -> None:
    """One setting tested by generation (a ``GenerationCheck``)."""
    print(f"  generation on {num_prompts} calib prompts, thresholds {fmt_thresholds(thresholds)}: agreement "
          f"{check.agreement:.4f} ({check.disagreements}/{check.tokens} differ), mean layers {check.mean_layers:.2f}",
          flush=True)


def verified_header() -> None:
    print("| confidence | threshold | drafts kept | drafts replaced | mean layers | modeled speed-up |")
    print("|---|---|---|---|---|---|")


def verified_row(measure: str, thresholds: Sequence[float], outcome, chosen: bool) -> None:
    """One setting along the path under ``verify_exits`` (a ``VerifiedOutcome``)."""
    mark = " (chosen)" if chosen else ""
    print(f"| {measure} | {fmt_thresholds(thresholds)}{mark} | {outcome.kept:.3f} | {outcome.replaced:.3f} | "
          f"{outcome.mean_layers:.2f} | {outcome.speedup:.3f}x |")
