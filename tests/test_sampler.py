"""Sampler tests: every expected value is computed by hand or with plain torch/math."""

import math

import pytest
import torch

from eeserve.sampling_params import SamplingParams
from eeserve.worker.sampler import Sampler, SamplingMetadata, apply_penalties


def _meta(params, prompts=None, outputs=None, generators=None, eos=None):
    B = len(params)
    return SamplingMetadata(
        params=params,
        prompt_token_ids=prompts if prompts is not None else [[] for _ in range(B)],
        output_token_ids=outputs if outputs is not None else [[] for _ in range(B)],
        generators=generators if generators is not None else [None] * B,
        eos_token_ids=eos if eos is not None else [None] * B,
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
    seeded = Sampler(_gen(2))(logits, _meta(params, generators=[_gen(i) for i in range(64)]))
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


def test_logprobs_raw_values_and_rank():
    torch.manual_seed(3)
    logits = torch.randn(3, 50)
    params = [
        SamplingParams(temperature=0.0, logprobs=5),
        SamplingParams(temperature=0.7, top_k=10, logprobs=0, seed=1),
        SamplingParams(temperature=1.0),
    ]
    out = Sampler(_gen(0))(logits, _meta(params, generators=[None, _gen(1), None]))
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
    torch.manual_seed(0)
    V = 1000
    mine = torch.randn(V) * 0.5  # flat enough that tokens vary from step to step
    others = torch.randn(3, V)
    p_seed = SamplingParams(temperature=1.0, seed=7)
    p_other = SamplingParams(temperature=0.9, top_p=0.9)

    g = _gen(7)
    logits_a = torch.stack([mine, others[0]])
    run_a = [
        Sampler(_gen(1))(logits_a, _meta([p_seed, p_other], generators=[g, None]))
        .token_ids[0]
        .item()
        for _ in range(20)
    ]
    g = _gen(7)
    g_b = _gen(99)
    logits_b = torch.stack([others[1], others[2], mine])
    params_b = [p_other, SamplingParams(temperature=1.0, seed=99, min_p=0.05), p_seed]
    run_b = [
        Sampler(_gen(2))(logits_b, _meta(params_b, generators=[None, g_b, g])).token_ids[2].item()
        for _ in range(20)
    ]
    g = _gen(7)
    run_alone = [
        Sampler(_gen(3))(mine.unsqueeze(0), _meta([p_seed], generators=[g])).token_ids[0].item()
        for _ in range(20)
    ]
    assert run_a == run_b == run_alone
    assert len(set(run_a)) > 5  # it really samples

    g8 = _gen(8)
    run_other_seed = [
        Sampler(_gen(1))(mine.unsqueeze(0), _meta([p_seed], generators=[g8])).token_ids[0].item()
        for _ in range(20)
    ]
    assert run_other_seed != run_a


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


def test_speculative_accept_samples_the_target_distribution():
    # Drafts drawn from q, verified against p: the tokens must be distributed as p, and a draft
    # kept with probability sum_x min(p(x), q(x)) (Leviathan et al. 2023, section 2.3).
    from eeserve.worker.sampler import speculative_accept

    p = torch.tensor([0.5, 0.3, 0.15, 0.05])
    q = torch.tensor([0.1, 0.6, 0.1, 0.2])
    g = torch.Generator().manual_seed(0)
    n = 20000
    drafts = torch.multinomial(q, n, replacement=True, generator=g).tolist()
    out = [speculative_accept(p, q, d, g) for d in drafts]
    freq = torch.bincount(torch.tensor(out), minlength=4).float() / n
    assert torch.allclose(freq, p, atol=0.015), freq
    kept = sum(o == d for o, d in zip(out, drafts)) / n
    assert kept == pytest.approx(float(torch.minimum(p, q).sum()), abs=0.015)  # 0.5


def test_sampler_verify_greedy_rows_and_rows_without_a_draft_distribution():
    sampler = Sampler(torch.Generator().manual_seed(0))
    logits = torch.tensor([[0.0, 3.0, 1.0], [2.0, 0.0, 1.0]])
    meta = SamplingMetadata(params=[SamplingParams(temperature=0.0, logprobs=1)] * 2, prompt_token_ids=[[0], [0]],
                            output_token_ids=[[], []], generators=[None, None], eos_token_ids=[None, None])
    out = sampler.verify(logits, meta, torch.tensor([1, 2]), [None, torch.tensor([0.0, 0.0, 1.0])])
    assert out.token_ids.tolist() == [1, 0]  # greedy: the argmax, whatever the draft
    assert out.logprobs[1].token_id == 0
    assert out.logprobs[1].logprob == pytest.approx(float(torch.log_softmax(logits[1], -1)[0]))


def test_return_probs_is_the_distribution_sampled_from():
    sampler = Sampler(torch.Generator().manual_seed(0))
    logits = torch.tensor([[0.0, 3.0, 1.0], [2.0, 0.0, 1.0]])
    meta = SamplingMetadata(params=[SamplingParams(temperature=0.0), SamplingParams(temperature=0.5)],
                            prompt_token_ids=[[0], [0]], output_token_ids=[[], []], generators=[None, None],
                            eos_token_ids=[None, None])
    out = sampler(logits, meta, return_probs=True)
    assert out.probs.tolist()[0] == [0.0, 1.0, 0.0]  # greedy: one-hot at the argmax
    assert torch.allclose(out.probs[1], torch.softmax(logits[1] / 0.5, -1))
