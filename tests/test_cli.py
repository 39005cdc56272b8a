"""The ``eeserve`` command line, run in-process through ``cli.main``.

Bad input must give exit code 2 and one line ``eeserve: error: ...`` naming the field. Tests
that need the model share one engine per configuration (``_build_llm`` is memoized), so the
model loads twice in this file: the default settings and a short ``--max-model-len``.
"""

from __future__ import annotations

import json
import re

import pytest

from eeserve.entrypoints import cli
from eeserve.entrypoints.cli_args import engine_config_from_args

SMALL_KV = ["--num-kv-blocks", "64", "--dtype", "float32", "--no-kernel-tuning"]
_ENGINES: dict = {}


@pytest.fixture
def shared_engines(monkeypatch):
    """Build one LLM per EngineConfig and reuse it across tests."""

    def build(args):
        from eeserve.entrypoints.llm import LLM

        cfg = engine_config_from_args(args)
        if cfg not in _ENGINES:
            _ENGINES[cfg] = LLM.from_config(cfg)
        return _ENGINES[cfg]

    monkeypatch.setattr(cli, "_build_llm", build)


def run_cli(capsys, argv: list[str]) -> tuple[int, str, str]:
    rc = cli.main(argv)
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def assert_one_line_error(rc: int, err: str, *needles: str) -> str:
    assert rc == 2, err
    assert "Traceback" not in err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1, f"expected one error line, got:\n{err}"
    line = lines[0]
    assert line.startswith("eeserve: error: "), line
    for n in needles:
        assert n in line, f"{n!r} not in {line!r}"
    return line


# ---- bad input, no model needed ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("flags", "needles"),
    [
        (["--temperature", "-1"], ["--temperature", "temperature", "-1"]),
        (["--top-p", "0"], ["--top-p", "top_p", "(0, 1]"]),
        (["--max-tokens", "0"], ["--max-tokens", "max_tokens"]),
        (["--exit-layers", "0,5"], ["--exit-layers", "exit_layers", "(0, 5)"]),
        (["--exit-layers", "12,8"], ["--exit-layers", "increasing"]),
        (["--exit-layers", "a,b"], ["--exit-layers", "'a,b'"]),
        (["--threshold", "abc"], ["--threshold", "'abc'"]),
        (["--exit-policy", "bogus"], ["--exit-policy", "bogus"]),
        (["--block-size", "3"], ["--block-size", "block_size"]),
        (["--max-num-seqs", "0"], ["--max-num-seqs", "max_num_seqs"]),
        (["--exit-heads", "/nonexistent/heads"], ["--exit-heads", "exit_config.json"]),
        (["--max-exit-batch", "-1"], ["--max-exit-batch", ">= 0"]),
        (["--verify-exits", "--kv-fill", "propagate"], ["--verify-exits", "kv_fill", "recompute"]),
        (["--max-draft-tokens", "-2"], ["--max-draft-tokens", ">= 0"]),
        # issue 17, item 3: thresholds in the confidence measure's range (the shipped heads' classifier)
        (["--threshold", "5"], ["--threshold", "threshold", "[0, 1]", "classifier", "5"]),
        (["--threshold", "-1"], ["--threshold", "[0, 1]", "-1"]),
        (["--threshold", "nan"], ["--threshold", "[0, 1]", "nan"]),
        (["--exit-heads", "none", "--exit-layers", "8", "--confidence", "entropy", "--threshold", "-0.5"],
         ["--threshold", ">= 0", "entropy"]),
        (["--exit-heads", "none", "--exit-layers", "8", "--confidence", "saturation", "--threshold", "1.5"],
         ["--threshold", "[-1, 1]"]),
        (["--min-exit-layer", "99"], ["--min-exit-layer", "min_exit_layer", "<= the last exit layer (4)", "99"]),
    ],
)
def test_bad_flag_values(capsys, flags, needles):
    rc, out, err = run_cli(capsys, ["generate", "--prompt", "hi", *flags])
    assert_one_line_error(rc, err, *needles)
    assert out == ""


@pytest.mark.parametrize(
    ("argv", "needles"),
    [
        (["tune", "--steps", "0"], ["--steps", ">= 1"]),
        (["tune", "--lr", "-1"], ["--lr", "(0.0, 1.0)"]),
        (["tune", "--heldout", "1"], ["--heldout", "(0.0, 1.0)"]),
        (["tune", "--window", "1"], ["--window", ">= 8"]),
        (["tune", "--ce-weight", "-1"], ["--ce-weight", "[0.0, 100.0)"]),
        (["tune", "--resume"], ["--resume", "checkpoint.pt"]),
        (["tune", "--data", "builtin:bogus"], ["--data", "builtin:pydoc"]),
        (["tune", "--data", "/nonexistent.txt"], ["--data", "/nonexistent.txt"]),
        (["tune", "--answer-temperature", "0"], ["--answer-temperature", "(0.0, 2.0]"]),
        (["calibrate", "--exit-heads", "HEADS", "--target-agreement", "1.5"], ["--target-agreement", "(0.0, 1.0]"]),
        (["calibrate", "--exit-heads", "HEADS", "--delta", "0"], ["--delta", "(0.0, 1.0)"]),
        (["calibrate", "--exit-heads", "/nonexistent"], ["--exit-heads", "exit_config.json"]),
        (["calibrate", "--exit-heads", "HEADS", "--cache", "FILE"], ["--cache", "is a file"]),
        (["calibrate", "--exit-heads", "HEADS", "--verify-exits", "--kv-fill", "propagate"],
         ["--verify-exits", "--kv-fill recompute"]),
        (["calibrate", "--exit-heads", "HEADS", "--verify-exits", "--no-verify"], ["--verify-exits", "--no-verify"]),
        (["calibrate", "--exit-heads", "HEADS", "--max-draft-tokens", "-1"], ["--max-draft-tokens", ">= 0"]),
        (["eval-exits", "--num-prompts", "0"], ["--num-prompts", ">= 1"]),
    ],
)
def test_tuning_commands_refuse_bad_input_before_loading(capsys, tmp_path, argv, needles):
    """Each is refused with one line naming the flag, before the model loads or any text is generated."""
    from eeserve.early_exit.defaults import shipped_heads

    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    argv = [str(a_file) if a == "FILE" else str(shipped_heads("smollm2-135m")) if a == "HEADS" else a for a in argv]
    if argv[0] == "tune":
        argv += ["--out", str(tmp_path / "out")]
    rc, out, err = run_cli(capsys, argv)
    assert_one_line_error(rc, err, *needles)
    assert not (tmp_path / "out").exists()


def test_unknown_subcommand(capsys):
    rc, _, err = run_cli(capsys, ["bogus"])
    assert_one_line_error(rc, err, "bogus", "generate")


def test_unknown_model_alias_lists_aliases(capsys):
    rc, _, err = run_cli(capsys, ["generate", "--model", "no-such-model", "--prompt", "hi"])
    assert_one_line_error(rc, err, "no-such-model", "smollm2-135m")


def test_missing_gguf_path(capsys, tmp_path):
    path = str(tmp_path / "missing.gguf")
    rc, _, err = run_cli(capsys, ["generate", "--model", path, "--prompt", "hi"])
    assert_one_line_error(rc, err, path, "does not exist")


def test_neither_prompt_nor_prompts_file(capsys):
    rc, _, err = run_cli(capsys, ["generate"])
    assert_one_line_error(rc, err, "--prompt", "--prompts-file")


def test_both_prompt_and_prompts_file(capsys, tmp_path):
    f = tmp_path / "p.jsonl"
    f.write_text('"hi"\n')
    rc, _, err = run_cli(capsys, ["generate", "--prompt", "hi", "--prompts-file", str(f)])
    assert_one_line_error(rc, err, "--prompt", "--prompts-file")


def test_prompts_file_missing(capsys, tmp_path):
    path = str(tmp_path / "nope.jsonl")
    rc, _, err = run_cli(capsys, ["generate", "--prompts-file", path])
    assert_one_line_error(rc, err, "--prompts-file", path, "does not exist")


def test_prompts_file_bad_json_line(capsys, tmp_path):
    f = tmp_path / "bad.jsonl"
    f.write_text('"fine"\n{"prompt": \n')
    rc, _, err = run_cli(capsys, ["generate", "--prompts-file", str(f)])
    assert_one_line_error(rc, err, "--prompts-file", "line 2", "not valid JSON")


@pytest.mark.parametrize(
    ("line", "needle"),
    [('{"text": "x"}', "must be a string or an object"), ('{"prompt_token_ids": ["a"]}', "list of integers")],
)
def test_prompts_file_bad_entry(capsys, tmp_path, line, needle):
    f = tmp_path / "bad.jsonl"
    f.write_text(line + "\n")
    rc, _, err = run_cli(capsys, ["generate", "--prompts-file", str(f)])
    assert_one_line_error(rc, err, "line 1", needle)


def test_prompts_file_empty(capsys, tmp_path):
    f = tmp_path / "empty.jsonl"
    f.write_text("\n\n")
    rc, _, err = run_cli(capsys, ["generate", "--prompts-file", str(f)])
    assert_one_line_error(rc, err, "no prompts")


# ---- help ----------------------------------------------------------------------------------------


def test_top_level_help(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for word in ("generate", "chat", "serve", "--show-exits", "--exit-policy"):
        assert word in out


def test_no_command_prints_help(capsys):
    rc, out, _ = run_cli(capsys, [])
    assert rc == 2
    assert "generate" in out


def test_generate_help(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["generate", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for flag in (
        "--prompt", "--prompts-file", "--show-exits", "--model", "--max-tokens", "--temperature", "--top-p",
        "--max-model-len", "--num-kv-blocks", "--max-num-seqs", "--max-num-batched-tokens",
        "--exit-policy", "--exit-layers", "--threshold", "--confidence", "--kv-fill",
    ):
        assert flag in out, flag


# ---- with the model --------------------------------------------------------------------------------


def test_generate_greedy_paris(capsys, shared_engines):
    rc, out, err = run_cli(
        capsys, ["generate", "--prompt", "The capital of France is", "--max-tokens", "8", "--temperature", "0", *SMALL_KV]
    )
    assert rc == 0, err
    assert out.startswith(" Paris"), out


def test_generate_show_exits(capsys, shared_engines):
    rc, out, err = run_cli(
        capsys,
        ["generate", "--prompt", "The capital of France is", "--max-tokens", "8", "--temperature", "0",
         "--show-exits", *SMALL_KV],
    )
    assert rc == 0, err
    assert "-- exit layer of each token (of 30 layers):" in out
    exits = re.findall(r"\[[^\[\]]*\|(\d+)\]", out)
    assert len(exits) == 8
    assert all(1 <= int(e) <= 30 for e in exits)
    assert re.search(r"\[ Paris\|\d+\]", out), out
    assert re.search(r"-- mean layers per token \d+\.\d of 30", out), out


def test_generate_prompts_file_prints_json_lines(capsys, shared_engines, tmp_path):
    f = tmp_path / "prompts.jsonl"
    f.write_text('"The capital of France is"\n{"prompt": "One, two, three,"}\n')
    rc, out, err = run_cli(
        capsys, ["generate", "--prompts-file", str(f), "--max-tokens", "4", "--temperature", "0", "--logprobs", "2",
                 *SMALL_KV]
    )
    assert rc == 0, err
    lines = out.strip().splitlines()
    assert len(lines) == 2
    rows = [json.loads(ln) for ln in lines]
    assert [r["prompt"] for r in rows] == ["The capital of France is", "One, two, three,"]
    assert rows[0]["text"].startswith(" Paris")
    for r in rows:
        assert len(r["token_ids"]) == len(r["exit_layers"]) == len(r["logprobs"]) == 4
        assert r["finish_reason"] == "length"
        for tid, top in zip(r["token_ids"], r["logprobs"]):  # greedy: the chosen token ranks first
            assert len(top) == 2 and top[0]["token_id"] == tid and top[0]["logprob"] >= top[1]["logprob"]
        assert r["cumulative_logprob"] == pytest.approx(sum(top[0]["logprob"] for top in r["logprobs"]))


def test_chat_one_message(capsys, shared_engines):
    rc, out, err = run_cli(
        capsys, ["chat", "--message", "What is the capital of France?", "--max-tokens", "12", *SMALL_KV]
    )
    assert rc == 0, err
    assert "Paris" in out


def test_prompt_longer_than_max_model_len(capsys, shared_engines):
    prompt = " ".join(["word"] * 40)
    rc, out, err = run_cli(capsys, ["generate", "--prompt", prompt, "--max-model-len", "16", *SMALL_KV])
    line = assert_one_line_error(rc, err, "max_model_len", "16")
    n = int(re.search(r"prompt is (\d+) tokens", line).group(1))
    assert n > 16
    assert out == ""


# ---- refused before the model loads (issue 17 items 1, 4, 6, 8) -----------------------------------


@pytest.fixture
def no_model(monkeypatch):
    """Fail the test if the command gets as far as loading a model or starting a server."""
    from eeserve.entrypoints.openai import server

    def refuse(*a, **k):
        pytest.fail("the model was loaded: the error should have come first")

    monkeypatch.setattr(cli, "_build_llm", refuse)
    monkeypatch.setattr(server, "run_server", refuse)


def test_help_and_argument_errors_import_neither_torch_nor_transformers():
    """`eeserve --help` and argument errors were slow (14.6 s) because torch and transformers
    were imported eagerly; they must not be imported at all on these paths."""
    import subprocess
    import sys

    code = (
        "import contextlib, io, json, sys, time\n"
        "t = time.perf_counter()\n"
        "from eeserve.entrypoints.cli import main\n"
        "argvs = [['--help'], ['generate', '--help'], ['serve', '--help'], ['tune', '--help'],\n"
        "         ['generate', '--temperature', '-1', '--prompt', 'x'], ['serve', '--port', '99999'],\n"
        "         ['generate', '--threads', '0', '--prompt', 'x'], ['bogus']]\n"
        "codes = []\n"
        "for a in argvs:\n"
        "    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):\n"
        "        try:\n"
        "            codes.append(main(a))\n"
        "        except SystemExit as e:\n"
        "            codes.append(e.code)\n"
        "heavy = sorted(m for m in ('torch', 'transformers', 'numpy', 'gguf', 'fastapi', 'httpx') if m in sys.modules)\n"
        "print(json.dumps({'codes': codes, 'heavy': heavy, 'seconds': time.perf_counter() - t}))\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    print(f"--help and 7 argument errors in one process: {res['seconds']:.2f} s")
    assert res["codes"] == [0, 0, 0, 0, 2, 2, 2, 2]
    assert res["heavy"] == []


def test_threads_is_set_before_the_model_loads(capsys, monkeypatch):
    import torch

    before = torch.get_num_threads()
    seen = {}

    def build(args):
        seen["threads"] = torch.get_num_threads()
        raise cli.UserError("stop here")

    monkeypatch.setattr(cli, "_build_llm", build)
    try:
        rc, _, err = run_cli(capsys, ["generate", "--prompt", "hi", "--threads", "1"])
    finally:
        torch.set_num_threads(before)
    assert_one_line_error(rc, err, "stop here")
    assert seen["threads"] == 1
    rc, _, err = run_cli(capsys, ["chat", "--message", "hi", "--threads", "0"])
    assert_one_line_error(rc, err, "--threads", ">= 1", "0")


def test_threads_default_is_the_cpus_this_process_may_use():
    import os
    import subprocess
    import sys

    cpu = min(os.sched_getaffinity(0))
    code = (
        "import os, sys\n"
        f"os.sched_setaffinity(0, {{{cpu}}})\n"
        "from eeserve.entrypoints.cli import build_parser\n"
        "from eeserve.entrypoints.cli_args import apply_threads\n"
        "n = apply_threads(build_parser().parse_args(['generate', '--prompt', 'x']))\n"
        "assert 'torch' not in sys.modules\n"
        "import torch\n"  # the count set before torch's import
        "print(n, torch.get_num_threads())\n"
        "for argv in (['serve'], ['eval-exits'], ['chat', '--threads', '2']):\n"
        "    torch.set_num_threads(3)\n"
        "    n = apply_threads(build_parser().parse_args(argv))\n"  # and after it
        "    print(n, torch.get_num_threads())\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["1", "1"] * 3 + ["2", "2"]


def _no_cuda(monkeypatch, count: int = 0):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: count > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)


def test_device_cuda_without_cuda_is_one_line(capsys, monkeypatch, no_model):
    _no_cuda(monkeypatch)
    rc, out, err = run_cli(capsys, ["generate", "--prompt", "hi", "--device", "cuda"])
    assert_one_line_error(rc, err, "--device", "'cuda'", "no CUDA device")
    _no_cuda(monkeypatch, count=1)
    rc, out, err = run_cli(capsys, ["serve", "--device", "cuda:3"])
    assert_one_line_error(rc, err, "--device", "cuda:0..cuda:0")


def test_python_api_device_cuda_without_cuda_is_a_value_error(monkeypatch):
    from eeserve import LLM, ModelConfig
    from eeserve.entrypoints import llm as llm_module

    _no_cuda(monkeypatch)
    monkeypatch.setattr(llm_module, "LLMEngine", lambda c: pytest.fail("the model was loaded"))
    with pytest.raises(ValueError, match=r"^device must be an available device, got 'cuda'"):
        LLM(device="cuda")
    with pytest.raises(ValueError, match=r"^device must be cpu, cuda, cuda:N or mps, got 'gpu'"):
        ModelConfig(device="gpu")


@pytest.mark.parametrize(
    ("flags", "needles"),
    [
        (["--port", "99999"], ["--port", "1..65535", "99999"]),
        (["--port", "-1"], ["--port", "1..65535", "-1"]),
        (["--port", "http"], ["--port", "'http'"]),
        (["--host", "999.1.1.1"], ["--host", "'999.1.1.1'", "not a valid IPv4 address"]),
        (["--host", "192.0.2.1"], ["--host", "'192.0.2.1'", "not an address of this machine"]),
    ],
)
def test_serve_bad_address_before_loading(capsys, no_model, flags, needles):
    rc, out, err = run_cli(capsys, ["serve", *flags])
    assert_one_line_error(rc, err, *needles)


def test_serve_port_in_use_before_loading(capsys, no_model):
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        rc, out, err = run_cli(capsys, ["serve", "--port", str(port)])
    assert_one_line_error(rc, err, f"--port {port}", "already in use")


def test_serve_binds_before_loading(capsys, monkeypatch):
    """The socket handed to the server is bound before the engine is built."""
    import socket

    from eeserve.entrypoints.openai import server

    seen = {}

    def fake_run_server(config, host, port, api_key, served_model_name, sock):
        seen["name"] = sock.getsockname()
        with socket.socket() as other, pytest.raises(OSError):
            other.bind(("127.0.0.1", port))  # taken while the model would load

    monkeypatch.setattr(server, "run_server", fake_run_server)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    assert cli.main(["serve", "--port", str(port)]) == 0
    assert seen["name"] == ("127.0.0.1", port)


def test_bench_serve_without_a_server_is_one_line(capsys):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nobody listens there
    rc, out, err = run_cli(capsys, ["bench", "serve", "--base-url", f"http://127.0.0.1:{port}", "--num-prompts", "1"])
    assert_one_line_error(rc, err, "--base-url", f"127.0.0.1:{port}", "no server answers")
    rc, out, err = run_cli(capsys, ["bench", "serve", "--base-url", "localhost:8000"])
    assert_one_line_error(rc, err, "--base-url", "http://")


def test_damaged_gguf_is_named_before_loading(capsys, tmp_path, no_model):
    from eeserve.model.loader import alias_path

    text = tmp_path / "readme.gguf"
    text.write_text("not a model\n")
    rc, _, err = run_cli(capsys, ["generate", "--model", str(text), "--prompt", "hi"])
    assert_one_line_error(rc, err, "--model", str(text), "not a GGUF file")
    cut = tmp_path / "cut.gguf"
    with open(alias_path("smollm2-135m"), "rb") as f:
        cut.write_bytes(f.read(3_000_000))
    rc, _, err = run_cli(capsys, ["generate", "--model", str(cut), "--prompt", "hi"])
    assert_one_line_error(rc, err, "--model", str(cut), "not a complete GGUF file")
    rc, _, err = run_cli(capsys, ["generate", "--model", str(tmp_path / "notes.txt"), "--prompt", "hi"])
    assert_one_line_error(rc, err, "--model", "does not exist")


def test_prompts_file_errors_name_file_and_line(capsys, tmp_path, no_model):
    rc, _, err = run_cli(capsys, ["generate", "--prompts-file", str(tmp_path)])
    assert_one_line_error(rc, err, "--prompts-file", str(tmp_path), "is a directory")
    f = tmp_path / "p.jsonl"
    f.write_bytes(b'"fine"\n"caf\xe9"\n')
    rc, _, err = run_cli(capsys, ["generate", "--prompts-file", str(f)])
    assert_one_line_error(rc, err, str(f), "line 2", "not valid UTF-8", "0xe9")
    for bad in ('{"messages": "hi"}', '{"messages": [{"role": "user", "content": 5}]}', '{"messages": []}', '""'):
        f.write_text('"fine"\n\n' + bad + "\n")
        rc, _, err = run_cli(capsys, ["generate", "--prompts-file", str(f)])
        assert_one_line_error(rc, err, str(f), "line 3")


def test_exit_layers_without_trained_heads_refused_before_loading(capsys, no_model):
    rc, _, err = run_cli(capsys, ["generate", "--prompt", "Hi", "--exit-policy", "token", "--exit-layers", "12,16,20,24"])
    assert_one_line_error(rc, err, "--exit-layers", "[4]", "--exit-heads none")
    rc, _, err = run_cli(capsys, ["generate", "--prompt", "Hi", "--exit-heads", "none", "--confidence", "classifier",
                                  "--exit-layers", "8"])
    assert_one_line_error(rc, err, "--confidence", "classifier")


def test_python_api_exit_layers_without_heads_is_a_value_error(monkeypatch):
    from eeserve import LLM
    from eeserve.entrypoints import llm as llm_module

    monkeypatch.setattr(llm_module, "LLMEngine", lambda c: pytest.fail("the model was loaded"))
    with pytest.raises(ValueError, match=r"^exit_layers must each have a trained head .* has \[4\]"):
        LLM("smollm2-135m", early_exit={"exit_policy": "token", "exit_layers": (12, 16, 20, 24), "threshold": 0.9})


def test_exit_layer_past_the_model_refused_before_the_weights_load(capsys, monkeypatch):
    """The number of layers comes from config.json: checked before any weight is read."""
    from eeserve.engine import llm_engine

    monkeypatch.setattr(llm_engine.loader, "load_state_dict", lambda *a, **k: pytest.fail("weights were loaded"))
    rc, _, err = run_cli(capsys, ["generate", "--prompt", "Hi", "--exit-heads", "none", "--exit-layers", "12,30"])
    assert_one_line_error(rc, err, "--exit-layers", "1..29", "30-layer")


def test_prompts_file_out_of_vocabulary_ids_name_the_line(capsys, shared_engines, tmp_path):
    f = tmp_path / "ids.jsonl"
    f.write_text('{"prompt_token_ids": [1, 2, 3]}\n{"prompt_token_ids": [1, 49152]}\n')
    rc, out, err = run_cli(capsys, ["generate", "--prompts-file", str(f), "--max-tokens", "2", *SMALL_KV])
    assert_one_line_error(rc, err, str(f), "line 2", "[0, 49152)", "49152")
    assert out == ""


def test_a_normal_run_right_after_the_errors_succeeds(capsys, shared_engines, tmp_path):
    for argv in (["serve", "--port", "99999"], ["generate", "--prompt", "x", "--threads", "0"],
                 ["generate", "--prompts-file", str(tmp_path)],
                 ["generate", "--prompt", "x", "--exit-layers", "12"]):
        rc, _, err = run_cli(capsys, argv)
        assert_one_line_error(rc, err)
    rc, out, err = run_cli(capsys, ["generate", "--prompt", "The capital of France is", "--max-tokens", "4",
                                    "--threads", "1", *SMALL_KV])
    import torch

    torch.set_num_threads(2)
    assert rc == 0, err
    assert out.startswith(" Paris")


# ---- bench serve's ratio line (issue 17 item 7) ----------------------------------------------------


def _run(mode: str, exits: list[int], seconds: float):
    from eeserve.entrypoints.bench_serve import RequestResult, RunResult, summarize

    req = RequestResult(ok=True, latency=seconds, ttft=0.1, itls=[0.05] * (len(exits) - 1),
                        num_output_tokens=len(exits), exit_layers=list(exits))
    return summarize(RunResult(mode, seconds, [req]))


def test_bench_table_claims_a_speed_up_only_with_early_exits():
    from eeserve.entrypoints.bench_serve import format_table

    # 8 tokens each; on: 8 / 1.0 s, off: 8 / 1.04 s -> 1.04x
    no_exits = format_table([_run("on", [30] * 8, 1.0), _run("off", [30] * 8, 1.04)])
    speed = [ln for ln in no_exits.splitlines() if ln.startswith("Speed-up")]
    assert len(speed) == 1 and speed[0].split()[-1] == "none"
    assert "1.04x (first/second) is noise" in no_exits and "about 4%" in no_exits
    with_exits = format_table([_run("on", [30, 12, 30, 12, 30, 30, 30, 30], 1.0), _run("off", [30] * 8, 1.04)])
    speed = [ln for ln in with_exits.splitlines() if ln.startswith("Speed-up")]
    assert len(speed) == 1 and speed[0].split()[-1] == "1.04x"
    aa = format_table([_run("off", [30] * 8, 1.0), _run("off", [30] * 8, 1.04)])
    assert "A/A ratio (same settings: noise)" in aa and "Speed-up" not in aa
