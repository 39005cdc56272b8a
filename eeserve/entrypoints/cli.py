"""``eeserve`` command line: generate, chat, serve, bench, tune, calibrate, eval-exits."""

from __future__ import annotations

import argparse
import json
import os
import sys

from eeserve.entrypoints.cli_args import (
    _with_flag,
    add_engine_args,
    add_sampling_args,
    add_threads_arg,
    apply_threads,
    engine_config_from_args,
    port_number,
    sampling_params_from_args,
)

DESCRIPTION = """eeserve: an inference and serving engine for early-exit LLMs.

Examples:
  eeserve generate --prompt "The capital of France is" --max-tokens 32 --show-exits
  eeserve chat --message "Write a haiku about the sea"
  eeserve serve --port 8000
  eeserve generate --prompt "Hi" --exit-heads none --exit-policy token --exit-layers 12,16,20,24 --threshold 0.9

The commands that run a model take --threads N (default: the CPUs this process may use).
"""


class UserError(Exception):
    """A mistake in the user's input: printed as one line, no traceback."""


class _ArgumentParser(argparse.ArgumentParser):
    """argparse, but a bad flag raises ``UserError`` (one line from ``main``) instead of
    printing the whole usage block and exiting."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UserError(f"{message} (see '{self.prog} --help')")


def _read_prompts_file(path: str) -> list[tuple[int, str | list[int] | dict]]:
    """JSONL: each line a string, {"prompt": str}, {"prompt_token_ids": [...]} or {"messages": [...]}.

    Returns:
        (line number, prompt) pairs; a prompt is a string, a list of token ids or {"messages": [...]}.

    Raises:
        UserError: naming the file and the line (missing file, a folder, invalid UTF-8 or JSON, an
            entry of the wrong shape).
    """
    if os.path.isdir(path):
        raise UserError(f"--prompts-file {path!r} is a directory; give a JSONL file (one prompt per line)")
    if not os.path.isfile(path):
        raise UserError(f"--prompts-file {path!r} does not exist")
    items: list[tuple[int, str | list[int] | dict]] = []
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            where = f"--prompts-file {path}: line {n}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise UserError(f"{where} is not valid UTF-8 (byte 0x{raw[e.start]:02x} at column {e.start + 1})")
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"{where} is not valid JSON ({e.msg})")
            items.append((n, _prompt_of_line(obj, where)))
    if not items:
        raise UserError(f"--prompts-file {path} holds no prompts")
    return items


def _prompt_of_line(obj: object, where: str) -> str | list[int] | dict:
    if isinstance(obj, str):
        prompt: str | list[int] | dict = obj
    elif isinstance(obj, dict) and isinstance(obj.get("prompt"), str):
        prompt = obj["prompt"]
    elif isinstance(obj, dict) and "prompt_token_ids" in obj:
        ids = obj["prompt_token_ids"]
        if not isinstance(ids, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in ids):
            raise UserError(f"{where}: prompt_token_ids must be a list of integers")
        prompt = list(ids)
    elif isinstance(obj, dict) and "messages" in obj:
        msgs = obj["messages"]
        if not isinstance(msgs, list) or not msgs:
            raise UserError(f"{where}: messages must be a non-empty list of {{'role': ..., 'content': ...}} objects")
        for i, m in enumerate(msgs):
            if not (isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
                raise UserError(f"{where}: messages[{i}] must be an object with a string 'role' and a string "
                                f"'content', got {json.dumps(m, ensure_ascii=False)[:80]}")
        prompt = {"messages": msgs}
    else:
        raise UserError(
            f"{where} must be a string or an object with 'prompt', 'prompt_token_ids' or 'messages'"
        )
    if not prompt:
        raise UserError(f"{where}: the prompt is empty")
    return prompt


def _engine_prompts(llm, items: list[tuple[int, str | list[int] | dict]], path: str) -> list[str | list[int]]:
    """Chat messages through the chat template, token ids checked against the vocabulary; a
    failure names the file and the line."""
    vocab = llm.engine.args.vocab_size
    prompts: list[str | list[int]] = []
    for n, item in items:
        where = f"--prompts-file {path}: line {n}"
        if isinstance(item, dict):
            try:
                prompts.append(llm.apply_chat_template(item["messages"]))
            except Exception as e:  # noqa: BLE001 - the template's error, told with its line
                raise UserError(f"{where}: messages cannot be formatted by the chat template ({e})")
        elif isinstance(item, list):
            bad = [t for t in item if not 0 <= t < vocab]
            if bad:
                raise UserError(f"{where}: prompt_token_ids must be in [0, {vocab}) (the vocabulary), got {bad[:5]}")
            prompts.append(item)
        else:
            prompts.append(item)
    return prompts


def format_exits(tokenizer, token_ids: list[int], exit_layers: list[int]) -> str:
    """Text with each token's exit layer: ``[ Paris|18][.|30]``."""
    parts = []
    for t, e in zip(token_ids, exit_layers):
        text = tokenizer.decode([t], skip_special_tokens=False).replace("\n", "\\n")
        parts.append(f"[{text}|{e}]")
    return "".join(parts)


def _logprob_rows(c) -> list[list[dict]]:
    """Per generated token, its top logprobs (the chosen token included), best first."""
    return [
        [{"token_id": tid, "token": lp.decoded_token, "logprob": lp.logprob}
         for tid, lp in sorted(d.items(), key=lambda kv: kv[1].rank)]
        for d in c.logprobs
    ]


def _print_output(llm, out, show_exits: bool, as_json: bool) -> None:
    for c in out.outputs:
        if as_json:
            row = {
                "prompt": out.prompt, "index": c.index, "text": c.text, "token_ids": c.token_ids,
                "finish_reason": c.finish_reason, "exit_layers": c.exit_layers,
            }
            if c.logprobs is not None:
                row["logprobs"] = _logprob_rows(c)
                row["cumulative_logprob"] = c.cumulative_logprob
            print(json.dumps(row, ensure_ascii=False))
            continue
        print(c.text)
        if c.logprobs is not None:
            print("\n-- logprob of each token (natural log; the top-N are in --prompts-file's JSON output):")
            print("".join(f"[{d[t].decoded_token!r}|{d[t].logprob:.2f}]" for t, d in zip(c.token_ids, c.logprobs)))
        if show_exits:
            L = llm.engine.args.num_layers
            print(f"\n-- exit layer of each token (of {L} layers):")
            print(format_exits(llm.tokenizer, c.token_ids, c.exit_layers))
    if show_exits and not as_json and out.metrics.mean_layers_per_token is not None:
        m = out.metrics
        ee = llm.engine.config.early_exit
        ratio = ""
        if m.flops_ratio is not None:
            ratio = f", FLOPs {100 * m.flops_ratio:.0f}% of full depth ({_flops_note(ee, m.flops_ratio)})"
        print(f"-- mean layers per token {m.mean_layers_per_token:.1f} of {llm.engine.args.num_layers}{ratio}")
        if ee.enabled and ee.verify_exits:
            sched = llm.engine.scheduler
            print(f"-- exits verified at full depth (output equals the full model's): "
                  f"{sched.num_drafts_accepted} kept, {sched.num_drafts_rejected} replaced since the model loaded")


def _check_model_source(model: str) -> None:
    """Refuse a --model path that cannot load, before torch is imported: a missing path, a file
    that is not .gguf, a damaged or non-GGUF .gguf file (aliases and folders are checked by the loader)."""
    from pathlib import Path

    path = Path(model).expanduser()
    if path.is_dir():
        return
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise UserError(f"--model {model!r} is a file but not a .gguf file; give a .gguf file, a Hugging Face "
                            "model folder or an alias (smollm2-135m)")
        from eeserve.model.gguf_file import check_gguf_source, default_cache_dir

        try:
            check_gguf_source(path, default_cache_dir())
        except (ValueError, OSError) as e:
            raise UserError(f"--model: {e}")
        return
    if os.sep in model or model.startswith((".", "~")) or model.lower().endswith(".gguf"):
        raise UserError(f"--model: model path {model!r} does not exist; pass an existing .gguf file or Hugging Face "
                        "model folder, or an alias (smollm2-135m)")


def _engine_config(args):
    """The validated EngineConfig of the flags, the model path checked: every check that needs no
    weights, done before the model loads."""
    cfg = engine_config_from_args(args)
    _check_model_source(cfg.model.model)
    return cfg


def _flops_note(ee, flops_ratio: float) -> str:
    """Why the FLOPs ratio is what it is (it can pass 100% while layers are skipped)."""
    if not ee.enabled:
        return "early exit off"
    if ee.verify_exits:
        return ("verified exits: each early token's skipped layers still run in its next step to check it, "
                "the exit head comes on top and a replaced draft's work is lost; the gain is time per token, "
                "since the check rides along with the next token, not FLOPs")
    if flops_ratio > 1:
        return "the exit heads and confidence checks cost more than the skipped layers saved"
    return "skipped layers less the cost of the exit heads and confidence checks"


def _build_llm(args):
    from eeserve.entrypoints.llm import LLM

    llm = LLM.from_config(engine_config_from_args(args))
    print(f"eeserve: {llm.engine.kernel_report}", file=sys.stderr)
    return llm


def cmd_generate(args) -> int:
    if (args.prompt is None) == (args.prompts_file is None):
        raise UserError("give exactly one of --prompt TEXT or --prompts-file FILE.jsonl")
    if args.prompt is not None and not args.prompt:
        raise UserError("--prompt is empty: give at least one character")
    items = [(0, args.prompt)] if args.prompt is not None else _read_prompts_file(args.prompts_file)
    params = sampling_params_from_args(args)
    _engine_config(args)
    llm = _build_llm(args)
    prompts = _engine_prompts(llm, items, args.prompts_file) if args.prompts_file else [args.prompt]
    outs = llm.generate(prompts, params, use_tqdm=len(prompts) > 1)
    for out in outs:
        _print_output(llm, out, args.show_exits, as_json=args.prompts_file is not None)
    return 0


def cmd_chat(args) -> int:
    params = sampling_params_from_args(args)
    _engine_config(args)
    llm = _build_llm(args)
    history: list[dict] = [{"role": "system", "content": args.system}] if args.system else []
    if args.message is not None:
        out = llm.chat(history + [{"role": "user", "content": args.message}], params, use_tqdm=False)[0]
        _print_output(llm, out, args.show_exits, as_json=False)
        return 0
    print("eeserve chat: type a message, Ctrl-D or /exit to quit.", file=sys.stderr)
    while True:
        try:
            line = input("> ")
        except EOFError:
            print(file=sys.stderr)
            return 0
        if line.strip() in ("/exit", "/quit"):
            return 0
        if not line.strip():
            continue
        history.append({"role": "user", "content": line})
        out = llm.chat(history, params, use_tqdm=False)[0]
        _print_output(llm, out, args.show_exits, as_json=False)
        history.append({"role": "assistant", "content": out.outputs[0].text})


def listen_socket(host: str, port: int):
    """Bind the server's socket before the model loads, so that a bad --host or a port in use is
    told at once (and no other process can take the port while the model loads).

    Returns:
        A bound (not yet listening) TCP socket.

    Raises:
        UserError: naming --host or --port.
    """
    import errno
    import ipaddress
    import socket

    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        if host.replace(".", "").isdigit():
            raise UserError(f"--host {host!r} is not a valid IPv4 address (four numbers 0..255, e.g. 127.0.0.1)")
        try:
            family, _, _, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
        except (socket.gaierror, UnicodeError) as e:
            raise UserError(f"--host {host!r} is not an IP address or a host name this machine can resolve ({e})")
    else:
        family, addr = (socket.AF_INET6 if ip.version == 6 else socket.AF_INET), (host, port)
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn: no wait after a restart
    try:
        sock.bind(addr)
    except OSError as e:
        sock.close()
        if e.errno == errno.EADDRINUSE:
            raise UserError(f"--port {port}: {host}:{port} is already in use (another server?); choose another --port")
        if e.errno == errno.EADDRNOTAVAIL:
            raise UserError(f"--host {host!r} is not an address of this machine ({e.strerror})")
        if e.errno == errno.EACCES:
            raise UserError(f"--port {port}: permission denied (ports below 1024 need privileges)")
        raise UserError(f"--host {host!r} --port {port}: cannot listen there ({e.strerror})")
    return sock


def cmd_serve(args) -> int:
    cfg = _engine_config(args)
    sock = listen_socket(args.host, args.port)
    try:
        from eeserve.entrypoints.openai.server import run_server

        api_key = args.api_key or os.environ.get("EESERVE_API_KEY") or None
        run_server(cfg, host=args.host, port=args.port, api_key=api_key, served_model_name=args.served_model_name,
                   sock=sock)
    finally:
        sock.close()
    return 0


def cmd_bench_serve(args) -> int:
    from eeserve.entrypoints.bench_serve import main as bench_main

    return bench_main(args)


def cmd_tune_kernels(args) -> int:
    from eeserve.entrypoints.tune_kernels import main as tune_main

    return tune_main(args)


def build_parser() -> argparse.ArgumentParser:
    p = _ArgumentParser(prog="eeserve", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    g = sub.add_parser("generate", help="generate text for a prompt or a JSONL file of prompts")
    g.add_argument("--prompt", default=None, help="the prompt text (raw, no chat template)")
    g.add_argument("--prompts-file", default=None, help="JSONL file: one string or {'prompt'|'prompt_token_ids'|'messages'} per line")
    g.add_argument("--show-exits", action="store_true", help="print each generated token with its exit layer")
    add_sampling_args(g)
    add_engine_args(g)
    g.set_defaults(func=cmd_generate)

    c = sub.add_parser("chat", help="chat with the model (one-shot with --message, else interactive)")
    c.add_argument("--message", default=None, help="one user message; omit for an interactive session")
    c.add_argument("--system", default=None, help="system prompt")
    c.add_argument("--show-exits", action="store_true", help="print each generated token with its exit layer")
    add_sampling_args(c)
    add_engine_args(c)
    c.set_defaults(func=cmd_chat)

    s = sub.add_parser("serve", help="OpenAI-compatible HTTP server")
    s.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1)")
    s.add_argument("--port", type=port_number, default=8000, help="TCP port, 1..65535 (default 8000)")
    s.add_argument("--api-key", default=None, help="require this bearer token on /v1 routes (also EESERVE_API_KEY)")
    s.add_argument("--served-model-name", default=None, help="model name clients use (default: the model's name)")
    add_engine_args(s, model_positional=True)
    s.set_defaults(func=cmd_serve)

    b = sub.add_parser("bench", help="benchmarks")
    bsub = b.add_subparsers(dest="bench_command", metavar="BENCH")
    bs = bsub.add_parser("serve", help="load-test a running server, early exit on and off")
    try:
        from eeserve.entrypoints.bench_serve import add_cli_args

        add_cli_args(bs)
    except ImportError:  # server extras not installed
        pass
    bs.set_defaults(func=cmd_bench_serve)

    k = sub.add_parser("tune-kernels", help="measure the matrix-product kernels on this machine (cached for later starts)")
    from eeserve.entrypoints.tune_kernels import add_cli_args as add_tune_kernels_args

    add_tune_kernels_args(k)
    k.set_defaults(func=cmd_tune_kernels)

    _add_tuning_commands(sub)
    for name, command in sub.choices.items():
        if name != "bench":  # a client: it runs no model
            add_threads_arg(command)
    return p


def _add_tuning_commands(sub) -> None:
    try:
        from eeserve.tuning import cli as tuning_cli
    except ImportError:
        return
    tuning_cli.add_commands(sub)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except UserError as e:
        print(f"eeserve: error: {e}", file=sys.stderr)
        return 2
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        apply_threads(args)
        return int(args.func(args) or 0)
    except ValueError as e:  # also from the engine: a config field's error names its flag
        print(f"eeserve: error: {_with_flag(e)}", file=sys.stderr)
        return 2
    except (UserError, OSError) as e:
        print(f"eeserve: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
