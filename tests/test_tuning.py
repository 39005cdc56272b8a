"""Exit-head tuning and calibration on a tiny random Llama (no tokenizer, no default model)."""

from __future__ import annotations

import json

import pytest
import torch

from eeserve.early_exit import drafts
from eeserve.model.exit_heads import ExitHeads, HeadSpec
from eeserve.model.llama import LlamaModel, ModelArgs
from eeserve.tuning import calibrate, cost_model, data, distill, search
from eeserve.tuning.evaluate import exit_table, expected_calibration_error, score_windows

IDENTITY = {"architecture": "LlamaForCausalLM", "num_layers": 4, "hidden_size": 64, "vocab_size": 128,
            "fingerprint": "tiny"}


@pytest.fixture(scope="module")
def tiny():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=128, max_position_embeddings=256, tie_word_embeddings=True,
                      initializer_range=0.3)
    hf = LlamaForCausalLM(cfg)
    model = LlamaModel(ModelArgs.from_hf_config(cfg), cfg, torch.float32, torch.device("cpu"), 256)
    model.load_hf_state_dict(hf.state_dict())
    return model


def _windows(n: int, length: int = 24, seed: int = 0) -> list[data.Window]:
    g = torch.Generator().manual_seed(seed)
    return [data.Window(torch.randint(0, 128, (length,), generator=g), 1) for _ in range(n)]


def test_features_match_full_forward(tiny):
    """The collected hidden states are the backbone's: the shared head on the last exit's state
    run through the remaining layers equals the final logits' top ids."""
    wins = _windows(3)
    feats = distill.collect_features(tiny, wins, (1, 2, 3), top_k=4, batch_tokens=40)
    assert feats.hidden.shape == (72, 3, 64) and feats.top_ids.shape == (72, 4)
    from eeserve.tuning.evaluate import _full_argmax

    top1 = torch.cat([_full_argmax(tiny, w) for w in wins])
    assert torch.equal(feats.top_ids[:, 0], top1)


@pytest.mark.parametrize("head_type", ["adapter", "mlp"])
def test_tuning_lowers_distillation_loss(tiny, head_type):
    wins = _windows(48, 32)
    train_w, held_w = data.split_windows(wins, 0.25, seed=0)
    train = distill.collect_features(tiny, train_w, (1, 2), top_k=8)
    held = distill.collect_features(tiny, held_w, (1, 2), top_k=8)
    heads = ExitHeads((1, 2), head_type, tiny, classifier=True, head_hidden=32)
    cfg = distill.TrainConfig(steps=80, batch_rows=128, lr=3e-2, union_k=8, negatives=16, eval_every=80)
    before = distill.heldout_kl(tiny, heads, held, cfg)
    log = distill.train_heads(tiny, heads, train, held, cfg)
    after = log.heldout[-1][1]
    # (on 1k rows of a random model the MLP starts to overfit sooner than the linear adapter)
    factor = 0.85 if head_type == "adapter" else 0.9
    assert all(a < factor * b for a, b in zip(after, before)), (before, after)
    # the full-vocabulary KL on held-out text drops too
    shared = exit_table(score_windows(tiny, ExitHeads((1, 2), "shared", tiny), held_w))
    tuned = exit_table(score_windows(tiny, heads, held_w))
    assert all(t["kl"] < s["kl"] for s, t in zip(shared, tuned))


def test_resume_continues_from_checkpoint(tiny, tmp_path):
    train = distill.collect_features(tiny, _windows(4), (2,), top_k=8)
    cfg = distill.TrainConfig(steps=6, batch_rows=32, union_k=8, negatives=8, ckpt_every=3)
    a = ExitHeads((2,), "adapter", tiny, classifier=True)
    distill.train_heads(tiny, a, train, None, cfg)
    b = ExitHeads((2,), "adapter", tiny, classifier=True)
    distill.train_heads(tiny, b, train, None, cfg, tmp_path / "ck.pt", stop_after=3)  # interrupted
    b = ExitHeads((2,), "adapter", tiny, classifier=True)  # a fresh process
    log = distill.train_heads(tiny, b, train, None, cfg, tmp_path / "ck.pt", resume=True)
    assert [s for s, _ in log.train] == list(range(1, 7))
    for (k, va), vb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.allclose(va, vb, atol=1e-6), k
    # a checkpoint of other exit layers / another schedule is refused with a clear error
    c = ExitHeads((1,), "adapter", tiny, classifier=True)
    with pytest.raises(ValueError, match=r"exit layers \[2\].*exit layers \[1\]"):
        distill.train_heads(tiny, c, train, None, cfg, tmp_path / "ck.pt", resume=True)
    longer = distill.TrainConfig(steps=9, batch_rows=32, union_k=8, negatives=8)
    with pytest.raises(ValueError, match="--steps 6"):
        distill.train_heads(tiny, ExitHeads((2,), "adapter", tiny, classifier=True), train, None, longer,
                            tmp_path / "ck.pt", resume=True)


@pytest.mark.parametrize("vocab,hidden_state", [(0, True), (16, True), (16, False)])
def test_classifier_fit_on_exact_labels(tiny, vocab, hidden_state):
    train = distill.collect_features(tiny, _windows(32, 32), (1, 2), top_k=8)
    heads = ExitHeads((1, 2), "adapter", tiny, classifier=True, classifier_hidden=16 if hidden_state else 0,
                      classifier_vocab=vocab, classifier_hidden_state=hidden_state)
    distill.choose_candidates(tiny, heads, train)
    rows = torch.arange(train.num_rows)
    labels = distill.exit_labels(tiny, heads, train, rows)
    # labels by hand: the exit head's full-vocabulary argmax against the teacher's top-1
    for i, e in enumerate((1, 2)):
        by_hand = heads[e].logits(tiny, train.hidden[rows, i].float()).argmax(-1) == train.top_ids[:, 0]
        assert torch.equal(labels[:, i], by_hand)
    share = distill.fit_classifiers(tiny, heads, train, distill.ClassifierConfig(
        rows=train.num_rows, steps=300, batch_rows=256, lr=1e-2 if hidden_state else 5e-2))
    assert share == pytest.approx(labels.float().mean(0).tolist())
    if vocab:
        # candidates: the 16 most frequent teacher top-1 ids (ties aside), counted by hand
        from collections import Counter

        counts = Counter(train.top_ids[:, 0].tolist())
        cand = heads[1].candidate_ids.tolist()
        assert len(set(cand)) == 16 and min(counts[c] for c in cand) >= max(
            (n for t, n in counts.items() if t not in cand), default=0)
        # the probe's extra inputs: softmax statistics over the candidates' logits
        h = train.hidden[:5, 0].float()
        x = heads[1].classifier_inputs(tiny, h)
        lg = heads[1].logits(tiny, h, heads[1].candidate_ids.expand(5, -1))
        p = lg.softmax(-1)
        d = 64 if hidden_state else 0
        assert x.shape == (5, d + 5)
        if hidden_state:
            assert torch.allclose(x[:, :64], h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6), atol=1e-4)
        assert torch.allclose(x[:, d], p.max(-1).values, atol=1e-5)
        assert torch.allclose(x[:, d + 1], p.topk(2, -1).values[:, 1], atol=1e-5)
        assert torch.allclose(x[:, d + 2], -(p * p.log()).sum(-1) / 5, atol=1e-5)
        assert torch.allclose(x[:, d + 3], lg.max(-1).values / 20, atol=1e-5)
        assert torch.allclose(x[:, d + 4], lg.logsumexp(-1) / 20, atol=1e-5)
    # the fitted probe beats the best constant guess (the base rate) on the rows it was fitted on;
    # on this random model the five logit statistics say little, so the statistics-only probe
    # must at least match the base rate and be right on average (checks the folded scaling)
    for i, e in enumerate((1, 2)):
        with torch.no_grad():
            p = heads[e].classifier_prob(train.hidden[:, i].float(), tiny).clamp(1e-6, 1 - 1e-6)
        y = labels[:, i].float()
        q = y.mean().clamp(1e-6, 1 - 1e-6)
        bce = -(y * p.log() + (1 - y) * (1 - p).log()).mean()
        base = -(q * q.log() + (1 - q) * (1 - q).log())
        if hidden_state:
            assert bce < 0.8 * base, (e, float(bce), float(base))
        else:
            assert bce <= base and abs(float(p.mean() - q)) < 0.02, (e, float(bce), float(base), float(p.mean()))
    with pytest.raises(ValueError, match="no classifier"):
        distill.fit_classifiers(tiny, ExitHeads((1,), "adapter", tiny), train, distill.ClassifierConfig())
    with pytest.raises(ValueError, match="classifier_vocab must be in 2"):
        ExitHeads((1,), "adapter", tiny, classifier=True, classifier_vocab=0, classifier_hidden_state=False)


def test_head_spec_normalises_and_round_trips(tiny, tmp_path):
    # sizes that do not apply are dropped, so equal heads have equal specs
    assert HeadSpec("adapter", head_hidden=64, classifier_vocab=8) == HeadSpec("adapter")
    assert HeadSpec("mlp", 32, classifier=False, classifier_hidden=8).classifier_hidden == 0
    assert not HeadSpec("mlp", 32, classifier=True, classifier_vocab=8, classifier_hidden_state=False).classifier_hidden_state
    assert HeadSpec("mlp", 32).classifier_hidden_state  # without a probe: the default
    spec = HeadSpec("mlp", 32, True, 0, 8, False)
    assert HeadSpec.from_json(json.loads(json.dumps(spec.to_json()))) == spec
    with pytest.raises(ValueError, match="head_hidden must be a positive size"):
        HeadSpec("mlp", 0)
    with pytest.raises(ValueError, match="head_type must be one of"):
        HeadSpec("linear")
    heads = ExitHeads((1, 2), "mlp", tiny, classifier=True, head_hidden=16, classifier_vocab=8,
                      classifier_hidden_state=False)
    heads.save(tmp_path, IDENTITY)
    assert ExitHeads.load(tmp_path, tiny, IDENTITY).spec == heads.spec
    assert all(heads[e].spec is heads.spec for e in (1, 2))  # one owner
    cfg = json.loads((tmp_path / "exit_config.json").read_text())
    cfg["head_type"] = "bogus"
    (tmp_path / "exit_config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="exit heads in .*head_type must be one of"):
        ExitHeads.load(tmp_path, tiny, IDENTITY)


@pytest.mark.parametrize("hidden", [0, 4])
def test_fold_standardization(hidden):
    torch.manual_seed(0)
    probe = (torch.nn.Linear(3, 1) if not hidden else
             torch.nn.Sequential(torch.nn.Linear(3, hidden), torch.nn.GELU(), torch.nn.Linear(hidden, 1)))
    mean, std = torch.tensor([1.0, -2.0, 0.5]), torch.tensor([0.1, 3.0, 1.0])
    x = torch.randn(6, 3) * 2
    with torch.no_grad():
        want = probe((x - mean) / std)
    distill._fold_standardization(probe, mean, std)
    with torch.no_grad():
        assert torch.allclose(probe(x), want, atol=1e-5)


@pytest.mark.parametrize("head_type", ["adapter", "mlp", "untied"])
def test_save_load_identical(tiny, tmp_path, head_type):
    train = distill.collect_features(tiny, _windows(4), (1, 3), top_k=8)
    heads = ExitHeads((1, 3), head_type, tiny, classifier=True, head_hidden=16,
                      classifier_hidden=8 if head_type == "mlp" else 0, classifier_vocab=0 if head_type == "adapter" else 8,
                      classifier_hidden_state=head_type != "untied")
    distill.train_heads(tiny, heads, train, None, distill.TrainConfig(steps=3, batch_rows=32, union_k=8, negatives=8))
    if head_type != "adapter":
        distill.choose_candidates(tiny, heads, train)
        distill.fit_classifiers(tiny, heads, train, distill.ClassifierConfig(rows=64, steps=3, batch_rows=32))
    heads.save(tmp_path, IDENTITY, {"confidence": "classifier"})
    loaded = ExitHeads.load(tmp_path, tiny, IDENTITY)
    h = torch.randn(5, 64)
    for e in (1, 3):
        assert torch.equal(heads[e].logits(tiny, h), loaded[e].logits(tiny, h))
        assert torch.equal(heads[e].classifier_prob(h, tiny), loaded[e].classifier_prob(h, tiny))
    # fp16 storage (what the shipped heads use) loads into the fp32 model within fp16 rounding
    heads.half().save(tmp_path / "half", IDENTITY)
    heads.float()
    half = ExitHeads.load(tmp_path / "half", tiny, IDENTITY)
    assert torch.allclose(heads[3].logits(tiny, h), half[3].logits(tiny, h), atol=1e-2)
    with pytest.raises(ValueError, match="another base model"):
        ExitHeads.load(tmp_path, tiny, {**IDENTITY, "fingerprint": "other"})


def test_bad_input_errors(tiny):
    with pytest.raises(ValueError, match="1..3"):
        distill.collect_features(tiny, _windows(2), (0, 2))
    with pytest.raises(ValueError, match="1..3"):
        distill.check_exit_layers((2, 4), 4)
    with pytest.raises(ValueError, match="no usable text"):
        data.split_windows([], 0.1, 0)
    with pytest.raises(ValueError, match="too little data"):
        data.split_windows(_windows(1), 0.1, 0)


def test_data_files(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    with pytest.raises(ValueError, match="holds no text"):
        data.read_documents(str(empty))
    with pytest.raises(FileNotFoundError):
        data.read_documents(str(tmp_path / "missing.txt"))
    f = tmp_path / "d.jsonl"
    f.write_text(json.dumps({"prompt": "Q?", "response": "A b c d e f g h i"}) + "\n" + json.dumps("plain") + "\n")
    docs = data.read_documents(str(f))
    assert docs[0].context == "Q?" and docs[1].text == "plain"
    wins = data.tokenize_documents(docs, lambda s: [ord(c) for c in s], window=32)
    # the prompt is context: loss starts at its last token (predicting the response's first)
    assert wins[0].token_ids.tolist()[:2] == [ord("Q"), ord("?")] and wins[0].first_target == 2
    assert len(data.load_prompts("train")) + len(data.load_prompts("calib")) + len(data.load_prompts("test")) \
        == len(data.load_prompts("all"))
    assert len(data.load_prompts("test")) >= 50


def test_calibration_picks_hand_computed_threshold():
    # one exit at layer 2 of 4; tokens sorted by confidence, correctness scripted
    conf = torch.tensor([[0.95], [0.9], [0.8], [0.7], [0.6], [0.5], [0.4], [0.3], [0.2], [0.1]])
    ok = torch.tensor([[True], [True], [True], [False], [True], [True], [False], [False], [False], [False]])
    # threshold t: tokens with conf >= t exit (agree iff ok), the rest run all layers (agree).
    # t=0.8: 0 wrong -> 1.0; t=0.7: 1 wrong -> 0.9; t=0.5: 1 wrong -> 0.9; t=0.4: 2 wrong -> 0.8
    thr = search.choose_thresholds(conf, ok, (2,), 4, target=0.9, delta=None, per_exit=False)
    assert thr == pytest.approx((0.5,))
    thr = search.choose_thresholds(conf, ok, (2,), 4, target=0.95, delta=None, per_exit=False)
    assert thr == pytest.approx((0.8,))
    out = search.simulate(conf, ok, (0.5,), (2,), 4)
    assert out.agreement == pytest.approx(0.9) and out.mean_layers == pytest.approx(0.6 * 2 + 0.4 * 4)
    # target 1.0: only the three most confident tokens (all right) may exit
    assert search.choose_thresholds(conf, ok, (2,), 4, 1.0, None, False) == pytest.approx((0.8,))
    # nothing passes: no token exits
    wrong = torch.zeros_like(ok)
    assert search.choose_thresholds(conf, wrong, (2,), 4, 0.95, None, False) == (drafts.NEVER,)


def test_calibration_per_exit_and_bound():
    g = torch.Generator().manual_seed(0)
    n = 4000
    conf = torch.rand(n, 2, generator=g)
    # exit 1 (layer 2) is right when very confident; exit 2 (layer 3) when fairly confident
    ok = torch.stack([conf[:, 0] > 0.8, conf[:, 1] > 0.3], 1)
    thr = search.choose_thresholds(conf, ok, (2, 3), 4, target=0.99, delta=None, per_exit=True)
    out = search.simulate(conf, ok, thr, (2, 3), 4)
    assert out.agreement >= 0.99 and out.mean_layers < 3.1
    assert thr[0] >= 0.7 and thr[1] >= 0.25
    # the Clopper-Pearson bound makes the choice stricter, never looser
    thr_b = search.choose_thresholds(conf, ok, (2, 3), 4, target=0.99, delta=0.1, per_exit=True)
    assert search.simulate(conf, ok, thr_b, (2, 3), 4).agreement >= 0.99
    # closed forms of the bound: P(Bin(n, u) <= 0) = (1-u)^n and P(Bin(n, u) <= n-1) = 1 - u^n equal delta
    assert search.binomial_upper(0, 2000, 0.1) == pytest.approx(1 - 0.1 ** (1 / 2000), rel=1e-6)
    assert search.binomial_upper(19, 20, 0.1) == pytest.approx(0.9 ** (1 / 20), rel=1e-6)
    assert search.binomial_upper(20, 20, 0.1) == 1.0


def test_generation_test_picks_hand_computed_setting():
    """Settings along a path are tested in order by (scripted) generation; the last one whose
    Clopper-Pearson bound passes is kept, and testing stops at the first failure."""
    N = drafts.NEVER
    # one exit, 10 tokens: confidence and correctness by hand
    conf = torch.tensor([[0.95], [0.9], [0.85], [0.8], [0.7], [0.6], [0.5], [0.4], [0.3], [0.2]])
    ok = torch.tensor([[True], [True], [True], [False], [True], [True], [False], [False], [True], [False]])
    path = [(N,), (0.95,), (0.9,), (0.85,), (0.8,), (0.7,), (0.6,), (0.5,)]
    # teacher-forced agreement along the path: 1, 1, 1, 1, .9, .9, .9, .8
    # levels .98, .975, ..., .93 (target .95 + .03 down to - .02): all keep (0.85,), the last at 1.0
    assert search.settings_to_test(path, conf, ok, (2,), 4, 0.95) == [(0.85,)]
    # levels .95, .90, .85, .80 keep (0.85,), (0.6,), (0.6,) again (dropped), (0.5,)
    assert search.settings_to_test(path, conf, ok, (2,), 4, 0.95, above=0.0, below=0.15, step=0.05) == [
        (0.85,), (0.6,), (0.5,)]
    # scripted generation: disagreements out of 2000 tokens per setting
    differ = {(0.9,): 10, (0.8,): 60, (0.7,): 85, (0.6,): 200, (0.5,): 90}
    runs = []

    def run(thr):
        runs.append(thr)
        return search.GenerationCheck(thr, 2000, differ[thr], 20.0, 1.0)

    # at delta 0.1 the bound for 85/2000 is about 0.0483 (<= .05 passes); 200/2000 fails
    chosen, checks = search.generation_test([(0.9,), (0.8,), (0.7,), (0.6,), (0.5,)], run, 0.95, 0.1)
    assert chosen == (0.7,) and runs == [(0.9,), (0.8,), (0.7,), (0.6,)]  # (0.5,) never run
    assert search.binomial_upper(85, 2000, 0.1) <= 0.05 < search.binomial_upper(100, 2000, 0.1)
    assert [c.agreement for c in checks] == pytest.approx([0.995, 0.97, 0.9575, 0.9])
    # the plain rule keeps 100/2000 exactly at the target, and nothing when the first setting fails
    differ[(0.6,)] = 100
    assert search.generation_test([(0.7,), (0.6,)], run, 0.95, None)[0] == (0.6,)
    assert search.generation_test([(0.6,)], run, 0.96, None)[0] is None


def test_enabled_exits_and_expected_flops(tiny):
    N = drafts.NEVER
    assert calibrate.enabled_exits((N, 0.9, N, 0.75), (4, 8, 12, 16)) == ([8, 16], [0.9, 0.75])
    assert calibrate.enabled_exits((N, N), (4, 8)) == ([8], [N])
    # 4-layer model, exits at 1 and 2; half the tokens leave at 1, a quarter at 2
    a = tiny.args
    out = search.Outcome(agreement=1.0, mean_layers=0.5 * 1 + 0.25 * 2 + 0.25 * 4, exit_share=(0.5, 0.25, 0.25))
    flops = cost_model.expected_flops(out, (0.9, 0.8), (1, 2), a, "classifier", classifier_flops=100.0)
    assert flops == pytest.approx(2.0 * a.layer_flops() + a.head_flops() + 100.0 * (1 + 0.5))
    # a disabled exit is not scored
    flops = cost_model.expected_flops(out, (N, 0.8), (1, 2), a, "softmax")
    assert flops == pytest.approx(2.0 * a.layer_flops() + a.head_flops() + a.head_flops() * 0.5)


def test_simulate_verified_hand_computed():
    # One answer: a prompt row, five decode rows, a row beyond the answer. Exit 4 fires (>= 0.5)
    # on decode rows 1, 2, 4, 5; row 2's draft is wrong. Walk: 1 drafts, 2 drafts, 3 runs all
    # layers carrying 1 (free) and 2 (a ride) and verifies: 1 kept, 2 replaced, generation
    # resumes at 3, which runs all layers; 4 drafts; 5, the last token, may not draft: runs all
    # layers, carries 4 (free), keeps it.
    conf = torch.tensor([[0.9], [0.9], [0.9], [0.1], [0.9], [0.9], [0.9]])
    correct = torch.tensor([[True], [True], [False], [True], [True], [True], [True]])
    seq = torch.zeros(7, dtype=torch.long)
    costs = drafts.StepCosts(draft=(0.3,), ride=(0.5,), full=1.0)
    out = drafts.simulate_verified(conf, correct, seq, (0.5,), (4,), 30, costs)
    assert out.cost == pytest.approx((0.3 + 0.3 + (1 + 0.5) + 1 + 0.3 + 1) / 5)
    assert out.kept == pytest.approx(2 / 5) and out.replaced == pytest.approx(1 / 5)
    assert out.mean_layers == pytest.approx((3 * 30 + 2 * 4) / 5)
    # At most one draft: 1 drafts, 2 runs all layers (keeps 1), 3 runs all layers, 4 drafts, 5
    # runs all layers (keeps 4). Row 2's wrong draft is never made.
    one = drafts.simulate_verified(conf, correct, seq, (0.5,), (4,), 30, costs, max_draft_tokens=1)
    assert one.cost == pytest.approx((0.3 + 1 + 1 + 0.3 + 1) / 5)
    assert (one.kept, one.replaced) == (pytest.approx(2 / 5), 0.0)
    never = drafts.simulate_verified(conf, correct, seq, (drafts.NEVER,), (4,), 30, costs)
    assert (never.cost, never.kept, never.mean_layers) == (1.0, 0.0, 30.0)


def test_verified_step_costs(tiny):
    a = tiny.args
    full = a.num_layers * a.layer_flops() + a.head_flops()
    c = drafts.verified_step_costs(a, (1, 2), (0.5, drafts.NEVER), 10.0, (100.0, 200.0))
    assert c.draft == pytest.approx([(a.layer_flops() + 10 + 100) / full, (2 * a.layer_flops() + 10 + 200) / full])
    assert c.ride == pytest.approx([((a.num_layers - 1) * a.layer_flops() + a.head_flops()) / full,
                                    ((a.num_layers - 2) * a.layer_flops() + a.head_flops()) / full])
    assert c.full == pytest.approx((full + 10) / full)


def test_calibrate_keeps_the_unverified_setting_beside_a_verified_one(tmp_path):
    from types import SimpleNamespace

    from eeserve.early_exit.defaults import config_from_heads_dir

    (tmp_path / "exit_config.json").write_text(json.dumps({
        "exit_layers": [1, 2], "head_type": "mlp",
        "serving": {"exit_layers": [1], "threshold": [0.6], "kv_fill": "recompute"}, "calibration": {"a": 1}}))
    args = SimpleNamespace(dry_run=False)
    verified = {"exit_layers": [1], "threshold": [0.3], "kv_fill": "recompute", "verify_exits": True}
    calibrate._finish(args, tmp_path, verified, {"b": 2}, 0.0)
    cfg = json.loads((tmp_path / "exit_config.json").read_text())
    assert cfg["serving"] == verified and cfg["calibration"] == {"b": 2}
    assert cfg["serving_unverified"]["threshold"] == [0.6] and cfg["calibration_unverified"] == {"a": 1}
    assert config_from_heads_dir(tmp_path)["threshold"] == (0.3,)
    assert config_from_heads_dir(tmp_path, unverified=True)["threshold"] == (0.6,)
    calibrate._finish(args, tmp_path, verified, {"c": 3}, 0.0)  # again: the unverified one stays
    assert json.loads((tmp_path / "exit_config.json").read_text())["serving_unverified"]["threshold"] == [0.6]
    plain = {"exit_layers": [2], "threshold": [0.7], "kv_fill": "recompute"}
    calibrate._finish(args, tmp_path, plain, {"d": 4}, 0.0)  # an unverified calibration replaces both
    cfg = json.loads((tmp_path / "exit_config.json").read_text())
    assert cfg["serving"] == plain and "serving_unverified" not in cfg


def test_serving_exit_subset_from_heads_folder(tiny, tmp_path):
    from eeserve.early_exit.defaults import resolve_early_exit

    heads = ExitHeads((1, 2, 3), "adapter", tiny, classifier=True)
    heads.save(tmp_path, IDENTITY, {"exit_layers": [2, 3], "exit_policy": "token", "confidence": "classifier",
                                    "threshold": [0.9, 0.8], "min_exit_layer": 2})
    cfg = resolve_early_exit("tiny", {"exit_heads": str(tmp_path)})
    assert cfg.exit_layers == (2, 3) and cfg.threshold == (0.9, 0.8) and cfg.confidence == "classifier"
    loaded = ExitHeads.load(tmp_path, tiny, IDENTITY, cfg.exit_layers)
    assert loaded.exit_layers == (2, 3)


def test_ece():
    conf = torch.tensor([0.95, 0.95, 0.15, 0.15])
    ok = torch.tensor([True, True, False, True])
    # bin 9: acc 1, conf .95 -> .05 * .5; bin 1: acc .5, conf .15 -> .35 * .5
    assert expected_calibration_error(conf, ok) == pytest.approx(0.2)


def test_generate_answers_greedy_plus_samples_and_cache(tmp_path):
    """Greedy answer first, then the samples, per prompt; the cache is reused only for the same settings."""
    from types import SimpleNamespace

    class FakeLLM:
        calls = 0

        def apply_chat_template(self, messages):
            return [ord(c) for c in messages[0]["content"]]

        def generate(self, ids, params, use_tqdm=False):
            FakeLLM.calls += 1
            n = params.n if params.temperature > 0 else 1
            tag = 0 if params.temperature == 0 else 100
            return [SimpleNamespace(outputs=[SimpleNamespace(token_ids=[tag + j, len(p)]) for j in range(n)])
                    for p in ids]

    llm, cache = FakeLLM(), tmp_path / "a.jsonl"
    docs = data.generate_answers(llm, ["ab", "c"], 8, cache, samples=2, temperature=0.7, seed=3)
    assert [d.token_ids for d in docs] == [(97, 98, 0, 2), (97, 98, 100, 2), (97, 98, 101, 2),
                                           (99, 0, 1), (99, 100, 1), (99, 101, 1)]
    assert [d.num_context_tokens for d in docs] == [2, 2, 2, 1, 1, 1] and FakeLLM.calls == 2
    assert data.generate_answers(llm, ["ab", "c"], 8, cache, samples=2, temperature=0.7, seed=3) == docs
    assert FakeLLM.calls == 2  # served from the cache
    data.generate_answers(llm, ["ab", "c"], 8, cache, samples=2, temperature=0.7, seed=4)
    assert FakeLLM.calls == 4  # another seed: generated again


def test_untied_heads_saved_in_the_old_layout_load(tiny, tmp_path):
    """Untied heads saved before the [V, H] layout stored ``lm_head_t`` as [H, V]; they load to
    the same logits."""
    from safetensors.torch import load_file, save_file

    heads = ExitHeads((1, 3), "untied", tiny)
    with torch.no_grad():
        heads[1].lm_head_w.add_(torch.randn_like(heads[1].lm_head_w) * 0.1)
    heads.save(tmp_path, IDENTITY)
    path = tmp_path / "exit_heads.safetensors"
    old = {k.replace("lm_head_w", "lm_head_t"): (v.t().contiguous() if k.endswith("lm_head_w") else v)
           for k, v in load_file(str(path)).items()}
    assert old["exits.1.lm_head_t"].shape == (64, 128)
    save_file(old, str(path))
    loaded = ExitHeads.load(tmp_path, tiny, IDENTITY)
    h = torch.randn(4, 64)
    for e in (1, 3):
        assert torch.equal(heads[e].logits(tiny, h), loaded[e].logits(tiny, h))
