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
