"""The engine on the real default model against transformers' LlamaForCausalLM (same weights)."""

from __future__ import annotations

import torch
from conftest import CHAT_PROMPTS
from helpers import (
    FP32_FIXED,
    assert_greedy_matches_reference,
    assert_no_leak,
    assert_same_or_near_tie,
    reference_logits,
)

from eeserve import LLM, SamplingParams

RAW_PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n    ",
    "Once upon a time, in a small village by the sea,",
    "1, 2, 3, 5, 8, 13,",
]


def test_logits_match_transformers(llm, hf_model):
    eng = llm.engine
    for prompt in RAW_PROMPTS:
        ids = eng.tokenizer.encode(prompt)
        ref = reference_logits(hf_model, ids)
        ours = eng.full_depth_logits(ids)
        diff = (ours - ref).abs().max().item()
        assert diff <= 1e-3, f"{prompt!r}: max |logit diff| {diff}"
    # SmolLM2 ties its LM head to the embedding: one tensor, not a 113 MB copy
    assert eng.model.lm_head_w.data_ptr() == eng.model.embed_tokens.data_ptr()


def test_greedy_chat_continuations_match_transformers(llm, hf_model):
    params = SamplingParams(temperature=0, max_tokens=64, ignore_eos=False)
    outs = llm.chat([[{"role": "user", "content": p}] for p in CHAT_PROMPTS], params, use_tqdm=False)
    assert_no_leak(llm)
    for p, out in zip(CHAT_PROMPTS, outs):
        c = out.outputs[0]
        assert len(c.token_ids) == 64 or c.finish_reason == "stop"
        assert_greedy_matches_reference(hf_model, out.prompt_token_ids, c.token_ids, label=p)
        assert c.text == llm.tokenizer.decode(c.token_ids, skip_special_tokens=True)
    # The answer to the first prompt is a real answer.
    assert "Paris" in outs[0].outputs[0].text


def _varied_prompts(tokenizer) -> list[list[int]]:
    base = (
        "In the beginning of the project the team wrote down every requirement they could think of, "
        "then they sorted them by cost and value, argued for a week, and finally picked the few that mattered. "
    )
    prompts = []
    for i in range(16):
        text = f"Note {i}: " + base * (1 + i % 4)
        ids = tokenizer.encode(text)[: 8 + 23 * i]
        prompts.append(ids)
    return prompts


def test_batch_invariance_and_preemption(llm, hf_model):
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    prompts = _varied_prompts(llm.tokenizer)
    alone = [llm.generate([p], params, use_tqdm=False)[0].outputs[0].token_ids for p in prompts]
    assert_no_leak(llm)
    together = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
    assert_no_leak(llm)
    for i, p in enumerate(prompts):
        assert_same_or_near_tie(hf_model, p, alone[i], together[i], f"batched prompt {i}")

    # A KV budget that cannot hold all 16 at once: preemption by recompute must happen.
    small = LLM("smollm2-135m", num_kv_blocks=48, max_num_batched_tokens=256, early_exit={"exit_heads": "none"},
                **FP32_FIXED)
    outs = small.generate(prompts, params, use_tqdm=False)
    assert sum(o.metrics.num_preemptions for o in outs) > 0, "expected preemption under a 48-block budget"
    assert small.engine.stats.num_preemptions > 0
    assert_no_leak(small)
    for i, (p, o) in enumerate(zip(prompts, outs)):
        assert_same_or_near_tie(hf_model, p, alone[i], o.outputs[0].token_ids, f"preempted-run prompt {i}")


def test_seed_reproducible_with_different_batch_mates(llm):
    p = SamplingParams(temperature=1.0, top_p=0.95, seed=1234, max_tokens=16, ignore_eos=True)
    other = SamplingParams(temperature=1.0, max_tokens=20, ignore_eos=True)
    alone = llm.generate(["Tell me a story about a dragon."], p, use_tqdm=False)[0].outputs[0].token_ids
    mixed = llm.generate(
        ["Hello there", "Tell me a story about a dragon.", "Why is the sky blue?"], [other, p, other], use_tqdm=False
    )
    assert mixed[1].outputs[0].token_ids == alone
    different = llm.generate(
        ["Tell me a story about a dragon."],
        SamplingParams(temperature=1.0, top_p=0.95, seed=99, max_tokens=16, ignore_eos=True),
        use_tqdm=False,
    )[0].outputs[0].token_ids
    assert different != alone
    assert_no_leak(llm)


def test_n_and_logprobs(llm):
    params = SamplingParams(n=3, temperature=0.8, seed=7, max_tokens=8, logprobs=3, ignore_eos=True)
    out = llm.generate("The weather today is", params, use_tqdm=False)[0]
    assert [c.index for c in out.outputs] == [0, 1, 2]
    eng = llm.engine
    for c in out.outputs:
        assert len(c.token_ids) == 8 and len(c.logprobs) == 8
        # Each chosen token's logprob equals log_softmax of the full-model logits at that prefix.
        ids = out.prompt_token_ids + c.token_ids
        ref = torch.log_softmax(eng.full_depth_logits(ids), -1)
        p0 = len(out.prompt_token_ids)
        total = 0.0
        for i, (tok, lp) in enumerate(zip(c.token_ids, c.logprobs)):
            assert tok in lp and len(lp) in (3, 4)
            assert abs(lp[tok].logprob - ref[p0 - 1 + i, tok].item()) < 1e-3
            total += lp[tok].logprob
        assert abs(c.cumulative_logprob - total) < 1e-4
    assert_no_leak(llm)


def test_stop_string_and_max_tokens(llm):
    greedy = llm.generate("The capital of France is", SamplingParams(temperature=0, max_tokens=12), use_tqdm=False)[0]
    text = greedy.outputs[0].text
    assert text.startswith(" Paris")
    stopped = llm.generate(
        "The capital of France is", SamplingParams(temperature=0, max_tokens=12, stop=["aris"]), use_tqdm=False
    )[0].outputs[0]
    assert stopped.text == " P" and stopped.finish_reason == "stop" and stopped.stop_reason == "aris"
    length = llm.generate("The capital of France is", SamplingParams(temperature=0, max_tokens=3, ignore_eos=True), use_tqdm=False)[0]
    assert len(length.outputs[0].token_ids) == 3 and length.outputs[0].finish_reason == "length"
    assert_no_leak(llm)


def test_paged_attention_mixed_batch_matches_a_direct_softmax():
    # single decode rows of different context lengths, sequences with 2-3 rows (pending rows
    # riding along) in the batched call, and a 7-row chunk; every row against softmax(q k^T) v
    # over its own causal context, in float64.
    from eeserve.model.attention import SeqAttention, build_attention_metadata, paged_attention

    torch.manual_seed(0)
    nh, nkv, hd, slots = 4, 2, 8, 200
    k_cache, v_cache = torch.randn(slots + 1, nkv, hd), torch.randn(slots + 1, nkv, hd)
    k_cache[slots] = v_cache[slots] = 0  # the pad slot
    layout = [(1, 9), (2, 5), (1, 13), (3, 11), (7, 20), (1, 4)]  # (query rows, context length)
    seqs, row, free = [], 0, torch.randperm(slots)
    for n, ctx in layout:
        kv_slots, free = free[:ctx], free[ctx:]
        seqs.append(SeqAttention(torch.arange(row, row + n), torch.arange(ctx - n, ctx), kv_slots))
        row += n
    meta = build_attention_metadata(seqs, row, torch.zeros(row, dtype=torch.long), slots)
    assert len(meta.chunks) == 1 and meta.batch_rows.shape == (5, 3)
    q = torch.randn(row, nh, hd)
    out = paged_attention(q, k_cache, v_cache, meta, scale=hd**-0.5)
    for s in seqs:
        for r, p in zip(s.rows.tolist(), s.positions.tolist()):
            k = k_cache[s.kv_slots[: p + 1]].double().repeat_interleave(nh // nkv, dim=1)  # [p+1, nh, hd]
            v = v_cache[s.kv_slots[: p + 1]].double().repeat_interleave(nh // nkv, dim=1)
            w = torch.softmax(torch.einsum("hd,khd->hk", q[r].double(), k) * hd**-0.5, dim=-1)
            ref = torch.einsum("hk,khd->hd", w, v).reshape(-1)
            torch.testing.assert_close(out[r].double(), ref, rtol=1e-5, atol=1e-5)


def _broken_params() -> SamplingParams:
    """Params that pass validation and then break the sampler (as a field changed after
    construction would): the float32 tensor of repetition penalties cannot hold 10**400."""
    bad = SamplingParams(temperature=0, max_tokens=6, repetition_penalty=1.5)
    object.__setattr__(bad, "repetition_penalty", 10**400)
    return bad


def test_a_request_that_breaks_the_step_fails_alone(llm, hf_model):
    # Issue 18 item 1: of 16 requests in one step, the one whose sampling raises finishes with
    # finish_reason "error"; the other 15 complete normally, in the sync engine and through
    # AsyncLLMEngine (whose caller gets the error), and nothing leaks.
    import asyncio

    from eeserve.engine.async_engine import AsyncLLMEngine

    prompts = [f"Item {i}: the colour of the sky is" for i in range(16)]
    good = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    params = [good] * 16
    params[5] = _broken_params()
    outs = llm.generate(prompts, params, use_tqdm=False)
    assert outs[5].outputs[0].finish_reason == "error"
    assert "OverflowError" in outs[5].outputs[0].error
    ref = llm.generate(prompts[:5] + prompts[6:], good, use_tqdm=False)
    for o, r in zip(outs[:5] + outs[6:], ref):
        c = o.outputs[0]
        assert c.finish_reason == "length" and len(c.token_ids) == 6 and c.error is None
        assert_same_or_near_tie(hf_model, o.prompt_token_ids, r.outputs[0].token_ids, c.token_ids, o.prompt)
    assert_no_leak(llm)

    async def concurrent():
        eng = AsyncLLMEngine(llm.engine)
        eng.start()

        async def one(i):
            try:
                return [o async for o in eng.generate(prompts[i], params[i], f"a{i}")][-1]
            except RuntimeError as e:
                return e

        try:
            return await asyncio.wait_for(asyncio.gather(*(one(i) for i in range(16))), 600)
        finally:
            eng.shutdown()

    results = asyncio.run(concurrent())
    assert isinstance(results[5], RuntimeError) and "OverflowError" in str(results[5])
    for o, r in zip(results[:5] + results[6:], ref):
        assert not isinstance(o, BaseException), o
        assert o.finished and o.outputs[0].finish_reason == "length"
        assert_same_or_near_tie(hf_model, o.prompt_token_ids, r.outputs[0].token_ids, o.outputs[0].token_ids, o.prompt)
    assert_no_leak(llm)


def test_stop_string_completed_by_the_last_allowed_token_reports_stop(llm):
    # Issue 18 item 2: when token max_tokens completes a stop string, the stop string wins:
    # finish_reason "stop", stop_reason set, the text cut before it (vLLM's order).
    tok = llm.tokenizer
    prompt = "Q: What is the capital of France? A:"
    ids = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=16, ignore_eos=True),
                       use_tqdm=False)[0].outputs[0].token_ids
    cases = []
    for k in range(1, len(ids)):
        before, upto = tok.decode(ids[:k]), tok.decode(ids[: k + 1])
        stop = tok.decode([ids[k]]).strip()
        if stop and stop not in before and upto.rstrip().endswith(stop) and upto.index(stop) >= len(before):
            cases.append((k, stop, upto[: upto.index(stop)]))
    assert cases, f"no token completes a fresh stop string in {tok.decode(ids)!r}"
    for k, stop, text in cases[:2]:
        last = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=k + 1, stop=[stop]),
                            use_tqdm=False)[0].outputs[0]
        assert (last.finish_reason, last.stop_reason, last.text) == ("stop", stop, text), k
        assert list(last.token_ids) == list(ids[: k + 1])
        later = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=k + 3, stop=[stop]),
                             use_tqdm=False)[0].outputs[0]
        assert (later.finish_reason, later.stop_reason, later.text) == ("stop", stop, text)
    assert_no_leak(llm)


def test_every_eos_id_of_generation_config_stops(llm, hf_model, tmp_path):
    # Issue 18 item 4: generation_config.json's eos_token_id list is read; generation stops on
    # any of them, and min_tokens masks all of them (checked against transformers' logits).
    import json

    prompt = "The capital of France is"
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    ids = list(llm.generate(prompt, params, use_tqdm=False)[0].outputs[0].token_ids)
    k = next(i for i in range(2, len(ids)) if ids[i] not in ids[:i] and 2 not in ids[: i + 1])
    extra = ids[k]  # made an EOS id of the copied model
    src = llm.engine.model_files.path
    for f in src.iterdir():
        (tmp_path / f.name).symlink_to(f)
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, extra]}))
    multi = LLM(str(tmp_path), num_kv_blocks=32, early_exit={"exit_heads": "none"})
    assert multi.engine.eos_token_ids == (2, extra)
    out = multi.generate(prompt, SamplingParams(temperature=0, max_tokens=12), use_tqdm=False)[0].outputs[0]
    assert list(out.token_ids) == ids[: k + 1] and out.finish_reason == "stop" and out.stop_reason is None
    # min_tokens past k: at k the model takes its best token other than the EOS ids
    held = multi.generate(prompt, SamplingParams(temperature=0, max_tokens=12, min_tokens=k + 1),
                          use_tqdm=False)[0].outputs[0]
    row = reference_logits(hf_model, llm.tokenizer.encode(prompt) + ids[:k])[-1]
    row[[2, extra]] = float("-inf")
    assert list(held.token_ids[:k]) == ids[:k] and held.token_ids[k] == int(row.argmax())
    assert not {2, extra} & set(held.token_ids[: k + 1])
    if held.finish_reason == "stop":
        assert held.token_ids[-1] in (2, extra)
    ignored = multi.generate(prompt, params, use_tqdm=False)[0].outputs[0]
    assert list(ignored.token_ids) == ids  # ignore_eos ignores every EOS id
    assert_no_leak(multi)
