"""Block pool, KV manager and scheduler on CPU, no model: a fake runner samples the tokens.

Every expected number below is worked out by hand from the rules in core/scheduler.py
(token budget, chunked prefill, admission order, preemption of the most recently admitted).
"""

from __future__ import annotations

import random
from collections.abc import Callable

import pytest

from eeserve.config import SchedulerConfig
from eeserve.core.block_pool import BlockPool
from eeserve.core.interfaces import ModelRunnerOutput, SampledToken, SchedulerOutput
from eeserve.core.kv_manager import KVCacheManager, cdiv
from eeserve.core.scheduler import Scheduler
from eeserve.request import Request, RequestStatus
from eeserve.sampling_params import SamplingParams

EOS = 2
FULL_DEPTH = 30


def make_scheduler(
    num_blocks: int = 64,
    block_size: int = 4,
    max_num_seqs: int = 8,
    max_num_batched_tokens: int = 256,
    max_model_len: int = 1024,
) -> Scheduler:
    kv = KVCacheManager(num_blocks, block_size)
    cfg = SchedulerConfig(max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens)
    return Scheduler(cfg, kv, max_model_len)


def make_request(
    rid: str,
    num_prompt: int,
    max_tokens: int = 16,
    eos: int | tuple[int, ...] | None = None,
    **params,
) -> Request:
    sp = SamplingParams(max_tokens=max_tokens, **params)
    prompt = [10 + (i % 50) for i in range(num_prompt)]  # never EOS
    return Request(rid, prompt, sp, arrival_time=0.0, max_tokens=max_tokens,
                   eos_token_ids=(eos,) if isinstance(eos, int) else tuple(eos or ()))


def next_token(req: Request) -> int:
    """Default fake model: output i of a request is token 1000 + i."""
    return 1000 + req.num_output_tokens


def fake_run(
    sched: Scheduler, out: SchedulerOutput, token_fn: Callable[[Request], int] = next_token
) -> ModelRunnerOutput:
    sampled = {
        s.request_id: SampledToken(token_fn(sched.requests[s.request_id]), exit_layer=FULL_DEPTH)
        for s in out.scheduled
        if s.sample
    }
    return ModelRunnerOutput(sampled=sampled)


def step(sched: Scheduler, token_fn: Callable[[Request], int] = next_token) -> SchedulerOutput:
    out = sched.schedule()
    sched.update_from_output(out, fake_run(sched, out, token_fn))
    sched.kv.check_integrity()
    return out


def run_to_end(sched: Scheduler, token_fn: Callable[[Request], int] = next_token, max_steps: int = 10_000) -> int:
    steps = 0
    while sched.has_unfinished_requests():
        step(sched, token_fn)
        steps += 1
        assert steps < max_steps, "scheduler did not finish (hang)"
    return steps


def assert_all_free(sched: Scheduler) -> None:
    sched.kv.check_integrity()
    assert sched.kv.num_free_blocks == sched.kv.num_blocks
    assert not sched.has_unfinished_requests()
    assert sched.requests == {}


def sizes(out: SchedulerOutput) -> dict[str, int]:
    return {s.request_id: s.num_new_tokens for s in out.scheduled}


# ---- block pool ------------------------------------------------------------------------------


def test_block_pool_allocate_free_and_integrity():
    pool = BlockPool(8)
    assert pool.num_free_blocks == 8
    a = pool.allocate(3)
    assert a == [0, 1, 2]
    b = pool.allocate(5)
    assert b == [3, 4, 5, 6, 7]
    assert pool.num_free_blocks == 0
    assert not pool.can_allocate(1)
    assert pool.can_allocate(0)
    with pytest.raises(RuntimeError, match="asked for 1 KV blocks, only 0 free"):
        pool.allocate(1)
    pool.check_integrity()
    pool.free(a)
    assert pool.num_free_blocks == 3
    assert pool.allocate(2) == [0, 1]  # FIFO free list
    pool.check_integrity()


def test_block_pool_double_free_is_an_error():
    pool = BlockPool(4)
    ids = pool.allocate(2)
    pool.free(ids)
    with pytest.raises(ValueError, match="KV block 0 freed but not allocated"):
        pool.free([0])
    with pytest.raises(ValueError, match="not allocated"):
        pool.free([3])  # never allocated
    pool.check_integrity()
    assert pool.num_free_blocks == 4


def test_block_pool_rejects_empty_pool():
    with pytest.raises(ValueError, match="num_blocks must be >= 1"):
        BlockPool(0)


# ---- KV manager ------------------------------------------------------------------------------


def test_cdiv():
    assert [cdiv(n, 16) for n in (0, 1, 15, 16, 17, 32, 33)] == [0, 1, 1, 1, 2, 2, 3]


def test_kv_manager_blocks_needed_and_growth():
    kv = KVCacheManager(num_blocks=10, block_size=16)
    assert kv.capacity_tokens == 160
    assert kv.num_blocks_needed("a", 1) == 1
    assert kv.num_blocks_needed("a", 16) == 1
    assert kv.num_blocks_needed("a", 17) == 2
    assert kv.num_blocks_needed("a", 100) == 7
    assert kv.allocate_slots("a", 17)
    assert kv.block_ids("a") == (0, 1)
    # positions 17..32 still fit in the 2 blocks
    assert kv.num_blocks_needed("a", 32) == 0
    assert kv.allocate_slots("a", 32)
    assert kv.block_ids("a") == (0, 1)
    # the 33rd position crosses a block boundary
    assert kv.num_blocks_needed("a", 33) == 1
    assert kv.allocate_slots("a", 33)
    assert kv.block_ids("a") == (0, 1, 2)
    assert kv.allocate_slots("b", 16 * 7)
    assert kv.num_free_blocks == 0
    assert kv.usage == 1.0
    # not enough: nothing is allocated
    assert not kv.can_allocate("a", 49)
    assert not kv.allocate_slots("a", 49)
    assert kv.block_ids("a") == (0, 1, 2)
    kv.check_integrity()
    kv.free("a")
    kv.free("a")  # no-op
    assert kv.num_free_blocks == 3
    assert kv.usage == pytest.approx(0.7)
    kv.free("b")
    kv.check_integrity()
    assert kv.num_free_blocks == 10


# ---- token budget and chunked prefill ----------------------------------------------------------


def test_chunked_prefill_256_256_256_232():
    sched = make_scheduler(num_blocks=300, block_size=4, max_num_batched_tokens=256, max_model_len=2048)
    sched.add_request(make_request("a", 1000, max_tokens=2))
    got = []
    for expect_start, expect_n in [(0, 256), (256, 256), (512, 256), (768, 232)]:
        out = step(sched)
        (s,) = out.scheduled
        got.append(s.num_new_tokens)
        assert s.start_position == expect_start
        assert s.num_new_tokens == expect_n
        assert out.num_batched_tokens == expect_n
        assert s.sample == (expect_start == 768)  # only the last chunk samples
        assert not s.is_decode
        assert s.token_ids == tuple(10 + (i % 50) for i in range(expect_start, expect_start + expect_n))
        # the block table covers exactly the positions computed so far
        assert len(s.block_ids) == cdiv(expect_start + expect_n, 4)
    assert got == [256, 256, 256, 232]
    req = sched.requests["a"]
    assert req.num_computed_tokens == 1000
    assert req.output_token_ids == [1000]
    out = step(sched)  # the decode step
    (s,) = out.scheduled
    assert (s.start_position, s.num_new_tokens, s.sample, s.is_decode) == (1000, 1, True, True)
    assert s.token_ids == (1000,)
    assert req.is_finished and req.status == RequestStatus.FINISHED_LENGTH
    assert req.output_token_ids == [1000, 1001]
    assert_all_free(sched)


def test_decode_row_runs_alongside_prefill_chunks():
    sched = make_scheduler(num_blocks=300, block_size=4, max_num_batched_tokens=256, max_model_len=2048)
    sched.add_request(make_request("a", 10, max_tokens=100))
    sched.add_request(make_request("b", 1000, max_tokens=1))
    # step 1: a's whole prompt (10) and a 246-token chunk of b
    out = step(sched)
    assert sizes(out) == {"a": 10, "b": 246}
    assert [s.sample for s in out.scheduled] == [True, False]
    # then a decodes one token per step while b gets the rest of the budget: 255, 255, 244
    for b_chunk, b_samples in [(255, False), (255, False), (244, True)]:
        out = step(sched)
        assert sizes(out) == {"a": 1, "b": b_chunk}
        assert out.num_batched_tokens == 1 + b_chunk <= 256
        a_row, b_row = out.scheduled
        assert a_row.is_decode and a_row.sample
        assert b_row.sample == b_samples and not b_row.is_decode
    assert sched.requests["a"].num_output_tokens == 4
    assert 246 + 255 + 255 + 244 == 1000
    # b got its one token and finished with length
    assert "b" not in sched.requests
    sched.finish_requests(["a"], RequestStatus.FINISHED_ABORTED)
    assert_all_free(sched)


def test_max_num_seqs_respected():
    sched = make_scheduler(num_blocks=200, max_num_seqs=3, max_num_batched_tokens=1000)
    for i in range(7):
        sched.add_request(make_request(f"r{i}", 5, max_tokens=2))
    out = step(sched)
    assert sizes(out) == {"r0": 5, "r1": 5, "r2": 5}  # budget allows all 7, max_num_seqs only 3
    assert [r.request_id for r in sched.waiting] == ["r3", "r4", "r5", "r6"]
    out = step(sched)  # r0..r2 decode their last token and finish; no room to admit meanwhile
    assert sizes(out) == {"r0": 1, "r1": 1, "r2": 1}
    out = step(sched)
    assert sizes(out) == {"r3": 5, "r4": 5, "r5": 5}
    while sched.has_unfinished_requests():
        out = step(sched)
        assert len(out.scheduled) <= 3
    assert_all_free(sched)


def test_budget_limits_admission_of_waiting_prompts():
    sched = make_scheduler(num_blocks=200, max_num_seqs=8, max_num_batched_tokens=20)
    for i in range(3):
        sched.add_request(make_request(f"r{i}", 8, max_tokens=3))
    out = step(sched)
    assert sizes(out) == {"r0": 8, "r1": 8, "r2": 4}  # r2 gets the 4 tokens left of 20
    assert [s.sample for s in out.scheduled] == [True, True, False]
    out = step(sched)
    assert sizes(out) == {"r0": 1, "r1": 1, "r2": 4}
    run_to_end(sched)
    assert_all_free(sched)


# ---- preemption --------------------------------------------------------------------------------


def test_preempts_most_recently_admitted_then_recomputes():
    # 6 blocks of 4 slots; three 6-token prompts take 2 blocks each, filling the cache.
    sched = make_scheduler(num_blocks=6, block_size=4, max_num_batched_tokens=100)
    for rid in ("a", "b", "c"):
        sched.add_request(make_request(rid, 6, max_tokens=4))
    out = step(sched)  # prefill: each has 6 computed, 7 tokens
    assert sizes(out) == {"a": 6, "b": 6, "c": 6}
    assert sched.kv.num_free_blocks == 0
    out = step(sched)  # decode at position 6: still inside block 2
    assert sizes(out) == {"a": 1, "b": 1, "c": 1}
    out = step(sched)  # decode at position 7: still inside block 2
    assert sizes(out) == {"a": 1, "b": 1, "c": 1}
    c = sched.requests["c"]
    c_tokens = c.all_token_ids
    assert c.num_output_tokens == 3 and c.num_computed_tokens == 8
    c_blocks = set(sched.kv.block_ids("c"))

    # position 8 needs a 3rd block for each; none is free -> c (the last admitted) is preempted,
    # its 2 blocks go to a and b.
    out = sched.schedule()
    assert out.preempted_request_ids == ("c",)
    assert sizes(out) == {"a": 1, "b": 1}
    assert c.status == RequestStatus.PREEMPTED
    assert c.num_computed_tokens == 0
    assert c.num_preemptions == 1 and sched.num_preemptions == 1
    assert sched.kv.block_ids("c") == ()
    assert list(sched.waiting) == [c]
    assert sched.running == [sched.requests["a"], sched.requests["b"]]
    assert set(sched.kv.block_ids("a")[2:] + sched.kv.block_ids("b")[2:]) == c_blocks
    assert sched.kv.num_free_blocks == 0
    sched.kv.check_integrity()
    sched.update_from_output(out, fake_run(sched, out))
    # a and b reach max_tokens=4 and finish, freeing all 6 blocks
    assert "a" not in sched.requests and "b" not in sched.requests
    assert sched.kv.num_free_blocks == 6

    # c resumes: prompt + its first 2 outputs recomputed in one chunk that does not sample, then
    # its last token as a decode row that samples (as it would have run without the preemption)
    out = step(sched)
    (s,) = out.scheduled
    assert s.request_id == "c"
    assert s.start_position == 0
    assert s.token_ids == tuple(c_tokens[:-1])
    assert s.num_new_tokens == 8
    assert not s.sample and not s.is_decode
    (s,) = step(sched).scheduled
    assert (s.token_ids, s.start_position, s.sample, s.is_decode) == ((c_tokens[-1],), 8, True, True)
    assert c.status == RequestStatus.FINISHED_LENGTH
    assert c.output_token_ids == [1000, 1001, 1002, 1003]
    assert_all_free(sched)


def test_preemption_of_the_request_itself_when_it_is_last():
    # 4 blocks of 4. a (6 tokens) and b (8 tokens) hold 2 blocks each. Next step a's decode at
    # position 6 still fits its blocks, b's at position 8 needs a 3rd: b is the last admitted,
    # so b preempts itself and a runs on.
    sched = make_scheduler(num_blocks=4, block_size=4, max_num_batched_tokens=100)
    a = make_request("a", 6, max_tokens=3)
    b = make_request("b", 8, max_tokens=3)
    sched.add_request(a)
    sched.add_request(b)
    step(sched)
    assert sched.kv.num_free_blocks == 0
    out = step(sched)
    assert sizes(out) == {"a": 1}
    assert out.preempted_request_ids == ("b",)
    assert b.status == RequestStatus.PREEMPTED and b.num_computed_tokens == 0
    assert list(sched.waiting) == [b]
    assert sched.kv.num_free_blocks == 2
    run_to_end(sched)
    assert a.output_token_ids == b.output_token_ids == [1000, 1001, 1002]
    assert b.num_preemptions == 1
    assert_all_free(sched)


def test_recompute_after_preemption_keeps_outputs():
    sched = make_scheduler(num_blocks=4, block_size=4, max_num_batched_tokens=100)
    sched.add_request(make_request("a", 6, max_tokens=10))
    sched.add_request(make_request("b", 6, max_tokens=10))
    seen: list[SchedulerOutput] = []
    while sched.has_unfinished_requests():
        seen.append(step(sched))
    preempted = [rid for o in seen for rid in o.preempted_request_ids]
    assert preempted == ["b"]  # step 4: a needs a 3rd block at position 8
    assert [sizes(o) for o in seen[:4]] == [{"a": 6, "b": 6}, {"a": 1, "b": 1}, {"a": 1, "b": 1}, {"a": 1}]
    # b resumed after a finished: 6 prompt + 2 outputs recomputed from position 0 without
    # sampling, then its last token (position 8) as a decode row, as it would have run unpreempted
    i = next(i for i, o in enumerate(seen) if sizes(o).get("b", 0) > 1 and i > 0)
    resume, after = seen[i].scheduled[0], seen[i + 1].scheduled[0]
    assert sizes(seen[i]) == {"b": 8} and not resume.sample and not resume.is_decode
    assert resume.token_ids == tuple([10 + i for i in range(6)] + [1000, 1001])
    assert (after.token_ids, after.start_position, after.sample, after.is_decode) == ((1002,), 8, True, True)
    assert_all_free(sched)


# ---- stop rules -------------------------------------------------------------------------------


def tokens_from(seq: list[int]) -> Callable[[Request], int]:
    return lambda req: seq[req.num_output_tokens]


def test_eos_stops():
    sched = make_scheduler()
    req = make_request("a", 5, max_tokens=10, eos=EOS)
    sched.add_request(req)
    run_to_end(sched, tokens_from([7, 8, EOS, 9, 9]))
    assert req.output_token_ids == [7, 8, EOS]
    assert req.status == RequestStatus.FINISHED_STOPPED
    assert req.status.finish_reason == "stop"
    assert req.stop_reason is None
    assert req.exit_layers == [FULL_DEPTH] * 3
    assert_all_free(sched)


def test_every_eos_id_stops_after_min_tokens():
    # Issue 18 item 4: a model with several EOS ids (generation_config.json) stops on any.
    for seq, expected in (([7, 77, 9], [7, 77]), ([7, EOS, 9], [7, EOS])):
        sched = make_scheduler()
        req = make_request("a", 5, max_tokens=10, eos=(EOS, 77))
        sched.add_request(req)
        run_to_end(sched, tokens_from(seq))
        assert req.output_token_ids == expected and req.status == RequestStatus.FINISHED_STOPPED
    sched = make_scheduler()
    req = make_request("a", 5, max_tokens=10, eos=(EOS, 77), min_tokens=2)
    sched.add_request(req)
    run_to_end(sched, tokens_from([77, 5, 77, 9]))
    assert req.output_token_ids == [77, 5, 77]  # the first 77 is below min_tokens
    sched = make_scheduler()
    req = make_request("a", 5, max_tokens=4, eos=(EOS, 77), ignore_eos=True)
    sched.add_request(req)
    run_to_end(sched, tokens_from([77, EOS, 77, 9]))
    assert req.output_token_ids == [77, EOS, 77, 9] and req.status == RequestStatus.FINISHED_LENGTH
    assert_all_free(sched)


def test_ignore_eos():
    sched = make_scheduler()
    req = make_request("a", 5, max_tokens=5, eos=EOS, ignore_eos=True)
    sched.add_request(req)
    run_to_end(sched, tokens_from([7, EOS, EOS, 8, 9]))
    assert req.output_token_ids == [7, EOS, EOS, 8, 9]
    assert req.status == RequestStatus.FINISHED_LENGTH
    assert_all_free(sched)


def test_stop_token_ids_set_stop_reason():
    sched = make_scheduler()
    req = make_request("a", 5, max_tokens=10, eos=EOS, stop_token_ids=[42, 43], ignore_eos=True)
    sched.add_request(req)
    run_to_end(sched, tokens_from([7, EOS, 43, 9]))
    assert req.output_token_ids == [7, EOS, 43]
    assert req.status == RequestStatus.FINISHED_STOPPED
    assert req.stop_reason == 43
    assert_all_free(sched)


def test_min_tokens_delays_eos_and_stop_tokens():
    sched = make_scheduler()
    req = make_request("a", 5, max_tokens=10, eos=EOS, min_tokens=3, stop_token_ids=[42])
    sched.add_request(req)
    run_to_end(sched, tokens_from([EOS, 42, EOS, 9]))
    # outputs 1 and 2 are below min_tokens; the third (EOS) counts
    assert req.output_token_ids == [EOS, 42, EOS]
    assert req.status == RequestStatus.FINISHED_STOPPED
    assert_all_free(sched)


def test_max_tokens_finishes_with_length():
    sched = make_scheduler()
    req = make_request("a", 5, max_tokens=4, eos=EOS)
    sched.add_request(req)
    steps = run_to_end(sched)
    assert steps == 4  # one prefill step, then 3 decode steps
    assert req.output_token_ids == [1000, 1001, 1002, 1003]
    assert req.status == RequestStatus.FINISHED_LENGTH
    assert req.status.finish_reason == "length"
    assert_all_free(sched)


def test_max_model_len_finishes_with_length():
    sched = make_scheduler(max_model_len=12)
    req = make_request("a", 8, max_tokens=100)
    sched.add_request(req)
    run_to_end(sched)
    assert req.num_tokens == 12
    assert req.num_output_tokens == 4
    assert req.status == RequestStatus.FINISHED_LENGTH
    assert_all_free(sched)


# ---- abort and bad requests ----------------------------------------------------------------------


def test_abort_frees_blocks_running_and_waiting():
    sched = make_scheduler(num_blocks=10, block_size=4, max_num_seqs=1)
    sched.add_request(make_request("a", 9, max_tokens=10))
    sched.add_request(make_request("b", 9, max_tokens=10))
    step(sched)
    assert sched.kv.block_ids("a") == (0, 1, 2)
    assert sched.kv.num_free_blocks == 7
    done = sched.finish_requests(["a", "b", "nope"], RequestStatus.FINISHED_ABORTED)
    assert [r.request_id for r in done] == ["a", "b"]
    assert all(r.status == RequestStatus.FINISHED_ABORTED and r.status.finish_reason == "abort" for r in done)
    assert sched.finish_requests(["a"], RequestStatus.FINISHED_ABORTED) == []  # already gone
    assert_all_free(sched)
    # an aborted request's scheduled row is skipped by update_from_output
    sched.add_request(make_request("c", 4, max_tokens=10))
    out = sched.schedule()
    sched.finish_requests(["c"], RequestStatus.FINISHED_ABORTED)
    assert sched.update_from_output(out, fake_run_after_abort(out)) == []
    assert_all_free(sched)


def fake_run_after_abort(out: SchedulerOutput) -> ModelRunnerOutput:
    return ModelRunnerOutput(sampled={s.request_id: SampledToken(5, FULL_DEPTH) for s in out.scheduled if s.sample})


def test_prompt_too_long_for_context():
    sched = make_scheduler(max_model_len=32)
    with pytest.raises(ValueError) as e:
        sched.add_request(make_request("a", 40))
    assert "40" in str(e.value) and "32" in str(e.value)
    with pytest.raises(ValueError, match="32"):  # equal leaves no room for a generated token
        sched.add_request(make_request("b", 32))
    sched.add_request(make_request("c", 31, max_tokens=5))
    run_to_end(sched)
    assert_all_free(sched)


def test_prompt_larger_than_whole_cache_is_refused():
    sched = make_scheduler(num_blocks=4, block_size=4, max_model_len=1024)  # 16 slots
    with pytest.raises(ValueError) as e:
        sched.add_request(make_request("a", 16))
    assert "16" in str(e.value)
    sched.add_request(make_request("b", 3))
    with pytest.raises(ValueError, match="already in use"):
        sched.add_request(make_request("b", 3))


def test_empty_prompt_is_refused():
    sched = make_scheduler()
    with pytest.raises(ValueError, match="at least one token"):
        sched.add_request(make_request("a", 0))


def test_request_that_outgrows_the_cache_finishes_with_length():
    # 16 slots; the prompt fits but prompt + 20 outputs never can.
    sched = make_scheduler(num_blocks=4, block_size=4, max_model_len=1024)
    req = make_request("a", 10, max_tokens=20)
    sched.add_request(req)
    finished_in_schedule = []
    steps = 0
    while sched.has_unfinished_requests():
        out = step(sched)
        finished_in_schedule += out.finished_request_ids
        steps += 1
        assert steps < 100
    # the 7th output makes 17 tokens; computing KV at position 16 needs a 5th block
    assert req.num_output_tokens == 7
    assert req.status == RequestStatus.FINISHED_LENGTH
    assert finished_in_schedule == ["a"]
    assert_all_free(sched)


def test_outgrown_request_alone_after_others_finish():
    # b grows past the 16-slot cache while a is there: at step 4 b needs a 3rd block and the
    # last admitted (a) is preempted; b then runs alone until position 16 needs a 5th block and
    # is finished with length (11 outputs); a resumes and completes.
    sched = make_scheduler(num_blocks=4, block_size=4, max_num_batched_tokens=100)
    b = make_request("b", 6, max_tokens=30)
    a = make_request("a", 3, max_tokens=6)
    sched.add_request(b)
    sched.add_request(a)
    outs = [step(sched) for _ in range(4)]
    assert [o.preempted_request_ids for o in outs] == [(), (), (), ("a",)]
    assert a.num_output_tokens == 3 and a.num_computed_tokens == 0
    run_to_end(sched)
    assert b.status == RequestStatus.FINISHED_LENGTH
    assert b.num_output_tokens == 11
    assert a.status == RequestStatus.FINISHED_LENGTH
    assert a.output_token_ids == [1000 + i for i in range(6)]
    assert a.num_preemptions == 1
    assert_all_free(sched)


# ---- randomized ---------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_randomized_tight_cache(seed: int):
    rng = random.Random(seed)
    block_size = 4
    max_num_seqs = 6
    budget = 64
    sched = make_scheduler(
        num_blocks=40, block_size=block_size, max_num_seqs=max_num_seqs,
        max_num_batched_tokens=budget, max_model_len=1024,
    )
    reqs: list[Request] = []
    pending = [
        make_request(f"r{i}", rng.randint(1, 100), max_tokens=rng.randint(1, 40)) for i in range(50)
    ]
    # the randomized lengths all fit the 160-slot cache on their own
    assert all(r.num_prompt_tokens + r.max_tokens <= 160 for r in pending)
    steps = 0
    num_preempted = 0
    while pending or sched.has_unfinished_requests():
        # requests arrive over time
        for _ in range(rng.randint(0, 3)):
            if pending:
                r = pending.pop(0)
                sched.add_request(r)
                reqs.append(r)
        out = sched.schedule()
        sched.kv.check_integrity()
        assert out.num_batched_tokens == sum(s.num_new_tokens for s in out.scheduled) <= budget
        assert len(out.scheduled) <= max_num_seqs
        assert len(sched.running) <= max_num_seqs
        assert out.finished_request_ids == ()  # everything fits on its own
        num_preempted += len(out.preempted_request_ids)
        for s in out.scheduled:
            req = sched.requests[s.request_id]
            assert s.start_position == req.num_computed_tokens
            assert len(s.block_ids) * block_size >= s.start_position + s.num_new_tokens
            assert s.sample == (s.start_position + s.num_new_tokens == req.num_tokens)
        sched.update_from_output(out, fake_run(sched, out))
        sched.kv.check_integrity()
        steps += 1
        assert steps < 20_000
    assert len(reqs) == 50
    for r in reqs:
        assert r.status == RequestStatus.FINISHED_LENGTH
        assert r.output_token_ids == [1000 + i for i in range(r.max_tokens)]
        assert len(r.exit_layers) == r.max_tokens
    assert num_preempted > 0  # the budget is tight enough to exercise preemption
    assert_all_free(sched)


# ---- verify_exits: drafts, their verification, rollback -----------------------------------------


def _draft(token_id: int) -> SampledToken:
    return SampledToken(token_id, exit_layer=4, draft=True)


def _full(token_id: int) -> SampledToken:
    return SampledToken(token_id, exit_layer=FULL_DEPTH)


def _apply(sched: Scheduler, sampled: dict, verified: dict | None = None) -> tuple[SchedulerOutput, list[Request]]:
    """One step with scripted tokens; every decode row costs 10 FLOPs, 30 at full depth."""
    out = sched.schedule()
    flops = {s.request_id: (10.0, 30.0) for s in out.scheduled if s.is_decode}
    updated = sched.update_from_output(out, ModelRunnerOutput(sampled=sampled, verified=verified or {},
                                                              request_flops=flops))
    sched.kv.check_integrity()
    return out, updated


def test_drafts_kept_replaced_and_rolled_back_by_hand():
    sched = make_scheduler()
    req = make_request("a", num_prompt=4, max_tokens=10)
    sched.add_request(req)
    _apply(sched, {"a": _full(1000)})  # prefill: positions 0-3, first token at full depth
    out, updated = _apply(sched, {"a": _draft(1001)})  # position 4 exits: a draft
    assert sizes(out) == {"a": 1} and out.scheduled[0].start_position == 4
    assert updated == []  # nothing final to report
    assert (req.output_token_ids, req.num_draft_tokens, req.num_confirmed_tokens) == ([1000, 1001], 1, 1)
    out, updated = _apply(sched, {"a": _draft(1002)})  # position 5 (input: the draft) exits too
    assert out.scheduled[0].token_ids == (1001,) and updated == []
    assert req.num_draft_tokens == 2 and req.num_computed_tokens == 6
    # Position 6 runs all layers and completes positions 4 and 5: the full model picks 1001 at 4
    # (kept) and 7777 at 5 (the draft 1002 is replaced); 1003, sampled after 1002, is discarded.
    _, updated = _apply(sched, {"a": _full(1003)}, {"a": (_full(1001), _full(7777))})
    assert updated == [req]
    assert req.output_token_ids == [1000, 1001, 7777]
    assert req.exit_layers == [FULL_DEPTH, 4, FULL_DEPTH]
    assert req.num_draft_tokens == 0
    assert req.num_computed_tokens == 4 + 2  # position 6 gets its new input 7777 recomputed
    assert (sched.num_drafts_accepted, sched.num_drafts_rejected) == (1, 1)
    # FLOPs: 3 decode rows spent; the full-depth cost counts the 2 decode tokens kept
    assert (req.flops, req.full_flops) == (30.0, 60.0)
    out, _ = _apply(sched, {"a": _full(1004)})
    assert out.scheduled[0].token_ids == (7777,) and out.scheduled[0].start_position == 6
    assert out.scheduled[0].is_decode
    assert req.output_token_ids == [1000, 1001, 7777, 1004]
    sched.finish_requests(["a"], RequestStatus.FINISHED_ABORTED)
    assert_all_free(sched)


def test_a_draft_eos_stops_only_once_verified():
    sched = make_scheduler()
    req = make_request("a", num_prompt=3, max_tokens=10, eos=EOS)
    sched.add_request(req)
    _apply(sched, {"a": _full(1000)})
    _apply(sched, {"a": _draft(EOS)})
    assert not req.is_finished and req.num_draft_tokens == 1  # a draft EOS does not stop
    # verified: EOS is what the full model picks; the token sampled after it is dropped
    _, updated = _apply(sched, {"a": _full(1001)}, {"a": (_full(EOS),)})
    assert updated == [req] and req.status == RequestStatus.FINISHED_STOPPED
    assert req.output_token_ids == [1000, EOS] and req.exit_layers == [FULL_DEPTH, 4]
    assert_all_free(sched)

    # a rejected draft EOS: generation goes on from the full model's token
    req = make_request("b", num_prompt=3, max_tokens=10, eos=EOS)
    sched.add_request(req)
    _apply(sched, {"b": _full(1000)})
    _apply(sched, {"b": _draft(EOS)})
    _apply(sched, {"b": _full(1001)}, {"b": (_full(555),)})
    assert not req.is_finished and req.output_token_ids == [1000, 555]
    sched.finish_requests(["b"], RequestStatus.FINISHED_ABORTED)
    assert_all_free(sched)


def test_preemption_drops_unverified_drafts():
    sched = make_scheduler()
    req = make_request("a", num_prompt=4, max_tokens=10)
    sched.add_request(req)
    _apply(sched, {"a": _full(1000)})
    _apply(sched, {"a": _draft(1001)})
    sched._preempt(req)
    assert req.output_token_ids == [1000] and req.num_draft_tokens == 0 and req.exit_layers == [FULL_DEPTH]
    out, _ = _apply(sched, {})  # resumes: the prompt at full depth, without sampling
    assert out.scheduled[0].token_ids == (10, 11, 12, 13) and not out.scheduled[0].sample
    out, _ = _apply(sched, {"a": _full(1001)})  # then the confirmed token as a decode row
    assert out.scheduled[0].token_ids == (1000,) and out.scheduled[0].is_decode
    assert req.output_token_ids == [1000, 1001]
    sched.finish_requests(["a"], RequestStatus.FINISHED_ABORTED)
    assert_all_free(sched)


def test_first_draft_of_a_chain_replaced_discards_the_chain():
    sched = make_scheduler()
    req = make_request("a", num_prompt=4, max_tokens=10)
    sched.add_request(req)
    _apply(sched, {"a": _full(1000)})
    _apply(sched, {"a": _draft(1001)})
    _apply(sched, {"a": _draft(1002)})
    # the full model picks 5555 where 1001 was drafted: 1002 and the new 1003 were computed from it
    _apply(sched, {"a": _full(1003)}, {"a": (_full(5555), _full(1002))})
    assert req.output_token_ids == [1000, 5555] and req.exit_layers == [FULL_DEPTH, FULL_DEPTH]
    assert req.num_computed_tokens == 4 + 1 and req.num_draft_tokens == 0
    assert (req.flops, req.full_flops) == (30.0, 30.0)  # three rows spent, one decode token kept
    out, _ = _apply(sched, {"a": _full(1002)})
    assert out.scheduled[0].token_ids == (5555,) and out.scheduled[0].start_position == 5
    sched.finish_requests(["a"], RequestStatus.FINISHED_ABORTED)
    assert_all_free(sched)
