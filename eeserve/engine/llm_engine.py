"""The synchronous engine: add requests, step, get outputs.

Request flow (docs/design.md section 5): ``add_request`` (tokenize, validate) -> ``Scheduler.schedule``
-> ``ModelRunner.execute`` -> ``Scheduler.update_from_output`` -> detokenizer and stop strings ->
``RequestOutput``.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field, replace

import torch

from eeserve.config import EarlyExitConfig, EngineConfig, check_threshold
from eeserve.core.interfaces import ModelRunnerOutput, SchedulerOutput, StepStats
from eeserve.core.kv_manager import KVCacheManager, cdiv
from eeserve.core.scheduler import Scheduler
from eeserve.early_exit.defaults import check_exit_config
from eeserve.engine.detokenizer import IncrementalDetokenizer
from eeserve.errors import InvalidRequestError
from eeserve.inputs import PromptType, parse_prompt
from eeserve.model import kernels, loader
from eeserve.model.attention import SeqAttention, build_attention_metadata
from eeserve.model.kv_cache import KVCache, kv_bytes_per_block
from eeserve.model.llama import LlamaModel, ModelArgs
from eeserve.outputs import CompletionOutput, Logprob, RequestMetrics, RequestOutput
from eeserve.request import Request, RequestStatus
from eeserve.sampling_params import SamplingParams
from eeserve.worker.forward import teacher_forced
from eeserve.worker.model_runner import ModelRunner
from eeserve.worker.sampler import Sampler

DEFAULT_KV_CACHE_MEMORY = 1 << 30  # bytes, when neither num_kv_blocks nor kv_cache_memory is set

logger = logging.getLogger(__name__)
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class _Child:
    request: Request
    detok: IncrementalDetokenizer


@dataclass
class _Parent:
    """A user request: its prompt and its n child sequences."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    arrival_time: float
    children: list[_Child] = field(default_factory=list)

    @property
    def finished(self) -> bool:
        return all(c.request.is_finished for c in self.children)


@dataclass
class EngineStats:
    """Counters since start, for metrics.

    Attributes:
        num_prompt_tokens: prompt tokens of admitted requests.
        num_generation_tokens: output tokens made final (a draft once verified, ``verify_exits``).
        num_preemptions: preemptions.
        exits: exit layer -> generated tokens delivered that a head at that layer produced (L: full
            depth; a sequence's first token, made by the prompt's pass, counts at L); a replaced
            draft counts at L, rows discarded after it not at all. Sums to num_generation_tokens.
        step: FLOP accounting summed over steps (its ``exits`` stays empty: see ``exits``).
    """

    num_prompt_tokens: int = 0
    num_generation_tokens: int = 0
    num_preemptions: int = 0
    exits: dict[int, int] = field(default_factory=dict)
    step: StepStats = field(default_factory=StepStats)


class LLMEngine:
    """Owns the model, the KV cache, the scheduler and the per-request output state.

    Args:
        config: the engine configuration.

    Raises:
        ValueError / FileNotFoundError: for an unknown model or invalid settings.
    """

    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        mc = config.model
        self.device = torch.device(mc.device)
        self.model_files = loader.resolve_model(mc.model)
        self.hf_config = loader.load_config(self.model_files)
        self.args = ModelArgs.from_hf_config(self.hf_config)
        check_exit_config(config.early_exit, self.args.num_layers)  # before kernels are tuned and the weights load
        setup = kernels.setup_for_model(self.args.linear_shapes(), mc.dtype, self.device.type, mc.kernel_tuning,
                                        loader.default_cache_dir())
        self.kernel_report = setup.report  # the dtype chosen and why, for the start-up log
        logger.info("%s", setup.report)
        weight_dtype = _DTYPES[setup.weight_dtype]
        # on CPUs the residual stream, norms and KV cache stay fp32 (reduced precision only in the
        # products, with fp32 accumulation); elsewhere everything runs in the chosen dtype
        self.dtype = torch.float32 if self.device.type == "cpu" else weight_dtype
        self.tokenizer = loader.load_tokenizer(self.model_files)
        model_len = self.args.max_position_embeddings
        if mc.max_model_len is not None and mc.max_model_len > model_len:
            raise ValueError(
                f"max_model_len {mc.max_model_len} exceeds the model's context length {model_len}"
            )
        self.max_model_len = mc.max_model_len or model_len
        self.model = LlamaModel(self.args, self.hf_config, self.dtype, self.device, self.max_model_len, weight_dtype)
        self.model.load_hf_state_dict(loader.load_state_dict(self.model_files, self.dtype))
        self.model.eval()
        if setup.plan is not None:
            kernels.install(setup.plan)
            kernels.prepare(self.model.linear_weights(), setup.plan)
        if mc.quantization is not None:
            if self.device.type != "cpu":
                raise ValueError(f"quantization {mc.quantization!r} runs on CPUs only, not on device {mc.device!r}")
            kernels.quantize(self.model.linear_weights(), mc.quantization)
            self.kernel_report += f"; weight-only {mc.quantization} products"

        cc = config.cache
        per_block = kv_bytes_per_block(self.args.num_layers, cc.block_size, self.args.num_kv_heads, self.args.head_dim, self.dtype)
        if cc.num_kv_blocks is not None:
            num_blocks = cc.num_kv_blocks
        else:
            budget = cc.kv_cache_memory or DEFAULT_KV_CACHE_MEMORY
            wanted = config.scheduler.max_num_seqs * cdiv(self.max_model_len, cc.block_size)
            num_blocks = min(wanted, int(budget // per_block)) if cc.kv_cache_memory is None else int(budget // per_block)
            if num_blocks < 1:
                raise ValueError(
                    f"kv_cache_memory {budget} bytes is less than one KV block ({per_block} bytes)"
                )
        self.kv_cache = KVCache(
            self.args.num_layers, num_blocks, cc.block_size, self.args.num_kv_heads, self.args.head_dim,
            self.dtype, self.device, debug_nan_fill=cc.debug_nan_fill,
        )
        self.kv_manager = KVCacheManager(
            num_blocks, cc.block_size, on_free=self.kv_cache.poison_blocks if cc.debug_nan_fill else None
        )
        self.scheduler = Scheduler(config.scheduler, self.kv_manager, self.max_model_len)
        self.default_generator = torch.Generator(device=self.device)
        self.default_generator.manual_seed(mc.seed)
        self.runner = ModelRunner(self.model, self.kv_cache, Sampler(self.default_generator), self._build_exit_executor())
        self.eos_token_ids: tuple[int, ...] = loader.load_eos_token_ids(self.model_files, self.tokenizer)
        self.stats = EngineStats()
        self._parents: dict[str, _Parent] = {}
        self._child_to_parent: dict[str, str] = {}

    def _build_exit_executor(self):
        ee = self.config.early_exit
        if not ee.enabled:
            return None
        from eeserve.early_exit.executor import build_exit_executor

        return build_exit_executor(ee, self.model, self.kv_cache, self.kv_manager, self.model_files)

    def set_early_exit(self, early_exit: EarlyExitConfig) -> None:
        """Switch the early-exit configuration without reloading the model (benchmarks,
        calibration). Only allowed while no request is in flight.

        Raises:
            RuntimeError: requests are still running or waiting.
            ValueError: invalid settings for this model.
        """
        if self.has_unfinished_requests():
            raise RuntimeError("set_early_exit needs an idle engine: finish or abort the running requests first")
        old = self.config
        self.config = replace(old, early_exit=early_exit)
        try:
            self.runner.exit_executor = self._build_exit_executor()
        except Exception:
            self.config = old
            raise

    # ---- requests ----------------------------------------------------------------------------

    def tokenize(self, prompt: PromptType, add_special_tokens: bool = True) -> tuple[str | None, list[int]]:
        """Return (prompt text or None, token ids).

        Args:
            prompt: a string, a list of token ids, ``{"prompt": str}`` or ``{"prompt_token_ids": [...]}``.
            add_special_tokens: for a string, let the tokenizer add its BOS (if it has one).

        Raises:
            InvalidRequestError (a ValueError): a prompt of another form, not valid Unicode text,
                empty, or token ids outside the vocabulary.
        """
        p = parse_prompt(prompt)
        if isinstance(p, str):
            ids = self.tokenizer.encode(p, add_special_tokens=add_special_tokens)
            text: str | None = p
        else:
            ids, text = p, None
            bad = [t for t in ids if not 0 <= t < self.args.vocab_size]
            if bad:
                raise InvalidRequestError(
                    f"prompt token ids must be in [0, {self.args.vocab_size}), got {bad[:5]}", param="prompt")
        if not ids:
            raise InvalidRequestError("prompt is empty: give at least one token", param="prompt")
        return text, ids

    def check_params(self, params: SamplingParams, num_prompt_tokens: int) -> None:
        """What ``SamplingParams`` cannot check without the model: token ids against the vocabulary,
        the context length, the early-exit threshold against the confidence measure. The Python
        API and the server both call this (through ``add_request``).

        Raises:
            InvalidRequestError (a ValueError): naming the field.
        """
        V = self.args.vocab_size
        for name, t in params.token_ids_used():
            if t >= V:
                raise InvalidRequestError(f"SamplingParams.{name} must hold token ids in [0, {V}), got {t}", param=name)
        limit = self.max_model_len
        if num_prompt_tokens >= limit:
            raise InvalidRequestError(
                f"prompt is {num_prompt_tokens} tokens but the context length (max_model_len) is "
                f"{limit}; shorten the prompt to at most {limit - 1} tokens", param="prompt",
                code="context_length_exceeded")
        if params.max_tokens is not None and num_prompt_tokens + params.max_tokens > limit:
            raise InvalidRequestError(
                f"SamplingParams.max_tokens must be at most {limit - num_prompt_tokens} (the context length "
                f"{limit} minus the prompt's {num_prompt_tokens} tokens), got {params.max_tokens}; "
                "reduce the prompt or max_tokens, or give None for up to the context length",
                param="max_tokens", code="context_length_exceeded")
        ov = params.early_exit
        if ov is not None and ov.threshold is not None:
            try:
                check_threshold(self.config.early_exit.confidence, ov.threshold, "SamplingParams.early_exit.threshold")
            except ValueError as e:
                raise InvalidRequestError(str(e), param="early_exit.threshold") from None

    def add_request(
        self,
        request_id: str,
        prompt: PromptType,
        params: SamplingParams | None = None,
        arrival_time: float | None = None,
    ) -> None:
        """Tokenize, check and queue a request (n child sequences when ``params.n > 1``).

        Raises:
            ValueError: bad prompt or parameters (``InvalidRequestError``, naming the field), id
                in use, a prompt or ``max_tokens`` that does not fit the context.
        """
        params = SamplingParams() if params is None else params
        if not isinstance(params, SamplingParams):
            raise InvalidRequestError(f"sampling_params must be a SamplingParams, got {type(params).__name__}",
                                      param="sampling_params")
        if request_id in self._parents:
            raise ValueError(f"request_id {request_id!r} is already in use")
        text, ids = self.tokenize(prompt)
        self.check_params(params, len(ids))
        room = self.max_model_len - len(ids)
        max_tokens = room if params.max_tokens is None else min(params.max_tokens, room)
        now = arrival_time if arrival_time is not None else time.time()
        parent = _Parent(request_id, text, ids, params, now)
        for i in range(params.n):
            child_id = request_id if params.n == 1 else f"{request_id}#{i}"
            # Every sequence samples with a seed (worker/sampler.py: noise keyed by seed and output
            # index): the user's (plus the child's index, as vLLM), else one drawn from the engine's
            # generator. Its tokens then never depend on its batch mates or on verified drafts.
            seed = params.seed + i if params.seed is not None else self._draw_seed()
            req = Request(
                request_id=child_id, prompt_token_ids=list(ids), sampling_params=params, arrival_time=now,
                max_tokens=max_tokens, eos_token_ids=self.eos_token_ids, seed=seed,
            )
            self.scheduler.add_request(req)
            parent.children.append(_Child(req, IncrementalDetokenizer(self.tokenizer, params, ids)))
            self._child_to_parent[child_id] = request_id
        self._parents[request_id] = parent
        self.stats.num_prompt_tokens += len(ids) * params.n

    def _draw_seed(self) -> int:
        """A sampling seed for a request without one, from the engine's seeded generator."""
        return int(torch.randint(0, 2**62, (), generator=self.default_generator, device=self.device))

    def abort_request(self, request_ids: str | list[str]) -> None:
        """Abort requests (by user request id); their blocks are freed at once. Unknown ids are ignored."""
        if isinstance(request_ids, str):
            request_ids = [request_ids]
        for rid in request_ids:
            parent = self._parents.pop(rid, None)
            if parent is None:
                continue
            ids = [c.request.request_id for c in parent.children]
            self.scheduler.finish_requests(ids, RequestStatus.FINISHED_ABORTED)
            for cid in ids:
                self._child_to_parent.pop(cid, None)

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished_requests()

    def get_num_unfinished_requests(self) -> int:
        return len(self._parents)

    def unfinished_request_ids(self) -> list[str]:
        """User request ids still in flight."""
        return list(self._parents)

    # ---- stepping ---------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        """Run one iteration; return the outputs of requests that changed (finished ones last time).

        A request whose work makes the step fail (an exception in the model runner or the
        sampler, or in its detokenizer) finishes alone with ``finish_reason`` ``error`` and its
        ``error`` set; the rest of the step is run again in parts without it, and the other
        requests go on (``_execute``; only settings whose exits depend on the batch size,
        ``max_exit_batch`` and the ``batch`` policy, can see the smaller parts).
        """
        sched = self.scheduler.schedule()
        self.stats.num_preemptions += len(sched.preempted_request_ids)
        touched: dict[str, None] = dict.fromkeys(
            self._child_to_parent[c] for c in sched.finished_request_ids if c in self._child_to_parent
        )
        if not sched.is_empty:
            live = {s.request_id: self.scheduler.requests[s.request_id] for s in sched.scheduled}
            failed: dict[str, BaseException] = {}
            for part, result in self._execute(sched, live, failed):
                self._accumulate(result.stats)
                updated = self.scheduler.update_from_output(part, result)
                # decode rows dropped after a replaced draft (verify_exits) made no token: their
                # FLOPs stay spent, their full-depth cost is not a token's
                self.stats.step.decode_full_flops -= updated.num_rows_discarded * self.args.full_depth_flops()
                stopped: list[str] = []
                for req in updated:
                    pid = self._child_to_parent[req.request_id]
                    touched[pid] = None
                    child = self._child(pid, req.request_id)
                    try:
                        stop_str = self._detokenize(req, child)
                    except Exception as e:  # noqa: BLE001 - this request's text alone
                        failed[req.request_id] = e
                        continue
                    if stop_str is None:
                        continue
                    req.stop_reason = stop_str
                    if not req.is_finished:
                        stopped.append(req.request_id)
                    elif req.status == RequestStatus.FINISHED_LENGTH:
                        # the last allowed token completed the stop string: the match wins (vLLM)
                        req.status = RequestStatus.FINISHED_STOPPED
                if stopped:
                    self.scheduler.finish_requests(stopped, RequestStatus.FINISHED_STOPPED)
            for rid, err in failed.items():
                touched[self._child_to_parent[rid]] = None
                self._fail_request(rid, err)
        outputs = [self._make_output(self._parents[pid]) for pid in touched if pid in self._parents]
        for out in outputs:
            if out.finished:
                parent = self._parents.pop(out.request_id)
                for c in parent.children:
                    self._child_to_parent.pop(c.request.request_id, None)
        return outputs

    def _execute(self, sched: SchedulerOutput, live: dict[str, Request], failed: dict[str, BaseException]
                 ) -> list[tuple[SchedulerOutput, ModelRunnerOutput]]:
        """Run the step; if it raises, undo its pending-KV changes and run each half again, down
        to the single request that fails (which goes into ``failed``).

        Every sequence's work in a step is independent of the others' (attention is per sequence,
        sampling per row, noise keyed per request), so the parts together compute what the whole
        step would have; a failed attempt leaves only K/V slots that are written again.

        Returns:
            (the part of ``sched`` that ran, its result) pairs, in schedule order.
        """
        snapshot = self.kv_manager.snapshot_pending()
        try:
            return [(sched, self.runner.execute(sched, live))]
        except Exception as e:  # noqa: BLE001 - narrowed down below, raised to no caller
            self.kv_manager.restore_pending(snapshot)
            if len(sched.scheduled) == 1:
                failed[sched.scheduled[0].request_id] = e
                return []
            logger.warning("engine step failed (%r); running its %d requests again in halves", e, len(sched.scheduled))
        half = len(sched.scheduled) // 2
        return [pair for part in (sched.scheduled[:half], sched.scheduled[half:])
                for pair in self._execute(_subset(sched, part), live, failed)]

    def _fail_request(self, request_id: str, err: BaseException) -> None:
        """Finish one child with ``error``; its user request's other children are aborted."""
        logger.error("request %r failed: %r", request_id, err)
        parent = self._parents[self._child_to_parent[request_id]]
        req = self._child(parent.request_id, request_id).request
        req.error = f"{type(err).__name__}: {err}"
        if req.is_finished:  # it failed in its detokenizer, after its last token
            req.status = RequestStatus.FINISHED_ERROR
        else:
            self.scheduler.finish_requests([request_id], RequestStatus.FINISHED_ERROR)
        self.scheduler.finish_requests([c.request.request_id for c in parent.children], RequestStatus.FINISHED_ABORTED)

    def _detokenize(self, req: Request, child: _Child) -> str | None:
        """Feed the request's new final tokens to its detokenizer one at a time (a step can make
        several final at once under ``verify_exits``); count them. At a stop string the tokens
        after it are dropped, as a full-depth run would never have made them.

        Returns:
            the stop string that matched, or None.
        """
        start = len(child.detok.token_ids)
        new_ids = req.output_token_ids[start : req.num_confirmed_tokens]
        stop_terminated = req.status == RequestStatus.FINISHED_STOPPED
        stop_str = None
        for i, tid in enumerate(new_ids):
            stop_str = child.detok.update([tid], stop_terminated and i == len(new_ids) - 1)
            j = start + i
            self.stats.num_generation_tokens += 1
            # every delivered token, the first (from the prompt's full-depth pass) included, so
            # that the exit counters and num_generation_tokens count the same tokens
            e = req.exit_layers[j]
            self.stats.exits[e] = self.stats.exits.get(e, 0) + 1
            if stop_str is not None:
                req.truncate_outputs(j + 1)  # also when finished: tokens final with it come after it
                break
        return stop_str

    def _child(self, parent_id: str, child_id: str) -> _Child:
        for c in self._parents[parent_id].children:
            if c.request.request_id == child_id:
                return c
        raise KeyError(child_id)

    def _accumulate(self, s: StepStats) -> None:
        t = self.stats.step
        t.layer_flops += s.layer_flops
        t.head_flops += s.head_flops
        t.kv_fill_flops += s.kv_fill_flops
        t.decode_full_flops += s.decode_full_flops
        t.decode_flops += s.decode_flops

    def _make_output(self, parent: _Parent) -> RequestOutput:
        completions = []
        all_exits: list[int] = []
        spent = full = 0.0
        for i, c in enumerate(parent.children):
            req = c.request
            n = req.num_confirmed_tokens  # drafts (verify_exits) are shown once verified
            logprobs = None
            cum = None
            if parent.params.logprobs is not None:
                logprobs = [
                    {
                        **{tid: Logprob(lp, r + 1, self.tokenizer.decode([tid])) for r, (tid, lp) in enumerate(t.top)},
                        t.token_id: Logprob(t.logprob, t.rank, self.tokenizer.decode([t.token_id])),
                    }
                    for t in req.output_logprobs[:n]
                ]
                cum = float(sum(t.logprob for t in req.output_logprobs[:n]))
            completions.append(
                CompletionOutput(
                    index=i,
                    text=c.detok.get_next_output_text(req.is_finished, delta=False),
                    token_ids=req.output_token_ids[:n],
                    cumulative_logprob=cum,
                    logprobs=logprobs,
                    finish_reason=req.status.finish_reason,
                    stop_reason=req.stop_reason,
                    exit_layers=req.exit_layers[:n],
                    error=req.error,
                )
            )
            all_exits.extend(req.exit_layers[:n])
            spent += req.flops
            full += req.full_flops
        reqs = [c.request for c in parent.children]
        firsts = [r.first_token_time for r in reqs if r.first_token_time is not None]
        finished = parent.finished
        metrics = RequestMetrics(
            arrival_time=parent.arrival_time,
            first_token_time=min(firsts) if firsts else None,
            finished_time=max(r.finished_time or 0.0 for r in reqs) if finished else None,
            num_preemptions=sum(r.num_preemptions for r in reqs),
            mean_layers_per_token=(sum(all_exits) / len(all_exits)) if all_exits else None,
            flops_ratio=(spent / full) if full > 0 else None,
        )
        return RequestOutput(parent.request_id, parent.prompt, parent.prompt_token_ids, completions, finished, metrics)

    # ---- introspection ----------------------------------------------------------------------

    def full_depth_logits(self, token_ids: list[int]) -> torch.Tensor:
        """[n, V] float32 logits of every position of ``token_ids`` from all L layers and the final
        head (teacher forcing, ``worker.forward.teacher_forced``), computed in scratch blocks that
        the KV manager lends and takes back. Used for token agreement (docs/design.md section 2)
        and logprob checks.

        Raises:
            RuntimeError: not enough free KV blocks for ``len(token_ids)`` tokens right now.
        """
        n = len(token_ids)
        blocks = self.kv_manager.allocate_scratch(n)
        if blocks is None:
            raise RuntimeError(f"full_depth_logits needs {cdiv(n, self.kv_cache.block_size)} free KV blocks, "
                               f"{self.num_free_blocks} are free")
        try:
            device = self.model.device
            slots = torch.tensor(self.kv_cache.slots(blocks, 0, n), dtype=torch.long, device=device)
            rows = torch.arange(n, device=device)
            meta = build_attention_metadata([SeqAttention(rows, rows, slots)], n, slots, self.kv_cache.pad_slot)
            ids = torch.tensor(token_ids, dtype=torch.long, device=device)
            with torch.inference_mode():
                return self.model.compute_logits(teacher_forced(self.model, self.kv_cache, ids, meta, rows).final)
        finally:
            self.kv_manager.free_scratch(blocks)

    @property
    def num_free_blocks(self) -> int:
        return self.kv_manager.num_free_blocks

    @property
    def num_total_blocks(self) -> int:
        return self.kv_manager.num_blocks

    def check_integrity(self) -> None:
        """Raises AssertionError if the block accounting is inconsistent."""
        self.kv_manager.check_integrity()


def _subset(sched: SchedulerOutput, scheduled: tuple) -> SchedulerOutput:
    """The part of a step that runs ``scheduled`` (preemptions and finishes stay with the whole)."""
    return SchedulerOutput(scheduled=tuple(scheduled), num_batched_tokens=sum(s.num_new_tokens for s in scheduled))
