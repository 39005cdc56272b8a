"""Text for exit-head tuning: sources, tokenization into windows, the held-out split.

Sources (``--data``):
- a ``.txt`` file: its text, cut into windows;
- a ``.jsonl`` file: one document per line, a string or an object with ``text``, or with
  ``prompt`` and ``response`` (the prompt is context only: no loss on its positions);
- ``builtin`` (needs no network): the CPython documentation shipped with the standard library
  (``pydoc_data.topics``) and the model's own greedy answers to the prompt list in
  ``eeserve/data/tuning/prompts.txt`` (``builtin:pydoc`` and ``builtin:answers`` name one part).

The prompt list is split by line number into ``train`` / ``calib`` / ``test`` prompts, so that
calibration and the final check run on prompts never used in tuning.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

PROMPTS_FILE = Path(__file__).resolve().parent.parent / "data" / "tuning" / "prompts.txt"
BUILTIN_SOURCES = ("builtin", "builtin:pydoc", "builtin:answers")


@dataclass(frozen=True)
class Document:
    """One unit of text. ``context`` is conditioning only (a prompt): no loss on its tokens.

    Attributes:
        text: the text trained on (or, with token ids given, empty).
        context: text before it, or token ids (already chat-formatted).
        token_ids: the whole document as ids (context + text), when already tokenized.
        num_context_tokens: with ``token_ids``: how many leading ids are context.
    """

    text: str = ""
    context: str = ""
    token_ids: tuple[int, ...] | None = None
    num_context_tokens: int = 0


@dataclass(frozen=True)
class Window:
    """A run of at most ``window`` tokens that the backbone sees as one sequence.

    Attributes:
        token_ids: [n] int64.
        first_target: positions >= first_target - 1 predict a trained token, i.e. the rows
            ``first_target - 1 .. n - 2`` carry loss (the last row predicts beyond the window
            and is also used: its target is the model's own pick).
    """

    token_ids: torch.Tensor
    first_target: int

    @property
    def num_loss_rows(self) -> int:
        return self.token_ids.numel() - max(0, self.first_target - 1)


def load_prompts(split: str = "train", path: Path = PROMPTS_FILE) -> list[str]:
    """Prompts of ``split`` (``train``, ``calib``, ``test`` or ``all``): line i goes to calib when
    i % 5 == 3, to test when i % 5 == 4, else to train."""
    lines = [ln.strip() for ln in Path(path).read_text(encoding="utf-8").splitlines() if ln.strip()]
    pick = {"train": lambda i: i % 5 < 3, "calib": lambda i: i % 5 == 3, "test": lambda i: i % 5 == 4,
            "all": lambda i: True}
    if split not in pick:
        raise ValueError(f"prompt split must be train, calib, test or all, got {split!r}")
    return [p for i, p in enumerate(lines) if pick[split](i)]


def pydoc_documents() -> list[Document]:
    """The CPython documentation topics in the standard library, one document per topic."""
    from pydoc_data.topics import topics

    return [Document(text=topics[k]) for k in sorted(topics)]


def read_documents(path: str) -> list[Document]:
    """Documents of a user's ``.txt`` or ``.jsonl`` file.

    Raises:
        FileNotFoundError: no such file.
        ValueError: a malformed JSONL line, or no text at all.
    """
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"data file {path!r} does not exist")
    docs: list[Document] = []
    if p.suffix == ".jsonl":
        for n, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"data file {path}: line {n} is not valid JSON ({e.msg})") from None
            if isinstance(obj, str):
                docs.append(Document(text=obj))
            elif isinstance(obj, dict) and isinstance(obj.get("text"), str):
                docs.append(Document(text=obj["text"]))
            elif isinstance(obj, dict) and isinstance(obj.get("prompt"), str) and isinstance(obj.get("response"), str):
                docs.append(Document(text=obj["response"], context=obj["prompt"]))
            else:
                raise ValueError(f"data file {path}: line {n} must be a string or an object with 'text' "  # noqa: TRY004 (user input)
                                 "or with 'prompt' and 'response'")
    else:
        docs.append(Document(text=p.read_text(encoding="utf-8", errors="replace")))
    docs = [d for d in docs if d.text.strip()]
    if not docs:
        raise ValueError(f"data file {path!r} holds no text")
    return docs


def windows_from_ids(ids: Sequence[int], num_context: int, window: int, min_len: int = 8) -> list[Window]:
    """Cut one tokenized document into windows of at most ``window`` tokens. The first window keeps
    the context (up to ``window // 2`` tokens of it, its end); later windows are plain text."""
    ids = list(ids)
    if num_context > 0:
        keep = min(num_context, window // 2)
        ids = ids[num_context - keep :]
        num_context = keep
    out: list[Window] = []
    start = 0
    while start < len(ids):
        chunk = ids[start : start + window]
        first = num_context if start == 0 else 0
        if len(chunk) - first >= min_len:
            out.append(Window(torch.tensor(chunk, dtype=torch.long), max(first, 1)))
        if start == 0 and num_context:
            start = window
        else:
            start += window
    return out


def tokenize_documents(docs: Sequence[Document], encode: Callable[[str], list[int]], window: int,
                       bos: int | None = None) -> list[Window]:
    """Documents -> windows. ``encode`` maps text to ids (no special tokens)."""
    out: list[Window] = []
    for d in docs:
        if d.token_ids is not None:
            ids, n_ctx = list(d.token_ids), d.num_context_tokens
        else:
            ctx = ([bos] if bos is not None else []) + (encode(d.context) if d.context else [])
            ids, n_ctx = ctx + encode(d.text), len(ctx)
        out.extend(windows_from_ids(ids, n_ctx, window))
    return out


def split_windows(windows: Sequence[Window], heldout_fraction: float, seed: int,
                  min_heldout: int = 1) -> tuple[list[Window], list[Window]]:
    """Shuffle with ``seed`` and hold out a fraction of the windows.

    Raises:
        ValueError: no windows, or too few for both a training and a held-out part.
    """
    if not windows:
        raise ValueError("the data holds no usable text (every document is shorter than a few tokens)")
    if not 0.0 < heldout_fraction < 1.0:
        raise ValueError(f"heldout fraction must be in (0, 1), got {heldout_fraction}")
    n_held = max(min_heldout, round(len(windows) * heldout_fraction))
    if len(windows) - n_held < 1:
        raise ValueError(
            f"too little data for a held-out split: {len(windows)} window(s) of text; need at least "
            f"{n_held + 1} (add more text or lower --heldout)"
        )
    order = list(range(len(windows)))
    random.Random(seed).shuffle(order)
    held = sorted(order[:n_held])
    train = sorted(order[n_held:])
    return [windows[i] for i in train], [windows[i] for i in held]


def limit_tokens(windows: Sequence[Window], max_tokens: int, seed: int) -> list[Window]:
    """A seeded random subset of the windows with at most ``max_tokens`` tokens in all."""
    order = list(range(len(windows)))
    random.Random(seed + 1).shuffle(order)
    out, total = [], 0
    for i in order:
        n = windows[i].token_ids.numel()
        if total + n > max_tokens:
            continue
        out.append(windows[i])
        total += n
    return out


def answer_settings(max_tokens: int, samples: int = 0, temperature: float = 0.8, seed: int = 0) -> dict:
    """The generation settings stored with cached answers; a cache is reused only when they match."""
    return {"max_tokens": max_tokens, "samples": samples, "temperature": temperature, "seed": seed}


def generate_answers(llm, prompts: Sequence[str], max_tokens: int, cache: Path | None = None, samples: int = 0,
                     temperature: float = 0.8, seed: int = 0) -> list[Document]:
    """The model's own answers (full depth) to chat prompts, as token-id documents whose context is
    the chat-formatted prompt: the greedy answer to each prompt, plus ``samples`` answers sampled
    at ``temperature`` (top_p 0.95, seeded), which cover more of what the model writes. Cached as
    JSONL in ``cache`` when given (reused only when prompts and settings match)."""
    from eeserve.sampling_params import SamplingParams

    settings = answer_settings(max_tokens, samples, temperature, seed)
    expected = [p for p in prompts for _ in range(1 + samples)]
    if cache is not None and cache.is_file():
        rows = [json.loads(ln) for ln in cache.read_text().splitlines() if ln.strip()]
        if [r["prompt"] for r in rows] == expected and all(r.get("settings") == settings for r in rows):
            return [Document(token_ids=tuple(r["ids"]), num_context_tokens=r["n_ctx"]) for r in rows]
    ids = [llm.apply_chat_template([{"role": "user", "content": p}]) for p in prompts]
    greedy = llm.generate(ids, SamplingParams(temperature=0.0, max_tokens=max_tokens), use_tqdm=True)
    sampled = (llm.generate(ids, SamplingParams(n=samples, temperature=temperature, top_p=0.95, seed=seed,
                                                max_tokens=max_tokens), use_tqdm=True) if samples else [])
    outputs = []
    for k in range(len(prompts)):
        outputs.append(list(greedy[k].outputs[0].token_ids))
        outputs.extend(list(c.token_ids) for c in (sampled[k].outputs if samples else []))
    prompt_ids = [i for i in ids for _ in range(1 + samples)]
    return save_answers(cache, expected, prompt_ids, outputs, settings)


def save_answers(cache: Path | None, prompts: Sequence[str], prompt_ids: Sequence[list[int]],
                 outputs: Sequence[list[int]], settings: dict) -> list[Document]:
    """Answers as documents; written to ``cache`` (JSONL, with the generation settings) when given."""
    docs, rows = [], []
    for p, i, gen in zip(prompts, prompt_ids, outputs):
        docs.append(Document(token_ids=tuple(i + gen), num_context_tokens=len(i)))
        rows.append({"prompt": p, "settings": settings, "ids": i + gen, "n_ctx": len(i)})
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        cache.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return docs
