"""Sampler tests: every expected value is computed by hand or with plain torch/math."""

import math

import pytest
import torch

from eeserve.sampling_params import SamplingParams
from eeserve.worker.sampler import Sampler, SamplingMetadata, apply_penalties


def _meta(params, prompts=None, outputs=None, seeds=None, eos=None):
    B = len(params)
    return SamplingMetadata(
        params=params,
        prompt_token_ids=prompts if prompts is not None else [[] for _ in range(B)],
        output_token_ids=outputs if outputs is not None else [[] for _ in range(B)],
        seeds=seeds if seeds is not None else [None] * B,
        eos_token_ids=[(e,) if isinstance(e, int) else tuple(e) for e in eos] if eos is not None else [()] * B,
    )


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _sample_ids(logits_row, params, n=4000, seed=0):
    """Sample n times from one distribution (n identical rows); return the list of ids."""
    logits = logits_row.unsqueeze(0).repeat(n, 1)
    out = Sampler(_gen(seed))(logits, _meta([params] * n))
    return out.token_ids.tolist()


def test_greedy_argmax():
    logits = torch.tensor([[0.1, 2.0, -1.0, 1.9], [5.0, 1.0, 0.0, 0.0], [-3.0, -2.0, -1.0, -1.5]])
    out = Sampler(_gen(0))(logits, _meta([SamplingParams(temperature=0.0)] * 3))
    assert out.token_ids.dtype == torch.int64
    assert out.token_ids.tolist() == [1, 0, 2]
    assert out.logprobs == [None, None, None]


def test_sampler_does_not_modify_logits():
    logits = torch.tensor([[1.0, 2.0, 3.0]])
    before = logits.clone()
    Sampler(_gen(0))(logits, _meta([SamplingParams(repetition_penalty=2.0, min_tokens=1)],
                                   outputs=[[2]], eos=[1]))
    assert torch.equal(logits, before)


def test_top_k_1_equals_greedy():
    torch.manual_seed(0)
    logits = torch.randn(64, 500) * 3
    expected = logits.argmax(dim=-1).tolist()
    params = [SamplingParams(temperature=1.0, top_k=1)] * 64
    out = Sampler(_gen(1))(logits, _meta(params))
    assert out.token_ids.tolist() == expected
    seeded = Sampler(_gen(2))(logits, _meta(params, seeds=list(range(64))))
    assert seeded.token_ids.tolist() == expected


def test_top_k_keeps_k_best():
    logits = torch.tensor([1.0, 4.0, 3.0, 2.0, 0.5])
    ids = _sample_ids(logits, SamplingParams(temperature=1.0, top_k=2))
    assert set(ids) == {1, 2}


@pytest.mark.parametrize(
    "top_p, expected",
    [
        (0.4, {0}),  # 0.5 >= 0.4 alone
        (0.7, {0, 1}),  # 0.5 < 0.7, 0.75 >= 0.7
        (0.8, {0, 1, 2}),  # 0.75 < 0.8, 0.9 >= 0.8
        (0.95, {0, 1, 2, 3}),  # 0.9 < 0.95
        (1.0, {0, 1, 2, 3}),
    ],
)
def test_top_p_keeps_smallest_set(top_p, expected):
    probs = torch.tensor([0.5, 0.25, 0.15, 0.10])
    logits = probs.log()[[2, 0, 3, 1]]  # shuffled: ids 1, 3, 0, 2 have probs .5, .25, .15, .10
    remap = {0: 1, 1: 3, 2: 0, 3: 2}  # index in `probs` -> token id
    ids = _sample_ids(logits, SamplingParams(temperature=1.0, top_p=top_p))
    assert set(ids) == {remap[i] for i in expected}


@pytest.mark.parametrize("top_p, expected", [(0.5, {0}), (0.75, {0, 1}), (0.875, {0, 1, 2})])
def test_top_p_mass_exactly_on_p(top_p, expected):
    # Dyadic probabilities are exact in float32, so the mass of the best tokens lands exactly on
    # p: 0.5, 0.5 + 0.25 = 0.75, 0.875. The smallest set whose mass is >= p stops there (vLLM's
    # and transformers' rule); a strict ">" would keep one token more.
    from transformers.generation.logits_process import TopPLogitsWarper

    probs = torch.tensor([0.5, 0.25, 0.125, 0.0625, 0.0625])
    logits = probs.log()[[3, 0, 4, 2, 1]]  # shuffled: ids 1, 4, 3, 0, 2 have probs .5, .25, .125, ...
    remap = {0: 1, 1: 4, 2: 3, 3: 0, 4: 2}  # index in `probs` -> token id
    kept = {remap[i] for i in expected}
    ref = TopPLogitsWarper(top_p)(None, logits.unsqueeze(0).clone())[0]
    assert {i for i, v in enumerate(ref.tolist()) if v > float("-inf")} == kept  # the reference agrees
    assert set(_sample_ids(logits, SamplingParams(temperature=1.0, top_p=top_p), n=2000)) == kept


def test_top_p_applies_after_temperature():
    # temperature 0.5 squares the probabilities: [0.6, 0.3, 0.1] -> [.36, .09, .01] / .46
    # = [0.783, 0.196, 0.022]. With top_p = 0.75: temperature 0.5 keeps {0} (0.783 >= 0.75),
    # temperature 1 keeps {0, 1} (0.6 < 0.75, 0.9 >= 0.75).
    probs = torch.tensor([0.6, 0.3, 0.1])
    hot = _sample_ids(probs.log(), SamplingParams(temperature=1.0, top_p=0.75))
    cold = _sample_ids(probs.log(), SamplingParams(temperature=0.5, top_p=0.75))
    assert set(hot) == {0, 1}
    assert set(cold) == {0}


@pytest.mark.parametrize(
    "min_p, expected",
    [
        (0.6, {0, 1}),  # threshold 0.24: drops 0.2 and 0.1
        (0.3, {0, 1, 2}),  # threshold 0.12: drops 0.1
        (0.2, {0, 1, 2, 3}),  # threshold 0.08
        (0.0, {0, 1, 2, 3}),
    ],
)
def test_min_p(min_p, expected):
    probs = torch.tensor([0.4, 0.3, 0.2, 0.1])
    ids = _sample_ids(probs.log(), SamplingParams(temperature=1.0, min_p=min_p))
    assert set(ids) == expected


def test_penalties_hand_computed():
    logits = torch.tensor(
        [
            [2.0, -1.0, 0.5, 3.0, -2.0],
            [2.0, -1.0, 0.5, 3.0, -2.0],
            [1.0, 1.0, 1.0, 1.0, 1.0],
        ]
    )
    out = apply_penalties(
        logits.clone(),
        prompt_token_ids=[[0], [0], [4]],
        output_token_ids=[[1, 1, 3], [1, 1, 3], [2, 2, 2, 0]],
        repetition_penalties=torch.tensor([2.0, 1.0, 1.0]),
        frequency_penalties=torch.tensor([0.5, 0.0, -0.5]),
        presence_penalties=torch.tensor([0.25, 0.0, 1.0]),
    )
    # row 0: repetition over {0, 1, 3}: 2/2 = 1, -1*2 = -2, 3/2 = 1.5;
    #        then id 1 (count 2): -2 - (0.5*2 + 0.25) = -3.25; id 3 (count 1): 1.5 - 0.75 = 0.75
    # row 1: no penalty at all
    # row 2: id 2 (count 3): 1 - (-0.5*3 + 1) = 1.5; id 0 (count 1): 1 - (-0.5 + 1) = 0.5;
    #        id 4 is only in the prompt: frequency/presence ignore it
    expected = torch.tensor(
        [
            [1.0, -3.25, 0.5, 0.75, -2.0],
            [2.0, -1.0, 0.5, 3.0, -2.0],
            [0.5, 1.0, 1.5, 1.0, 1.0],
        ]
    )
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-6)


def test_repetition_penalty_prompt_only():
    out = apply_penalties(
        torch.tensor([[4.0, -4.0, 4.0]]),
        [[0, 1]],
        [[]],
        torch.tensor([4.0]),
        torch.tensor([0.0]),
        torch.tensor([0.0]),
    )
    torch.testing.assert_close(out, torch.tensor([[1.0, -16.0, 4.0]]), rtol=0, atol=0)


def test_penalties_change_greedy_choice():
    logits = torch.tensor([[3.0, 2.0, 0.0]])
    params = SamplingParams(temperature=0.0, presence_penalty=2.0)
    out = Sampler(_gen(0))(logits, _meta([params], outputs=[[0]]))
    assert out.token_ids.tolist() == [1]  # 3 - 2 = 1 < 2


def test_min_tokens_blocks_eos_and_stop_ids():
    logits = torch.tensor([[0.0, 1.0, 5.0, 10.0]])  # eos = 3, stop id = 2
    params = SamplingParams(temperature=0.0, min_tokens=2, stop_token_ids=[2])
    sampler = Sampler(_gen(0))
    blocked = sampler(logits, _meta([params], outputs=[[1]], eos=[3]))
    assert blocked.token_ids.tolist() == [1]
    free = sampler(logits, _meta([params], outputs=[[1, 1]], eos=[3]))
    assert free.token_ids.tolist() == [3]
    # ignore_eos does not lift the min_tokens mask either
    params_ie = SamplingParams(temperature=0.0, min_tokens=2, ignore_eos=True)
    out = sampler(logits, _meta([params_ie], outputs=[[]], eos=[3]))
    assert out.token_ids.tolist() == [2]
    # sampling: never eos or stop id while below min_tokens
    n = 2000
    sp = SamplingParams(temperature=1.0, min_tokens=5, stop_token_ids=[2])
    out = sampler(
        torch.zeros(n, 4), _meta([sp] * n, outputs=[[0]] * n, eos=[3] * n)
    )
    assert set(out.token_ids.tolist()) == {0, 1}
    # a model with several EOS ids (generation_config.json): every one is masked
    out = sampler(torch.zeros(n, 5), _meta([sp] * n, outputs=[[0]] * n, eos=[(3, 4)] * n))
    assert set(out.token_ids.tolist()) == {0, 1}


def test_logprobs_raw_values_and_rank():
    torch.manual_seed(3)
    logits = torch.randn(3, 50)
    params = [
        SamplingParams(temperature=0.0, logprobs=5),
        SamplingParams(temperature=0.7, top_k=10, logprobs=0, seed=1),
        SamplingParams(temperature=1.0),
    ]
    out = Sampler(_gen(0))(logits, _meta(params, seeds=[None, 1, None]))
    ref = torch.log_softmax(logits, dim=-1)
    assert out.logprobs[2] is None
    for row in (0, 1):
        lp = out.logprobs[row]
        tok = out.token_ids[row].item()
        assert lp.token_id == tok
        assert lp.logprob == pytest.approx(ref[row, tok].item(), abs=1e-6)
        assert lp.rank == 1 + int((ref[row] > ref[row, tok]).sum())
    assert out.logprobs[0].rank == 1
    vals, ids = ref[0].topk(5)
    assert [t for t, _ in out.logprobs[0].top] == ids.tolist()
    assert [v for _, v in out.logprobs[0].top] == pytest.approx(vals.tolist(), abs=1e-6)
    assert out.logprobs[1].top == ()


def test_logprobs_are_before_penalties():
    logits = torch.tensor([[3.0, 2.0, 0.0]])
    params = SamplingParams(temperature=0.0, presence_penalty=2.0, logprobs=2)
    out = Sampler(_gen(0))(logits, _meta([params], outputs=[[0]]))
    z = math.log(math.exp(3) + math.exp(2) + math.exp(0))
    lp = out.logprobs[0]
    assert lp.token_id == 1
    assert lp.rank == 2
    assert lp.logprob == pytest.approx(2.0 - z, abs=1e-6)
    assert lp.top[0][0] == 0 and lp.top[0][1] == pytest.approx(3.0 - z, abs=1e-6)
    assert lp.top[1][0] == 1


def test_same_seed_same_tokens_whatever_the_batch():
    # A seeded row's j-th token depends only on its logits, its seed and j: not on its batch
    # mates, their seeds, their index in the batch, or how often the sampler ran before.
    torch.manual_seed(0)
    V = 1000
    mine = torch.randn(V) * 0.5  # flat enough that tokens vary from step to step
    others = torch.randn(3, V)
    p_seed = SamplingParams(temperature=1.0, seed=7)
    p_other = SamplingParams(temperature=0.9, top_p=0.9)
    hist = [[0] * j for j in range(20)]  # the j-th output token of the request

    logits_a = torch.stack([mine, others[0]])
    sampler_a = Sampler(_gen(1))
    run_a = [sampler_a(logits_a, _meta([p_seed, p_other], outputs=[h, [1]], seeds=[7, None])).token_ids[0].item()
             for h in hist]
    logits_b = torch.stack([others[1], others[2], mine])
    params_b = [p_other, SamplingParams(temperature=1.0, seed=99, min_p=0.05), p_seed]
    sampler_b = Sampler(_gen(2))
    sampler_b(logits_b, _meta(params_b, seeds=[None, 99, 7]))  # an extra call first: no effect
    run_b = [sampler_b(logits_b, _meta(params_b, outputs=[[], [2] * 3, h], seeds=[None, 99, 7])).token_ids[2].item()
             for h in hist]
    run_alone = [Sampler(_gen(3))(mine.unsqueeze(0), _meta([p_seed], outputs=[h], seeds=[7])).token_ids[0].item()
                 for h in reversed(hist)][::-1]
    assert run_a == run_b == run_alone
    assert len(set(run_a)) > 5  # it really samples

    run_other_seed = [Sampler(_gen(1))(mine.unsqueeze(0), _meta([p_seed], outputs=[h], seeds=[8])).token_ids[0].item()
                      for h in hist]
    assert run_other_seed != run_a


def test_keyed_noise_samples_the_distribution_over_seeds_and_indices():
    # argmax(p / E) with E keyed by (seed, index) is an exact sample of p: over many seeds at one
    # index, and over many indices of one seed (chi-square, 3 degrees of freedom, p = 0.001).
    from eeserve.worker.sampler import exponential_race

    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    n = 4000
    expected = probs[0].double() * n
    over_seeds = [int(exponential_race(probs, [s], [0], None)[0]) for s in range(n)]
    over_indices = [int(exponential_race(probs, [12345], [j], None)[0]) for j in range(n)]
    for ids in (over_seeds, over_indices):
        counts = torch.bincount(torch.tensor(ids), minlength=4).double()
        assert float(((counts - expected) ** 2 / expected).sum()) < 16.27


def test_a_draft_is_kept_exactly_when_it_is_the_full_models_token():
    # verify_exits: a draft sampled from the exit's distribution q and the full model's token
    # from p use the same noise (same seed, same output index). The scheduler keeps the draft when
    # the two are equal, so every final token is the full model's own sample for that seed; the
    # coupling keeps the draft often when q is close to p, and never changes the result.
    torch.manual_seed(1)
    V = 64
    p_logits = torch.randn(V) * 2
    q_logits = p_logits + 0.3 * torch.randn(V)  # a good draft model
    params = SamplingParams(temperature=1.0)
    kept = 0
    for seed in range(300):
        sampler = Sampler(_gen(0))
        draft = sampler(q_logits[None], _meta([params], outputs=[[5, 6]], seeds=[seed])).token_ids[0].item()
        full = sampler(p_logits[None], _meta([params], outputs=[[5, 6]], seeds=[seed])).token_ids[0].item()
        alone = Sampler(_gen(9))(p_logits[None], _meta([params], outputs=[[5, 6]], seeds=[seed])).token_ids[0].item()
        assert full == alone  # the final token: what a run without drafts draws
        kept += draft == full
    tv = 0.5 * float((p_logits.softmax(-1) - q_logits.softmax(-1)).abs().sum())
    assert kept / 300 >= (1 - tv) / (1 + tv) - 0.08  # Gumbel-coupling bound, with sampling slack


def test_exponential_race_matches_probabilities():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    n = 20000
    ids = torch.tensor(_sample_ids(probs.log(), SamplingParams(temperature=1.0), n=n, seed=42))
    counts = torch.bincount(ids, minlength=4).double()
    expected = probs.double() * n
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 16.27  # chi-square, 3 degrees of freedom, p = 0.001


def test_temperature_sharpens():
    # temperature 0.5 squares probabilities: [0.6, 0.4] -> [0.36, 0.16] / 0.52
    probs = torch.tensor([0.6, 0.4])
    n = 20000
    ids = torch.tensor(_sample_ids(probs.log(), SamplingParams(temperature=0.5), n=n, seed=5))
    frac0 = (ids == 0).double().mean().item()
    assert frac0 == pytest.approx(0.36 / 0.52, abs=0.015)


def test_top_p_one_and_no_top_k_filter_nothing():
    # Issue 17 item 11: with top_k 0 and top_p 1.0 no entry may be masked, even where the
    # cumulative sum rounds to 1 before the last token.
    from eeserve.worker.sampler import apply_top_k_top_p

    torch.manual_seed(0)
    logits = torch.randn(2, 49152) * 4
    out = apply_top_k_top_p(logits.clone(), torch.tensor([0, 49152]), torch.tensor([1.0, 1.0]))
    assert torch.equal(out, logits)
    assert not torch.isinf(out).any()


def test_unfiltered_rows_are_untouched_by_their_batch_mates_filters():
    # A row that asks for no filtering has, bit for bit, the same logits after the filters and the
    # same sampled tokens whatever its batch mates ask.
    from eeserve.worker.sampler import apply_min_p, apply_top_k_top_p

    torch.manual_seed(2)
    V = 49152
    logits = torch.randn(4, V) * 3
    out = apply_top_k_top_p(logits.clone(), torch.tensor([0, 50, 0, 7]), torch.tensor([1.0, 1.0, 0.9, 0.5]))
    assert torch.equal(out[0], logits[0])
    assert int(torch.isfinite(out[1]).sum()) == 50  # the mates are filtered
    assert int(torch.isfinite(out[3]).sum()) <= 7
    out = apply_min_p(logits.clone(), torch.tensor([0.0, 0.1, 0.0, 0.0]))
    assert torch.equal(out[0], logits[0])

    plain = SamplingParams(temperature=0.8)
    mates = [SamplingParams(temperature=0.8, top_k=50), SamplingParams(temperature=1.2, top_p=0.9, min_p=0.05)]
    for seed in range(20):
        alone = Sampler(_gen(0))(logits[:1], _meta([plain], seeds=[seed])).token_ids[0].item()
        batch = Sampler(_gen(0))(logits[:3], _meta([plain, *mates], seeds=[seed, 1, None])).token_ids[0].item()
        assert alone == batch


def test_huge_top_k_filters_nothing():
    # top_k beyond the vocabulary keeps every token; the sampler never builds a tensor from it.
    logits = torch.tensor([[1.0, 4.0, 3.0, 2.0, 0.5]])
    ids = _sample_ids(logits[0], SamplingParams(temperature=1.0, top_k=2**40), n=2000)
    assert set(ids) == {0, 1, 2, 3, 4}
