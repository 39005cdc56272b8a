"""``eeserve`` command line: generate, chat, serve, bench, tune, calibrate, eval-exits."""

from __future__ import annotations

import argparse
import json
import os
import sys

from eeserve.entrypoints.cli_args import (
    add_engine_args,
    add_sampling_args,
    engine_config_from_args,
    sampling_params_from_args,
)

DESCRIPTION = """eeserve: an inference and serving engine for early-exit LLMs.

Examples:
  eeserve generate --prompt "The capital of France is" --max-tokens 32 --show-exits
  eeserve chat --message "Write a haiku about the sea"
  eeserve serve --port 8000
  eeserve generate --prompt "Hi" --exit-policy token --exit-layers 12,16,20,24 --threshold 0.9
"""


class UserError(Exception):
    """A mistake in the user's input: printed as one line, no traceback."""


class _ArgumentParser(argparse.ArgumentParser):
    """argparse, but a bad flag raises ``UserError`` (one line from ``main``) instead of
    printing the whole usage block and exiting."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UserError(f"{message} (see '{self.prog} --help')")


def _read_prompts_file(path: str) -> list:
    """JSONL: each line a string, {"prompt": str}, {"prompt_token_ids": [...]} or {"messages": [...]}."""
    if not os.path.isfile(path):
        raise UserError(f"--prompts-file {path!r} does not exist")
    items = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"--prompts-file {path}: line {n} is not valid JSON ({e.msg})")
            if isinstance(obj, str):
                items.append(obj)
            elif isinstance(obj, dict) and isinstance(obj.get("prompt"), str):
                items.append(obj["prompt"])
            elif isinstance(obj, dict) and isinstance(obj.get("prompt_token_ids"), list):
                if not all(isinstance(t, int) and not isinstance(t, bool) for t in obj["prompt_token_ids"]):
                    raise UserError(f"--prompts-file {path}: line {n}: prompt_token_ids must be a list of integers")
                items.append(list(obj["prompt_token_ids"]))
            elif isinstance(obj, dict) and isinstance(obj.get("messages"), list):
                items.append({"messages": obj["messages"]})
            else:
                raise UserError(
                    f"--prompts-file {path}: line {n} must be a string or an object with 'prompt', "
                    "'prompt_token_ids' or 'messages'"
                )
    if not items:
        raise UserError(f"--prompts-file {path} holds no prompts")
    return items


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
        ratio = f", FLOPs {100 * m.flops_ratio:.0f}% of full depth" if m.flops_ratio is not None else ""
        print(f"-- mean layers per token {m.mean_layers_per_token:.1f} of {llm.engine.args.num_layers}{ratio}")
        ee = llm.engine.config.early_exit
        if ee.enabled and ee.verify_exits:
            sched = llm.engine.scheduler
            print(f"-- exits verified at full depth (output equals the full model's): "
                  f"{sched.num_drafts_accepted} kept, {sched.num_drafts_rejected} replaced since the model loaded")


def _build_llm(args):
    from eeserve.entrypoints.llm import LLM

    llm = LLM.from_config(engine_config_from_args(args))
    print(f"eeserve: {llm.engine.kernel_report}", file=sys.stderr)
    return llm


def cmd_generate(args) -> int:
    if (args.prompt is None) == (args.prompts_file is None):
        raise UserError("give exactly one of --prompt TEXT or --prompts-file FILE.jsonl")
    items = [args.prompt] if args.prompt is not None else _read_prompts_file(args.prompts_file)
    params = sampling_params_from_args(args)
    llm = _build_llm(args)
    prompts = [llm.apply_chat_template(i["messages"]) if isinstance(i, dict) else i for i in items]
    outs = llm.generate(prompts, params, use_tqdm=len(prompts) > 1)
    for out in outs:
        _print_output(llm, out, args.show_exits, as_json=args.prompts_file is not None)
    return 0


def cmd_chat(args) -> int:
    params = sampling_params_from_args(args)
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


def cmd_serve(args) -> int:
    from eeserve.entrypoints.openai.server import run_server

    cfg = engine_config_from_args(args)
    api_key = args.api_key or os.environ.get("EESERVE_API_KEY") or None
    run_server(cfg, host=args.host, port=args.port, api_key=api_key, served_model_name=args.served_model_name)
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
    s.add_argument("--port", type=int, default=8000, help="port (default 8000)")
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
        return int(args.func(args) or 0)
    except (UserError, ValueError, FileNotFoundError) as e:
        print(f"eeserve: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
