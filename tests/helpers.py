"""Reference checks shared by the tests."""

from __future__ import annotations

import torch

NEAR_TIE = 1e-3  # logits
# Engines compared with transformers run in fp32 (``dtype="auto"`` may pick bf16) with the fixed
# legacy kernel rule; every form that tuning may pick is checked against the reference in
# tests/test_kernels.py.
FP32_FIXED = {"dtype": "float32", "kernel_tuning": False}


@torch.no_grad()
def reference_logits(hf_model, token_ids: list[int]) -> torch.Tensor:
    """[n, V] logits of transformers' model for every position of ``token_ids``."""
    return hf_model(torch.tensor([token_ids])).logits[0].float()


def first_divergence(a: list[int], b: list[int]) -> int | None:
    """First index where the sequences differ (also a length difference), or None."""
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def assert_greedy_matches_reference(hf_model, prompt_ids: list[int], gen_ids: list[int], label: str = "") -> None:
    """Every generated token must be the reference's greedy choice given the same prefix
    (teacher forcing: equivalent to comparing with the reference's own greedy generation).
    The only tolerated difference is a true near-tie: at the first differing position the
    reference's top-1 and top-2 logits differ by less than 1e-3 and our token is one of them;
    the comparison stops there (the continuations legitimately diverge) and the tie is printed.
    """
    logits = reference_logits(hf_model, prompt_ids + gen_ids)
    p = len(prompt_ids)
    for i, tok in enumerate(gen_ids):
        row = logits[p - 1 + i]
        best = int(row.argmax())
        if best == tok:
            continue
        top2 = row.topk(2)
        gap = float(top2.values[0] - top2.values[1])
        ours_gap = float(row[best] - row[tok])
        assert gap < NEAR_TIE and ours_gap < NEAR_TIE, (
            f"{label}: token {i} is {tok}, reference greedy picks {best} "
            f"(logit gap {ours_gap:.5f}, not a near-tie)"
        )
        print(f"near-tie tolerated ({label}): position {i}, top-1/top-2 gap {gap:.2e}")
        return


def assert_same_or_near_tie(hf_model, prompt_ids: list[int], ref: list[int], got: list[int], label: str) -> None:
    """Two greedy runs of the same prompt must match; at the first difference the reference's
    top-1 and top-2 logits must be within 1e-3 (a true near-tie, printed)."""
    i = first_divergence(ref, got)
    if i is None:
        return
    assert i < len(ref) and i < len(got), f"{label}: lengths differ ({len(ref)} vs {len(got)}) with equal prefix"
    row = reference_logits(hf_model, prompt_ids + ref[:i])[-1]
    top2 = row.topk(2)
    gap = float(top2.values[0] - top2.values[1])
    assert gap < NEAR_TIE and {ref[i], got[i]} <= set(top2.indices.tolist()), (
        f"{label}: differs at token {i} ({ref[i]} vs {got[i]}); reference top-1/top-2 gap {gap:.5f} is not a near-tie"
    )
    print(f"near-tie tolerated ({label}): position {i}, gap {gap:.2e}")


def assert_no_leak(llm) -> None:
    """After a run: every KV block is free again and the accounting is consistent."""
    eng = llm.engine
    eng.check_integrity()
    assert eng.num_free_blocks == eng.num_total_blocks, f"{eng.num_total_blocks - eng.num_free_blocks} KV blocks leaked"
    assert not eng.has_unfinished_requests()
