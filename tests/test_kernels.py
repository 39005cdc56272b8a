"""Matrix-product kernels chosen by measurement (eeserve.model.kernels): every form the tuner may
pick gives the reference's numbers, the cache is refused on another machine or torch version, and
the dtype choice follows the measured times."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import CHAT_PROMPTS
from helpers import reference_logits

from eeserve.model import kernels
from eeserve.model.kernels import ROW_BUCKETS, Choice, KernelPlan, shape_key


def _forms() -> list[str]:
    return [f for f in kernels.FORMS if f != "onednn" or kernels.onednn_available()]


def _form_pads() -> list[tuple[str, bool]]:
    """(form, padded) pairs the tuner may choose (``kernels.candidates``)."""
    return [(f, False) for f in _forms()] + [("f_linear", True), ("w_xt", True)]


def _forced_plan(shapes, dtype: torch.dtype, form: str, pad: bool) -> KernelPlan:
    """Every bucket of every shape on ``form`` (padded to the next bucket below PAD_LIMIT)."""
    per = []
    for i, b in enumerate(ROW_BUCKETS):
        rows = ROW_BUCKETS[i + 1] if pad and b < kernels.PAD_LIMIT else b
        per.append(Choice(form, rows, 1.0))
    return KernelPlan(identity=kernels.machine_identity(), choices={shape_key(o, i, dtype): per for o, i, _ in shapes})


def test_legacy_rule_is_the_old_padding():
    # the rule measured on the Zen 3 machine before tuning: 1, 3, 7 padded by one, 9-15 to 16
    assert [kernels.legacy_choice(m).rows for m in range(1, 17)] == [2, 2, 4, 4, 5, 6, 8, 8] + [16] * 8
    assert {kernels.legacy_choice(m).form for m in range(1, 17)} == {"w_xt"}
    assert kernels.legacy_choice(17) == Choice("f_linear", 17)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_every_form_and_padding_matches_a_float64_product(dtype):
    # x @ W^T in float64 on the same (dtype-rounded) operands; fp32 forms within 1e-4, bf16 ones
    # within bf16 rounding of the output
    torch.manual_seed(0)
    w = (torch.randn(96, 40) * 40**-0.5).to(dtype)
    tol = dict(rtol=1e-5, atol=1e-4) if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-2)
    for form in _forms():
        for pad in (False, True):
            plan = _forced_plan([(96, 40, 1)], dtype, form, pad)
            kernels.prepare([w], plan)
            kernels.install(plan)
            try:
                for m in [*range(1, 20), 33, 130, 300]:
                    x = torch.randn(m, 40)
                    out = kernels.linear(x, w)  # fp32 in, the product in w's dtype, fp32 out
                    assert out.shape == (m, 96) and out.is_contiguous() and out.dtype == torch.float32
                    ref = (x.to(dtype).double() @ w.double().T).float()
                    torch.testing.assert_close(out, ref, **tol, msg=lambda s, k=(form, pad, m): f"{k}: {s}")
            finally:
                kernels.install(None)
    # a weight the plan has no layout for (a slice made at run time) falls back to a plain form
    plan = _forced_plan([(96, 40, 1)], dtype, "onednn" if kernels.onednn_available() else "x_wt", False)
    kernels.install(plan)
    try:
        fresh = w.clone()
        x = torch.randn(3, 40)
        torch.testing.assert_close(kernels.linear(x, fresh), (x.to(dtype).double() @ w.double().T).float(), **tol)
    finally:
        kernels.install(None)


def test_every_fp32_form_gives_the_references_logits(llm, hf_model):
    # the whole model on each form in turn: logits of transformers within 1e-3 (the engine's
    # tolerance against transformers), and every form within 1e-4 of the legacy rule's
    eng = llm.engine
    ids = eng.tokenizer.encode("The capital of France is Paris, and the capital of Spain is")
    ref = reference_logits(hf_model, ids)
    base = eng.full_depth_logits(ids)
    try:
        for form, pad in _form_pads():
            plan = _forced_plan(eng.args.linear_shapes(), torch.float32, form, pad)
            kernels.prepare(eng.model.linear_weights(), plan)
            kernels.install(plan)
            got = eng.full_depth_logits(ids)
            assert (got - ref).abs().max().item() <= 1e-3, f"{form} pad={pad}"
            assert (got - base).abs().max().item() <= 1e-4, f"{form} pad={pad}"
    finally:
        kernels.install(None)


def _texts(llm) -> list[list[int]]:
    """Chat prompts with the fp32 engine's own greedy continuation: text the bf16 model has to
    predict token by token (teacher-forced)."""
    from eeserve import SamplingParams

    outs = llm.chat([[{"role": "user", "content": p}] for p in CHAT_PROMPTS[:3]],
                    SamplingParams(temperature=0, max_tokens=24), use_tqdm=False)
    return [o.prompt_token_ids + list(o.outputs[0].token_ids) for o in outs]


def _agreement(eng, texts, refs) -> float:
    same = total = 0
    for t, r in zip(texts, refs):
        same += int((eng.full_depth_logits(t).argmax(-1) == r).sum())
        total += len(t)
    return same / total


def test_bf16_and_int8_weights_agree_with_fp32_top1(llm, hf_model):
    # bf16 products (fp32 activations, KV and accumulation): teacher-forced top-1 agreement with
    # transformers in fp32 on every position of the texts (measured 0.994 here), on the legacy
    # rule and on oneDNN, the form the tuner picks almost everywhere (every bf16 form is checked
    # against a float64 product above); weight-only int8 measured 0.965 (2 near-ties of 171)
    from eeserve import LLM

    texts = _texts(llm)
    refs = [reference_logits(hf_model, t).argmax(-1) for t in texts]
    bf = LLM("smollm2-135m", dtype="bfloat16", kernel_tuning=False, num_kv_blocks=64, early_exit={"exit_heads": "none"})
    eng = bf.engine
    assert eng.model.layers[0].qkv_w.dtype == eng.model.lm_head_w.dtype == torch.bfloat16
    assert eng.model.dtype == torch.float32 and eng.kv_cache.k[0].dtype == torch.float32
    try:
        for form in [None, *(["onednn"] if kernels.onednn_available() else [])]:
            if form is not None:
                plan = _forced_plan(eng.args.linear_shapes(), torch.bfloat16, form, False)
                kernels.prepare(eng.model.linear_weights(), plan)
                kernels.install(plan)
            agree = _agreement(eng, texts, refs)
            assert agree >= 0.97, f"form {form}: top-1 agreement {agree:.3f}"
    finally:
        kernels.install(None)
    del bf, eng
    q8 = LLM("smollm2-135m", dtype="float32", quantization="int8", kernel_tuning=False, num_kv_blocks=64,
             early_exit={"exit_heads": "none"})
    assert "int8" in q8.engine.kernel_report
    agree = _agreement(q8.engine, texts, refs)
    assert agree >= 0.95, f"int8: top-1 agreement {agree:.3f}"


def _tiny_shapes():
    return [(24, 16, torch.float32)]


def test_cache_is_used_then_refused_on_another_cpu_or_torch(tmp_path, monkeypatch):
    measured = []
    real = kernels.measure_shape

    def counting(o, i, dt, **kw):
        measured.append((o, i, dt))
        return real(o, i, dt, buckets=ROW_BUCKETS, reps=1, samples=1)

    monkeypatch.setattr(kernels, "measure_shape", counting)
    plan, how = kernels.load_or_tune(_tiny_shapes(), tmp_path)
    assert measured == _tiny_shapes() and "no cached kernel choice" in how
    assert [c.form for c in plan.choices["24x16:float32"]] and len(plan.choices["24x16:float32"]) == len(ROW_BUCKETS)
    saved = json.loads((tmp_path / "kernels.json").read_text())
    assert saved["identity"] == kernels.machine_identity()

    plan2, how = kernels.load_or_tune(_tiny_shapes(), tmp_path)  # same machine: from the cache
    assert len(measured) == 1 and "kernel choice from" in how and plan2.choices == plan.choices

    for field, value in (("cpu", "Some Other CPU 9000"), ("torch", "1.0.0+other")):
        ident = dict(kernels.machine_identity(), **{field: value})
        monkeypatch.setattr(kernels, "machine_identity", lambda ident=ident: ident)
        n = len(measured)
        plan3, how = kernels.load_or_tune(_tiny_shapes(), tmp_path)
        assert len(measured) == n + 1, f"a cache from another {field} must be re-measured"
        assert f"measured on another machine ({field}" in how and value in how
        assert json.loads((tmp_path / "kernels.json").read_text())["identity"][field] == value
        plan4, _ = kernels.load_or_tune(_tiny_shapes(), tmp_path)  # and the new one is then kept
        assert len(measured) == n + 1
    # a new shape on the same machine: only it is measured, the rest kept
    plan5, _ = kernels.load_or_tune([*_tiny_shapes(), (8, 16, torch.float32)], tmp_path)
    assert measured[-1] == (8, 16, torch.float32) and set(plan5.choices) == {"24x16:float32", "8x16:float32"}
    # an unreadable file is re-measured, not trusted
    (tmp_path / "kernels.json").write_text("{not json")
    _, how = kernels.load_or_tune(_tiny_shapes(), tmp_path)
    assert "unreadable" in how


def test_plan_lookup_buckets_and_padding():
    w = torch.zeros(24, 16)
    per = [Choice("w_xt", b + (1 if b == 3 else 0), float(b)) for b in ROW_BUCKETS]
    plan = KernelPlan(identity={}, choices={"24x16:float32": per})
    assert plan.choice(w, 3) == Choice("w_xt", 4, 3.0)  # padded as measured
    assert plan.choice(w, 5).rows == 6  # rounded up to the 6-row bucket (padding is free there)
    assert plan.choice(w, 20) == Choice("w_xt", 20, 32.0)  # above PAD_LIMIT: the bucket's form, unpadded
    assert plan.choice(w, 1000).rows == 1000  # beyond the last bucket: its form
    # an unknown shape uses the fallback (legacy rule when none was measured)
    assert plan.choice(torch.zeros(5, 7), 1) == kernels.legacy_choice(1)


def _plan_with_times(f32_us: float, b16_us: float, shapes) -> KernelPlan:
    choices = {}
    for o, i, _ in shapes:
        choices[shape_key(o, i, torch.float32)] = [Choice("f_linear", b, f32_us) for b in ROW_BUCKETS]
        choices[shape_key(o, i, torch.bfloat16)] = [Choice("f_linear", b, b16_us) for b in ROW_BUCKETS]
    return KernelPlan(identity={}, choices=choices)


def test_dtype_auto_follows_hardware_and_measurement():
    shapes = [(24, 16, 30), (100, 16, 1)]
    assert kernels.step_us(_plan_with_times(2.0, 1.0, shapes), shapes, torch.float32, 1) == 2.0 * 31
    fast = _plan_with_times(100.0, 50.0, shapes)
    assert kernels.choose_dtype(fast, shapes, bf16_hardware=True)[0] == "bfloat16"
    assert kernels.choose_dtype(fast, shapes, bf16_hardware=False)[0] == "float32"  # no bf16 instructions
    slow = _plan_with_times(100.0, 95.0, shapes)  # less than the 10% it must gain
    assert kernels.choose_dtype(slow, shapes, bf16_hardware=True)[0] == "float32"
    # off the CPU and without tuning, auto is float32 and nothing is measured
    assert kernels.setup_for_model(shapes, "auto", "cuda", True, None).weight_dtype == "float32"
    s = kernels.setup_for_model(shapes, "auto", "cpu", False, None)
    assert s.plan is None and s.weight_dtype == "float32" and "tuning off" in s.report


def test_int8_weights_run_their_own_product():
    # weight-only int8: the product equals x @ (q * scale)^T computed in float64, and the
    # dequantized weight is within half a quantization step of the original
    torch.manual_seed(0)
    w = torch.randn(96, 40) * 0.1
    q, scales = kernels.quantize_int8(w)
    assert q.dtype == torch.int8 and scales.shape == (96,)
    deq = q.double() * scales.double()[:, None]
    assert ((deq - w.double()).abs() <= scales.double()[:, None] / 2 + 1e-7).all()
    kernels.quantize([w], "int8")
    for m in (1, 3, 17, 130):
        x = torch.randn(m, 40)
        torch.testing.assert_close(kernels.linear(x, w), (x.double() @ deq.T).float(), rtol=1e-5, atol=1e-4)
    with pytest.raises(ValueError, match="quantization must be one of int8"):
        kernels.quantize([w], "int3")
