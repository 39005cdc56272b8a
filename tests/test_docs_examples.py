"""Every example in README.md, docs/serving.md, `eeserve --help` and `make demo` runs as written.

The commands are read from the documents themselves, so an example that stops working fails
here. To keep this cheap:

- ``eeserve generate`` / ``chat`` run in-process through ``cli.main`` with ``--max-tokens`` capped
  at 6 (appended: argparse keeps the last value); in the Python and curl examples every
  ``max_tokens`` is rewritten to 6. Every ``LLMEngine`` of one model, cache and
  scheduler configuration is built once and switched between early-exit settings with
  ``set_early_exit`` (the same validation as a fresh engine).
- One real ``eeserve serve`` process (the README's command, on a free port) answers the curl
  commands, the ``openai`` client snippets and ``eeserve bench serve`` (2 prompts, 4 tokens).
  The other ``serve`` commands are parsed, bound and built into an engine, not served.
- ``tune``, ``calibrate`` and ``eval-exits`` take minutes; their commands are only parsed.
"""

from __future__ import annotations

import builtins
import re
import shlex
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from eeserve.entrypoints import cli

ROOT = Path(__file__).resolve().parent.parent
DOCS = {"README.md": ROOT / "README.md", "docs/serving.md": ROOT / "docs" / "serving.md"}
MAX_TOKENS = "6"
SLOW_COMMANDS = ("tune", "calibrate", "eval-exits")  # minutes each: parsed only


def _join_commands(block: str) -> list[str]:
    """Shell commands of a code block: continuation lines joined, comment lines dropped."""
    out, buf = [], ""
    for line in block.splitlines():
        if not buf and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if line.endswith("\\"):
            buf += line[:-1] + " "
            continue
        buf += line
        try:
            shlex.split(buf, comments=True)
        except ValueError:  # a quoted string goes on over the next line
            buf += "\n"
            continue
        out.append(buf.strip())
        buf = ""
    return out


def _blocks(text: str, lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", text, flags=re.S)


def _doc_commands(program: str) -> list[tuple[str, list[str]]]:
    """(document, argv) of every `program ...` command in the bash blocks of the documents."""
    found = []
    for name, path in DOCS.items():
        for block in _blocks(path.read_text(), "bash"):
            for cmd in _join_commands(block):
                argv = shlex.split(cmd, comments=True)
                if argv and argv[0] == program:
                    found.append((name, argv))
    return found


def _inline_commands() -> list[tuple[str, list[str]]]:
    """`eeserve ...` spans inside the README's text that are whole commands (not `--help`)."""
    found = []
    for span in re.findall(r"`(eeserve [^`]+)`", DOCS["README.md"].read_text()):
        argv = shlex.split(span)
        if len(argv) > 2 and "--help" not in argv and not any(a.endswith("...") for a in argv):
            found.append(("README.md (inline)", argv))
    return found


def _help_and_demo_commands() -> list[tuple[str, list[str]]]:
    found = [("eeserve --help", shlex.split(line)) for line in cli.DESCRIPTION.splitlines()
             if line.strip().startswith("eeserve ")]
    demo = re.search(r"^demo:.*\n\t(.*)$", (ROOT / "Makefile").read_text(), flags=re.M).group(1)
    found.append(("make demo", ["eeserve", *shlex.split(demo)[1:]]))
    return found


EESERVE = _doc_commands("eeserve") + _inline_commands() + _help_and_demo_commands()
MODEL_RUNS = [(d, a) for d, a in EESERVE if a[1] in ("generate", "chat")]
SERVES = [(d, a) for d, a in EESERVE if a[1] == "serve"]
assert len(MODEL_RUNS) >= 10 and len(SERVES) >= 4, "the examples were not found: has the README moved?"


def _id(item: tuple[str, list[str]]) -> str:
    return f"{item[0]}: {shlex.join(item[1])}"[:120]


@pytest.fixture(scope="module")
def engines():
    """LLMEngine, one per (model, cache, scheduler) config, reused across early-exit settings."""
    from eeserve.engine import llm_engine
    from eeserve.entrypoints import llm as llm_module

    real = llm_engine.LLMEngine
    built: dict = {}

    def engine(config):
        key = (config.model, config.cache, config.scheduler)
        if key not in built:
            built[key] = real(config)
        else:
            built[key].set_early_exit(config.early_exit)
        return built[key]

    mp = pytest.MonkeyPatch()
    mp.setattr(llm_module, "LLMEngine", engine)
    mp.setattr(llm_engine, "LLMEngine", engine)
    yield built
    mp.undo()


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """A folder with the files the examples name: prompts.jsonl and runs/heads (a copy of the
    shipped tuned heads, as `eeserve tune --out runs/heads` would leave)."""
    from eeserve.early_exit.defaults import shipped_heads

    (tmp_path / "prompts.jsonl").write_text(
        '"The capital of France is"\n{"prompt": "Once upon a time"}\n{"prompt_token_ids": [504, 3575, 282]}\n'
        '{"messages": [{"role": "user", "content": "Hi!"}]}\n'
    )
    shutil.copytree(shipped_heads("smollm2-135m"), tmp_path / "runs" / "heads")
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.mark.parametrize("example", MODEL_RUNS, ids=_id)
def test_generate_and_chat_examples_run(example, engines, workdir, capsys, monkeypatch):
    doc, argv = example
    if argv[1] == "chat" and "--message" not in argv:  # interactive: one message, then Ctrl-D
        replies = iter(["Hi!"])

        def fake_input(prompt=""):
            try:
                return next(replies)
            except StopIteration:
                raise EOFError from None

        monkeypatch.setattr(builtins, "input", fake_input)
    rc = cli.main([*argv[1:], "--max-tokens", MAX_TOKENS])
    out, err = capsys.readouterr()
    assert rc == 0, f"{doc}: {shlex.join(argv)} failed:\n{err}"
    assert out.strip(), err
    if "--show-exits" in argv:
        assert "exit layer of each token" in out and "mean layers per token" in out
        assert "FLOPs" not in out or "of full depth (" in out, "the FLOPs ratio needs its explanation"
    if "--prompts-file" in argv:
        assert len(out.strip().splitlines()) == 4  # one JSON line per prompt


@pytest.mark.parametrize("example", [e for e in EESERVE if e[1][1] in SLOW_COMMANDS], ids=_id)
def test_tuning_examples_parse(example):
    args = cli.build_parser().parse_args(example[1][1:])
    assert args.func is not None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _with_port(argv: list[str], port: int) -> list[str]:
    return [a.replace("127.0.0.1:8000", f"127.0.0.1:{port}") for a in argv]


@pytest.mark.parametrize("example", SERVES[1:], ids=_id)
def test_other_serve_examples_bind_and_build(example, engines, monkeypatch):
    """Everything `serve` does before it answers: flags, the socket, the engine."""
    from eeserve.entrypoints.openai import server

    doc, argv = example
    argv = list(argv)
    port = _free_port()
    if "--port" in argv:
        argv[argv.index("--port") + 1] = str(port)
    else:
        argv += ["--port", str(port)]
    seen = {}

    def fake_run_server(config, host, port, api_key, served_model_name, sock):
        from eeserve.engine import llm_engine

        seen.update(sock_name=sock.getsockname(), api_key=api_key)
        llm_engine.LLMEngine(config)  # the engine run_server would serve: every model-side check

    monkeypatch.setattr(server, "run_server", fake_run_server)
    assert cli.main(argv[1:]) == 0
    assert seen["sock_name"][1] == port
    if "--api-key" in argv:
        assert seen["api_key"] == argv[argv.index("--api-key") + 1]


@pytest.fixture(scope="module")
def live_server():
    """The README's first `eeserve serve` command, as a process, on a free port."""
    doc, argv = SERVES[0]
    assert doc == "README.md" and "--port" in argv
    port = _free_port()
    argv = list(argv)
    argv[argv.index("--port") + 1] = str(port)
    proc = subprocess.Popen([sys.executable, "-m", "eeserve.entrypoints.cli", *argv[1:]],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    import httpx

    deadline = time.time() + 240
    try:
        while True:
            if proc.poll() is not None:
                pytest.fail(f"{shlex.join(argv)} exited with {proc.returncode}:\n{proc.stdout.read()[-3000:]}")
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.time() < deadline, "the README's server did not come up"
            time.sleep(0.3)
        yield port
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _curl_examples() -> list[tuple[str, list[str]]]:
    return _doc_commands("curl")


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
@pytest.mark.parametrize("example", _curl_examples(), ids=_id)
def test_curl_examples(example, live_server):
    doc, argv = example
    argv = [_fewer_tokens(a) for a in _with_port(argv, live_server)] + ["-sS", "-w", "\nHTTP %{http_code}"]
    r = subprocess.run(argv, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stdout.rstrip().endswith("HTTP 200"), r.stdout[-2000:]
    assert '"exit_layers"' in r.stdout


def _fewer_tokens(code: str) -> str:
    """The example with every max_tokens set to MAX_TOKENS (a Python keyword or a JSON field)."""
    code = re.sub(r"max_tokens=\d+", f"max_tokens={MAX_TOKENS}", code)
    return re.sub(r'"max_tokens": \d+', f'"max_tokens": {MAX_TOKENS}', code)


def _python_blocks() -> list[tuple[str, str]]:
    return [(name, _fewer_tokens(b)) for name, path in DOCS.items() for b in _blocks(path.read_text(), "python")]


def test_python_api_examples(engines, capsys, monkeypatch):
    """The README's LLM blocks, run in order in one namespace (as one Python session)."""
    blocks = [b for name, b in _python_blocks() if "OpenAI(" not in b]
    assert len(blocks) >= 2
    ns: dict = {}
    for b in blocks:
        exec(compile(b, "README.md", "exec"), ns)  # noqa: S102 - the documentation's own code
    out = capsys.readouterr().out
    assert "Paris" in out
    llm = ns["llm"]
    assert llm.engine.config.early_exit.exit_layers == (12, 16, 20, 24)


@pytest.mark.parametrize("block", [b for b in _python_blocks() if "OpenAI(" in b[1]], ids=lambda b: b[0])
def test_openai_client_examples(block, live_server, capsys):
    pytest.importorskip("openai")
    doc, code = block
    code = code.replace("127.0.0.1:8000", f"127.0.0.1:{live_server}")
    exec(compile(code, doc, "exec"), {})  # noqa: S102
    assert capsys.readouterr().out.strip()


@pytest.mark.parametrize("example", [e for e in EESERVE if e[1][1] == "bench"], ids=_id)
def test_bench_serve_examples(example, live_server, capsys):
    argv = _with_port(example[1], live_server)
    rc = cli.main([*argv[1:], "--num-prompts", "2", "--max-tokens", "4"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    assert "Successful requests" in out
