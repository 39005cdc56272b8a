"""Offline Python API, shaped like vLLM's ``LLM``."""

from __future__ import annotations

import itertools
import time
from collections.abc import Sequence
from typing import Any

from eeserve.config import CacheConfig, EarlyExitConfig, EngineConfig, ModelConfig, SchedulerConfig
from eeserve.engine.llm_engine import LLMEngine
from eeserve.entrypoints.chat_utils import parse_chat_messages
from eeserve.errors import InvalidRequestError
from eeserve.inputs import PromptType, parse_prompts
from eeserve.outputs import RequestOutput
from eeserve.sampling_params import SamplingParams

Message = dict[str, Any]


class LLM:
    """Generate text with an (early-exit) LLM.

    Example::

        from eeserve import LLM, SamplingParams
        llm = LLM("smollm2-135m")
        out = llm.generate(["The capital of France is"], SamplingParams(temperature=0, max_tokens=16))
        print(out[0].outputs[0].text)

    Args:
        model: alias (``smollm2-135m``), a ``.gguf`` file or a Hugging Face folder.
        dtype: ``auto`` (default: bfloat16 where the CPU has bf16 instructions and it measures
            faster, else float32), ``float32``, ``bfloat16`` or ``float16``.
        device: ``cpu`` (default) or ``cuda``.
        max_model_len: context length (default: the model's).
        block_size, num_kv_blocks, kv_cache_memory: KV cache (see ``CacheConfig``).
        max_num_seqs, max_num_batched_tokens: batching limits (see ``SchedulerConfig``).
        early_exit: an ``EarlyExitConfig``, or a dict of its fields merged over the model's
            default (tuned heads shipped for ``smollm2-135m``; ``{"exit_heads": "none"}`` turns
            them off), or None for that default.
        seed: seed of the generator used by requests without their own seed.
        kernel_tuning, quantization: see ``ModelConfig`` (measured kernels, on by default;
            weight-only ``"int8"``, off by default).

    Raises:
        ValueError / FileNotFoundError: invalid settings or an unknown model, naming the field.
    """

    def __init__(
        self,
        model: str = "smollm2-135m",
        *,
        dtype: str = "auto",
        device: str = "cpu",
        max_model_len: int | None = None,
        block_size: int = 16,
        num_kv_blocks: int | None = None,
        kv_cache_memory: int | None = None,
        max_num_seqs: int = 32,
        max_num_batched_tokens: int = 512,
        early_exit: EarlyExitConfig | dict | None = None,
        seed: int = 0,
        debug_nan_fill: bool = False,
        kernel_tuning: bool = True,
        quantization: str | None = None,
    ) -> None:
        from eeserve.early_exit.defaults import resolve_early_exit

        if early_exit is None or isinstance(early_exit, dict):
            early_exit = resolve_early_exit(model, dict(early_exit or {}))
        config = EngineConfig(
            model=ModelConfig(model=model, dtype=dtype, device=device, max_model_len=max_model_len, seed=seed,
                              kernel_tuning=kernel_tuning, quantization=quantization),
            cache=CacheConfig(
                block_size=block_size, num_kv_blocks=num_kv_blocks, kv_cache_memory=kv_cache_memory,
                debug_nan_fill=debug_nan_fill,
            ),
            scheduler=SchedulerConfig(max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens),
            early_exit=early_exit,
        )
        self.engine = LLMEngine(config)
        self._counter = itertools.count()

    @classmethod
    def from_config(cls, config: EngineConfig) -> LLM:
        """Build from a complete ``EngineConfig`` (what the CLI does)."""
        llm = cls.__new__(cls)
        llm.engine = LLMEngine(config)
        llm._counter = itertools.count()
        return llm

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    def get_tokenizer(self):
        return self.engine.tokenizer

    def generate(
        self,
        prompts: PromptType | Sequence[PromptType],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = True,
    ) -> list[RequestOutput]:
        """Generate completions for one or many prompts.

        Args:
            prompts: a prompt or a list of prompts; a prompt is a string, a list of token ids,
                ``{"prompt": str}`` or ``{"prompt_token_ids": [ids]}`` (vLLM's forms).
            sampling_params: one for all prompts, or one per prompt.
            use_tqdm: show a progress bar with output tokens/s (for more than one prompt).

        Returns:
            one ``RequestOutput`` per prompt, in prompt order.

        Raises:
            ValueError: bad prompt or sampling params (``InvalidRequestError``, naming the field, as
                the server's 400 does), or a mismatched number of sampling params; nothing is
                queued then.
        """
        prompts = parse_prompts(prompts)
        if sampling_params is None:
            sampling_params = SamplingParams()
        if isinstance(sampling_params, SamplingParams):
            params_list = [sampling_params] * len(prompts)
        elif isinstance(sampling_params, (list, tuple)):
            params_list = list(sampling_params)
            if len(params_list) != len(prompts):
                raise ValueError(
                    f"sampling_params has {len(params_list)} entries for {len(prompts)} prompts; give one or one per prompt"
                )
        else:
            raise InvalidRequestError(
                f"sampling_params must be a SamplingParams or a list of them, got {type(sampling_params).__name__}",
                param="sampling_params")
        ids = []
        try:
            for prompt, params in zip(prompts, params_list):
                rid = str(next(self._counter))
                self.engine.add_request(rid, prompt, params)
                ids.append(rid)
        except Exception:
            self.engine.abort_request(ids)
            raise
        return self._run(ids, use_tqdm and len(ids) > 1)

    def _run(self, ids: list[str], use_tqdm: bool) -> list[RequestOutput]:
        results: dict[str, RequestOutput] = {}
        bar = None
        if use_tqdm:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(ids), desc="Processed prompts", dynamic_ncols=True)
        start = time.perf_counter()
        num_out = 0
        try:
            while self.engine.has_unfinished_requests():
                for out in self.engine.step():
                    if out.finished:
                        results[out.request_id] = out
                        num_out += sum(len(c.token_ids) for c in out.outputs)
                        if bar is not None:
                            bar.update(1)
                            bar.set_postfix_str(f"output {num_out / (time.perf_counter() - start):.1f} tok/s")
        except BaseException:
            self.engine.abort_request(ids)
            raise
        finally:
            if bar is not None:
                bar.close()
        return [results[i] for i in ids]

    def chat(
        self,
        messages: list[Message] | list[list[Message]],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = True,
        add_generation_prompt: bool = True,
        chat_template_kwargs: dict[str, Any] | None = None,
    ) -> list[RequestOutput]:
        """Generate replies to one conversation or a list of them, using the model's chat template.

        Args:
            messages: ``[{"role": "user", "content": "..."}, ...]`` or a list of such lists;
                ``content`` is a string or OpenAI's list of ``{"type": "text", "text": ...}`` parts.

        Raises:
            ValueError: a malformed message (``InvalidRequestError`` naming it, as the server's 400).
        """
        if isinstance(messages, (list, tuple)) and messages and all(isinstance(c, (list, tuple)) for c in messages):
            conversations = list(messages)
        else:
            conversations = [messages]
        prompts = [self.apply_chat_template(c, add_generation_prompt, chat_template_kwargs) for c in conversations]  # type: ignore[arg-type]
        return self.generate(prompts, sampling_params, use_tqdm=use_tqdm)

    def apply_chat_template(
        self, conversation: list[Message], add_generation_prompt: bool = True, chat_template_kwargs: dict | None = None
    ) -> list[int]:
        """Token ids of a conversation rendered with the model's chat template.

        Raises:
            ValueError: a malformed message (see ``chat``).
        """
        text = self.engine.tokenizer.apply_chat_template(
            parse_chat_messages(conversation), tokenize=False, add_generation_prompt=add_generation_prompt, **(chat_template_kwargs or {})
        )
        return self.engine.tokenizer.encode(text, add_special_tokens=False)
