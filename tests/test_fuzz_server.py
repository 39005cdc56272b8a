"""Fuzzing the HTTP API: schemathesis generates bodies from the server's own OpenAPI schema.

The server is the real ``eeserve serve`` process on 127.0.0.1, over a tiny random Llama (2 layers,
hidden size 32) with the default model's tokenizer, so that each generated request costs
milliseconds; early exit is on (token policy, exit layer 1) so the exit path runs too. Every route
gets schema-valid and (for routes with a body) schema-invalid examples, a bounded number each. No
answer may be a 5xx, every 4xx must carry OpenAI's error object, and afterwards the metrics must
show no request left running or waiting and no KV block in use (issue 17, "Fuzzing in the suite").
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time

import pytest

httpx = pytest.importorskip("httpx")
schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from schemathesis import GenerationMode  # noqa: E402

ROUTES = [
    ("POST", "/v1/completions"), ("POST", "/v1/chat/completions"), ("POST", "/tokenize"), ("POST", "/detokenize"),
    ("GET", "/v1/models"), ("GET", "/health"), ("GET", "/metrics"),
]
EXAMPLES = {"POST": 40, "GET": 5}  # per route and mode: about a minute in all on the 2-core machine
MODEL_NAME = "tiny"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _metric(base: str, name: str) -> float:
    for line in httpx.get(base + "/metrics", timeout=10).text.splitlines():
        if line.startswith((name + "{", name + " ")):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"metric {name} not found")


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    """A 2-layer random Llama saved as a Hugging Face folder, with SmolLM2's tokenizer."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from eeserve.model.loader import resolve_model

    src = resolve_model("smollm2-135m").path
    vocab = json.loads((src / "config.json").read_text())["vocab_size"]
    out = tmp_path_factory.mktemp("tiny-llama")
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=128,
                      tie_word_embeddings=True)
    LlamaForCausalLM(cfg).save_pretrained(out, safe_serialization=True)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(src / name, out / name)
    return out


@pytest.fixture(scope="module")
def tiny_server(tiny_model_dir):
    port = _free_port()
    log = tempfile.TemporaryFile(mode="w+")  # noqa: SIM115 - closed at teardown
    env = {k: v for k, v in os.environ.items() if k != "EESERVE_API_KEY"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "eeserve.entrypoints.cli", "serve", str(tiny_model_dir), "--port", str(port),
         "--served-model-name", MODEL_NAME, "--max-num-seqs", "16", "--num-kv-blocks", "128",
         "--exit-policy", "token", "--exit-layers", "1", "--threshold", "0.5", "--no-kernel-tuning"],
        stdout=log, stderr=subprocess.STDOUT, env=env,
    )
    base = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    try:
        while True:
            if proc.poll() is not None:
                log.seek(0)
                pytest.fail(f"server exited with {proc.returncode}:\n{log.read()[-4000:]}")
            try:
                if httpx.get(base + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.time() > deadline:
                log.seek(0)
                pytest.fail(f"server did not become healthy:\n{log.read()[-4000:]}")
            time.sleep(0.3)
        yield base
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.seek(0)
        tail = log.read()[-3000:]
        if "Traceback" in tail:
            print("server log tail:\n" + tail, file=sys.stderr)
        log.close()


def _check_answer(case, response) -> None:
    """No 5xx; a 4xx carries {"error": {"message", "type", "param", "code"}}."""
    where = f"{case.method} {case.path} body={ascii(case.body)[:500]}"
    assert response.status_code < 500, f"{where} -> {response.status_code} {response.text[:500]}"
    if response.status_code >= 400:
        err = response.json()["error"]
        assert set(err) == {"message", "type", "param", "code"}, (where, err)
        assert isinstance(err["message"], str) and err["message"], (where, err)
        assert err["type"] == "invalid_request_error", (where, err)


def test_schema_lists_every_route(tiny_server):
    schema = httpx.get(tiny_server + "/openapi.json", timeout=10).json()
    got = {(m.upper(), p) for p, ops in schema["paths"].items() for m in ops}
    assert got == set(ROUTES)
    for method, path in ROUTES:
        if method == "POST":
            assert schema["paths"][path]["post"]["requestBody"]["content"]["application/json"]["schema"]


@pytest.fixture(scope="module")
def api_schema(tiny_server):
    raw = httpx.get(tiny_server + "/openapi.json", timeout=10).json()
    return schemathesis.openapi.from_dict(raw)


# Schema-invalid input exists only for the routes with a body (the GET routes take no parameters).
CASES = [(m, p, GenerationMode.POSITIVE) for m, p in ROUTES] + [
    (m, p, GenerationMode.NEGATIVE) for m, p in ROUTES if m == "POST"]


@pytest.mark.parametrize("method,path,mode", CASES, ids=[f"{m}-{p}-{g.value}" for m, p, g in CASES])
def test_fuzz_route(api_schema, tiny_server, method, path, mode):
    op = api_schema[path][method]
    statuses: list[int] = []

    @settings(max_examples=EXAMPLES[method], deadline=None, database=None, derandomize=True,
              suppress_health_check=list(HealthCheck))
    @given(case=op.as_strategy(generation_mode=mode))
    def run(case):
        if isinstance(case.body, dict) and isinstance(case.body.get("model"), str):
            case.body["model"] = MODEL_NAME  # a random name is a plain 404: reach the validation behind it
        response = case.call(base_url=tiny_server, timeout=60)
        statuses.append(response.status_code)
        _check_answer(case, response)

    run()
    print(f"{method} {path} {mode.value}: statuses {sorted(statuses)}")
    assert statuses, "no example was sent"
    if mode is GenerationMode.NEGATIVE:
        assert all(400 <= s < 500 for s in statuses), sorted(set(statuses))
    # a normal request right after still succeeds
    ok = httpx.post(tiny_server + "/v1/completions", json={"model": MODEL_NAME, "prompt": "Hi", "max_tokens": 2},
                    timeout=60)
    assert ok.status_code == 200, ok.text


def test_after_fuzzing_nothing_is_left(tiny_server):
    """Runs after the fuzz tests (file order): no request running or waiting, no KV block used."""
    deadline = time.time() + 20
    names = ("eeserve:num_requests_running", "eeserve:num_requests_waiting", "eeserve:kv_cache_usage_perc")
    while time.time() < deadline and any(_metric(tiny_server, n) != 0 for n in names):
        time.sleep(0.2)
    assert [_metric(tiny_server, n) for n in names] == [0, 0, 0]
    assert _metric(tiny_server, "eeserve:generation_tokens_total") > 0  # the fuzzing did reach the engine
